"""Settings: TOML file, EDGENODE_<SECTION>__<KEY> overrides, and errors that name the bad key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from node.config import AUTO_LISTENERS_MAX, SCHEDULE_T, ConfigError, Priority, load_settings
from tests.conftest import edgenode_cmd, node_env

TOML = """
[node]
ae_title = "EDGE1"
port = 11113
data_dir = "{data}"
min_free_disk_mb = 50

[[peers]]
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[stability]
stable_seconds = 10
max_wait_seconds = 100

[[routing]]
name = "er"
modalities = ["ct"]
priority = "stat"
destination = "PACS"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "edgenode.toml"
    path.write_text(TOML.format(data=tmp_path / "var"))
    return path


def test_defaults_match_the_operator_contract() -> None:
    s = load_settings(None)
    assert (s.node.ae_title, s.node.host, s.node.port) == ("EDGENODE", "0.0.0.0", 11112)
    assert (s.stability.stable_seconds, s.stability.max_wait_seconds, s.stability.scan_interval_seconds) == (30, 900, 1)
    assert s.peers == []  # default deny
    assert s.routing[0].modalities == ["CT", "CR", "DX"]
    assert (s.web.host, s.web.port, s.inference.ensemble) == ("127.0.0.1", 8080, 7)


def test_toml_then_environment_override(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(config)
    assert (s.node.ae_title, s.node.port, s.node.min_free_disk_mb) == ("EDGE1", 11113, 50)
    assert s.peer("PACS") is not None and s.peer("PACS").port == 4242
    assert (s.routing[0].modalities, s.routing[0].priority) == (["CT"], Priority.STAT)
    monkeypatch.setenv("EDGENODE_NODE__PORT", "10104")
    monkeypatch.setenv("EDGENODE_STABILITY__STABLE_SECONDS", "2.5")
    monkeypatch.setenv("EDGENODE_NODE__SHUTDOWN_GRACE_SECONDS", "3")
    s = load_settings(config)
    assert (s.node.port, s.stability.stable_seconds, s.node.ae_title) == (10104, 2.5, "EDGE1")
    assert s.node.shutdown_grace_seconds == 3
    assert s.database_url == f"sqlite:///{config.parent / 'var' / 'edgenode.db'}"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node]\nae_titel = 'X'\n")
    with pytest.raises(ConfigError, match=r"node\.ae_titel: unknown key"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "node.ae_title"),
        ("[stability]\nstable_seconds = 60\nmax_wait_seconds = 30\n", "max_wait_seconds"),
        ("[[routing]]\nseries_description = '(['\n", "routing.0.series_description"),
        ("[[routing]]\ndestination = 'NOWHERE'\n", "NOWHERE"),
        ("[node]\ntls_cert = '/x.pem'\n", "tls_key"),
        ("[inference]\nmin_ct_slices = 0\n", "inference.min_ct_slices"),
        ("[node]\npending_timeout_seconds = 0\n", "node.pending_timeout_seconds"),
        ("[node]\nmax_pending_per_address = 0\n", "node.max_pending_per_address"),
        ("[node]\nrefusal_audit_interval_seconds = -1\n", "node.refusal_audit_interval_seconds"),
        ("[node]\nlisteners = -2\n", "node.listeners"),
        ("[node]\nlisteners = 'many'\n", "node.listeners"),
    ],
)
def test_invalid_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        load_settings(path)


def test_listener_processes_auto_or_a_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert load_settings(None).node.listeners == "auto"
    assert load_settings(None).node.listener_count() == min(cores, AUTO_LISTENERS_MAX)
    path = tmp_path / "listeners.toml"
    for text, count in [("0", min(cores, AUTO_LISTENERS_MAX)), ('"auto"', min(cores, AUTO_LISTENERS_MAX)), ("3", 3)]:
        path.write_text(f"[node]\nlisteners = {text}\n")
        assert load_settings(path).node.listener_count() == count
    monkeypatch.setenv("EDGENODE_NODE__LISTENERS", "1")
    assert load_settings(path).node.listener_count() == 1


