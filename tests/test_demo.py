"""`edgenode demo` end to end: phantom study -> real Orthanc -> Lua routing -> node -> results back in Orthanc."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import edgenode_cmd, node_env
from tests.engine_models import saved_unet

pytestmark = pytest.mark.slow  # `edgenode demo` end to end


def test_demo_delivers_seg_sc_and_sr_to_orthanc(tmp_path: Path) -> None:
    _, info, model_path = saved_unet(tmp_path, "tiny")
    env = node_env(
        EDGENODE_INFERENCE__MODEL=str(model_path),
        EDGENODE_INFERENCE__ENSEMBLE="2",
        EDGENODE_INFERENCE__STEPS="2",
        EDGENODE_INFERENCE__BACKEND="torch",
        EDGENODE_RESULTS__EMPTY_SEG="true",
    )
    result = subprocess.run(
        edgenode_cmd("demo", "--workdir", str(tmp_path / "demo"), "--size", "64", "--slices", "6", "--timeout", "240"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    for kind in ("seg", "sc", "sr"):
        assert re.search(rf"^\s+{kind}\s+[\d.]+\s+http://127\.0\.0\.1:\d+/instances/[0-9a-f-]+$", out, re.M), out
    assert "NOT FOUND" not in out
    assert f"model {info.model_id}" in out
    # Library chatter stays at WARNING: highdicom logs a line per segment, frame and reference at INFO.
    chatter = [line for line in result.stderr.splitlines() if re.search(r" (INFO|DEBUG) (highdicom|pynetdicom)", line)]
    assert not chatter, chatter[:5]
    assert " INFO node." in result.stderr  # the node's own progress is still shown
