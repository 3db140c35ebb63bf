"""The triton backend against a real Triton Inference Server (PyTriton's bundled tritonserver on 127.0.0.1,
serving the exported U-Net through ONNX Runtime): the same findings as the local ONNX Runtime backend, a model
of other weights refused, a server stopped mid-study costing the job nothing, and the model repository that
`edgenode engine build --triton-repo` writes parsed and served."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from sqlalchemy import select

from db.models import AuditEvent, AuditEventType, Job, JobStatus, OutboundItem
from db.session import Database
from engines.onnx_export import OnnxModel, cached_onnx
from engines.ort_backend import OrtDenoiser
from engines.select import BackendUnavailable, plan_backend
from engines.select import select as select_backend
from engines.triton_backend import (
    MODEL_ID_PARAMETER,
    MODEL_SHA256_PARAMETER,
    TritonDenoiser,
    TritonEndpoint,
    TritonModelMismatch,
    TritonUnavailable,
    probe,
)
from engines.triton_repo import parse_config
from inference.pipeline import PipelineSettings, run_pipeline
from inference.unet import ModelInfo
from node.config import ConfigError, load_settings
from node.inference_server import TritonMonitor
from node.metrics import build_registry
from node.web.health import check_health
from node.worker import JobRunner
from tests.conftest import edgenode_cmd, node_env
from tests.dicomgen import make_ct_series, write_datasets
from tests.engine_models import random_batch, saved_unet
from tests.ports import free_port
from tests.test_scp_tls import make_pki
from tests.test_worker import received_study
from tests.triton_support import (
    TritonProcess,
    bundled_backends,
    pytriton_python,
    pytriton_server,
    raw_tritonserver,
)

MODEL_NAME = "edgenode-unet"


def identity(info: ModelInfo) -> dict[str, str]:
    return {MODEL_SHA256_PARAMETER: info.sha256, MODEL_ID_PARAMETER: info.model_id}


@dataclass
class Served:
    server: TritonProcess
    info: ModelInfo
    onnx: OnnxModel

    def endpoint(self, **kwargs: object) -> TritonEndpoint:
        return TritonEndpoint(url=self.server.url, model_name=MODEL_NAME, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def python() -> Path:
    return pytriton_python()


@pytest.fixture(scope="module")
def served(python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module, serving a random-weight tiny U-Net."""
    work = tmp_path_factory.mktemp("triton")
    model, info, _ = saved_unet(work / "weights", seed=3)
    onnx = cached_onnx(model, info, work / "engines", exporter="torchscript")
    server = pytriton_server(python, onnx.path, MODEL_NAME, identity(info), work / "server.log")
    server.start()
    yield Served(server, info, onnx)
    server.stop()


@pytest.mark.slow  # starts a Triton server
def test_pipeline_through_triton_gives_the_local_onnxruntime_findings(served: Served, tmp_path: Path) -> None:
    files = write_datasets(make_ct_series(4, 48, 48, seed=7), tmp_path / "ct")
    settings = PipelineSettings(
        t_start={"CT": 200}, steps=3, ensemble=3, threshold_lambda={"CT": 2.0}, min_component_size=2, seed=11,
        segment_polarity={"CT": "both"},  # an untrained model's errors have no sign to keep to
    )  # fmt: skip
    local = run_pipeline(files, OrtDenoiser(served.onnx, max_batch=8), served.info, settings)
    # micro-batches of 3 from 8-image calls: three requests in flight per call, for the dynamic batcher to merge
    remote_denoiser = TritonDenoiser(served.endpoint(in_flight=3, micro_batch=3), served.info, max_batch=8)
    remote = run_pipeline(files, remote_denoiser, served.info, settings)
    assert local.segmentation.any() and not local.segmentation.all()  # a real decision to agree on
    assert remote.model_id == local.model_id and remote.settings["engine"] == "triton"
    assert np.array_equal(remote.segmentation, local.segmentation)
    assert np.array_equal(remote.anatomy_mask, local.anatomy_mask)
    np.testing.assert_allclose(remote.slice_scores, local.slice_scores, rtol=0, atol=1e-5)
    assert abs(remote.study_score - local.study_score) <= 1e-5
    assert remote.anomalous_volume_mm3 == local.anomalous_volume_mm3


@pytest.mark.slow  # starts a Triton server
def test_a_served_model_of_other_weights_is_refused(served: Served, tmp_path: Path) -> None:
    other_model, other, _ = saved_unet(tmp_path, seed=4)
    with pytest.raises(TritonModelMismatch, match=f"this node runs {other.model_id}") as refused:
        TritonDenoiser(served.endpoint(), other, max_batch=8)
    assert served.info.model_id in str(refused.value)
    with pytest.raises(TritonModelMismatch):  # what a worker does at start: it exits instead of taking jobs
        select_backend((other_model, other), backend="triton", max_batch=8, triton=served.endpoint())
    x, c, t = random_batch(2, other.config.image_size)
    lazy = TritonDenoiser(served.endpoint(), other, max_batch=8, verify=False)
    with pytest.raises(TritonModelMismatch):  # checked before the first call too
        lazy(x, c, t)
    state = probe(served.endpoint(), other)
    assert state.state == "mismatch" and not state.ok
    assert probe(served.endpoint(), served.info).ok


