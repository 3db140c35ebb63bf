"""docs/EVALUATION.md: CT and radiograph sections on both held-out sets, from one command (`edgenode evaluate`).

Sections, each with the threshold baseline beside the model rows:
- Chest CT, set A (training ranges): the triage table, the full ablation ladder, its findings, per lesion kind;
- Chest CT, set B (shifted ranges, out of distribution): baseline and full method;
- Chest radiographs (CR/DX), sets A and B: the lung-field brightness threshold, and the radiograph model when one
  is given (`--model-cr`; without one the section says so and shows the baseline only).
Nothing here is tuned on a held-out set: lambda, steps and K are the node's, the radiograph baseline's threshold
comes from healthy training-seed radiographs.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from inference.evaluate import (
    ABLATION_MODELS,
    NODE_T_START,
    ModelDenoiser,
    Row,
    RowResult,
    default_rows,
    evaluate_row,
    radiograph_rows,
    triage_rows,
)
from inference.evaluation_tables import findings, goals, kind_table, markdown_table, triage_table
from inference.heldout import (
    GT_FRACTION,
    Case,
    assert_held_out,
    lung_field_brightness_threshold,
    make_ct_cases,
    make_radiograph_cases,
)
from inference.lung_refiner import load_refiner, refiner_phantom_seeds
from inference.phantoms import SHIFTED, TRAINING, Ranges, Span
from inference.radiograph_phantoms import SHIFTED_FIELDS, SHIFTED_RADIOGRAPHS, TYPICAL_RADIOGRAPHS
from inference.study_metrics import BOOTSTRAP_RESAMPLES, SPECIFICITY
from inference.unet import ModelInfo

Log = Callable[[str], None]
MIN_LESION_STUDIES, MIN_HEALTHY_STUDIES = 30, 15  # per modality and set, so that the spread means something
CALIBRATION_SUBJECTS = 12  # healthy training-seed radiographs the brightness threshold is taken from
SETS = ("training", "shifted")
KIND_ROWS = ("baseline", "full", "deep", "mixed")  # the CT rows of the by-kind table: deeper starts beside full


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class SetResult:
    """One held-out set's rows, as the report shows them."""

    title: str
    modality: str  # "CT" or "DX"
    ranges: str  # "training" or "shifted"
    cases: list[Case]
    # the same phantoms on the grid of an ablation model trained on another grid than the shipped model's
    cases_on_grid: dict[int, list[Case]] = field(default_factory=dict)
    results: list[RowResult] = field(default_factory=list)
    row_numbers: list[int] = field(default_factory=list)  # the row's number in the full ladder (CT set A)
    seconds: float = 0.0


@dataclass
class Models:
    """The weights a run evaluates: the CT model, the ablation models, the radiograph model."""

    ct: ModelDenoiser
    ct_info: ModelInfo
    by_row: dict[str, ModelDenoiser]  # Row.model -> denoiser
    described: dict[str, str]  # Row.model -> how the report names it
    infos: list[ModelInfo]  # every model loaded (their training seeds are excluded from every held-out set)
    radiograph: ModelDenoiser | None = None
    radiograph_info: ModelInfo | None = None


def load_models(model_path: Path, ablations: Path | None, radiograph_model: Path | None) -> Models:
    from inference.unet import load_model

    model, info = load_model(model_path)
    ct = ModelDenoiser(model, info)
    grid = info.config.image_size
    by_row: dict[str, ModelDenoiser] = {"shipped": ct}
    described = {"shipped": f"`{info.model_id}` (shipped)"}
    infos = [info]
    for key, filename in ABLATION_MODELS.items():
        path = ablations / filename if ablations else None
        if path is not None and path.exists():
            abl_model, abl_info = load_model(path)
            by_row[key] = ModelDenoiser(abl_model, abl_info)
            t = abl_info.training
            abl_grid = abl_info.config.image_size
            on_grid = f"{abl_grid}x{abl_grid} grid, " if abl_grid != grid else ""
            described[key] = (
                f"`{abl_info.model_id}` ({on_grid}{t.get('steps')} steps, {t.get('noise')}, "
                f"cond {t.get('conditioned')})"
            )
            infos.append(abl_info)
        else:
            by_row[key] = ct
            described[key] = f"`{info.model_id}` (shipped weights, component switched off at inference only)"
    models = Models(ct, info, by_row, described, infos)
    if radiograph_model is not None:
        rx_model, rx_info = load_model(radiograph_model)
        if not {"CR", "DX"} & set(rx_info.modalities):
            raise ValueError(
                f"{radiograph_model}: its metadata names {rx_info.describe_training()}, not CR or DX: "
                "not a radiograph model"
            )
        models.radiograph, models.radiograph_info = ModelDenoiser(rx_model, rx_info), rx_info
        models.infos.append(rx_info)
    return models


