"""Choose the CPU backend by measurement: the fastest candidate that passes the accuracy guard.

Which backend and precision is fastest depends on the CPU (AMX, AVX512-BF16, VNNI, core count) and on
the libraries' versions, so it is measured where the node runs: every candidate this CPU can run (torch
fp32/bf16, ONNX Runtime fp32, OpenVINO fp32/bf16) is timed on full batches, and candidates are then
checked from the fastest down until one passes the **accuracy guard**: on a fixed set of phantom slices
(healthy and with lesions), run through the node's own detection (`inference.pipeline.detect`) at the
node's default settings, its binary anomaly mask agrees with torch fp32's at Dice >= 0.98 and every slice
score is within 2 % of torch fp32's, in the same order wherever torch fp32's scores differ by more than 2 %.
torch fp32 is the reference and always passes; a fast candidate that changes the findings never runs.

The outcome is cached in the engine cache (`probe-*.json`), keyed by the model's hash, the CPU's model
and flags, the library versions, threads, max_batch and the candidates, so a restart does not probe again
and any change of those does. Int8 (NNCF post-training quantisation) is not a candidate: see docs/engines.md.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from engines.openvino_backend import openvino_precisions, openvino_version
from engines.ort_backend import ort_providers
from inference.denoiser import Denoiser
from inference.hardware import cpu_info
from inference.lungmask import anatomy_mask
from inference.phantoms import make_ct
from inference.pipeline import ModelGridDetection, PipelineSettings, detect
from inference.unet import ModelInfo
from inference.volume import GridMapping, mask_to_grid, normalise, resample_to_grid

log = logging.getLogger(__name__)

PROBE_VERSION = 2  # bump when the guard set, its settings or the timing change: cached outcomes then expire
GUARD_DICE = 0.98
GUARD_SCORE_TOLERANCE = 0.02
# The node's default detection (K = 7, 5 steps, t_start, lambda, morphology): 8 slices x 7 members are two
# full batches of 28 per step. A shorter ensemble exaggerates low-precision noise: on the bundled model
# OpenVINO bf16 moved a healthy slice's score by 2.8 % with K = 3 and 5 steps, by at most 0.75 % at the
# defaults, which are what the node computes.
GUARD_SETTINGS = PipelineSettings()
GUARD_SLICES_PER_KIND = 4  # healthy slices + lesion slices
_PHANTOM = dict(rows=128, cols=128, slices=24)
_HEALTHY_SEED, _LESION_SEED = 11, 12
TIMING_ROUNDS = 3  # timed calls per candidate, interleaved; the fastest counts (other load only slows)


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"


REFERENCE = Candidate("torch", "fp32")


def cpu_candidates(backend: str = "auto", precision: str = "auto") -> list[Candidate]:
    """What this CPU can run, restricted to the forced backend/precision ("auto": any); reference first.

    torch bf16 only on CPUs with bf16 units (emulated bf16 is slower than fp32); OpenVINO bf16 where
    its CPU plugin reports native bf16.
    """
    found = [REFERENCE]
    if cpu_info().bf16_units:
        found.append(Candidate("torch", "bf16"))
    if "CPUExecutionProvider" in ort_providers():
        found.append(Candidate("onnxruntime", "fp32"))
    found += [Candidate("openvino", p) for p in openvino_precisions()]
    return [c for c in found if backend in ("auto", c.backend) and precision in ("auto", c.precision)]


@dataclass(frozen=True)
class GuardSlices:
    """Model-grid slices in [-1, 1] with their anatomy masks: healthy first, then slices with lesions."""

    images: np.ndarray  # (Z, S, S) float32
    masks: np.ndarray  # (Z, S, S) bool
    lesion: np.ndarray  # (Z,) bool


def _phantom_on_grid(seed: int, lesions: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ph = make_ct(seed, _PHANTOM["rows"], _PHANTOM["cols"], _PHANTOM["slices"], lesions)
    mapping = GridMapping(rows=_PHANTOM["rows"], cols=_PHANTOM["cols"], size=size)
    sz, sy, sx = ph.grid.spacing  # phantom slices run feet to head
    lungs = anatomy_mask(ph.hu, "CT", (sy, sx), np.array([0.0, 0.0, 1.0]), sz)
    image = resample_to_grid(normalise(ph.hu, "CT"), mapping, fill=-1.0)
    return image, mask_to_grid(lungs, mapping), ph.lesion_mask.sum(axis=(1, 2))


@functools.cache
def guard_slices(size: int) -> GuardSlices:
    """The fixed guard set for a model grid: the healthy phantom's slices with the most anatomy mask and
    the lesion phantom's slices with the most lesion voxels (deterministic: fixed seeds)."""
    h_img, h_mask, _ = _phantom_on_grid(_HEALTHY_SEED, "none", size)
    l_img, l_mask, lesion_voxels = _phantom_on_grid(_LESION_SEED, "nodule", size)
    k = GUARD_SLICES_PER_KIND
    healthy = np.sort(np.argsort(-h_mask.sum(axis=(1, 2)), kind="stable")[:k])
    sick = np.sort(np.argsort(-lesion_voxels, kind="stable")[:k])
    return GuardSlices(
        np.concatenate([h_img[healthy], l_img[sick]]).astype(np.float32),
        np.concatenate([h_mask[healthy], l_mask[sick]]),
        np.array([False] * len(healthy) + [bool(lesion_voxels[i]) for i in sick]),
    )


