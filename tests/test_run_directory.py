"""A run owns its output directory and loses nothing at the edges: refused starts, locks, resume checks,
signals, early write checks, bounded untrusted files, and a demo writer that only writes where it may.

Each test names the promise of the README's Promises table it proves.
"""
import contextlib
import errno
import io
import os
import shutil
import signal
import zipfile

import pytest
import torch

import evaluate as ev
import read_ImageNetData as data
import train
from helpers import load_checkpoint, one_line, run_main, run_script
from mnv2 import checkpoint, outputs
from mnv2.data import demo, imagenet
from mnv2.deploy import export

FLAGS = ["--batch-size", "8", "--num-epochs", "1", "--width-mult", "0.25", "--input-size", "32",
         "--num-workers", "0", "--print-freq", "100", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run(demo, out, *extra, on_step=None):
    """train.py on the demo data into `out`, in this process: (exit code, stderr, stdout)."""
    argv = ["--data-dir", demo, "--save-path", out, *FLAGS, *extra]
    if on_step is None:
        return run_script(train, *argv)
    args = train.get_args_parser().parse_args([str(a) for a in argv])
    return run_main(train, args, on_step=on_step), "", ""


@pytest.fixture(scope="module")
def first_run(demo_data, tmp_path_factory):
    """A finished 1-epoch run (seed 0): its directory, to copy into each test's own."""
    out = tmp_path_factory.mktemp("first")
    assert run(demo_data, out)[0] == 0
    return out


def copy_run(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    return out


def snapshot_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


# ---- a run owns its output directory ----------------------------------------------------------------

@pytest.mark.slow
def test_a_new_run_into_another_runs_directory_is_refused_and_changes_nothing(demo_data, first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    before = snapshot_files(out)
    code, err, _ = run(demo_data, out, "--seed", "1", "--keep-last", "1")
    line = one_line(err)
    assert code == 2 and "--resume auto" in line and "--start-over" in line and str(out) in line
    assert snapshot_files(out) == before


@pytest.mark.slow
def test_start_over_moves_the_earlier_run_aside_before_anything_is_written(demo_data, first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    before = snapshot_files(out)
    old_id = load_checkpoint(out / "last.pth")["run_id"]
    code, err, stdout = run(demo_data, out, "--seed", "1", "--start-over", "--keep-last", "1")
    assert code == 0, err
    aside = out / f"previous-{old_id}"
    assert "moved the earlier run's files" in stdout and aside.is_dir()
    assert snapshot_files(aside) == before
    new = load_checkpoint(out / "last.pth")
    assert new["run_id"] != old_id and outputs.RunDirectory(out).owner() == new["run_id"]


def test_every_checkpoint_and_the_run_file_name_the_run(demo_data, first_run):
    run_id = outputs.RunDirectory(first_run).owner()
    assert run_id and all(load_checkpoint(p)["run_id"] == run_id for p in first_run.glob("*.pth"))


@pytest.mark.slow
def test_resume_auto_continues_the_run_in_its_own_directory_under_its_id(demo_data, first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    run_id = outputs.RunDirectory(out).owner()
    code, err, _ = run(demo_data, out, "--num-epochs", "2", "--resume", "auto")
    assert code == 0, err
    assert load_checkpoint(out / "last.pth")["epoch"] == 2 and load_checkpoint(out / "last.pth")["run_id"] == run_id


def test_a_second_run_on_a_locked_directory_fails_in_one_line_naming_the_holder(demo_data, tmp_path):
    out = tmp_path / "out"
    with outputs.RunDirectory(out) as held:
        held.lock()
        code, err, _ = run(demo_data, out)
    line = one_line(err)
    assert code == 1 and f"pid {os.getpid()}" in line and "in use by another run" in line
    assert not list(out.glob("*.pth"))


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_not_in_the_way(demo_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / outputs.LOCK_FILE).write_text("pid 999999 on a-host-long-gone\n")  # no process holds its flock
    (out / ".last.pth.tmp-abc123").write_bytes(b"partial")                   # and its half-written file
    code, err, _ = run(demo_data, out)
    assert code == 0, err
    assert not list(out.glob(".*.tmp-*")) and (out / "last.pth").is_file()


# ---- --resume auto chooses by what the files hold ---------------------------------------------------

@pytest.mark.slow
def test_resume_auto_chooses_by_the_stored_epoch_not_by_file_times(demo_data, first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    assert run(demo_data, out, "--num-epochs", "2", "--resume", "auto")[0] == 0
    # best.pth holds epoch 1 (epoch 2 was no better on this data) or 2; make it the newest file, as
    # `cp` without -p does, and last.pth (epoch 2) the oldest.
    shutil.copy(out / "epoch_1.pth", out / "best.pth")
    os.utime(out / "last.pth", (1_000_000, 1_000_000))
    path, ckpt = checkpoint.find_latest(out, log=lambda *a: None)
    assert path.name == "last.pth" and ckpt["epoch"] == 2


# ---- a resume that would change what the numbers mean is refused -----------------------------------

@pytest.mark.parametrize("flags, names", [
    (["--class-order", "devkit"], "--class-order sorted"),
    (["--input-size", "40"], "--input-size 32"),
    (["--interpolation", "bicubic"], "--interpolation bilinear"),
])
def test_a_resume_with_other_classes_or_preprocessing_is_refused(demo_data, first_run, tmp_path, flags, names):
    out = copy_run(first_run, tmp_path)
    before = snapshot_files(out)
    code, err, _ = run(demo_data, out, "--num-epochs", "2", "--resume", "auto", *flags)
    line = one_line(err)
    assert code == 2 and names in line
    assert snapshot_files(out) == before


@pytest.mark.slow
def test_a_resume_that_would_drop_the_ema_is_refused(demo_data, tmp_path):
    out = tmp_path / "out"
    assert run(demo_data, out, "--model-ema")[0] == 0
    code, err, _ = run(demo_data, out, "--num-epochs", "2", "--resume", "auto")
    assert code == 2 and "--model-ema" in one_line(err)


@pytest.mark.slow
def test_a_mid_epoch_resume_on_a_dataset_of_another_size_is_refused(demo_data, tmp_path):
    out = tmp_path / "out"

    def preempt(epoch, step, indices):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert run(demo_data, out, "--num-epochs", "2", on_step=preempt)[0] == 128 + signal.SIGTERM
    smaller = tmp_path / "smaller"
    shutil.copytree(demo_data, smaller)
    next((smaller / "ILSVRC2012_img_train").rglob("*.JPEG")).unlink()
    code, err, _ = run(smaller, out, "--num-epochs", "2", "--resume", "auto")
    line = one_line(err)
    assert code == 2 and "40 training images" in line and "39" in line and "epoch_N.pth" in line


# ---- signals ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_mid_epoch_finishes_the_step_saves_and_exits_130(demo_data, tmp_path):
    out = tmp_path / "out"
    steps = []

    def interrupt(epoch, step, indices):
        steps.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert run(demo_data, out, "--num-epochs", "2", on_step=interrupt)[0] == 130
    ckpt = load_checkpoint(out / "last.pth")
    # the signal came after step 2; step 3 was already under way: it is finished, then the run stops
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3) and steps == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put pytest's handler back
    assert run(demo_data, out, "--num-epochs", "2", "--resume", "auto")[0] == 0


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_save_keeps_the_previous_checkpoint_and_says_so(demo_data, first_run,
                                                                                     tmp_path, monkeypatch):
    out = copy_run(first_run, tmp_path)
    before = (out / "last.pth").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if ".last.pth.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            os.kill(os.getpid(), signal.SIGINT)  # the second one: arrives while last.pth is being written
        real_fsync(fd)

    def interrupt(epoch, step, indices):
        if step == 2:
            monkeypatch.setattr(os, "fsync", fsync)
            os.kill(os.getpid(), signal.SIGINT)

    args = train.get_args_parser().parse_args([str(a) for a in ["--data-dir", demo_data, "--save-path", out, *FLAGS,
                                                                "--num-epochs", "2", "--resume", "auto"]])
    code, err, _ = _run_parsed(args, interrupt)
    monkeypatch.undo()
    line = one_line(err)
    assert code == 130 and "second SIGINT" in line and "temporary file removed" in line
    assert (out / "last.pth").read_bytes() == before
    assert not list(out.glob(".*.tmp-*"))


def _run_parsed(args, on_step):
    """train.main on parsed args with stderr captured: (exit code, stderr, stdout)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run_main(train, args, on_step=on_step)
    return code, err.getvalue(), out.getvalue()


# ---- output paths are checked before the work starts -------------------------------------------------

@pytest.mark.parametrize("where", ["below a file", "an existing file"])
def test_an_unwritable_save_path_fails_before_the_first_step(demo_data, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "below a file" else blocker
    steps = []
    args = train.get_args_parser().parse_args([str(a) for a in ["--data-dir", demo_data, "--save-path", out, *FLAGS]])
    code, err, _ = _run_parsed(args, lambda *a: steps.append(a))
    line = one_line(err)
    assert code == 1 and "--save-path" in line and not steps
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("flag", ["--json", "--per-class", "--predictions", "--export-onnx"])
def test_evaluate_checks_its_output_paths_before_scoring(demo_data, first_run, tmp_path, flag, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        ev.main(ev.get_args_parser().parse_args(["--weights", str(first_run / "last.pth"), "--data-dir",
                                                 str(demo_data), "--device", "cpu", "--no-progress",
                                                 flag, str(blocker / "out.file")]))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and flag in one_line(captured.err)
    assert "top-1" not in captured.out  # nothing was scored


@pytest.mark.slow
def test_a_failed_export_never_replaces_a_good_file(first_run, tmp_path, monkeypatch, capsys):
    target = tmp_path / "model.pt2"
    ev.main(ev.get_args_parser().parse_args(["--weights", str(first_run / "last.pth"), "--device", "cpu",
                                             "--export-pt2", str(target)]))
    good = target.read_bytes()

    def disagreeing(model, path, **kwargs):
        path.write_bytes(b"a broken model")
        return 3e-3

    monkeypatch.setattr(export, "export_pt2", disagreeing)
    with pytest.raises(SystemExit):
        ev.main(ev.get_args_parser().parse_args(["--weights", str(first_run / "last.pth"), "--device", "cpu",
                                                 "--export-pt2", str(target)]))
    assert "not written" in capsys.readouterr().err
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    outputs.write_csv(target, ["a"], [[1]])

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(outputs.OutputError, match="No space left"):
        outputs.write_csv(target, ["a"], [[2]])
    monkeypatch.undo()
    assert target.read_bytes() == b"a\r\n1\r\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


# ---- untrusted files are bounded ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_small_file_declaring_a_huge_record_is_refused_before_loading(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as record:
            zeros = bytes(1 << 20)
            for _ in range(256):  # 256 MiB of zeros: about 256 KB compressed
                record.write(zeros)
    assert bomb.stat().st_size < 2 << 20

    def never(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(checkpoint.WeightsError, match="declare 256 MiB"):
        checkpoint.read_weights(bomb)


# ---- the demo writer writes only where it may --------------------------------------------------------

def test_the_demo_writer_never_overwrites_files_it_did_not_write(fake_imagenet, tmp_path):
    root = fake_imagenet["root"]
    before = snapshot_files(root)
    code, err, _ = run_script(data, "--make-demo", root)
    assert code == 1 and "not written by the demo writer" in one_line(err)
    assert snapshot_files(root) == before


def test_the_demo_writer_finishes_its_own_folder_and_refuses_other_settings(tmp_path):
    root = demo.make_demo(tmp_path / "demo", train_per_class=1, val_per_class=1, image_size=16)
    assert demo.demo_is_complete(root)
    assert demo.make_demo(root, train_per_class=1, val_per_class=1, image_size=16) == root  # nothing to do
    with pytest.raises(imagenet.DataError, match="other settings"):
        demo.make_demo(root, train_per_class=2, val_per_class=1, image_size=16)


@pytest.mark.slow
def test_train_demo_run_again_starts_its_own_run_afresh_saying_so(demo_data, tmp_path):
    out = tmp_path / "demo-out"
    flags = ["--demo", "--data-dir", demo_data, "--save-path", out, "--num-epochs", "1", "--width-mult", "0.25",
             "--input-size", "32", "--batch-size", "8"]
    assert run_script(train, *flags)[0] == 0
    first = load_checkpoint(out / "last.pth")["run_id"]
    code, err, stdout = run_script(train, *flags)
    assert code == 0, err
    assert "moved the earlier run's files" in stdout and (out / f"previous-{first}" / "last.pth").is_file()


@pytest.mark.parametrize("entry", [{"epoch": "x"}, {"classes": {"order": "sorted", "wnids": 5}},
                                   {"model": {"features.0.0.weight": 5}}, {"model_config": {"width_mult": "wide"}}])
def test_a_checkpoint_with_odd_entries_is_one_line_from_train_and_evaluate(demo_data, first_run, tmp_path, entry):
    odd = tmp_path / "odd.pth"
    saved = {k: v for k, v in load_checkpoint(first_run / "last.pth").items() if k != "sha256"}
    torch.save({**saved, **entry}, odd)  # without a digest: as a file written elsewhere would be
    for module, argv in ((train, ["--data-dir", demo_data, "--save-path", tmp_path / "out", *FLAGS,
                                  "--num-epochs", "2", "--resume", odd]),
                         (ev, ["--weights", odd, "--data-dir", demo_data, "--device", "cpu", "--no-progress"])):
        code, err, _ = run_script(module, *argv)
        line = one_line(err)
        assert code == 1 and str(odd) in line and repr(next(iter(entry))) in line


def test_an_exporter_that_raises_is_one_line_and_keeps_the_good_file(first_run, tmp_path, monkeypatch, capsys):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the good file")

    def exporter_bug(model, path, **kwargs):
        path.write_bytes(b"half a model")
        raise RuntimeError("Unsupported: ONNX export of operator foo\nlong exporter report ...")

    monkeypatch.setattr(export, "export_onnx", exporter_bug)
    code, err, _ = run_script(ev, "--weights", first_run / "last.pth", "--device", "cpu", "--export-onnx", target)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "the onnx export failed (RuntimeError: Unsupported" in lines[0]
    assert target.read_bytes() == b"the good file" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
