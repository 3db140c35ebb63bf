"""What a training run shows while it runs and leaves beside its weights: progress lines and the loss curve.

Why plain lines: long runs go to a log file (nohup), where a progress bar's carriage returns are noise; a line
every PROGRESS_EVERY_S seconds (and at each checkpoint) says how far the run is, how fast, and when it ends. A
terminal gets the bar instead. The loss curve is a PNG next to the shipped weights, for the model card.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROGRESS_EVERY_S = 30.0
SMOOTHING = 50  # steps in the moving mean the progress and the curve show


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class ProgressLine:
    """Prints `step k/N, loss, images/s, elapsed, ETA` lines to stdout, at most every `every_s` seconds."""

    total: int
    batch_size: int
    start_step: int
    wall_before: float  # seconds spent by earlier runs this one resumes
    label: str  # what the run computes with, e.g. "cpu, bf16 autocast, 2 threads"
    every_s: float = PROGRESS_EVERY_S
    enabled: bool = True
    _t0: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def __post_init__(self) -> None:
        self._last = self._t0
        if self.enabled and self.start_step:
            self.print(f"resumed at step {self.start_step}/{self.total} ({self.label})")
        elif self.enabled:
            self.print(f"training {self.total} steps ({self.label})")

    def print(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    def update(self, step: int, losses: list[float], note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or not (force or now - self._last >= self.every_s):
            return
        self._last = now
        elapsed = now - self._t0
        done = step - self.start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        loss = float(np.mean(losses[-SMOOTHING:])) if losses else float("nan")
        self.print(
            f"step {step}/{self.total} ({100 * step / max(self.total, 1):.1f} %) loss {loss:.4f} "
            f"(mean of {min(SMOOTHING, len(losses))}) {rate * self.batch_size:.1f} img/s "
            f"elapsed {_clock(self.wall_before + elapsed)} eta {_clock(eta) if np.isfinite(eta) else '?'}"
            + (f" {note}" if note else "")
        )


def loss_curve_path(weights: Path) -> Path:
    """Where the loss curve of `weights` lies: <name>.loss.png beside it."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".loss.png")


def write_loss_curve(
    losses: list[float], path: Path, title: str, subtitle: str, ylabel: str = "epsilon-prediction MSE"
) -> Path:
    """The training loss per step (faint) and its moving mean over SMOOTHING steps, log scale, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, values.size + 1)
    if values.size:
        axes.plot(steps, values, color="#9ab", linewidth=0.5, label="loss per step")
        width = min(SMOOTHING, values.size)
        mean = np.convolve(values, np.ones(width) / width, mode="valid")
        axes.plot(steps[width - 1 :], mean, color="#c33", linewidth=1.5, label=f"mean of {width} steps")
        if values.min() > 0:
            axes.set_yscale("log")
        axes.legend(loc="upper right")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=11)
    figure.text(0.5, 0.01, subtitle, ha="center", fontsize=8, color="#444")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