def training_seeds_of(infos: Sequence[ModelInfo]) -> set[int]:
    from inference.train import model_training_seeds

    return {s for info in infos for s in model_training_seeds(info.training)}


def run_set(
    result: SetResult,
    numbered: Sequence[tuple[int, Row]],
    models: Models,
    seed: int,
    lam: float,
    resamples: int,
    log: Log,
) -> SetResult:
    """Run the rows on the set's cases, one progress line per row."""
    start = time.perf_counter()
    for i, (number, row) in enumerate(numbered, 1):
        t0 = time.perf_counter()
        denoiser = models.radiograph if result.modality != "CT" else models.by_row[row.model]
        if row.method == "intensity":
            denoiser = None
        cases = result.cases
        if denoiser is not None and denoiser.grid in result.cases_on_grid:
            # an ablation model of another grid: the same studies on its grid (Dice and pixel metrics count its
            # grid's pixels; the study and slice metrics compare with the other rows as they are)
            cases = result.cases_on_grid[denoiser.grid]
            on_grid = f"{denoiser.grid}x{denoiser.grid} grid"
            row = replace(row, note=f"{row.note}; {on_grid}" if row.note else on_grid)
        r = evaluate_row(row, cases, denoiser, seed, lam, resamples)
        result.results.append(r)
        result.row_numbers.append(number)
        study = f", study AUROC {r.study.auroc:.3f}" if r.study else ""
        log(
            f"[{result.title}] row {i}/{len(numbered)} ({row.label}): {r.n_cases} studies, {r.n_slices} slices, "
            f"{time.perf_counter() - t0:.1f} s{study}"
        )
    result.seconds = time.perf_counter() - start
    return result


# --- the report ----------------------------------------------------------------------------------------------


