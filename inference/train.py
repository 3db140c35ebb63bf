"""Training of the mask-conditioned denoising U-Net on healthy chest images only.

Why healthy only: the model learns to reconstruct normal anatomy; at inference whatever it cannot reconstruct
is the anomaly. Training uses exactly the inference noise (`NoiseSource`, simplex by default, Gaussian for the
ablation), the same schedule and forward diffusion (`q_sample`), the same intensity normalisation and model-grid
resampling (`inference.volume`), and the lung mask as the condition channel. Timesteps are drawn only up to
`t_max` because inference diffuses to t_start << T: capacity goes where it is used.

Loss: epsilon-prediction L2. Optimiser: AdamW, linear warm-up then cosine decay. EMA weights are what ships.
Checkpoints hold model, EMA, optimiser and data position, so a run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.diffusion import LinearSchedule, q_sample
from inference.hardware import cpu_info
from inference.phantoms import make_ct
from inference.simplex import NoiseSource, splitmix64
from inference.training_report import PROGRESS_EVERY_S, ProgressLine, loss_curve_path, write_loss_curve
from inference.unet import PRESETS, UNet, UNetConfig, save_model
from inference.volume import GridMapping, mask_to_grid, normalise, resample_to_grid

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint and the shipped weights' metadata."""

    preset: str = "small"
    image_size: int | None = None  # overrides the preset's model grid
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    ema_decay: float = 0.995
    t_max: int = 350  # timesteps drawn from [0, t_max); inference uses t_start <= t_max
    noise: str = "simplex"  # simplex | gaussian (ablation)
    # The simplex spectrum (NoiseSource): the pipeline diffuses with the spectrum its model was trained with.
    noise_octaves: int = 6
    noise_base_frequency: float = 2**-6
    noise_persistence: float = 0.8
    conditioned: bool = True  # False: the condition channel is all zeros (ablation)
    seed: int = 0
    subjects: int = 120  # phantom subjects in the training pool
    phantom_size: int = 256  # phantom rows/cols before resampling to the model grid
    phantom_slices: int = 24
    data_dir: str = ""  # a folder of healthy DICOM series instead of phantoms
    # What the model is for, written into its metadata: the node runs it only on these modalities. Phantoms are
    # rendered as CT slices for CT and as PA chest radiographs for CR/DX; a DICOM folder must hold only these.
    modalities: tuple[str, ...] = ("CT",)
    body_part: str = "CHEST"
    rotate_degrees: float = 0.0  # augmentation: random rotation in [-d, d]
    intensity_jitter: float = 0.0  # augmentation: random gain 1 +- j and offset +- j (in [-1, 1] units)
    flip: bool = False  # left-right flips: off for chests (the heart is on the left)
    device: str = "auto"
    amp: bool = True  # bf16 autocast where there are bf16 units: CUDA GPUs, CPUs with AVX512-BF16 or AMX
    time_limit_s: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    # > 0: train as many steps as fit in this many seconds (at most `steps`), timed over the warm-up, so the
    # cosine schedule ends when the time does on hardware of unknown speed (a lent GPU); the seconds count from
    # the call of `train`, building the training images included (a minute on a GPU machine); see `fitted_steps`
    fit_time_s: float = 0.0
    init_from: str = ""  # start from these weights (.safetensors: fine-tuning, e.g. on a site's healthy series)
    checkpoint_every: int = 200  # steps between checkpoints ...
    checkpoint_minutes: float = 5.0  # ... or minutes, whichever comes first (0: steps only)
    extra: dict[str, object] = field(default_factory=dict)

    def unet_config(self) -> UNetConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        return replace(base, image_size=self.image_size) if self.image_size else base


@dataclass
class SlicePool:
    """Healthy slices on the model grid: images in [-1, 1] and lung masks, (N, S, S) float32."""

    images: torch.Tensor
    masks: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def training_seeds(seed: int, subjects: int) -> list[int]:
    """The phantom seeds a run with data seed `seed` draws its `subjects` from (CT slices and radiographs alike).

    Why a function: a phantom's subject is fixed by its seed alone, so an evaluation set is held out exactly when
    none of its seeds is here (`inference.heldout` checks that for every model it evaluates).
    """
    return [splitmix64(seed, i) % 2**31 for i in range(subjects)]


