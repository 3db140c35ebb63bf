"""The benchmark scripts run and print their tables (on a small input): a GPU session has minutes of device time,
so a script broken by a code change must fail here first, not there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, node_env

pytestmark = pytest.mark.slow  # runs the benchmark scripts: minutes


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=node_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def table(stdout: str) -> list[list[str]]:
    """The markdown table's body rows, split into cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_pipeline_benchmark_compares_the_cpu_backends() -> None:
    out = run_script(
        "benchmarks/pipeline.py", "--slices", "8", "--size", "128", "--repeats", "1",
        "--only", "torch-cpu-fp32", "onnxruntime-cpu-fp32", "openvino-cpu-fp32",
    ).stdout  # fmt: skip
    rows = table(out)
    assert [r[0] for r in rows] == ["torch-cpu-fp32", "onnxruntime-cpu-fp32", "openvino-cpu-fp32"]
    reference, *others = rows
    assert float(reference[7]) == 0.0  # the first row is the reference
    for row in others:
        assert float(row[7]) < 1e-4 and row[9] == reference[9]  # same map to fp32 rounding, same score
    assert all(float(r[2]) >= float(r[3]) > 0 for r in rows)  # the study includes its U-Net time
    assert all(float(r[4]) >= 0 and float(r[5]) >= 0 for r in rows)  # and its mask time, and the rest
    assert "CPU: " in out


def test_pipeline_benchmark_times_a_radiograph_per_model_grid() -> None:
    out = run_script(
        "benchmarks/pipeline.py", "--modality", "dx", "--grids", "32", "48", "--preset", "tiny", "--size", "128",
        "--repeats", "1", "--only", "torch-cpu-fp32",
    ).stdout  # fmt: skip
    assert "phantom DX: 128x128" in out and "32x32 grid" in out and "48x48 grid" in out
    rows = table(out.split("48x48 grid")[1])
    assert [r[0] for r in rows] == ["torch-cpu-fp32"] and float(rows[0][2]) >= float(rows[0][3]) > 0


def test_radiograph_sanity_check_scores_lesion_and_healthy_radiographs() -> None:
    from tests.radiograph_model import trained_radiograph_model

    out = run_script(
        "benchmarks/radiograph_sanity.py", "--model", str(trained_radiograph_model()), "--lesion-cases", "1",
        "--healthy-cases", "1", "--size", "96", "--threads", "1",
    ).stdout  # fmt: skip
    kinds = [r[0] for r in table(out)]
    assert kinds == ["none", "nodule"] and "image AUROC, lesion vs healthy: model study score" in out


def test_engines_benchmark_reports_the_selected_cpu_backend() -> None:
    out = run_script(
        "benchmarks/engines.py",
        "--rounds", "1", "--batches", "4", "--threads", "2", "--matmul", "256",
        "--only", "torch-cpu-fp32", "onnxruntime-cpu mb7 x2", "openvino-cpu-fp32",
    ).stdout  # fmt: skip
    rows = table(out)
    assert sorted(r[0] for r in rows) == ["onnxruntime-cpu mb7 x2", "openvino-cpu-fp32", "torch-cpu-fp32"]
    assert all(r[1] == "fp32" and r[2] == "4" and float(r[6]) > 0 and r[8].endswith("%") for r in rows)
    assert "chosen by engines.select (no probe): CPU preference onnxruntime" in out
    assert "CPU: " in out and "matmul peaks 256^2" in out and "fp32 " in out and "bf16 " in out


def test_memory_benchmark_measures_each_series_length() -> None:
    rows = table(run_script("benchmarks/memory.py", "--slices", "12").stdout)
    assert len(rows) == 1 and rows[0][0] == "12"
    before, after = float(rows[0][1]), float(rows[0][2])
    assert 0 < before <= after  # peak memory only grows


