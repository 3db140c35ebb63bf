"""`edgenode engine build|info` as an operator runs them (a subprocess with a data directory)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import edgenode_cmd, node_env
from tests.engine_models import saved_unet


def _edgenode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = node_env(EDGENODE_NODE__DATA_DIR=str(data_dir))
    return subprocess.run(edgenode_cmd(*args), env=env, capture_output=True, text=True, timeout=300)


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


def test_unavailable_backend_and_missing_model_exit_2(tmp_path: Path) -> None:
    missing = _edgenode(tmp_path, "engine", "build", "--model", str(tmp_path / "none.safetensors"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    env = node_env(EDGENODE_NODE__DATA_DIR=str(tmp_path), EDGENODE_INFERENCE__BACKEND="tensorrt")
    trt = subprocess.run(edgenode_cmd("engine", "info"), env=env, capture_output=True, text=True, timeout=120)
    if "yes  tensorrt" not in trt.stdout:
        assert trt.returncode == 2 and "backend = 'tensorrt'" in trt.stderr