def _n(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _span(span: Span) -> str:
    return " or ".join(f"{_n(lo)} to {_n(hi)}" if lo != hi else _n(lo) for lo, hi in span)


def _scanners(ranges: Ranges) -> str:
    return "<br>".join(
        f"{s.name} {s.kernel}: noise {s.noise_hu:g} HU, blur {s.blur_mm:g} mm, edge gain {s.sharpen:g}, {s.kvp} kVp"
        for s in ranges.scanners
    )


def ranges_table(train: Ranges = TRAINING, shifted: Ranges = SHIFTED) -> str:
    """CT draws of the training data / set A against set B, from the Ranges themselves."""
    rows = [
        ("Body size (scale of body, lungs, heart, z extent)", _span(train.body_scale), _span(shifted.body_scale)),
        ("Scanners and kernels", _scanners(train), _scanners(shifted)),
    ]
    for kind in ("nodule", "ggo", "consolidation", "reticular"):
        rows.append((f"{kind} size (mm)", _span(train.size_mm(kind)), _span(shifted.size_mm(kind))))
    for kind, what in (
        ("nodule", "nodule density (HU)"),
        ("ggo", "ground-glass lift over lung (HU)"),
        ("consolidation", "consolidation density (HU)"),
        ("reticular", "reticular line density (HU)"),
    ):
        rows.append((what, _span(train.density_hu(kind)), _span(shifted.density_hu(kind))))
    head = "| CT parameter | training data and set A | set B (shifted) |\n|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n"


def radiograph_ranges_table() -> str:
    """The radiograph acquisition ranges set B moves outside the typical (training and set A) ones."""
    labels = {
        "kvp": "Tube voltage (kVp)",
        "fluence": "Fluence without the patient (photons / mm^2)",
        "read_noise": "Detector read noise (photons / pixel)",
        "scatter": "Scatter fraction per interaction (no grid)",
        "blur_mm": "Detector blur (mm)",
        "line_gain": "Detector line-gain noise (std)",
        "gamma": "Presentation exponent",
        "window": "Line integral shown white",
    }
    head = "| Radiograph acquisition | training data and set A | set B (shifted) |\n|---|---|---|\n"
    rows = [
        f"| {labels[name]} | {_span((getattr(TYPICAL_RADIOGRAPHS, name),))} "
        f"| {_span((getattr(SHIFTED_RADIOGRAPHS, name),))} |"
        for name in SHIFTED_FIELDS
    ]
    return head + "\n".join(rows) + "\n"


def _set_description(s: SetResult) -> str:
    lesion = [c for c in s.cases if c.lesion_study]
    healthy = [c for c in s.cases if not c.lesion_study]
    kinds = ", ".join(f"{k} {sum(c.kind == k for c in lesion)}" for k in dict.fromkeys(c.kind for c in lesion))
    small = ""
    if len(lesion) < MIN_LESION_STUDIES or len(healthy) < MIN_HEALTHY_STUDIES:
        small = (
            f" **Below the {MIN_LESION_STUDIES} lesion / {MIN_HEALTHY_STUDIES} healthy studies the spread needs:"
            " the intervals are wide.**"
        )
    sizes = []
    for kind in ("nodule", "ggo", "consolidation", "reticular"):
        # a mixed study's lesions are of any kind; its sizes are not attributed here
        drawn = [size for c in lesion if c.kind == kind for size in c.lesion_sizes_mm]
        if drawn:
            sizes.append(f"{kind} {min(drawn):.0f}-{max(drawn):.0f} mm")
    drawn_sizes = f" Lesion sizes drawn: {', '.join(sizes)}." if sizes else ""
    shape = s.cases[0].image.shape if s.cases else (0, 0, 0)
    unit = f"{shape[0]} slices of {shape[1]}x{shape[2]}" if s.modality == "CT" else f"{shape[1]}x{shape[2]}"
    return (
        f"{len(lesion)} lesion studies ({kinds}) and {len(healthy)} healthy studies, {unit} on the model grid; "
        f"rows ran for {s.seconds / 60:.1f} min.{drawn_sizes}{small}"
    )


def _ct_section(s: SetResult, models: Models, full_ladder: bool, resamples: int, seed: int) -> str:
    text = f"## {s.title}\n\n{_set_description(s)}\n\n### Triage (study level)\n\n{triage_table(s.results)}\n"
    text += goals(s.results, "CT") + "\n"
    text += f"### Pixel and slice metrics\n\n{markdown_table(s.results)}\n"
    if full_ladder:
        models_used = "\n".join(
            f"- row {i} ({r.row.label}): {models.described[r.row.model]}"
            for i, r in enumerate(s.results, 1)
            if r.row.method != "intensity"
        )
        text += f"Weights per row:\n\n{models_used}\n\n"
    text += f"### What the rows say (computed from the tables)\n\n{findings(s.results, resamples, seed)}\n"
    by_kind = [r for r in s.results if r.row.key in KIND_ROWS]
    text += f"### By lesion kind\n\n{kind_table(by_kind)}\n"
    return text


def _radiograph_section(s: SetResult, models: Models, resamples: int, seed: int) -> str:
    text = f"## {s.title}\n\n{_set_description(s)}\n\n"
    if models.radiograph_info is None:
        text += (
            "**No radiograph model was given (`--model-cr`): this section shows the brightness-threshold baseline"
            " only.** The node sends nothing for a CR/DX series unless a model trained for CR/DX is configured.\n\n"
        )
    else:
        info = models.radiograph_info
        text += (
            f"Radiograph model: `{info.model_id}` (grid {info.config.image_size}, {info.describe_training()}, "
            f"trained {info.training.get('steps')} steps on {info.training.get('data')}).\n\n"
        )
    text += f"### Triage (study level: one image per study)\n\n{triage_table(s.results, slices=False)}\n"
    if models.radiograph_info is not None:
        text += goals(s.results, "DX") + "\n"
        text += findings(s.results, resamples, seed, unit="Image") + "\n"
    text += f"### Pixel metrics\n\n{markdown_table(s.results, unit='Image')}\n"
    text += f"### By lesion kind\n\n{kind_table(s.results)}\n"
    return text


def figure(ct: SetResult, path: Path, denoiser: ModelDenoiser, seed: int) -> None:
    """Bar chart of Dice, slice AUROC and study AUROC per CT row, and one example case: input, reconstruction,
    error, segmentation, truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inference.pipeline import PipelineSettings, detect

    results = ct.results
    fig = plt.figure(figsize=(14, 8))
    ax = fig.add_subplot(2, 1, 1)
    xs = np.arange(len(results))
    dice_m = [r.summary("dice")[0] for r in results]
    dice_s = [r.summary("dice")[1] for r in results]
    img = [r.image["auroc"] for r in results]
    study = [r.study.auroc if r.study else np.nan for r in results]
    ax.bar(xs - 0.27, dice_m, 0.27, yerr=dice_s, label="Dice (lesion cases, mean ± std)")
    ax.bar(xs, img, 0.27, label="Slice AUROC")
    ax.bar(xs + 0.27, study, 0.27, label="Study AUROC (whole-study rows)")
    ax.set_xticks(xs, [str(n) for n in ct.row_numbers])
    ax.set_xlabel(f"row of the table ({ct.title})")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    cases = ct.cases
    case = next((c for c in cases if c.kind != "none" and c.lesion.any()), cases[0])
    k = int(np.argmax(case.lesion.sum(axis=(1, 2))))
    settings = PipelineSettings(ensemble=3, seed=seed).for_model(denoiser.training)
    det = detect(case.image[k : k + 1], case.anatomy[k : k + 1], denoiser, settings, "CT")
    panels = [
        ("input", case.image[k], "gray"),
        ("reconstruction (mean)", det.reconstruction[0], "gray"),
        ("anomaly map", det.anomaly_map[0], "magma"),
        ("segmentation", det.segmentation[0].astype(float), "gray"),
        ("ground truth", case.lesion[k].astype(float), "gray"),
    ]
    for i, (title, arr, cmap) in enumerate(panels):
        a = fig.add_subplot(2, 5, 6 + i)
        a.imshow(arr, cmap=cmap)
        a.set_title(f"{title}" if i else f"{title} ({case.kind})")
        a.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(
    model_path: Path,
    out: Path,
    figure_path: Path,
    *,
    radiograph_model: Path | None = None,
    lesion_cases: int = MIN_LESION_STUDIES,
    healthy_cases: int = MIN_HEALTHY_STUDIES,
    ensemble: int = 3,
    subset_cases: int = 3,
    subset_slices: int = 6,
    every_step_cases: int = 2,
    every_step_slices: int = 2,
    lam: float = 6.0,
    lam_radiograph: float = 3.0,
    seed: int = 0,
    only_rows: Sequence[int] | None = None,
    ablations: Path | None = None,
    grid_source_size: int = 192,
    slices: int = 16,
    radiograph_size: int = 256,
    sets: Sequence[str] = SETS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    calibration_subjects: int = CALIBRATION_SUBJECTS,
    lung_refiner: Path | None = None,
    log: Log = log_stderr,
) -> list[SetResult]:
    """Build the held-out sets, run the rows, write the Markdown report and the figure; the sets' results.
    `lung_refiner`: the CT lung refiner every CT row's mask is refined with, as the node's (None: threshold mask)."""
    from inference.train import TrainConfig, training_seeds

    wall = time.perf_counter()
    unknown = set(sets) - set(SETS)
    if unknown or not sets:
        raise ValueError(f"sets {sorted(unknown) or '(none)'}: choose from {', '.join(SETS)}")
    torch.manual_seed(seed)
    models = load_models(model_path, ablations, radiograph_model)
    info = models.ct_info
    grid = info.config.image_size
    rx_grid = models.radiograph_info.config.image_size if models.radiograph_info else grid
    excluded = training_seeds_of(models.infos)
    refiner = load_refiner(lung_refiner) if lung_refiner is not None else None
    if refiner is not None:  # its training phantoms are not held out either
        excluded |= refiner_phantom_seeds(refiner.info)
    # the radiograph baseline's threshold, from healthy training-seed radiographs (the radiograph model's own when
    # given, else the default training run's)
    rx_training = sorted(training_seeds_of([models.radiograph_info])) if models.radiograph_info else []
    calibration = (rx_training or training_seeds(TrainConfig().seed, TrainConfig().subjects))[:calibration_subjects]
    excluded |= set(calibration)

    t_max = info.training.get("t_max")
    trained_t_max = int(t_max) if isinstance(t_max, int | float) else None
    ladder = default_rows(ensemble, subset_cases, subset_slices, every_step_cases, every_step_slices, trained_t_max)
    numbered = [(i + 1, r) for i, r in enumerate(ladder) if only_rows is None or (i + 1) in only_rows]
    chosen_keys = {r.key for _, r in numbered}
    ood_keys = {x.key for x in triage_rows(ensemble, trained_t_max)} & chosen_keys
    ood_rows = [(n, r) for n, r in numbered if r.key in ood_keys]

    results: list[SetResult] = []
    t0 = time.perf_counter()
    threshold = lung_field_brightness_threshold(calibration, radiograph_size)
    log(
        f"radiograph baseline threshold {threshold:.4f} from {len(calibration)} training radiographs "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    for ranges_name in sets:
        t0 = time.perf_counter()
        ranges = TRAINING if ranges_name == "training" else SHIFTED
        cases = make_ct_cases(
            seed, lesion_cases, healthy_cases, grid, grid_source_size, slices, ranges, refiner=refiner
        )
        assert_held_out([c.seed for c in cases], excluded, f"CT set {ranges_name}")
        ct = SetResult(f"Chest CT, held-out set {_letter(ranges_name)}", "CT", ranges_name, cases)
        rows = numbered if ranges_name == "training" else ood_rows
        for other in sorted({models.by_row[r.model].grid for _, r in rows if r.method != "intensity"} - {grid}):
            ct.cases_on_grid[other] = make_ct_cases(
                seed, lesion_cases, healthy_cases, other, grid_source_size, slices, ranges, refiner=refiner
            )
            if [c.seed for c in ct.cases_on_grid[other]] != [c.seed for c in cases]:
                raise ValueError(f"CT set {ranges_name}: the studies on the {other} grid differ")
        log(f"[{ct.title}] {len(cases)} studies rendered in {time.perf_counter() - t0:.1f} s")
        results.append(run_set(ct, rows, models, seed, lam, resamples, log))
    rx_rows = radiograph_rows(ensemble, threshold, models.radiograph is not None)
    for ranges_name in sets:
        t0 = time.perf_counter()
        rx_cases = make_radiograph_cases(
            seed, lesion_cases, healthy_cases, rx_grid, radiograph_size, shifted=ranges_name == "shifted"
        )
        assert_held_out([c.seed for c in rx_cases], excluded, f"radiograph set {ranges_name}")
        rx = SetResult(f"Chest radiographs (CR/DX), held-out set {_letter(ranges_name)}", "DX", ranges_name, rx_cases)
        log(f"[{rx.title}] {len(rx_cases)} studies rendered in {time.perf_counter() - t0:.1f} s")
        results.append(run_set(rx, list(enumerate(rx_rows, 1)), models, seed, lam_radiograph, resamples, log))
    all_seeds = [c.seed for s in results for c in s.cases]
    if len(set(all_seeds)) != len(all_seeds):
        raise ValueError("two held-out studies share a seed: the sets overlap")

    ct_a = next((s for s in results if s.modality == "CT" and s.ranges == "training"), None)
    if ct_a is not None and ct_a.results:
        figure(ct_a, figure_path, models.ct, seed)
    minutes = (time.perf_counter() - wall) / 60
    command = _command(
        model_path,
        radiograph_model,
        ablations,
        lesion_cases,
        healthy_cases,
        ensemble,
        subset_cases,
        subset_slices,
        every_step_cases,
        every_step_slices,
        grid_source_size,
        slices,
        radiograph_size,
        seed,
        only_rows,
        sets,
        resamples,
        lung_refiner,
    )
    training = info.training
    trained = training.get("noise_spectrum")
    spectrum = ""
    if isinstance(trained, dict):
        spectrum = f" (persistence {trained['persistence']}, {trained['octaves']} octaves)"
    started = f", fine-tuned from `{training['init_from_model']}`" if training.get("init_from_model") else ""
    from inference.pipeline import PipelineSettings

    sizes = PipelineSettings().for_model(training)
    whose = "the CT model's own, from its metadata" if "segmentation" in training else "the pipeline's defaults"
    cleaning = (
        f"CT segmentation: a {sizes.median_size}x{sizes.median_size} median filter of the error map (1x1 = none), "
        f"opening / closing {sizes.opening} / {sizes.closing} iteration(s), components of at least "
        f"{sizes.min_component_size} voxels ({whose}; the ablation rows' models and the radiograph model use the "
        "pipeline's defaults)"
    )
    mask_text = "the threshold mask alone (`--lung-refiner off`)"
    if refiner is not None:
        mask_text = f"the threshold mask refined by `{refiner.model_id}` (inference/lung_refiner.py), as the node's"
    sections = []
    for s in results:
        if s.modality == "CT":
            sections.append(_ct_section(s, models, s.ranges == "training", resamples, seed))
        else:
            sections.append(_radiograph_section(s, models, resamples, seed))
    text = f"""# Evaluation on held-out phantoms

Regenerate this page and its figure (fixed seed {seed}; this run took {minutes:.0f} min with
{torch.get_num_threads()} torch thread(s) on {platform.processor() or platform.machine()}, printing one line per row):

    {command}

- CT lung mask (every CT row's condition and inside): {mask_text}.
- CT model: `{info.model_id}` (grid {grid}x{grid}, trained {training.get("steps")} steps on
  {training.get("data")}{started}, {training.get("noise")} noise{spectrum}, mask-conditioned:
  {training.get("conditioned")}).
- **Study score** (the triage decision): exactly the score the node ranks its worklist by and sends in its SR, the
  pipeline's `study_score` = the maximum of the slice scores, a slice score being the root of the mean of
  the 20 largest in-mask values of the squared error median-filtered over 5 x 5 pixels (docs/method.md). For the
  threshold baselines: the maximum over slices of the 99th percentile of the value (HU, or radiograph
  brightness) inside the node's mask.
- **Study AUROC**: P(a lesion study scores above a healthy one). **Sensitivity at {SPECIFICITY:.0%} specificity**:
  lesion studies flagged (score above the threshold column) when the threshold is the lowest that leaves
  {SPECIFICITY:.0%} of the healthy studies unflagged. Brackets: 95 % percentile bootstrap intervals over studies
  ({resamples} stratified resamples, seed {seed}). Per lesion kind: that kind's lesion studies against all healthy
  studies. Rows run on slice subsets have no study score.
- Held-out sets: seeds from their own streams (`inference.heldout`), checked in code to share none with the
  training seeds of every model evaluated (`assert_held_out`) and with each other. Set B is rendered outside the
  training ranges (tables at the end). Lesion studies take nodule, GGO, consolidation, reticular, mixed in
  rotation.
- Ground truth on the model grid: a pixel is a lesion pixel when >= {GT_FRACTION:.0%} of its area is lesion; a
  study is a lesion study when its phantom holds lesion voxels.
- The node's settings, nothing tuned on these sets: t_start {NODE_T_START["CT"]} (CT) / {NODE_T_START["DX"]} (CR/DX) of
  T = 1000, DDIM sampler, lambda = {lam} (CT) / {lam_radiograph} (CR/DX); {cleaning}. Fixed-threshold rows (no
  adaptive threshold) use the pipeline's `fixed_threshold` (0.05 on the squared error).
- Pixel metrics: mean (std) over the lesion cases, over the exact lungs together with the node's anatomy mask
  (lesions the node's mask leaves out count as misses); FPR over all cases. Slice level (CT): every slice is an
  image (positive: holds lesion pixels); F1 of "slice has a segmented pixel".
- Seconds per slice / study: wall time of the row divided by its slices / studies, fp32 torch {torch.__version__}
  on a shared machine: indicative only (benchmarks/ has the node's timings).

{"".join(sections)}
## The held-out sets' ranges

CT phantoms (`inference.phantoms.TRAINING` / `SHIFTED`; every set B range lies outside the training range):

{ranges_table()}
A phantom keeps a lesion only when it changes at least 8 voxels of the source volume (`phantoms.add_lesion`), so
with thick slices the smallest lesions of a range are rarely or never drawn; each set's "Lesion sizes drawn" line
says what was.

Radiographs: `make_radiograph` draws each radiograph's acquisition from `radiograph_phantoms.TYPICAL_RADIOGRAPHS`
(training and set A) or `SHIFTED_RADIOGRAPHS` (set B), whose ranges below lie outside the typical ones; geometry,
collimation, grid, markers, subjects and lesions are drawn as in training in both sets.

{radiograph_ranges_table()}
Radiograph baseline threshold {threshold:.4f}: the 99th percentile of presentation values in the node's lung-field
mask over {len(calibration)} healthy training-seed radiographs.

![Evaluation figure]({figure_path.name})

The figure's rows are numbered as in the CT set A tables.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out} in {minutes:.1f} min")
    return results


def _letter(ranges_name: str) -> str:
    return "A (training ranges)" if ranges_name == "training" else "B (shifted ranges, out of distribution)"


def _command(
    model_path: Path,
    radiograph_model: Path | None,
    ablations: Path | None,
    lesion_cases: int,
    healthy_cases: int,
    ensemble: int,
    subset_cases: int,
    subset_slices: int,
    every_step_cases: int,
    every_step_slices: int,
    source_size: int,
    slices: int,
    radiograph_size: int,
    seed: int,
    only_rows: Sequence[int] | None,
    sets: Sequence[str],
    resamples: int,
    lung_refiner: Path | None = None,
) -> str:
    """The command line that reproduces the run (paths relative to the working directory when inside it)."""
    parts = [f"edgenode evaluate --threads {torch.get_num_threads()} --model {_rel(model_path)}"]
    if radiograph_model is not None:
        parts.append(f"--model-cr {_rel(radiograph_model)}")
    if ablations is not None:
        parts.append(f"--ablations {_rel(ablations)}")
    parts += [
        f"--lesion-cases {lesion_cases} --healthy-cases {healthy_cases} --ensemble {ensemble}",
        f"--subset-cases {subset_cases} --subset-slices {subset_slices}",
        f"--every-step-cases {every_step_cases} --every-step-slices {every_step_slices}",
        f"--source-size {source_size} --slices {slices} --radiograph-size {radiograph_size}",
        f"--bootstrap {resamples} --seed {seed}",
    ]
    if only_rows is not None:
        parts.append("--rows " + ",".join(str(r) for r in only_rows))
    if tuple(sets) != SETS:
        parts.append("--sets " + ",".join(sets))
    parts.append(f"--lung-refiner {_rel(lung_refiner) if lung_refiner is not None else 'off'}")
    return " \\\n        ".join(parts)


def _rel(path: Path) -> str:
    """A path relative to the working directory when it is inside it (for the reproducible command line)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