def model_training_seeds(training: dict[str, object]) -> list[int]:
    """The phantom seeds behind a shipped model, from its training metadata (`ship` writes the run's config).

    A model trained on a DICOM folder has none; metadata without a config (older files) counts as the
    TrainConfig defaults, the most likely run.
    """
    raw = training.get("config")
    config = json.loads(raw) if isinstance(raw, str) else {}
    if config.get("data_dir"):
        return []
    defaults = TrainConfig()
    seed = config.get("seed", training.get("data_seed", defaults.seed))
    subjects = config.get("subjects", defaults.subjects)
    return training_seeds(int(seed), int(subjects))


def _ct_subject(case_seed: int, size: int, slices: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """One healthy phantom CT subject's slices and lung masks on the model grid."""
    from inference.lungmask import anatomy_mask

    ph = make_ct(case_seed, size, size, slices, "none")
    mapping = GridMapping(rows=size, cols=size, size=grid)
    image = resample_to_grid(normalise(ph.hu, "CT"), mapping, fill=-1.0)
    sz, sy, sx = ph.grid.spacing  # phantom slices run feet to head: normal (0, 0, 1)
    lungs = anatomy_mask(ph.hu, "CT", (sy, sx), np.array([0.0, 0.0, 1.0]), sz)
    return image, mask_to_grid(lungs, mapping).astype(np.float32)


def _radiograph_subject(case_seed: int, size: int, native: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """One healthy phantom PA radiograph and its lung fields on the model grid."""
    from inference.lungmask import anatomy_mask
    from inference.radiograph_phantoms import make_radiograph

    rx = make_radiograph(case_seed, size, size, "none", native=native)
    pixels = (np.round(np.clip(rx.image, 0.0, 1.0) * 4095.0) / 4095.0).astype(np.float32)[None]
    mapping = GridMapping(rows=size, cols=size, size=grid)
    image = resample_to_grid(normalise(pixels, "DX"), mapping, fill=-1.0)
    lungs = anatomy_mask(pixels, "DX", rx.pixel_spacing)
    return image, mask_to_grid(lungs, mapping).astype(np.float32)


SUBJECTS_PER_RENDER_PROCESS = 8


def _render_subjects(
    render: Callable[..., tuple[np.ndarray, np.ndarray]], seeds: list[int], args: tuple[int, ...], workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`render(seed, *args)` for every seed, in seed order, on `workers` processes, with a progress line.

    Why processes: each subject is independent numpy and scipy work under the GIL; rendering a few hundred
    radiographs on one core took 25 minutes. The order, and so the pool, is the same for any number of workers.
    """
    images, masks = [], []
    started = last = time.monotonic()

    def keep(image: np.ndarray, mask: np.ndarray) -> None:
        nonlocal last
        images.append(image)
        masks.append(mask)
        now, done = time.monotonic(), len(images)
        if now - last >= PROGRESS_EVERY_S or done == len(seeds):
            last, each = now, (now - started) / done
            log.info(
                "rendered %d/%d subjects (%.1f s each, %.0f s left)", done, len(seeds), each, each * (len(seeds) - done)
            )

    if workers <= 1 or len(seeds) < 2:
        for seed in seeds:
            keep(*render(seed, *args))
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(max_workers=min(workers, len(seeds)), mp_context=context) as pool:
            for image, mask in pool.map(render, seeds, *(itertools.repeat(a) for a in args)):
                keep(image, mask)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(masks))


def phantom_slices(seed: int, subjects: int, size: int, slices: int, grid: int, workers: int = 1) -> SlicePool:
    """Healthy phantom CT subjects, normalised and resampled to the model grid like inference does.

    The condition is the mask the node computes (`anatomy_mask`), not the phantom's exact lungs: the model then
    learns the condition it will be given, quirks included.
    """
    images, masks = _render_subjects(_ct_subject, training_seeds(seed, subjects), (size, slices, grid), workers)
    return SlicePool(images, masks, f"phantoms(seed={seed}, subjects={subjects}, {size}x{size}x{slices})")


def radiograph_slices(seed: int, subjects: int, size: int, grid: int, workers: int = 1) -> SlicePool:
    """Healthy phantom PA chest radiographs with the typical acquisition variation, one per subject, stored as the
    phantoms' DICOM stores them (12 bits), normalised and conditioned on the lung fields as inference does.

    The projection is rendered at twice the model grid (at least 128 pixels, at most `size`: what the model grid
    resolves) and presented at `size` pixels, where the lung fields are computed as the node computes them."""
    native = min(size, max(128, 2 * grid))
    images, masks = _render_subjects(_radiograph_subject, training_seeds(seed, subjects), (size, native, grid), workers)
    return SlicePool(
        images,
        masks,
        f"radiograph phantoms(seed={seed}, subjects={subjects}, {size}x{size}, typical acquisition variation)",
    )


RADIOGRAPH_MODALITIES = ("CR", "DX")


def training_pool(cfg: TrainConfig, grid: int, workers: int = 1) -> SlicePool:
    """The run's healthy images: a DICOM folder (its modalities must be the run's), else phantoms of the run's
    kind (CT slices, or radiographs for a CR/DX model; a model for both kinds at once is refused)."""
    wanted = {m.upper() for m in cfg.modalities}
    if not wanted or not wanted <= {"CT", *RADIOGRAPH_MODALITIES}:
        raise ValueError(f"modalities {sorted(wanted)}: choose CT, or CR and/or DX")
    if cfg.data_dir:
        return dicom_slices(Path(cfg.data_dir), grid, wanted)
    if wanted == {"CT"}:
        return phantom_slices(cfg.seed, cfg.subjects, cfg.phantom_size, cfg.phantom_slices, grid, workers)
    if wanted <= set(RADIOGRAPH_MODALITIES):
        return radiograph_slices(cfg.seed, cfg.subjects, cfg.phantom_size, grid, workers)
    raise ValueError(f"modalities {sorted(wanted)}: one model is for CT or for radiographs (CR/DX), not both")


def dicom_slices(folder: Path, grid: int, modalities: set[str] | None = None) -> SlicePool:
    """Every DICOM series under `folder` (healthy by the operator's word), with the inference lung mask."""
    from inference.lungmask import anatomy_mask
    from inference.volume import load_series, to_model_grid

    by_dir: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix.lower() == ".dcm" or path.suffix == ""):
            by_dir.setdefault(path.parent, []).append(path)
    images, masks = [], []
    for files in by_dir.values():
        volume = load_series(files)
        if modalities is not None and volume.modality not in modalities:
            raise ValueError(
                f"{files[0].parent} holds {volume.modality} images; "
                f"this model is trained for {', '.join(sorted(modalities))}"
            )
        x, mapping = to_model_grid(volume, grid)
        images.append(x)
        mask = anatomy_mask(volume.pixels, volume.modality, volume.pixel_spacing, volume.normal, volume.slice_spacing)
        masks.append(mask_to_grid(mask, mapping).astype(np.float32))
    if not images:
        raise ValueError(f"no DICOM series found under {folder}")
    return SlicePool(
        torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(masks)), f"dicom({folder})"
    )


def augment(
    x: torch.Tensor, m: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small rotations, intensity jitter and (optional) flips, applied identically to image and mask."""
    n = x.shape[0]
    if cfg.rotate_degrees > 0:
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(cfg.rotate_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        m = (F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    if cfg.intensity_jitter > 0:
        j = cfg.intensity_jitter
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j
        offset = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j
        x = ((x + 1) * gain - 1 + offset).clamp(-1, 1)
    if cfg.flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        m = torch.where(flip[:, None, None, None], m.flip(-1), m)
    return x, m


def batches(pool: SlicePool, cfg: TrainConfig, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random batches; batch k depends only on (seed, k), so a resumed run sees the same data as an unbroken one."""
    step = start_step
    while True:
        gen = torch.Generator().manual_seed(splitmix64(cfg.seed, 10_000_000 + step) % 2**63)
        idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
        x, m = pool.images[idx, None], pool.masks[idx, None]
        yield augment(x, m, cfg, gen)
        step += 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fitted_steps(cfg: TrainConfig, spent_s: float, seconds_per_step: float) -> int:
    """The run's length when it must end `cfg.fit_time_s` after it began: the steps done (`warmup_steps`) plus
    as many as the time left holds at the measured pace, never more than `cfg.steps` nor fewer than the warm-up.

    Why at the end of the warm-up: the learning rate there does not depend on the run's length
    (`lr_at`), so fixing the length then gives the same schedule as a run told that length at the start.
    """
    left = max(0.0, cfg.fit_time_s - spent_s)
    return max(cfg.warmup_steps, min(cfg.steps, cfg.warmup_steps + int(left / max(seconds_per_step, 1e-9))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes it natively; on a CPU without bf16 units it would be
    emulated, slower than fp32, so that CPU trains in fp32."""
    return cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_info().bf16_units))


@dataclass
class TrainResult:
    model: UNet  # the EMA weights
    losses: list[float]
    steps_done: int
    wall_s: float
    pool_source: str
    config: TrainConfig  # the run's settings as it ended (its length fitted to `fit_time_s`)
    precision: str = "fp32"  # "bf16": autocast (weights, optimiser and loss stay fp32)
    init_from_model: str = ""  # identity of the weights a fine-tuning run started from


# Settings a checkpoint may be resumed with when they differ: how long and where the run goes, not what it learns.
RESUMABLE_CHANGES = frozenset(
    {"steps", "time_limit_s", "fit_time_s", "checkpoint_every", "checkpoint_minutes", "device", "amp"}
)
FIT_SKIP_STEPS = 10  # steps left out of the timing that fits a run to its time: allocation, kernel choice
POOL_KEYS = ("seed", "subjects", "phantom_size", "phantom_slices", "data_dir", "modalities", "body_part")


def pool_cache_path(checkpoint: Path) -> Path:
    """The training images cached beside a checkpoint: a resumed run skips rendering them again."""
    return checkpoint.with_name(checkpoint.name + ".pool.pt")


def cached_training_pool(cfg: TrainConfig, grid: int, cache: Path | None) -> SlicePool:
    """`training_pool`, read from `cache` when it holds this run's pool (same data settings and grid), else
    built and written there. Rendering a few hundred radiographs takes minutes; reading them, a second."""
    key = json.dumps({**{k: getattr(cfg, k) for k in POOL_KEYS}, "grid": grid}, sort_keys=True)
    if cache is not None and cache.exists():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved["key"] == key:
                log.info("training images from %s", cache)
                return SlicePool(saved["images"], saved["masks"].float(), saved["source"])
            log.info("%s holds another run's images: building them", cache)
        except (OSError, RuntimeError, KeyError, EOFError) as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("cannot read %s (%s): building the training images", cache, exc)
    log.info("building the training images (%d subjects)%s", cfg.subjects, f", cached in {cache}" if cache else "")
    started = time.monotonic()
    # the cores the run was given, where each process has enough subjects to repay starting it (~3 s)
    workers = min(torch.get_num_threads(), max(1, cfg.subjects // SUBJECTS_PER_RENDER_PROCESS))
    pool = training_pool(cfg, grid, workers)
    log.info("%d training images in %.0f s", len(pool), time.monotonic() - started)
    if cache is not None:
        binary = bool(((pool.masks == 0) | (pool.masks == 1)).all())  # stored as bytes: a quarter of the size
        masks = pool.masks.bool() if binary else pool.masks
        save_atomically({"key": key, "images": pool.images, "masks": masks, "source": pool.source}, cache)
    return pool


def save_atomically(state: dict[str, object], path: Path) -> None:
    """Write to a temporary file, flush it to disk, rename over `path`: a kill at any moment (kill -9 included)
    leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _check_resumable(saved: dict[str, object], cfg: TrainConfig, checkpoint: Path) -> None:
    """A checkpoint resumes only the run that wrote it (other data or another model would mix two runs)."""
    current, before = json.loads(json.dumps(asdict(cfg))), json.loads(json.dumps(saved))
    differ = sorted(k for k in current if k not in RESUMABLE_CHANGES and before.get(k, current[k]) != current[k])
    if differ:
        changes = ", ".join(f"{k}: {before.get(k)!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"checkpoint {checkpoint} belongs to a run with other settings ({changes}); "
            "resume with the same settings or use another --checkpoint"
        )


def train(
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    pool: SlicePool | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume from `checkpoint` when it exists) and return the EMA model; `stop_after` ends this run
    early at that step (with a checkpoint), as an interruption would.

    The checkpoint is written every `checkpoint_every` steps or `checkpoint_minutes` minutes, whichever comes
    first, and at the end; with a checkpoint the training images are cached beside it (`pool_cache_path`).
    Progress: a bar on a terminal, else a line every 30 s (training_report.ProgressLine).
    """
    from tqdm import tqdm

    began = time.monotonic()  # what --fit-time counts from: building the images is part of the run's time
    if cfg.fit_time_s and cfg.warmup_steps < 2 * FIT_SKIP_STEPS:
        raise ValueError(f"fitting the run to its time needs a warm-up of at least {2 * FIT_SKIP_STEPS} steps")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    unet_cfg = cfg.unet_config()
    saved = None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        _check_resumable(saved.get("config", {}), cfg, checkpoint)
    if pool is None:
        pool = cached_training_pool(cfg, unet_cfg.image_size, pool_cache_path(checkpoint) if checkpoint else None)
    model = UNet(unet_cfg).to(device)
    init_from_model = ""
    if cfg.init_from:
        initial, init_from_model = _initial_weights(Path(cfg.init_from), unet_cfg)
        model = initial.to(device)
    ema = UNet(unet_cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    # fused on a GPU: one kernel for the whole update rather than a few per parameter tensor (launch-bound there)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None
    )
    ema_params: list[torch.Tensor] = list(ema.parameters())
    model_params: list[torch.Tensor] = list(model.parameters())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN's fastest kernels are found once
    schedule = LinearSchedule()
    noise = NoiseSource(cfg.noise, cfg.noise_octaves, cfg.noise_base_frequency, cfg.noise_persistence)  # type: ignore[arg-type]
    losses: list[float] = []
    step, wall_before = 0, 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        step, losses, wall_before = saved["step"], saved["losses"], saved["wall_s"]
        if cfg.fit_time_s and step >= cfg.warmup_steps:  # the length the first run fitted stays
            cfg = replace(cfg, steps=int(saved["config"]["steps"]))
        # the start as the first run saw it: the --init file may since have been replaced by this run's weights
        init_from_model = saved.get("init_from_model", init_from_model)
        log.info("resumed from %s at step %d", checkpoint, step)
        del saved

    def save_checkpoint() -> None:
        if checkpoint is None:
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "losses": losses,
            "wall_s": wall_before + time.monotonic() - t0,
            "config": asdict(cfg),
            "init_from_model": init_from_model,
        }
        save_atomically(state, checkpoint)

    use_amp = uses_bf16(cfg, device)
    label = f"{device}, {'bf16 autocast' if use_amp else 'fp32'}, {torch.get_num_threads()} threads"
    log.info("training on %s", label)
    t0 = time.monotonic()
    last_save = t0
    data = batches(pool, cfg, step)
    bar_wanted = progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=step, disable=not bar_wanted, unit="step", dynamic_ncols=True)
    lines = ProgressLine(cfg.steps, cfg.batch_size, step, wall_before, label, enabled=progress and not bar_wanted)
    model.train()
    fit_from: tuple[int, float] | None = None  # (step, time) the pace is timed from
    while step < min(cfg.steps, stop_after or cfg.steps):
        if cfg.time_limit_s and wall_before + time.monotonic() - t0 > cfg.time_limit_s:
            log.info("time limit reached at step %d", step)
            lines.update(step, losses, "(time limit reached)", force=True)
            break
        x0, mask = next(data)
        x0, mask = x0.to(device), mask.to(device)
        if not cfg.conditioned:
            mask = torch.zeros_like(mask)
        n, _, h, w = x0.shape
        gen = torch.Generator().manual_seed(splitmix64(cfg.seed, step) % 2**63)
        t = torch.randint(0, cfg.t_max, (n,), generator=gen).to(device)
        eps = noise((n, h, w), splitmix64(cfg.seed, 20_000_000 + step), device).unsqueeze(1)
        x_t = q_sample(schedule, x0, t, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = model(x_t, mask, t.float())
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # one launch for all, not one per tensor
        losses.append(loss.item())
        step += 1
        if cfg.fit_time_s and FIT_SKIP_STEPS <= step < cfg.warmup_steps and fit_from is None:
            fit_from = (step, time.monotonic())
        elif cfg.fit_time_s and step == cfg.warmup_steps and fit_from is not None:
            pace = (time.monotonic() - fit_from[1]) / (step - fit_from[0])
            cfg = replace(cfg, steps=fitted_steps(cfg, wall_before + time.monotonic() - began, pace))
            log.info("%.1f ms per step: %d steps fit in %.0f s", 1000 * pace, cfg.steps, cfg.fit_time_s)
            lines.total = bar.total = cfg.steps
        elapsed = time.monotonic() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", img_s=f"{n * bar.n / max(elapsed, 1e-9):.1f}")
        due = cfg.checkpoint_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes
        if step % cfg.checkpoint_every == 0 or due:
            save_checkpoint()
            last_save = time.monotonic()
            lines.update(step, losses, f"checkpoint {checkpoint}" if checkpoint else "", force=checkpoint is not None)
            log.info(
                "step %d loss %.4f (mean of 50) %.1f img/s",
                step,
                float(np.mean(losses[-50:])),
                cfg.batch_size * step / max(wall_before + elapsed, 1e-9),
            )
        else:
            lines.update(step, losses)
    bar.close()
    save_checkpoint()
    lines.update(step, losses, "done" + (f", checkpoint {checkpoint}" if checkpoint else ""), force=True)
    ema.eval()
    precision = "bf16" if use_amp else "fp32"
    wall = wall_before + time.monotonic() - t0
    return TrainResult(ema, losses, step, wall, pool.source, cfg, precision, init_from_model)


def _initial_weights(path: Path, unet_cfg: UNetConfig) -> tuple[UNet, str]:
    """The weights to fine-tune from and their identity; their architecture must be the run's (a mismatch is a
    clear error).

    The model grid may differ: the U-Net is convolutional and its attention has no positional terms, so weights
    trained on a 64 grid are a sound start for a 96 or 128 grid (a finer grid costs more per step; starting from
    the coarser model saves most of the steps).
    """
    from inference.unet import load_model

    loaded, info = load_model(path)
    if replace(info.config, image_size=unet_cfg.image_size) != unet_cfg:
        raise ValueError(f"--init {path}: its architecture {info.config} differs from this run's {unet_cfg}")
    model = UNet(unet_cfg)
    model.load_state_dict(loaded.state_dict())
    if info.config.image_size != unet_cfg.image_size:
        log.info("model grid %d -> %d", info.config.image_size, unet_cfg.image_size)
    log.info("starting from %s (%s)", path, info.model_id)
    return model.train(), info.model_id


def noise_spectrum_metadata(cfg: TrainConfig) -> dict[str, float]:
    """The simplex spectrum as the weights' metadata records it (`PipelineSettings.for_model` reads it back)."""
    return {
        "octaves": cfg.noise_octaves,
        "base_frequency": cfg.noise_base_frequency,
        "persistence": cfg.noise_persistence,
    }


def ship(result: TrainResult, cfg: TrainConfig, path: Path, name: str) -> Path:
    """Write the EMA weights with the training metadata the model card and the pipeline read, and the loss curve
    beside them (`training_report.loss_curve_path`); returns the curve's path."""
    threads = torch.get_num_threads()
    device = f"cuda {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu x{threads}"
    metadata: dict[str, object] = {
        "t_start": 250,
        "t_max": cfg.t_max,
        "noise": cfg.noise,
        **({"noise_spectrum": noise_spectrum_metadata(cfg)} if cfg.noise == "simplex" else {}),
        "conditioned": cfg.conditioned,
        "grid": result.model.config.image_size,
        "preset": cfg.preset,
        "steps": result.steps_done,
        "batch_size": cfg.batch_size,
        "data": result.pool_source,
        "data_seed": cfg.seed,
        "wall_time_s": round(result.wall_s, 1),
        "precision": result.precision,
        "threads": threads,
        "final_loss_mean50": round(float(np.mean(result.losses[-50:])), 5) if result.losses else None,
        "hardware": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {device}",
        "config": json.dumps(asdict(cfg)),
    }
    if result.init_from_model:  # by identity: the --init path may be the very file these weights replace
        metadata["init_from_model"] = result.init_from_model
    save_model(result.model, path, name, metadata, modalities=cfg.modalities, body_part=cfg.body_part)
    subtitle = (
        f"{result.steps_done} steps of {cfg.batch_size}, {result.wall_s / 60:.0f} min, {result.precision}, "
        f"{device}; {result.pool_source}"
    )
    return write_loss_curve(result.losses, loss_curve_path(path), f"{name}: training loss", subtitle[:150])
