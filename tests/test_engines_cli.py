"""`edgenode engine build|info` as an operator runs them (a subprocess with a data directory)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import edgenode_cmd, node_env
from tests.engine_models import saved_unet


def _edgenode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = node_env(EDGENODE_NODE__DATA_DIR=str(data_dir))
    return subprocess.run(edgenode_cmd(*args), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # an ONNX export in a subprocess
def test_build_exports_into_the_cache_and_info_lists_it(tmp_path: Path) -> None:
    _, info, weights = saved_unet(tmp_path)
    data_dir = tmp_path / "var"
    empty = _edgenode(data_dir, "engine", "info")
    assert empty.returncode == 0, empty.stderr
    assert "onnxruntime-cpu" in empty.stdout and "chosen: " in empty.stdout and "why: " in empty.stdout
    assert "(empty" in empty.stdout

    built = _edgenode(data_dir, "engine", "build", "--model", str(weights), "--exporter", "torchscript")
    assert built.returncode == 0, built.stderr
    assert "[1/3] loading model" in built.stdout and "[3/3]" in built.stdout
    assert "relative error onnxruntime vs torch" in built.stdout
    exported = list((data_dir / "engines").glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith(info.model_id)

    listed = _edgenode(data_dir, "engine", "info")
    assert listed.returncode == 0
    assert exported[0].name in listed.stdout and "opset 17" in listed.stdout


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_unavailable_backend_and_missing_model_exit_2(tmp_path: Path) -> None:
    missing = _edgenode(tmp_path, "engine", "build", "--model", str(tmp_path / "none.safetensors"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    env = node_env(EDGENODE_NODE__DATA_DIR=str(tmp_path), EDGENODE_INFERENCE__BACKEND="tensorrt")
    trt = subprocess.run(edgenode_cmd("engine", "info"), env=env, capture_output=True, text=True, timeout=120)
    if "yes  tensorrt" not in trt.stdout:
        assert trt.returncode == 2 and "backend = 'tensorrt'" in trt.stderr


@pytest.mark.slow
def test_info_probes_on_request_and_then_shows_the_cached_table(tmp_path: Path) -> None:
    _, info, weights = saved_unet(tmp_path)
    data_dir = tmp_path / "var"
    model = ("--model", str(weights), "--threads", "1")
    before = _edgenode(data_dir, "engine", "info", *model)
    assert before.returncode == 0, before.stderr
    assert "CPU: " in before.stdout and "yes  openvino-cpu" in before.stdout
    assert f"probe: none cached for {info.model_id}" in before.stdout

    probed = _edgenode(data_dir, "engine", "info", "--probe", "--exporter", "torchscript", *model)
    assert probed.returncode == 0, probed.stderr
    assert "accuracy guard vs torch-fp32" in probed.stdout and "<- chosen" in probed.stdout
    assert len(list((data_dir / "engines").glob(f"probe-{info.model_id}-*.json"))) == 1
    # the CT lung refiner is probed too, with its own guard, cached apart
    assert "lung refiner (CT): ct-lung-refiner-" in probed.stdout and "lung mask Dice" in probed.stdout
    assert len(list((data_dir / "engines").glob("probe-ct-lung-refiner-*.json"))) == 1

    shown = _edgenode(data_dir, "engine", "info", *model)  # no probe: the cached table
    assert shown.returncode == 0, shown.stderr
    chosen = [line for line in shown.stdout.splitlines() if "<- chosen" in line]
    assert len(chosen) == 2 and all(line in probed.stdout for line in chosen)  # the model's and the refiner's


@pytest.mark.slow  # subprocess nodes / real runs: the whole suite, not the fast tier
def test_info_shows_which_model_serves_each_modality(tmp_path: Path) -> None:
    """Default: the bundled CT model serves CT; CR and DX are received but not analysed (no radiograph model).
    With the per-modality table naming a model trained for CR/DX, that one serves them."""
    from inference.unet import read_model_info
    from inference.weights import bundled_model_path
    from tests.radiograph_model import trained_radiograph_model

    bundled = read_model_info(bundled_model_path())
    default = _edgenode(tmp_path / "a", "engine", "info")
    assert default.returncode == 0, default.stderr
    assert f"CT: {bundled.model_id} (trained for CT CHEST)" in default.stdout
    for modality in ("CR", "DX"):
        assert (
            f"{modality}: not analysed (no model trained for {modality} (the configured model {bundled.model_id}"
            in (default.stdout)
        )
    rx = trained_radiograph_model()
    env = node_env(EDGENODE_NODE__DATA_DIR=str(tmp_path / "b"), EDGENODE_INFERENCE__MODEL__DX=str(rx))
    config = tmp_path / "edgenode.toml"
    config.write_text(f'[inference]\nmodel = {{ CR = "{rx}" }}\n')
    table = subprocess.run(
        edgenode_cmd("engine", "info", "--config", str(config)), env=env, capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0, table.stderr
    rx_id = read_model_info(rx).model_id
    assert f"CT: {bundled.model_id} (trained for CT CHEST)" in table.stdout
    assert f"CR: {rx_id} (trained for CR, DX CHEST)" in table.stdout
    assert f"DX: {rx_id} (trained for CR, DX CHEST)" in table.stdout