def guard_detection(denoiser: Denoiser, size: int) -> ModelGridDetection:
    data = guard_slices(size)
    return detect(data.images, data.masks, denoiser, GUARD_SETTINGS, "CT")


@dataclass(frozen=True)
class GuardVerdict:
    dice: float
    score_error: float  # largest |score - reference| / reference over the slices
    ranking: bool
    passed: bool

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        order = "same order" if self.ranking else "order changed"
        return f"{verdict}: Dice {self.dice:.4f}, scores within {self.score_error * 100:.2f}%, {order}"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def same_ranking(ref: np.ndarray, got: np.ndarray, tolerance: float = GUARD_SCORE_TOLERANCE) -> bool:
    """Every pair of slices whose reference scores differ by more than `tolerance` (relative) keeps its order."""
    for i in range(len(ref)):
        for j in range(len(ref)):
            if ref[i] > ref[j] + tolerance * max(abs(ref[i]), abs(ref[j])) and not got[i] > got[j]:
                return False
    return True


def guard_verdict(ref: ModelGridDetection, got: ModelGridDetection) -> GuardVerdict:
    """Does `got` (a candidate's detection on the guard set) give torch fp32's findings?"""
    r, g = ref.slice_scores.astype(np.float64), got.slice_scores.astype(np.float64)
    errors = np.abs(g - r) / np.maximum(np.abs(r), 1e-12)
    errors[(r == 0) & (g == 0)] = 0.0
    score_error = float(errors.max()) if errors.size else 0.0
    d = dice(ref.segmentation, got.segmentation)
    ranking = same_ranking(r, g)
    return GuardVerdict(d, score_error, ranking, d >= GUARD_DICE and score_error <= GUARD_SCORE_TOLERANCE and ranking)


class Verdict(Protocol):
    @property
    def passed(self) -> bool: ...

    def describe(self) -> str: ...


class Guard(Protocol):
    """What a candidate must reproduce of torch fp32's output on fixed inputs before it may be chosen: the
    diffusion model's findings (DetectionGuard), or another network's own output (engines.refiner's guard)."""

    @property
    def name(self) -> str: ...

    def run(self, denoiser: Denoiser) -> Any: ...

    def verdict(self, ref: Any, got: Any) -> Verdict: ...

    def summary(self, ref: Any) -> dict[str, object]: ...


@dataclass(frozen=True)
class DetectionGuard:
    """The diffusion model's guard: the node's detection on the guard slices (module docstring)."""

    size: int
    name: str = "detection"

    def run(self, denoiser: Denoiser) -> ModelGridDetection:
        return guard_detection(denoiser, self.size)

    def verdict(self, ref: ModelGridDetection, got: ModelGridDetection) -> GuardVerdict:
        return guard_verdict(ref, got)

    def summary(self, ref: ModelGridDetection) -> dict[str, object]:
        return {
            "slice_scores": [round(float(v), 5) for v in ref.slice_scores],
            "segmented_voxels": int(ref.segmentation.sum()),
        }


@dataclass
class ProbeRow:
    candidate: str
    ms_per_call: float | None  # fastest of TIMING_ROUNDS calls on max_batch images; None: could not build
    images_per_s: float | None
    guard: str  # the verdict, or why it was not checked
    chosen: bool = False


@dataclass
class ProbeRecord:
    """A probe's outcome as cached and shown by `edgenode engine info`."""

    key: dict[str, object]
    chosen: str
    backend: str
    precision: str
    rows: list[ProbeRow]
    probed_at: str
    probe_s: float
    reference: dict[str, object] = field(default_factory=dict)  # torch fp32's guard findings

    def table(self) -> list[str]:
        lines = [f"  {'candidate':18} {'ms/call':>9} {'images/s':>9}  accuracy guard vs torch-fp32"]
        for row in self.rows:
            ms = f"{row.ms_per_call:.1f}" if row.ms_per_call is not None else "-"
            ips = f"{row.images_per_s:.0f}" if row.images_per_s is not None else "-"
            mark = "  <- chosen" if row.chosen else ""
            lines.append(f"  {row.candidate:18} {ms:>9} {ips:>9}  {row.guard}{mark}")
        return lines


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def probe_key(
    info: ModelInfo, candidates: list[Candidate], max_batch: int, threads: int | None, guard: str = "detection"
) -> dict[str, object]:
    """Everything a probe's outcome depends on."""
    cpu = cpu_info()
    return {
        "probe_version": PROBE_VERSION,
        "guard": guard,
        "model_sha256": info.sha256,
        "cpu_model": cpu.model,
        "cpu_flags": sorted(cpu.flags),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "openvino": openvino_version() or "",
        "threads": threads or torch.get_num_threads(),
        "max_batch": max_batch,
        "candidates": [c.name for c in candidates],
    }


