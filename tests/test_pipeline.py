"""The pipeline end to end on DICOM files: a nodule the "healthy" oracle cannot reconstruct is found on its slice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.diffusion import LinearSchedule
from inference.pipeline import PipelineSettings, detect, run_pipeline
from inference.unet import PRESETS, ModelInfo, save_model
from inference.volume import load_series, to_model_grid
from tests.dicomgen import make_ct_series, make_dx, write_datasets
from tests.test_diffusion import OracleDenoiser, TinyUNetDenoiser

TINY_INFO = ModelInfo(name="oracle", config=PRESETS["tiny"], sha256="0" * 64)


def fast_settings(**kw: object) -> PipelineSettings:
    base = PipelineSettings(t_start={"CT": 200, "DX": 150, "CR": 150}, steps=3, ensemble=2, min_component_size=2)
    return replace(base, **kw)


def nodule_series(tmp_path: Path) -> tuple[list[Path], list[Path], int, np.ndarray]:
    """Two copies of one CT series (same UIDs), the second with a soft-tissue nodule in the right lung."""
    healthy = make_ct_series(4, 48, 48, seed=5, shuffle_instance_numbers=True)
    sick = make_ct_series(4, 48, 48, seed=5, shuffle_instance_numbers=True)
    for a, b in zip(healthy, sick, strict=True):
        b.SOPInstanceUID = a.SOPInstanceUID
        b.file_meta.MediaStorageSOPInstanceUID = a.SOPInstanceUID
        b.SeriesInstanceUID = a.SeriesInstanceUID
    k = 2  # by position; files are written in reverse so file order != slice order
    yy, xx = np.mgrid[0:48, 0:48]
    nodule = (yy - 22) ** 2 + (xx - 34) ** 2 <= 9
    raw = np.frombuffer(sick[k].PixelData, np.uint16).reshape(48, 48).copy()
    raw[nodule] = 1024 + 40
    sick[k].PixelData = raw.tobytes()
    return (
        write_datasets(healthy[::-1], tmp_path / "healthy"),
        write_datasets(sick[::-1], tmp_path / "sick"),
        k,
        nodule,
    )


class HealthyOracle(OracleDenoiser):
    """Returns the noise that would make x_t come from the healthy image (+ a faint global texture), i.e. a
    perfect model of normal anatomy: what differs from it (the nodule) cannot be reconstructed."""


def test_nodule_is_found_on_its_source_slice(tmp_path: Path) -> None:
    healthy_files, sick_files, k, nodule = nodule_series(tmp_path)
    settings = fast_settings(ensemble=3)
    grid, _ = to_model_grid(load_series(healthy_files), 32)
    texture = 0.01 * np.sin(np.arange(32) / 3.0)[None, None, :] * np.ones((4, 32, 1))
    healthy = torch.from_numpy((grid + texture).astype(np.float32))[:, None]
    # One chunk holds all members x slices, so the oracle can follow items in order.
    oracle = HealthyOracle(healthy.repeat(settings.ensemble, 1, 1, 1), LinearSchedule(), max_batch=64)
    stages: list[str] = []
    result = run_pipeline(sick_files, oracle, TINY_INFO, settings, progress=lambda s, f: stages.append(s))

    vol = load_series(sick_files)
    assert result.source_sop_instance_uids == vol.sop_instance_uids
    assert result.anomaly_map.shape == result.segmentation.shape == result.anatomy_mask.shape == (4, 48, 48)
    assert result.uncertainty_map.shape == (4, 48, 48) and result.slice_scores.shape == (4,)
    assert result.top_slices(1) == [k]
    assert result.positive and result.segmentation[k].sum() > 0
    others = [i for i in range(4) if i != k]
    assert not result.segmentation[others].any()
    seg = result.segmentation[k]
    dice = 2 * (seg & nodule).sum() / (seg.sum() + nodule.sum())
    assert dice >= 0.6, dice
    assert result.slice_scores[k] > 5 * result.slice_scores[others].max()
    assert result.study_score == pytest.approx(float(result.slice_scores[k]))
    assert result.anomalous_volume_mm3 == pytest.approx(seg.sum() * 0.7 * 0.7 * 2.5)
    assert result.model_id == TINY_INFO.model_id and result.modality == "CT"
    assert result.settings["t_start"] == 200 and result.settings["timesteps"] == [200, 100, 0]
    assert result.settings["deep_t_start"] is None  # one depth unless a mixed-depth ensemble is configured
    assert {"load", "mask", "resample", "reconstruct", "postprocess", "map_back"} <= set(result.timings)
    assert stages[0] == "load" and "reconstruct" in stages and stages[-1] == "done"
    assert 0 < result.anomalous_fraction < 0.2


def test_a_left_out_slice_is_interpolated_for_the_analysis_and_never_reported(tmp_path: Path) -> None:
    import pydicom

    from inference.volume import GridMapping, fill_left_out_slices, normalise, resample_to_grid
    from tests.dicomgen import make_undecodable

    healthy_files, sick_files, k, nodule = nodule_series(tmp_path)
    damaged = sick_files[3 - 1]  # files are in reverse order: this is the slice at position 1, beside the nodule
    ds = pydicom.dcmread(damaged)
    make_undecodable(ds).save_as(damaged)
    settings = fast_settings(ensemble=3)
    # The healthy model sees what the pipeline analyses: slices 0, 2, 3 and slice 1 interpolated between 0 and 2.
    full = load_series(healthy_files)
    regular = fill_left_out_slices(full.pixels[[0, 2, 3]], np.array([0, 2, 3]))
    grid = resample_to_grid(normalise(regular, "CT"), GridMapping(48, 48, 32), fill=-1.0)
    texture = 0.01 * np.sin(np.arange(32) / 3.0)[None, None, :] * np.ones((4, 32, 1))
    healthy = torch.from_numpy((grid + texture).astype(np.float32))[:, None]
    oracle = HealthyOracle(healthy.repeat(settings.ensemble, 1, 1, 1), LinearSchedule(), max_batch=64)
    result = run_pipeline(sick_files, oracle, TINY_INFO, settings)

    kept = [full.sop_instance_uids[i] for i in (0, 2, 3)]
    assert result.source_sop_instance_uids == kept
    assert [left.sop_instance_uid for left in result.left_out] == [full.sop_instance_uids[1]]
    assert result.anomaly_map.shape == result.segmentation.shape == result.anatomy_mask.shape == (3, 48, 48)
    assert result.uncertainty_map.shape == (3, 48, 48) and result.slice_scores.shape == (3,)
    assert result.top_slices(1) == [1]  # the nodule's slice, position 2, is the second analysed slice
    assert result.segmentation[1].any() and not result.segmentation[[0, 2]].any()
    assert result.study_score == pytest.approx(float(result.slice_scores.max()))
    assert result.anomalous_volume_mm3 == pytest.approx(result.segmentation.sum() * 0.7 * 0.7 * 2.5)


def test_healthy_series_is_negative(tmp_path: Path) -> None:
    healthy_files, sick_files, _, _ = nodule_series(tmp_path)
    settings = fast_settings()
    grid, _ = to_model_grid(load_series(healthy_files), 32)
    texture = 0.01 * np.sin(np.arange(32) / 3.0)[None, None, :] * np.ones((4, 32, 1))
    healthy = torch.from_numpy((grid + texture).astype(np.float32))[:, None]
    oracle = HealthyOracle(healthy.repeat(settings.ensemble, 1, 1, 1), LinearSchedule(), max_batch=64)
    result = run_pipeline(healthy_files, oracle, TINY_INFO, settings)
    assert not result.positive
    sick = run_pipeline(sick_files, oracle, TINY_INFO, settings)
    assert sick.positive and result.study_score < sick.study_score / 5, (result.study_score, sick.study_score)


def test_radiograph_with_tiny_unet(tmp_path: Path) -> None:
    model = TinyUNetDenoiser(max_batch=4)
    info = save_model(model.model, tmp_path / "tiny.safetensors", "tiny")
    files = write_datasets([make_dx(40, 40, monochrome1=True)], tmp_path / "dx")
    result = run_pipeline(files, model, info, fast_settings(sampler="ddpm", ensemble=3))
    assert result.modality == "DX" and result.anomaly_map.shape == (1, 40, 40)
    assert np.isfinite(result.anomaly_map).all() and (result.anomaly_map >= 0).all()
    assert result.uncertainty_map.max() > 0  # members differ
    assert result.anatomy_mask.any() and result.model_id == info.model_id
    assert result.slice_thickness_mm == 1.0 and result.pixel_spacing_mm == (0.5, 0.5)


class CondRecorder(OracleDenoiser):
    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.cond_max = float(cond.max())
        self.batch = x_t.shape[0]
        return super().__call__(x_t, cond, t)


def test_detect_on_model_grid_and_switches() -> None:
    x0 = torch.linspace(-0.9, 0.9, 2 * 16 * 16).reshape(2, 16, 16)
    mask = np.zeros((2, 16, 16), bool)
    mask[:, 4:12, 4:12] = True
    oracle = CondRecorder(x0[:, None].repeat(2, 1, 1, 1), LinearSchedule(), max_batch=64)
    det = detect(x0.numpy(), mask, oracle, fast_settings(), "CT")
    assert oracle.cond_max == 1.0 and oracle.batch == 4
    assert det.anomaly_map.max() < 1e-8 and not det.segmentation.any()
    assert det.reconstruction.shape == (2, 16, 16)
    oracle = CondRecorder(x0[:, None].repeat(2, 1, 1, 1), LinearSchedule(), max_batch=64)
    det = detect(x0, mask, oracle, fast_settings(use_mask_condition=False, noise="gaussian", stride=50), "CT")
    assert oracle.cond_max == 0.0
    with pytest.raises(ValueError, match="must both be"):
        detect(x0.numpy(), mask[:, :8], oracle, fast_settings())


def test_ct_outlines_only_what_is_denser_than_the_reconstruction_and_scores_both() -> None:
    healthy = torch.full((2, 24, 24), -0.6)
    mask = np.zeros((2, 24, 24), bool)
    mask[:, 2:22, 2:22] = True
    sick = healthy.clone()
    sick[0, 6:11, 6:11] += 0.8  # an opacity: denser than the healthy reconstruction
    sick[1, 12:17, 12:17] -= 0.3  # a darker patch (a cyst, say)
    found = {}
    for polarity in ("denser", "both"):
        oracle = OracleDenoiser(healthy[:, None].repeat(2, 1, 1, 1), LinearSchedule(), max_batch=64)
        settings = fast_settings(segment_polarity={"CT": polarity})
        found[polarity] = detect(sick.numpy(), mask, oracle, settings, "CT")
    denser, both = found["denser"], found["both"]
    assert denser.segmentation[0, 7:10, 7:10].all() and not denser.segmentation[1].any()  # (corners: the opening)
    assert both.segmentation[0, 7:10, 7:10].all() and both.segmentation[1, 13:16, 13:16].all()
    # the darker patch still ranks its slice: the scores and the threshold do not depend on the polarity
    np.testing.assert_allclose(denser.slice_scores, both.slice_scores)
    assert denser.slice_scores[1] > 0.2 and denser.threshold == both.threshold
    assert PipelineSettings().polarity_for("CT") == "denser" and PipelineSettings().polarity_for("DX") == "both"


def test_max_batch_setting_caps_the_denoiser() -> None:
    x0 = torch.zeros(3, 8, 8)
    mask = np.ones((3, 8, 8), bool)
    unet = TinyUNetDenoiser(max_batch=16)
    seen: list[int] = []
    inner = unet.__call__

    class Spy:
        name, device, dtype, model_id, max_batch = unet.name, unet.device, unet.dtype, unet.model_id, 16

        def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(x_t.shape[0])
            return inner(x_t, cond, t)

    detect(x0, mask, Spy(), fast_settings(max_batch=4, ensemble=2, steps=2), "CT")
    assert max(seen) == 4 and sum(seen) == 6 * 2


def test_mixed_depth_settings_give_a_second_schedule_between_t_start_and_T() -> None:
    settings = PipelineSettings(t_start={"CT": 250}, deep_t_start={"CT": 550}, steps=3)
    assert settings.deeper_timesteps("CT") == [[550, 275, 0]] and settings.deeper_timesteps("DX") == []
    with pytest.raises(ValueError, match="between t_start and T"):
        PipelineSettings(t_start={"CT": 250}, deep_t_start={"CT": 200}).deeper_timesteps("CT")


def test_the_pipeline_diffuses_with_the_noise_spectrum_its_model_was_trained_with(tmp_path: Path) -> None:
    _, sick_files, _, _ = nodule_series(tmp_path)
    spectrum = {"octaves": 3, "base_frequency": 0.125, "persistence": 0.5}
    trained = replace(TINY_INFO, training={"noise": "simplex", "noise_spectrum": spectrum})
    settings = fast_settings(ensemble=1)
    result = run_pipeline(sick_files, TinyUNetDenoiser(max_batch=4), trained, settings)
    assert {k: result.settings[k] for k in spectrum} == spectrum
    # A model whose metadata predates the key was trained with the defaults: the settings stay as they are.
    older = run_pipeline(sick_files, TinyUNetDenoiser(max_batch=4), TINY_INFO, settings)
    assert (older.settings["octaves"], older.settings["persistence"]) == (settings.octaves, settings.persistence)
    assert not np.allclose(older.anomaly_map, result.anomaly_map)


def test_the_pipeline_segments_with_the_pixel_sizes_its_model_carries(tmp_path: Path) -> None:
    """A model chosen with other segmentation sizes (a finer grid) carries them; the result records them."""
    _, sick_files, _, _ = nodule_series(tmp_path)
    sizes = {"median_size": 1, "opening": 0, "closing": 0, "min_component_size": 9}
    chosen = replace(TINY_INFO, training={"segmentation": sizes})
    settings = fast_settings(ensemble=1)
    result = run_pipeline(sick_files, TinyUNetDenoiser(max_batch=4), chosen, settings)
    assert {k: result.settings[k] for k in sizes} == sizes
    plain = run_pipeline(sick_files, TinyUNetDenoiser(max_batch=4), TINY_INFO, settings)
    assert plain.settings["median_size"] == settings.median_size and plain.settings["opening"] == settings.opening
    assert not np.array_equal(plain.anomaly_map, result.anomaly_map)  # the error map is no longer median-filtered


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"median": 3}, "unknown segmentation sizes"),
        ({"median_size": 2}, "must be odd"),
        ({"score_median_size": 4}, "score_median_size must be odd"),
        ({"opening": -1}, "whole number >= 0"),
        ({"closing": 1.5}, "whole number >= 0"),
        ([1, 2], "must be a table"),
    ],
)
def test_segmentation_sizes_that_make_no_sense_are_refused_saying_why(sizes: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineSettings().for_model({"segmentation": sizes})


def test_stamping_a_models_training_metadata_keeps_its_tensors_and_changes_its_identity(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from inference.unet import UNet, load_model, stamp_training

    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    before = save_model(UNet(PRESETS["tiny"]), path, "m", {"steps": 3, "noise": "simplex"})
    tensors = load_file(str(path))
    after = stamp_training(path, {"segmentation": {"median_size": 1}})
    assert after.training == {"steps": 3, "noise": "simplex", "segmentation": {"median_size": 1}}
    assert after.model_id != before.model_id and after.config == before.config
    assert all(torch.equal(tensors[k], v) for k, v in load_file(str(path)).items())
    assert PipelineSettings().for_model(load_model(path)[1].training).median_size == 1
