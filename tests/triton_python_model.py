"""Triton python-backend model.py for validating a generated repository: runs the repository's own
`model.onnx` through ONNX Runtime. The bundled tritonserver has only the python backend, so the test swaps
the config's platform for this backend and serves everything else (inputs, reshape, batching, parameters)
exactly as `edgenode engine build --triton-repo` wrote it. Runs inside the PyTriton venv's stub, never in
the project."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.session = onnxruntime.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.config = json.loads(args["model_config"])

    def execute(self, requests: list) -> list:  # type: ignore[type-arg]
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in ("x_t", "cond", "t")}
            feeds = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in feeds.items()}
            (eps,) = self.session.run(["eps"], feeds)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("eps", eps)]))
        return responses