def test_triton_benchmark_compares_the_remote_call_with_local_onnxruntime() -> None:
    from tests.triton_support import pytriton_python

    pytriton_python()  # the server's venv (skips with the reason where the wheel cannot be installed)
    out = run_script(
        "benchmarks/triton_remote.py",
        "--calls", "1", "--batch", "4", "--in-flight", "2", "--slices", "3", "--size", "64",
        "--repeats", "1", "--ensemble", "1", "--steps", "1", "--threads", "1",
    ).stdout  # fmt: skip
    rows = table(out)
    assert [r[0] for r in rows] == ["onnxruntime-cpu x1 (local)", "triton in_flight 2"]
    assert float(rows[0][2]) == 0.0 and float(rows[0][4]) == 0.0  # the local row is the reference
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |eps diff|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-5  # the same export gives the same numbers remotely


def test_train_benchmark_times_each_precision_the_hardware_runs() -> None:
    from inference.hardware import cpu_info

    out = run_script(
        "benchmarks/train.py", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--threads", "1"
    ).stdout  # fmt: skip
    rows = table(out)
    assert [r[0] for r in rows] == (["fp32", "bf16"] if cpu_info().bf16_units else ["fp32"])
    assert all(float(r[3]) > 0 for r in rows) and "CPU: " in out


def test_flushes_benchmark_times_each_flush_an_image_waits_for(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_script("benchmarks/flushes.py", "--images", "5", "--repeats", "1", "--folder", str(tmp_path)).stdout
    rows = {row[0]: float(row[1]) for row in table(out)}
    assert len(rows) == 4 and all(ms > 0 for ms in rows.values())
    assert not list(tmp_path.iterdir())  # its files are gone


def test_ingest_benchmark_compares_receivers_and_their_cpu_per_instance() -> None:
    out = run_script(
        "benchmarks/ingest.py",
        "--slices",
        "8",
        "--size",
        "64",
        "--repeats",
        "1",
        "--associations",
        "1",
        "2",
        "--targets",
        "edgenode",
        "storescp",
    ).stdout
    rows = {(row[0], int(row[3])): row for row in table(out)}
    assert set(rows) == {("edgenode", 1), ("edgenode", 2), ("storescp", 1), ("storescp", 2)}
    for row in rows.values():
        assert float(row[5]) >= float(row[8]) > 0  # instances/s: the best run's, then the median run's
        assert row[7] == row[9] == "-"  # no Orthanc in this run to compare with
        assert float(row[10]) >= 0  # the receiver's CPU per instance (10 ms ticks: storescp may show none)
    assert all(float(rows[("edgenode", n)][10]) > 0 for n in (1, 2))  # a Python listener always spends some


def test_ingest_benchmark_with_receivers_kept_running_sends_each_run_a_series_of_its_own() -> None:
    args = ("--slices", "4", "--size", "32", "--repeats", "2", "--associations", "1", "2", "--running")
    out = run_script("benchmarks/ingest.py", *args, "--targets", "edgenode", "storescp").stdout
    assert "receivers kept running" in out
    rows = {(row[0], int(row[3])): row for row in table(out)}
    assert set(rows) == {("edgenode", 1), ("edgenode", 2), ("storescp", 1), ("storescp", 2)}
    assert all(float(row[5]) >= float(row[8]) > 0 for row in rows.values())  # every run stored all its images


def test_association_benchmark_reports_what_an_association_costs_each_receiver() -> None:
    args = ("--images", "12", "--repeats", "1", "--targets", "edgenode", "storescp")
    out = run_script("benchmarks/associations.py", *args).stdout
    rows = {row[0]: row for row in table(out)}
    assert set(rows) == {"edgenode", "storescp"}
    assert float(rows["edgenode"][1]) > 0  # eleven more associations cost a Python listener more than one
    assert all(float(row[2]) >= 0 for row in rows.values())


def test_index_benchmark_times_both_ways_of_running_the_listeners_statements() -> None:
    out = run_script("benchmarks/ingest_index.py", "--calls", "50").stdout
    rows = [row for row in table(out) if not row[1].startswith("-") and "us" not in row[1]]  # the second header
    statements, calls = rows[:5], rows[5:]
    assert statements[0][0] == "lookup (SELECT)" and [row[0].split()[0] for row in calls] == [
        "IngestIndex.add_instances",
        "IngestIndex.lookup",
        "IngestIndex.record_event",
    ]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in statements)
    assert all(float(row[1]) > 0 for row in calls)
