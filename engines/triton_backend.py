"""The U-Net served by a Triton Inference Server (a GPU pool shared by several nodes), called over gRPC.

The node keeps loading, masks, noise, the sampler and post-processing; only the U-Net calls travel. A call
is cut into micro-batches sent as concurrent requests, so Triton's dynamic batcher can merge them with the
requests of other workers and nodes into full GPU batches. The served model's configuration carries the
hash of the weights it was exported from (parameter `edgenode_model_sha256`, written by
`edgenode engine build --triton-repo`): a node refuses a model whose hash is not its own, so it never mixes
results from another model into its findings. A server that cannot be reached, times out or has the model
unloaded raises `TritonUnavailable`, which the worker treats as "retry the job later", never as a failure.

`tritonclient` is an optional dependency (`pip install edgenode[triton]`), imported only when used.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from engines.base import batch_slices, check_inputs
from engines.onnx_export import INPUT_NAMES, OUTPUT_NAME
from inference.unet import ModelInfo

if TYPE_CHECKING:
    from tritonclient.grpc import InferenceServerClient

log = logging.getLogger(__name__)

MODEL_SHA256_PARAMETER = "edgenode_model_sha256"  # the weights file's SHA-256 (ModelInfo.sha256)
MODEL_ID_PARAMETER = "edgenode_model_id"  # for people reading the config; the hash is what is checked
# gRPC codes that mean "not now" rather than "never": the server is down, restarting, overloaded or slow,
# or the model is (re)loading. Anything else (a malformed request, a wrong shape) is a real error.
RETRYABLE_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED", "UNKNOWN", "NOT_FOUND"}
)
DEFAULT_IN_FLIGHT = 4


class TritonUnavailable(RuntimeError):
    """The Triton server or its model cannot serve now (down, slow, loading): retry the job later."""


class TritonModelNotReady(TritonUnavailable):
    """The server answers but does not serve the model now (not loaded, loading, unloaded)."""


class TritonModelMismatch(RuntimeError):
    """The served model is not the node's model (another hash, no hash, or another interface)."""


def tritonclient_version() -> str | None:
    """Installed tritonclient version, or None when `tritonclient[grpc]` is not importable."""
    try:
        import importlib.metadata

        import tritonclient.grpc  # noqa: F401
    except ImportError:
        return None
    return importlib.metadata.version("tritonclient")


