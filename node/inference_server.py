"""The node's view of a remote inference server (`[inference] backend = "triton"`): where it is, and whether
it serves this node's model now, for /healthz and /metrics.

The engines layer knows how to talk to Triton; this module only maps the node's settings onto it, and imports
it (and torch) on first use, so a node that runs the U-Net locally never loads either.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from node.config import Settings

if TYPE_CHECKING:
    from engines.triton_backend import TritonEndpoint, TritonState
    from inference.unet import ModelInfo


def uses_triton(settings: Settings) -> bool:
    return settings.inference.backend == "triton"


def triton_endpoint(settings: Settings) -> TritonEndpoint:
    """`[triton]` as the engines layer takes it."""
    from engines.triton_backend import TritonEndpoint

    tr = settings.triton
    return TritonEndpoint(
        url=tr.url,
        model_name=tr.model_name,
        model_version=tr.model_version,
        timeout_seconds=tr.timeout_seconds,
        in_flight=tr.in_flight,
        micro_batch=tr.micro_batch,
        tls=tr.tls,
        root_ca=tr.root_ca,
        client_cert=tr.client_cert,
        client_key=tr.client_key,
    )


class TritonMonitor:
    """Answers "does Triton serve this node's model now?" for health checks and scrapes.

    The expected identity is read once from the weights file's header; each check asks the server afresh
    (with a short timeout), since the pool can go down or be redeployed with another model at any time.
    """

    PROBE_TIMEOUT_SECONDS = 3.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()

    def _model_info(self) -> ModelInfo | None:
        with self._lock:
            if self._info is None:
                from engines.select import resolve_model_path
                from inference.unet import read_model_info

                try:
                    # On triton every modality names the one served model (InferenceSettings validates it).
                    self._info = read_model_info(resolve_model_path(self._settings.inference.model_for("CT")))
                except (FileNotFoundError, ValueError):
                    return None  # the workers report a missing model; the server's state is still worth knowing
            return self._info

    def state(self) -> TritonState:
        from dataclasses import replace

        from engines.triton_backend import probe

        endpoint = triton_endpoint(self._settings)
        endpoint = replace(endpoint, timeout_seconds=min(endpoint.timeout_seconds, self.PROBE_TIMEOUT_SECONDS))
        return probe(endpoint, self._model_info())