def probe_path(cache_dir: Path, info: ModelInfo, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"probe-{info.model_id}-{digest}.json"


def read_probe(cache_dir: Path | None, info: ModelInfo, key: dict[str, object]) -> ProbeRecord | None:
    """The cached outcome for exactly this key, or None (missing, unreadable or another key)."""
    if cache_dir is None:
        return None
    path = probe_path(cache_dir, info, key)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        record = ProbeRecord(**{**raw, "rows": [ProbeRow(**r) for r in raw["rows"]]})
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("unreadable probe cache %s (%s); probing again", path, exc)
        return None
    return record if record.key == key else None


def _write_probe(cache_dir: Path, info: ModelInfo, record: ProbeRecord) -> None:
    path = probe_path(cache_dir, info, record.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(path)


def _time_candidates(denoisers: dict[Candidate, Denoiser], batch: int, size: int) -> dict[Candidate, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen)
    c = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float()
    t = torch.rand(batch, generator=gen) * 250
    for denoiser in denoisers.values():  # warm-up: allocation, kernel choice
        denoiser(x, c, t)
    best = dict.fromkeys(denoisers, float("inf"))
    for _ in range(TIMING_ROUNDS):  # interleaved, so a load change hits every candidate alike
        for cand, denoiser in denoisers.items():
            start = time.perf_counter()
            denoiser(x, c, t)
            best[cand] = min(best[cand], time.perf_counter() - start)
    return best


@dataclass
class ProbeOutcome:
    record: ProbeRecord
    denoiser: Denoiser
    cached: bool


def probe_cpu(
    info: ModelInfo,
    candidates: list[Candidate],
    build: Callable[[Candidate], Denoiser],
    max_batch: int,
    threads: int | None,
    cache_dir: Path | None,
    force: bool = False,
    guard: Guard | None = None,
) -> ProbeOutcome:
    """The fastest candidate that passes the guard (default: the diffusion model's detection guard), built; from
    the cache unless `force` or the key changed."""
    checked: Guard = guard if guard is not None else DetectionGuard(info.config.image_size)
    key = probe_key(info, candidates, max_batch, threads, checked.name)
    cached = None if force else read_probe(cache_dir, info, key)
    if cached is not None:
        try:
            return ProbeOutcome(cached, build(Candidate(cached.backend, cached.precision)), cached=True)
        except Exception as exc:  # noqa: BLE001 - what was chosen no longer builds: measure again
            log.warning("cached choice %s does not build here (%s); probing again", cached.chosen, exc)

    start = time.perf_counter()
    size = info.config.image_size
    denoisers: dict[Candidate, Denoiser] = {}
    rows: dict[Candidate, ProbeRow] = {}
    for cand in candidates:
        try:
            denoisers[cand] = build(cand)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot build here is not chosen
            log.warning("probe: %s could not be built: %s", cand.name, exc)
            rows[cand] = ProbeRow(cand.name, None, None, f"not built: {exc}")
    seconds = _time_candidates(denoisers, max_batch, size)
    reference = denoisers[REFERENCE] if REFERENCE in denoisers else build(REFERENCE)
    ref = checked.run(reference)
    chosen: Candidate | None = None
    for cand in sorted(denoisers, key=seconds.__getitem__):
        s = seconds[cand]
        if chosen is not None:
            verdict = "not checked: a faster candidate passed"
        elif cand == REFERENCE:
            verdict, chosen = "reference", cand
        else:
            try:
                result = checked.verdict(ref, checked.run(denoisers[cand]))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails on real slices is not chosen
                log.warning("probe: %s failed on the guard slices: %s", cand.name, exc)
                verdict = f"FAIL: {type(exc).__name__}: {exc}"
            else:
                verdict = result.describe()
                if result.passed:
                    chosen = cand
        rows[cand] = ProbeRow(cand.name, s * 1e3, max_batch / s, verdict, chosen == cand)
    if chosen is None:  # only when the reference itself was not a candidate (precision forced) and all failed
        raise RuntimeError(
            "no candidate passed the accuracy guard: "
            + "; ".join(f"{r.candidate}: {r.guard}" for r in rows.values())
            + ". Set [inference] precision = 'fp32' or 'auto'"
        )
    ordered = [rows[c] for c in sorted(rows, key=lambda c: (rows[c].ms_per_call is None, rows[c].ms_per_call or 0))]
    record = ProbeRecord(
        key=key,
        chosen=chosen.name,
        backend=chosen.backend,
        precision=chosen.precision,
        rows=ordered,
        probed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        probe_s=round(time.perf_counter() - start, 2),
        reference=checked.summary(ref),
    )
    if cache_dir is not None:
        _write_probe(cache_dir, info, record)
    return ProbeOutcome(record, denoisers[chosen], cached=False)
