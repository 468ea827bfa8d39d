"""The benchmark suite runs end to end on the CPU and writes well-formed rows. Timings are never asserted:
on a shared machine they are noise; only the structure and the arithmetic between the figures are.

    python -m pytest -q tests/test_bench.py
"""
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run_all  # noqa: E402

SPEED_ROWS = ["input pipeline train (per core)", "input pipeline eval (per core)",
              "input pipeline train ta_wide+erase (per core)", "training step (cpu)", "evaluation (cpu)"]
EPOCH_ROW = "demo epoch (cpu): share waiting for data"
ONNX_ROW = "batch-1 latency, ONNX vs eager PyTorch"
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

pytestmark = pytest.mark.slow  # every test here reads one run of the benchmark suite (about 30 s)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `run_all.py --quick` on the CPU, in its own process as a user runs it: (rows from --json, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    # One thread: two threads on two cores shared with other work can run 10-50x slower (spinning
    # OpenMP threads wait on each other), which would only make this test slow, not more thorough.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_quick_suite_writes_every_row_with_its_four_fields(quick):
    rows, _ = quick
    expected = SPEED_ROWS + ["input pipeline eval identical to torchvision", EPOCH_ROW] + ([ONNX_ROW] if HAS_ONNX else [])
    assert set(expected) <= set(rows), sorted(set(expected) - set(rows))
    for name, row in rows.items():
        assert set(row) == {"ratio", "ours", "reference", "unit"}, name
        assert isinstance(row["unit"], str) and row["unit"], name
        for key in ("ratio", "ours", "reference"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])


def test_speed_ratios_are_ours_over_reference_and_latency_the_inverse(quick):
    rows, _ = quick
    for name in SPEED_ROWS:
        r = rows[name]
        assert r["unit"] == "images/s"
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=1e-9), name
    if HAS_ONNX:
        r = rows[ONNX_ROW]
        assert r["unit"] == "ms"
        assert r["ratio"] == pytest.approx(r["reference"] / r["ours"], rel=1e-9)


def test_demo_epoch_share_is_a_fraction_of_the_epoch(quick):
    r = quick[0][EPOCH_ROW]
    assert r["unit"] == "s"
    assert 0 < r["ours"] < r["reference"]  # time waiting for batches is part of the epoch
    assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=1e-9)


def test_eval_pipeline_gives_torchvisions_pixels_on_every_image(quick):
    r = quick[0]["input pipeline eval identical to torchvision"]
    assert r["ours"] == r["reference"] and r["ratio"] == 1.0


def test_printed_table_has_one_line_per_row(quick):
    rows, stdout = quick
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| measurement | ratio | ours | reference | unit")
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(rows)


@pytest.mark.slow
def test_cpu_suite_leaves_cuda_untouched(tmp_path):
    threads = torch.get_num_threads()
    try:
        args = run_all.get_args_parser().parse_args(["--quick", "--device", "cpu", "--threads", "1", "--only", "epoch",
                                                     "--json", str(tmp_path / "rows.json")])
        rows = run_all.main(args)
    finally:
        torch.set_num_threads(threads)
    assert list(rows) == [EPOCH_ROW]
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("flags", [["--only", "data,warp"], ["--threads", "0"], ["--images", "/no/such/folder"]])
def test_bad_flags_are_usage_errors(flags):
    with pytest.raises(SystemExit) as e:
        run_all.main(run_all.get_args_parser().parse_args(flags))
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        run_all.main(run_all.get_args_parser().parse_args(["--device", "cuda"]))
    assert e.value.code == 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
def test_gpu_check_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