def test_config_check_cli_exit_codes(config: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        edgenode_cmd("config", "check", "--config", str(config)),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[stability]\nstable_secs = 3\n")
    failed = subprocess.run(
        edgenode_cmd("config", "check", "--config", str(bad)),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "stability.stable_secs" in failed.stderr
    env_bad = subprocess.run(
        edgenode_cmd("config", "check", "--config", str(config)),
        env=node_env(EDGENODE_NODE__PORT="not-a-port"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert env_bad.returncode == 2
    assert "node.port" in env_bad.stderr and "EDGENODE_NODE__PORT" in env_bad.stderr


def test_inference_defaults_are_the_pipelines_defaults() -> None:
    """The evaluation, benchmarks/pipeline.py and the model card use PipelineSettings(); the node its config."""
    from inference.pipeline import PipelineSettings
    from node.model_loader import pipeline_settings

    s = load_settings(None)
    assert pipeline_settings(s.inference, s.inference.max_batch) == PipelineSettings(max_batch=s.inference.max_batch)
    assert PipelineSettings().schedule_T == SCHEDULE_T  # the bound [inference] t_start is validated against


def test_a_partial_per_modality_table_keeps_the_other_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edgenode.toml"
    path.write_text("[inference]\nthreshold_lambda = { cr = 4.5 }\nt_start = { DX = 200 }\n")
    s = load_settings(path)
    assert s.inference.threshold_lambda == {"CT": 8.0, "CR": 4.5, "DX": 3.0}  # CT keeps 8, not the fallback 3
    assert s.inference.t_start == {"CT": 250, "CR": 25, "DX": 200}
    monkeypatch.setenv("EDGENODE_INFERENCE__T_START__CT", "100")  # arrives as {"ct": "100"}
    assert load_settings(path).inference.t_start == {"CT": 100, "CR": 25, "DX": 200}  # merged with the file
    path.write_text('[inference]\nsegment_polarity = { CT = "both" }\n')
    assert load_settings(path).inference.segment_polarity == {"CT": "both", "CR": "both", "DX": "both"}
    path.write_text('[inference]\nsegment_polarity = { CR = "darker" }\n')
    with pytest.raises(ConfigError, match="segment_polarity"):
        load_settings(path)
    path.write_text("[inference]\nthreshold_lambda = { MR = 2 }\n")
    with pytest.raises(ConfigError, match="inference.threshold_lambda: unknown modality 'MR'"):
        load_settings(path)
    path.write_text("[inference]\nt_start = { CR = 1000 }\n")  # (CT is overridden from the environment above)
    with pytest.raises(ConfigError, match="t_start must be 0..999"):
        load_settings(path)


def test_a_mixed_depth_ensemble_is_configured_per_modality_between_t_start_and_t(tmp_path: Path) -> None:
    from node.model_loader import pipeline_settings

    path = tmp_path / "edgenode.toml"
    assert load_settings(None).inference.deep_t_start == {}  # one depth unless asked
    path.write_text("[inference]\ndeep_t_start = { ct = 550 }\n")
    s = load_settings(path)
    assert s.inference.deep_t_start == {"CT": 550}
    assert pipeline_settings(s.inference, 4).deeper_timesteps("CT")[0][0] == 550
    path.write_text("[inference]\ndeep_t_start = { CT = 200 }\n")  # not deeper than CT's t_start 250
    with pytest.raises(ConfigError, match="deep_t_start .'CT': 200.: each must lie above"):
        load_settings(path)
    path.write_text("[inference]\nensemble = 1\ndeep_t_start = { CT = 550 }\n")  # nothing to alternate
    with pytest.raises(ConfigError, match="needs ensemble >= 2"):
        load_settings(path)
    path.write_text("[inference]\ndeep_t_start = { MR = 550 }\n")
    with pytest.raises(ConfigError, match="unknown modality 'MR'"):
        load_settings(path)


def test_the_model_is_a_per_modality_table_or_one_string_for_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.config import Settings, settings_to_toml

    assert Settings().inference.model == {"CT": "bundled", "CR": "bundled", "DX": "bundled"}
    path = tmp_path / "edgenode.toml"
    path.write_text('[inference]\nmodel = "/models/site-ct.safetensors"\n')  # a plain string: every modality
    assert load_settings(path).inference.model == dict.fromkeys(("CT", "CR", "DX"), "/models/site-ct.safetensors")
    path.write_text('[inference]\nmodel = { cr = "/models/rx.safetensors", DX = "/models/rx.safetensors" }\n')
    s = load_settings(path)
    assert s.inference.model == {"CT": "bundled", "CR": "/models/rx.safetensors", "DX": "/models/rx.safetensors"}
    assert s.inference.model_for("CR") == "/models/rx.safetensors" and s.inference.model_for("ct") == "bundled"
    assert load_settings(path).model_dump() == Settings.model_validate(s.model_dump()).model_dump()  # worker copy
    assert 'model = { CT = "bundled", CR = "/models/rx.safetensors"' in settings_to_toml(s)
    monkeypatch.setenv("EDGENODE_INFERENCE__MODEL__CT", "/models/ct2.safetensors")
    assert load_settings(path).inference.model["CT"] == "/models/ct2.safetensors"  # merged with the file
    monkeypatch.delenv("EDGENODE_INFERENCE__MODEL__CT")
    monkeypatch.setenv("EDGENODE_INFERENCE__MODEL", "/models/all.safetensors")  # one variable, a plain path
    assert load_settings().inference.model == dict.fromkeys(("CT", "CR", "DX"), "/models/all.safetensors")
    monkeypatch.setenv("EDGENODE_INFERENCE__MODEL", '{"dx": "/models/rx.safetensors"}')  # or a JSON table
    assert load_settings().inference.model == {"CT": "bundled", "CR": "bundled", "DX": "/models/rx.safetensors"}
    monkeypatch.delenv("EDGENODE_INFERENCE__MODEL")
    path.write_text('[inference]\nmodel = { MR = "/models/mr.safetensors" }\n')
    with pytest.raises(ConfigError, match="inference.model: unknown modality 'MR'"):
        load_settings(path)
    path.write_text('[inference]\nmodel = { CR = "" }\n')
    with pytest.raises(ConfigError, match="inference.model: no model given for CR"):
        load_settings(path)
    path.write_text('[inference]\nbackend = "triton"\nmodel = { CR = "/models/rx.safetensors" }\n')
    with pytest.raises(ConfigError, match="inference: .*triton backend serves one model"):
        load_settings(path)


def test_the_database_password_is_never_printed(tmp_path: Path) -> None:
    url = "postgresql+psycopg://edgenode:S3cretPw@db.internal/edge"
    env = node_env(EDGENODE_DATABASE__URL=url, EDGENODE_NODE__DATA_DIR=str(tmp_path))
    for action in ("check", "show"):  # systemd runs `config check` before every start: its output is in the journal
        done = subprocess.run(edgenode_cmd("config", action), env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "S3cretPw" not in done.stdout + done.stderr and "db.internal" in done.stdout


def test_max_batch_unset_follows_the_device_the_unet_runs_on(tmp_path: Path) -> None:
    """28 on a CPU, 560 on a GPU (benchmarks/RESULTS.md); a set value everywhere; the CPU's to a Triton server, whose
    repository may have been written for it."""
    import torch

    from node.config import MAX_BATCH_DEFAULTS
    from node.model_loader import effective_max_batch

    def inference(**values: object):  # type: ignore[no-untyped-def]
        return load_settings(None, node={"data_dir": str(tmp_path)}, inference=values).inference

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert (MAX_BATCH_DEFAULTS["cpu"], MAX_BATCH_DEFAULTS["cuda"]) == (28, 560)
    assert effective_max_batch(inference()) == MAX_BATCH_DEFAULTS[here]
    assert effective_max_batch(inference(device="cpu")) == 28
    assert effective_max_batch(inference(device="cuda")) == 560  # planned, or taken as asked where there is no GPU
    assert effective_max_batch(inference(device="cpu", max_batch=7)) == 7
    assert effective_max_batch(inference(device="cuda", max_batch=7)) == 7
    assert effective_max_batch(inference(backend="triton", device="cuda")) == 28
    with pytest.raises(ConfigError, match="max_batch"):
        inference(max_batch=0)