def _stop_on_call(denoiser: TritonDenoiser, server: TritonProcess, call: int) -> TritonDenoiser:
    """Stop the real server just before the denoiser's `call`-th U-Net call: mid-study, at a known point."""
    inner, calls = denoiser.__call__, [0]

    class Stopping:
        def __getattr__(self, name: str) -> object:
            return getattr(denoiser, name)

        def __call__(self, *args: object) -> object:
            calls[0] += 1
            if calls[0] == call:
                server.stop()
            return inner(*args)  # type: ignore[arg-type]

    return Stopping()  # type: ignore[return-value]


@pytest.mark.slow  # starts a Triton server
def test_triton_stopped_mid_study_defers_the_job_until_it_is_back(python: Path, tmp_path: Path) -> None:
    settings, db = received_study(tmp_path, make_ct_series(3, 48, 48, seed=5))
    weights = Path(settings.inference.model_for("CT"))
    settings.inference.model = {"CT": str(weights), "CR": str(weights), "DX": str(weights)}  # triton: one model
    settings.inference.backend = "triton"
    settings.inference.steps = 4
    settings.jobs.retry_backoff_seconds = 0.2
    runner = JobRunner(settings, "worker-1-0.1")
    from engines.select import load_source

    model, info = load_source(weights)
    onnx = cached_onnx(model, info, tmp_path / "served", exporter="torchscript")
    server = pytriton_server(python, onnx.path, MODEL_NAME, identity(info), tmp_path / "server.log")
    server.start()
    try:
        settings.triton.url = server.url
        served = runner.model.for_modality("CT")  # loads it
        assert served is not None
        stopping = replace(served, denoiser=_stop_on_call(served.denoiser, server, call=2))
        runner.model.models._loaded[served.source] = stopping  # the CT series is analysed with it
        monitor = TritonMonitor(settings)
        assert check_health(settings, db, triton=monitor).as_dict()["inference_server"] == "ok"

        assert runner.run_once()
        with db.session() as s:
            job = s.scalars(select(Job)).one()
            assert job.status == JobStatus.QUEUED and job.attempts == 0  # the outage used no attempt
            assert "UNAVAILABLE" in job.error
            retries = s.scalars(select(AuditEvent).where(AuditEvent.event_type == str(AuditEventType.JOB_RETRY))).all()
            assert any("deferred" in r.detail for r in retries)
            assert s.scalars(select(OutboundItem)).all() == []
        health = check_health(settings, db, triton=monitor)
        assert not health.ok and health.as_dict(detail=False)["inference_server"] == "unreachable"
        scraped = generate_latest(build_registry(settings, db, monitor)).decode()
        assert "edgenode_inference_server_up 0.0" in scraped
        assert 'edgenode_inference_server_state{state="unreachable"} 1.0' in scraped

        server.start()  # back, on the same port
        time.sleep(0.3)  # the job's backoff
        assert runner.run_once()
        with db.session() as s:
            job = s.scalars(select(Job)).one()
            assert job.status == JobStatus.DONE and job.attempts == 1, job.error
            assert len(s.scalars(select(OutboundItem)).all()) > 0
        assert check_health(settings, db, triton=monitor).ok
        assert "edgenode_inference_server_up 1.0" in generate_latest(build_registry(settings, db, monitor)).decode()
    finally:
        server.stop()


@pytest.mark.slow  # starts a Triton server
def test_a_job_meeting_another_model_waits_without_using_an_attempt(served: Served, tmp_path: Path) -> None:
    settings, db = received_study(tmp_path, make_ct_series(2, 48, 48, seed=6))  # weights other than the served
    ct_weights = settings.inference.model_for("CT")
    settings.inference.model = {"CT": ct_weights, "CR": ct_weights, "DX": ct_weights}  # triton: one model
    settings.inference.backend = "triton"
    settings.triton.url = served.server.url
    runner = JobRunner(settings, "worker-1-0.1")
    assert runner.run_once()
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobStatus.QUEUED and job.attempts == 0
        assert job.error.startswith("TritonModelMismatch: ") and "refusing to mix results" in job.error
        assert s.scalars(select(OutboundItem)).all() == []


def test_a_server_that_never_answers_in_time_is_unavailable_not_an_error(tmp_path: Path) -> None:
    _, info, _ = saved_unet(tmp_path)
    # A listening socket that never speaks gRPC: the deadline passes, as with an overloaded server.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = TritonEndpoint(
            url=f"127.0.0.1:{silent.getsockname()[1]}", model_name=MODEL_NAME, timeout_seconds=0.5
        )
        with pytest.raises(TritonUnavailable):
            TritonDenoiser(endpoint, info, max_batch=4)
        assert probe(endpoint, info).state == "unreachable"


