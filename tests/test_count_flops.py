"""count_flops.py pinned to the published figures for MobileNetV2 1.0 at 224 px."""
import json
import sys

import pytest
import torch

import count_flops
from helpers import RunsCode
from MobileNetV2 import MobileNetV2


@pytest.fixture(scope="module")
def report():
    args = count_flops.get_args_parser().parse_args([])
    return count_flops.main(args)


def test_width_1_at_224_matches_the_published_figures(report):
    assert report["params"] == 3_504_872
    assert report["macs_exact"] == 300_774_272
    # torchsummaryX on current pandas: the seed's README reported 300.79 M with it.
    assert round(report["macs_torchsummaryx"] / 1e6, 2) == 300.79
    # Today's thop adds BatchNorm arithmetic and pooling on top of the exact count.
    assert report["macs_thop"] == 327_486_720


def test_table_shows_every_counter_and_why_they_differ(report, capsys):
    count_flops.main(count_flops.get_args_parser().parse_args([]))
    out = capsys.readouterr().out
    assert "3,504,872" in out and "300,774,272" in out and "300.79 M" in out and "327.49 M" in out
    assert "BatchNorm" in out


def test_missing_counter_package_gives_a_note_not_a_crash(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "thop", None)
    monkeypatch.setitem(sys.modules, "torchsummaryX", None)
    row = count_flops.main(count_flops.get_args_parser().parse_args(["--input-size", "64",
                                                                     "--width-mult", "0.35"]))
    assert row["macs_thop"] is None and row["macs_torchsummaryx"] is None
    assert row["macs_exact"] > 0
    assert "not installed" in capsys.readouterr().out


@pytest.mark.slow
def test_grid_json_covers_the_papers_trade_off_table(capsys):
    rows = count_flops.main(count_flops.get_args_parser().parse_args(["--grid", "--json"]))
    assert len(rows) == 25
    assert json.loads(capsys.readouterr().out) == rows
    by_key = {(r["width_mult"], r["input_size"]): r for r in rows}
    assert by_key[(1.0, 224)]["macs_exact"] == 300_774_272
    assert by_key[(0.35, 96)]["params"] == 1_677_128
    # Multiply-adds grow with both width and resolution.
    assert by_key[(1.4, 224)]["macs_exact"] > by_key[(1.0, 224)]["macs_exact"] > by_key[(1.0, 192)]["macs_exact"]


def test_counts_a_saved_model(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save(MobileNetV2(num_classes=10, width_mult=0.5).state_dict(), path)
    row = count_flops.main(count_flops.get_args_parser().parse_args(["--weights", str(path), "--json",
                                                                     "--input-size", "96"]))
    assert row["num_classes"] == 10 and row["width_mult"] == 0.5 and row["params"] == 700_490


def test_untrusted_weight_file_is_refused(tmp_path, capsys):
    marker, path = tmp_path / "marker", tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCode(marker)}, path)
    with pytest.raises(SystemExit) as info:
        count_flops.main(count_flops.get_args_parser().parse_args(["--weights", str(path)]))
    assert info.value.code == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("flags", [["--input-size", "16"], ["--width-mult", "0"], ["--num-classes", "0"]])
def test_bad_flags_exit_2(flags):
    with pytest.raises(SystemExit) as info:
        count_flops.main(count_flops.get_args_parser().parse_args(flags))
    assert info.value.code == 2