@dataclass(frozen=True)
class TritonEndpoint:
    """Where the model is served and how to reach it (from `[triton]` in the node's settings)."""

    url: str  # host:port of Triton's gRPC endpoint
    model_name: str
    model_version: str = ""  # "" = the version Triton serves as latest
    timeout_seconds: float = 30.0  # per request; a slower answer counts as "unavailable"
    in_flight: int = DEFAULT_IN_FLIGHT  # concurrent requests per denoiser call
    micro_batch: int = 0  # images per request; 0: each call split evenly over in_flight requests
    tls: bool = False
    root_ca: Path | None = None  # PEM CA bundle for the server's certificate (None: the system's roots)
    client_cert: Path | None = None  # PEM client certificate + key for mutual TLS
    client_key: Path | None = None

    def client(self) -> InferenceServerClient:
        """A new gRPC client (thread-safe; one per denoiser or probe)."""
        import tritonclient.grpc as grpcclient

        def read(path: Path | None) -> str | None:
            return None if path is None else str(path)

        return grpcclient.InferenceServerClient(
            url=self.url,
            ssl=self.tls,
            root_certificates=read(self.root_ca),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def describe(self) -> str:
        version = self.model_version or "latest"
        return f"{self.model_name} (version {version}) at {'grpcs' if self.tls else 'grpc'}://{self.url}"


def _code(exc: Exception) -> str:
    """The gRPC status code of a tritonclient error, e.g. 'UNAVAILABLE' ('' when it has none)."""
    status = getattr(exc, "status", None)
    text = str(status() if callable(status) else status or "")
    return text.removeprefix("StatusCode.")


def translate_error(exc: Exception, endpoint: TritonEndpoint, what: str) -> Exception:
    """A tritonclient exception as TritonUnavailable (retry later) or RuntimeError (a real error)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        code = _code(exc)
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        if code in RETRYABLE_CODES or not code:
            return TritonUnavailable(
                f"Triton {endpoint.describe()} unavailable during {what}: {code or 'error'}: {message}"
            )
        return RuntimeError(f"Triton {endpoint.describe()} refused {what}: {code}: {message}")
    return exc


@dataclass(frozen=True)
class ServedModel:
    """What the server says about the model: enough to check it is the node's and how to call it."""

    name: str
    version: str
    platform: str
    max_batch_size: int
    inputs: dict[str, list[int]]  # name -> dims (without the batch axis when max_batch_size > 0)
    outputs: dict[str, list[int]]
    parameters: dict[str, str] = field(default_factory=dict)


def served_model(client: InferenceServerClient, endpoint: TritonEndpoint) -> ServedModel:
    """Read the model's configuration from the server; TritonUnavailable when it cannot answer or is not ready."""
    try:
        if not client.is_server_live(client_timeout=endpoint.timeout_seconds):
            raise TritonUnavailable(f"Triton {endpoint.describe()} is not live")
        if not client.is_model_ready(
            endpoint.model_name, endpoint.model_version, client_timeout=endpoint.timeout_seconds
        ):
            raise TritonModelNotReady(f"Triton {endpoint.describe()}: the model is not ready (not loaded, or loading)")
        config = client.get_model_config(
            endpoint.model_name, endpoint.model_version, as_json=True, client_timeout=endpoint.timeout_seconds
        )["config"]
        metadata = client.get_model_metadata(
            endpoint.model_name, endpoint.model_version, as_json=True, client_timeout=endpoint.timeout_seconds
        )
    except TritonUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - tritonclient raises InferenceServerException for everything
        raise translate_error(exc, endpoint, "the model query") from exc
    versions = metadata.get("versions") or [endpoint.model_version or "?"]
    return ServedModel(
        name=config.get("name", endpoint.model_name),
        version=endpoint.model_version or str(versions[-1]),
        platform=config.get("platform") or config.get("backend", ""),
        max_batch_size=int(config.get("max_batch_size", 0)),
        inputs={i["name"]: [int(d) for d in i.get("dims", [])] for i in config.get("input", [])},
        outputs={o["name"]: [int(d) for d in o.get("dims", [])] for o in config.get("output", [])},
        parameters={k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()},
    )


def check_served_model(served: ServedModel, info: ModelInfo) -> None:
    """Refuse a served model that is not `info`'s weights, or does not take the U-Net's inputs."""
    where = f"Triton model {served.name!r} version {served.version}"
    served_hash = served.parameters.get(MODEL_SHA256_PARAMETER, "")
    if not served_hash:
        raise TritonModelMismatch(
            f"{where} carries no {MODEL_SHA256_PARAMETER} parameter, so it cannot be shown to be this node's model "
            f"{info.model_id}; serve a repository written by `edgenode engine build --triton-repo`"
        )
    if served_hash != info.sha256:
        served_id = served.parameters.get(MODEL_ID_PARAMETER, "?")
        raise TritonModelMismatch(
            f"{where} is model {served_id} (weights sha256 {served_hash[:16]}...), but this node runs "
            f"{info.model_id} (sha256 {info.sha256[:16]}...): refusing to mix results of another model; "
            "deploy this node's repository to Triton or point [triton] model_name at it"
        )
    names = set(served.inputs), set(served.outputs)
    if names != (set(INPUT_NAMES), {OUTPUT_NAME}):
        raise TritonModelMismatch(
            f"{where} has inputs {sorted(names[0])} and outputs {sorted(names[1])}, expected "
            f"{list(INPUT_NAMES)} and [{OUTPUT_NAME!r}]"
        )
    size = info.config.image_size
    image_dims = served.inputs["x_t"][-2:]
    if all(d > 0 for d in image_dims) and image_dims != [size, size]:
        raise TritonModelMismatch(f"{where} takes {image_dims} images, the model's grid is {size} x {size}")


TritonHealth = Literal["ok", "unreachable", "not ready", "mismatch", "not configured"]


@dataclass(frozen=True)
class TritonState:
    """The server as /healthz and /metrics report it."""

    state: TritonHealth
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def probe(endpoint: TritonEndpoint, info: ModelInfo | None) -> TritonState:
    """Ask the server whether it serves the node's model now (with `info` None: only whether it is ready)."""
    if tritonclient_version() is None:
        return TritonState("unreachable", "tritonclient is not installed (pip install edgenode[triton])")
    try:
        client = endpoint.client()
    except Exception as exc:  # noqa: BLE001 - a bad URL or unreadable certificate: cannot reach it
        return TritonState("unreachable", f"{type(exc).__name__}: {exc}")
    try:
        served = served_model(client, endpoint)
        if info is not None:
            check_served_model(served, info)
    except TritonModelNotReady as exc:
        return TritonState("not ready", str(exc))
    except TritonUnavailable as exc:
        return TritonState("unreachable", str(exc))
    except TritonModelMismatch as exc:
        return TritonState("mismatch", str(exc))
    except RuntimeError as exc:
        return TritonState("unreachable", str(exc))
    finally:
        client.close()
    return TritonState("ok", f"{served.platform} model {served.name} version {served.version}")


class TritonDenoiser:
    """eps = U-Net(x_t, cond, t) computed by a Triton server: the Denoiser protocol over gRPC.

    A call is cut into micro-batches of at most `endpoint.micro_batch` images (0: the call spread over
    `endpoint.in_flight` requests), at most `in_flight` of them outstanding at once. The served model is checked
    against `info` before the first call and again after the server was unreachable (it may have come back
    with another model); `verify=False` defers even the first check to the first call (a node starting
    while the pool is down keeps its worker and retries jobs instead of crash-looping).
    """

    def __init__(
        self,
        endpoint: TritonEndpoint,
        info: ModelInfo,
        device: str | torch.device = "cpu",
        max_batch: int = 28,
        verify: bool = True,
    ) -> None:
        if tritonclient_version() is None:
            raise RuntimeError("the triton backend needs tritonclient: pip install edgenode[triton]")
        if endpoint.in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {endpoint.in_flight}")
        self.endpoint = endpoint
        self.info = info
        self.device = torch.device(device)
        self.dtype = torch.float32  # what crosses the wire; the served model decides its compute precision
        self.max_batch = max_batch
        self.micro_batch = endpoint.micro_batch or None
        self.in_flight = endpoint.in_flight
        self.model_id = info.model_id
        self.name = "triton"
        self.served: ServedModel | None = None
        self._client = endpoint.client()
        self._reconnect = False  # set when the server failed us: the next check opens a new channel
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="triton")
        if verify:
            self.verify()

    def verify(self) -> ServedModel:
        """Check the served model is ours (TritonModelMismatch if not, TritonUnavailable if it cannot answer)."""
        if self._reconnect:
            # gRPC's channel waits out a growing reconnect backoff after a refused connection; a server that is
            # back should be used at once, so start over with a fresh channel.
            self._client.close()
            self._client = self.endpoint.client()
            self._reconnect = False
        try:
            served = served_model(self._client, self.endpoint)
        except TritonUnavailable:
            self._reconnect = True
            raise
        check_served_model(served, self.info)
        self.served = served
        log.info("Triton %s serves %s (%s)", self.endpoint.describe(), self.info.model_id, served.platform)
        return served

    def _chunk(self, n: int) -> int:
        chunk = self.micro_batch or math.ceil(n / self.in_flight)
        if self.served is not None and self.served.max_batch_size:
            chunk = min(chunk, self.served.max_batch_size)
        return max(chunk, 1)

    def _request(self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, array in (("x_t", x_t), ("cond", cond), ("t", t)):
            tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = self._client.infer(
                self.endpoint.model_name,
                inputs,
                model_version=self.endpoint.model_version,
                outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                client_timeout=self.endpoint.timeout_seconds,
            )
        except Exception as exc:  # noqa: BLE001 - translated: retry later, or a real error
            raise translate_error(exc, self.endpoint, f"a {x_t.shape[0]}-image U-Net call") from exc
        out = result.as_numpy(OUTPUT_NAME)
        if out is None or out.shape != x_t.shape:
            raise RuntimeError(f"Triton returned {None if out is None else out.shape} for a {x_t.shape} batch")
        return out

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = check_inputs(x_t, cond, t, self.max_batch)
        if self.served is None:
            self.verify()
        x = x_t.detach().to("cpu", torch.float32).contiguous().numpy()
        c = cond.detach().to("cpu", torch.float32).contiguous().numpy()
        steps = t.detach().to("cpu", torch.float32).reshape(n, 1).contiguous().numpy()  # dims [1] per image
        futures = [self._pool.submit(self._request, x[s], c[s], steps[s]) for s in batch_slices(n, self._chunk(n))]
        try:
            parts = [f.result() for f in futures]
        except TritonUnavailable:
            self.served = None  # check the model again once the server is back: it may be another one
            self._reconnect = True
            for f in futures:
                f.cancel()
            raise
        # One response is a read-only view of the gRPC buffer; torch needs memory it may own.
        out = np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(out).to(self.device)

    def describe(self) -> str:
        chunk = f"micro-batch {self.micro_batch}" if self.micro_batch else f"calls split over {self.in_flight}"
        return f"{self.name} {self.endpoint.describe()} ({chunk}, {self.in_flight} requests in flight)"

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