@pytest.mark.slow  # starts a Triton server
def test_generated_repository_parses_and_is_served(python: Path, tmp_path: Path) -> None:
    _, info, weights = saved_unet(tmp_path, seed=3)
    repo = tmp_path / "repo"
    env = node_env(EDGENODE_NODE__DATA_DIR=str(tmp_path / "var"), EDGENODE_INFERENCE__MAX_BATCH="8")
    built = subprocess.run(
        edgenode_cmd(
            "engine", "build", "--model", str(weights), "--exporter", "torchscript",
            "--triton-repo", str(repo), "--triton-kind", "cpu", "--triton-instances", "2",
        ),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "[4/4] writing the Triton model repository" in built.stdout
    model_dir = repo / MODEL_NAME
    assert (model_dir / "1" / "model.onnx").is_file()
    assert not (repo / f"{MODEL_NAME}-tensorrt").exists()  # no TensorRT on this machine
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 2  # KIND_CPU
    assert config.parameters[MODEL_SHA256_PARAMETER].string_value == info.sha256
    assert [i.name for i in config.input] == ["x_t", "cond", "t"] and list(config.input[2].dims) == [1]

    # Served as written by the bundled tritonserver. Its wheel carries only the python backend, so unless it
    # has onnxruntime's, the config's platform is swapped for a python model.py running the same model.onnx.
    if "onnxruntime" not in bundled_backends(python):
        text = (model_dir / "config.pbtxt").read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        (model_dir / "config.pbtxt").write_text(text)
        shutil.copy(Path(__file__).parent / "triton_python_model.py", model_dir / "1" / "model.py")
    server = raw_tritonserver(python, repo, tmp_path / "server", tmp_path / "tritonserver.log")
    server.start(ready="Started GRPCInferenceService")
    try:
        remote = TritonDenoiser(TritonEndpoint(url=server.url, model_name=MODEL_NAME), info, max_batch=8)
        assert remote.served is not None and remote.served.max_batch_size == 8
        onnx = OnnxModel(
            path=model_dir / "1" / "model.onnx", sha256="", model_id=info.model_id, exporter="torchscript",
            opset=17, dynamic_spatial=False, image_size=info.config.image_size,
        )  # fmt: skip
        x, c, t = random_batch(8, info.config.image_size)
        np.testing.assert_array_equal(remote(x, c, t).numpy(), OrtDenoiser(onnx, max_batch=8)(x, c, t).numpy())
    finally:
        server.stop()


@pytest.mark.slow  # starts a Triton server
def test_mutual_tls_with_the_sites_ca(python: Path, served: Served, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = (pki["server.pem"], pki["server.key"], pki["ca.pem"])
    server = pytriton_server(python, served.onnx.path, MODEL_NAME, identity(served.info), tmp_path / "log", tls=tls)
    server.start()
    try:
        base = TritonEndpoint(url=server.url, model_name=MODEL_NAME, timeout_seconds=5, tls=True, root_ca=pki["ca.pem"])
        mutual = replace(base, client_cert=pki["client.pem"], client_key=pki["client.key"])
        x, c, t = random_batch(4, served.info.config.image_size)
        got = TritonDenoiser(mutual, served.info, max_batch=4)(x, c, t)
        np.testing.assert_array_equal(got.numpy(), OrtDenoiser(served.onnx, max_batch=4)(x, c, t).numpy())
        for refused in (base, replace(base, tls=False, root_ca=None)):  # no client certificate; no TLS at all
            with pytest.raises(TritonUnavailable):
                TritonDenoiser(refused, served.info, max_batch=4)
    finally:
        server.stop()


def test_triton_settings_are_checked_and_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"triton\.url: .*not host:port"):
        load_settings(None, triton={"url": "grpc://pool:8001"})
    with pytest.raises(ConfigError, match="client_cert and client_key must be set together"):
        load_settings(None, triton={"tls": True, "client_cert": str(tmp_path / "c.pem")})
    settings = load_settings(None, inference={"backend": "triton"}, triton={"url": "pool.example:8001"})
    assert settings.triton.model_name == MODEL_NAME
    with pytest.raises(BackendUnavailable, match="served model decides its precision"):
        plan_backend(backend="triton", precision="fp16")


def test_healthz_and_metrics_report_an_unreachable_server(tmp_path: Path) -> None:
    """The node's web app asks the server on every health check and scrape, and never fails for it."""
    from fastapi.testclient import TestClient

    from node.web.app import create_app

    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path)},
        inference={"backend": "triton", "model": str(saved_unet(tmp_path)[2])},
        triton={"url": f"127.0.0.1:{free_port()}", "timeout_seconds": 1},  # nothing listens there
    )
    client = TestClient(create_app(settings, Database(settings.database_url), token="t0ken"))
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["inference_server"] == "unreachable"
    assert "inference_server_detail" not in health.json()  # error texts only behind the token
    scraped = client.get("/metrics", headers={"Authorization": "Bearer t0ken"}).text
    assert "edgenode_inference_server_up 0.0" in scraped
    assert 'edgenode_inference_server_state{state="unreachable"} 1.0' in scraped
