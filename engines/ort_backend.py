"""The exported U-Net in ONNX Runtime: CPU execution provider, or the CUDA provider when present.

On CUDA the inputs and output are bound to torch's device buffers (I/O binding), so nothing crosses
to the host. On a CPU, numpy views of the torch tensors are passed without copying, and a batch can
be run as micro-batches on several single-threaded runs at once (`workers`): the small U-Net's
convolutions and norms are too short to split across threads without each thread waiting at every
operator's end, so whole images per core keep the cores busier (benchmarks/RESULTS.md, ## Engines).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engines.base import batch_slices, check_inputs
from engines.onnx_export import INPUT_NAMES, OUTPUT_NAME, OnnxModel

log = logging.getLogger(__name__)


def ort_providers() -> list[str]:
    """Execution providers this onnxruntime build offers ([] when onnxruntime is not importable)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


class OrtDenoiser:
    """Runs an exported U-Net (see engines.onnx_export) in an ONNX Runtime session.

    `threads` is the session's intra-op thread count (0 or None: onnxruntime's default, one per
    physical core). `micro_batch` splits each call into chunks of at most that many images.
    `workers` > 1 (CPU only) runs the chunks concurrently on that many threads, each calling the
    one session (ONNX Runtime's Run is thread-safe and releases the GIL); a batch is then cut into
    at least `workers` chunks so every worker gets images. Use it with threads=1: one core per run.
    """

    def __init__(
        self,
        onnx_model: OnnxModel,
        device: str | torch.device = "cpu",
        max_batch: int = 28,
        threads: int | None = None,
        micro_batch: int | None = None,
        workers: int = 1,
        optimized_path: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")

        self.device = torch.device(device)
        self.dtype = torch.float32
        self.max_batch = max_batch
        self.micro_batch = micro_batch
        self.model_id = onnx_model.model_id
        self.onnx_model = onnx_model
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort_providers():
                raise RuntimeError(
                    "device 'cuda' requested for onnxruntime, but this onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu)"
                )
            if self.device.index is None:  # "cuda": the current device, which a worker process may have pinned
                self.device = torch.device("cuda", torch.cuda.current_device())
            providers: list[object] = [
                ("CUDAExecutionProvider", {"device_id": self.device.index}),
                "CPUExecutionProvider",
            ]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"unsupported device {self.device} for onnxruntime")
        if workers > 1 and self.device.type != "cpu":
            raise ValueError("workers > 1 is for the CPU execution provider only")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning idle workers would steal the cores torch needs for the sampler's own tensor math
        # between U-Net calls (and any other session in the process).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if optimized_path is not None:
            options.optimized_model_filepath = str(optimized_path)  # to inspect what the optimiser fused
        self.session = ort.InferenceSession(str(onnx_model.path), options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUT_NAMES):
            raise ValueError(f"{onnx_model.path} has inputs {names}, expected {list(INPUT_NAMES)}")
        self.name = f"onnxruntime-{self.device.type}"
        self.threads = threads
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ort-cpu") if workers > 1 else None

    def _run_cpu(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {
            "x_t": x_t.detach().contiguous().numpy(),
            "cond": cond.detach().contiguous().numpy(),
            "t": t.detach().contiguous().numpy(),
        }
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(out)

    def _run_cuda(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = self.device.index or 0
        x_t, cond, t = x_t.contiguous(), cond.contiguous(), t.contiguous()
        out = torch.empty_like(x_t)
        binding = self.session.io_binding()
        for name, tensor in (("x_t", x_t), ("cond", cond), ("t", t)):
            binding.bind_input(name, "cuda", index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        # ORT runs on its own stream: the inputs written on torch's stream must be complete first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_inputs(x_t, cond, t, self.max_batch)
        x_t = x_t.to(self.device, torch.float32)
        cond = cond.to(self.device, torch.float32)
        t = t.to(self.device, torch.float32)
        run = self._run_cuda if self.device.type == "cuda" else self._run_cpu
        n = x_t.shape[0]
        if self._pool is not None and n > 1:
            chunk = min(self.micro_batch or n, math.ceil(n / self.workers))
            # The pool hands chunks out as workers free up, so a core slowed by other work takes fewer.
            futures = [self._pool.submit(run, x_t[s], cond[s], t[s]) for s in batch_slices(n, chunk)]
            parts = [f.result() for f in futures]
        else:
            with torch.inference_mode():
                parts = [run(x_t[s], cond[s], t[s]) for s in batch_slices(n, self.micro_batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def describe(self) -> str:
        extra = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        if self.workers > 1:
            extra += f", {self.workers} concurrent runs"
        threads = self.threads or "default"
        return (
            f"{self.name} ({self.onnx_model.exporter} export, opset {self.onnx_model.opset}, threads {threads}{extra})"
        )
