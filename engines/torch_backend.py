"""The U-Net in PyTorch: eager fp32 on CPU or CUDA; on CUDA also fp16/bf16 autocast, channels_last and CUDA graphs.

CUDA graphs remove the per-kernel launch cost that dominates small batches on a GPU: each input
shape is captured once into static buffers and replayed afterwards. On a CPU, large batches spill
the activations out of cache, so a batch can be run as consecutive micro-batches.
"""

from __future__ import annotations

import copy
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from engines.base import PRECISIONS, batch_slices, check_inputs
from inference.unet import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class _CapturedGraph:
    """One CUDA graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    x_t: torch.Tensor
    cond: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor


class TorchDenoiser:
    """Runs a UNet with PyTorch on one device.

    The model is copied, so the caller's module is never moved or converted. `threads` sets torch's
    intra-op thread count for the process (a process-wide setting, made here because the settings
    decide it, never at import). `micro_batch` splits each call into chunks of at most that many
    images (CPU cache locality); None runs the whole batch at once.
    """

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        cuda_graphs: bool = False,
        max_batch: int = 28,
        micro_batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
            )
        if self.device.type == "cpu" and precision == "fp16":
            raise ValueError("fp16 is not supported on the CPU; use fp32 (or bf16 on CPUs with AVX512-BF16/AMX)")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs device 'cuda'")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if threads is not None and threads > 0:
            torch.set_num_threads(threads)
        self.dtype = PRECISIONS[precision]
        self.precision = precision
        self.max_batch = max_batch
        self.micro_batch = micro_batch
        self.model_id = info.model_id
        self.info = info
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        parts = ["torch", self.device.type, precision]
        if channels_last:
            parts.append("cl")
        if cuda_graphs:
            parts.append("graphs")
        self.name = "-".join(parts)

        self.model = copy.deepcopy(model).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if channels_last:
            # torch's stub of Module.to omits memory_format, which Module.to accepts (torch._C._nn._parse_to)
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._graphs: dict[tuple[int, ...], _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def _autocast(self) -> AbstractContextManager[object]:
        if self.dtype == torch.float32:
            return nullcontext()
        # Caching autocast's weight casts is not allowed during graph capture, and buys nothing here.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    def _forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
            cond = cond.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.model(x_t, cond, t)
        return out.float().contiguous()

    def _capture(self, shape: tuple[int, ...]) -> _CapturedGraph:
        """Capture the forward pass for one input shape; warm-up runs on a side stream as CUDA requires."""
        log.info("capturing a CUDA graph for input shape %s (%s)", shape, self.name)
        x_t = torch.zeros(shape, device=self.device)
        cond = torch.zeros(shape, device=self.device)
        t = torch.zeros(shape[0], device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # lets cuDNN/cuBLAS pick and allocate their workspaces before capture
                self._forward(x_t, cond, t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(x_t, cond, t)
        return _CapturedGraph(graph, x_t, cond, t, out)

    def _replay(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = tuple(x_t.shape)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(key)
        captured.x_t.copy_(x_t)
        captured.cond.copy_(cond)
        captured.t.copy_(t)
        captured.graph.replay()
        return captured.out.clone()  # the static output is overwritten by the next replay

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_inputs(x_t, cond, t, self.max_batch)
        x_t = x_t.to(self.device, torch.float32)
        cond = cond.to(self.device, torch.float32)
        t = t.to(self.device, torch.float32)
        run = self._replay if self.cuda_graphs else self._forward
        with torch.inference_mode():
            parts = [run(x_t[s], cond[s], t[s]) for s in batch_slices(x_t.shape[0], self.micro_batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def describe(self) -> str:
        extra = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        return f"{self.name} (threads {torch.get_num_threads()}{extra})" if self.device.type == "cpu" else self.name
