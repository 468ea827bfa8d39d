"""train.py and distributed.py on tiny generated data: artefacts, exact resume, preemption, faults, DDP.

    python -m pytest tests/test_train.py -q

Every run uses the demo layout (10 digit classes among 1000) with 4 training and 1 validation image per
class at 32 px and a width-0.25 network, so the whole file stays within a few minutes on two CPU cores.
"""
import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import helpers
import train
from mnv2 import checkpoint, cli, outputs
from mnv2.checkpoint import digest as checkpoint_digest
from mnv2.data.loaders import TrainSampler
from mnv2.data.transforms import normalize
from mnv2.training import config, optimization, recipes, run, state
from mnv2.weights import load_model, to_torchvision_keys
from MobileNetV2 import MobileNetV2

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 40  # 10 classes x 4
BATCH = 8
STEPS = TRAIN_IMAGES // BATCH
TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="session")
def data(demo_data):
    return demo_data


def parse(data, out, *extra):
    return train.get_args_parser().parse_args(
        ["--data-dir", str(data), "--save-path", str(out), "--batch-size", str(BATCH), "--num-epochs", "1",
         "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--print-freq", "100",
         "--device", "cpu", *extra])


def run_main(args, on_step=None):
    return helpers.run_main(train, args, on_step=on_step)


load = helpers.load_checkpoint
assert_same_tensors = helpers.assert_same_tensors


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


# ----------------------------------------------------------------------------------------------------
# A short run and its artefacts


@pytest.fixture(scope="session")
def two_epochs(data, tmp_path_factory):
    """One uninterrupted 2-epoch run with dropout, EMA and workers (augmentation in another process)."""
    out = tmp_path_factory.mktemp("two_epochs")
    args = parse(data, out, "--num-epochs", "2", "--dropout", "0.2", "--model-ema", "--num-workers", "1")
    assert run_main(args) == 0
    return out


@pytest.mark.slow
def test_short_run_writes_every_artefact(two_epochs):
    names = {p.name for p in two_epochs.iterdir()}
    assert {"epoch_1.pth", "epoch_2.pth", "last.pth", "best.pth", "metrics.csv", "result.txt", "curves.png"} <= names
    ckpt = load(two_epochs / "last.pth")  # plain data: weights_only=True reads it
    assert ckpt["format"] == "mobilenetv2-checkpoint" and ckpt["version"] == 1
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    assert ckpt["model_config"]["num_classes"] == 1000 and ckpt["model_config"]["width_mult"] == 0.25
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["model_ema"] is not None and ckpt["model_ema"].keys() == ckpt["model"].keys()
    assert ckpt["classes"]["order"] == "sorted" and len(ckpt["classes"]["wnids"]) == 1000
    assert ckpt["data"]["input_size"] == 32 and ckpt["args"]["batch_size"] == BATCH
    assert {"python", "numpy", "torch"} <= ckpt["rng"].keys() and ckpt["sampler"]["epoch"] == 1
    assert ckpt["sha256"] == checkpoint_digest(ckpt)
    assert len(ckpt["metrics"]) == 2
    header = (two_epochs / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"]
    assert len((two_epochs / "result.txt").read_text().splitlines()) == 2
    assert (two_epochs / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # evaluate.py's loader rebuilds the model from the file alone
    model = load_model(two_epochs / "last.pth")
    assert model.config["width_mult"] == 0.25
    lr = [m["lr"] for m in ckpt["metrics"]]
    assert lr == pytest.approx([0.045, 0.045 * 0.98])


FAULTS_AFTER_FREE = """
import resource, sys, torch
from mnv2.training import run
if sys.argv[1] == "keep":
    assert run.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):  # the heap settles after a few rounds, as a training run's does after a few steps
    torch.ones(16 * 2**20)  # 64 MB, as large as a batch's activation tensor, allocated and freed
before = faults()
for _ in range(5):
    torch.ones(16 * 2**20)
print(faults() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_memory_is_reused_without_faulting_it_in_again():
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE, mode], cwd=REPO, check=True,
                                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                                       text=True, timeout=120).stdout)
              for mode in ("default", "keep")}
    # 5 x 64 MB is 81,920 pages of 4 KB: by default each allocation is mapped afresh and faulted in again.
    assert faults["keep"] < max(200, faults["default"] / 20), faults


@pytest.mark.slow
def test_a_cpu_run_keeps_freed_memory(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: calls.append(1) or True)
    assert run_main(parse(data, tmp_path)) == 0
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.slow
def test_resume_is_bit_exact(data, two_epochs, tmp_path):
    extra = ("--dropout", "0.2", "--model-ema", "--num-workers", "1")
    assert run_main(parse(data, tmp_path, *extra)) == 0
    assert run_main(parse(data, tmp_path, *extra, "--num-epochs", "2", "--resume", str(tmp_path / "last.pth"))) == 0
    resumed, straight = load(tmp_path / "last.pth"), load(two_epochs / "last.pth")
    for key in ("model", "model_ema", "optimizer", "epoch", "step", "best_acc1", "sampler"):
        assert_same_tensors(resumed[key], straight[key])  # tolerance 0
    assert without_timing(resumed["metrics"]) == without_timing(straight["metrics"])


def to_seed_layout(state):
    """torchvision keys -> the seed's DataParallel file: module.network.<i>.conv.<flat index>.*"""
    expanded = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    unexpanded = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.conv\.(\d(?:\.\d)?)\.(\w+)", key)
        if m:
            table = unexpanded if m.group(1) == "1" else expanded
            key = f"network.{m.group(1)}.conv.{table[m.group(2)]}.{m.group(3)}"
        else:
            key = key.replace("features.", "network.").replace("classifier.1.", "classifier.")
        out["module." + key] = value
    return out


@pytest.mark.slow
def test_seed_format_weights_resume_at_start_epoch_with_implied_lr(data, tmp_path):
    torch.manual_seed(3)
    reference = MobileNetV2(num_classes=1000, width_mult=0.25)
    seed_file = tmp_path / "epoch_200.pth"
    torch.save(to_seed_layout(reference.state_dict()), seed_file)
    assert to_torchvision_keys(load(seed_file))[1] == "seed"
    out = tmp_path / "out"
    seen = {}

    def on_step(epoch, step, indices):
        seen.setdefault(epoch, step)

    args = parse(data, out, "--resume", str(seed_file), "--start-epoch", "200", "--num-epochs", "201")
    assert run_main(args, on_step) == 0
    ckpt = load(out / "last.pth")
    assert list(seen) == [200] and ckpt["epoch"] == 201
    assert [m["epoch"] for m in ckpt["metrics"]] == [201]
    assert ckpt["metrics"][0]["lr"] == pytest.approx(0.045 * 0.98 ** 200)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.045 * 0.98 ** 200)


@pytest.mark.slow
def test_resume_file_continues_without_start_epoch_and_start_epoch_wins(data, two_epochs, tmp_path, capsys):
    args = parse(data, tmp_path, "--num-epochs", "3", "--resume", str(two_epochs / "epoch_1.pth"),
                 "--start-epoch", "2", "--model-ema")
    assert run_main(args) == 0
    assert "overrides" in capsys.readouterr().out
    assert [m["epoch"] for m in load(tmp_path / "last.pth")["metrics"]] == [1, 3]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_auto_skips_corrupt_newest(data, two_epochs, tmp_path, capsys):
    for name in ("epoch_1.pth", "epoch_2.pth", "last.pth", "best.pth"):
        (tmp_path / name).write_bytes((two_epochs / name).read_bytes())
    now = time.time()
    for age, name in enumerate(("last.pth", "epoch_2.pth", "best.pth", "epoch_1.pth")):
        os.utime(tmp_path / name, (now - age, now - age))
    size = (tmp_path / "last.pth").stat().st_size
    flip_byte(tmp_path / "last.pth", size // 2)                                # a bit flip inside tensor data
    with open(tmp_path / "epoch_2.pth", "r+b") as f:                            # truncated
        f.truncate(size // 3)
    (tmp_path / "best.pth").write_bytes(b"")                                    # zero bytes
    path, ckpt = checkpoint.find_latest(tmp_path, log=print)
    assert path.name == "epoch_1.pth" and ckpt["epoch"] == 1
    notes = capsys.readouterr().out
    assert all(name in notes for name in ("last.pth", "epoch_2.pth", "best.pth"))

    # the whole run: resumes from epoch 1 and trains epoch 2 again
    assert run_main(parse(data, tmp_path, "--num-epochs", "2", "--resume", "auto", "--model-ema")) == 0
    assert [m["epoch"] for m in load(tmp_path / "last.pth")["metrics"]] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bitflip", "truncated", "empty"])
def test_corrupt_resume_file_gives_one_line_error(data, two_epochs, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pth"
    payload = (two_epochs / "epoch_1.pth").read_bytes()
    bad.write_bytes({"bitflip": payload, "truncated": payload[:len(payload) // 2], "empty": b""}[damage])
    if damage == "bitflip":
        flip_byte(bad, len(payload) // 2)
    assert run_main(parse(data, tmp_path / "out", "--resume", str(bad))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]


# ----------------------------------------------------------------------------------------------------
# Preemption


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_covers_each_sample_once(data, tmp_path):
    consumed = []

    def preempt(epoch, step, indices):
        consumed.append((epoch, indices.tolist()))
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled like a cluster's preemption

    args = parse(data, tmp_path, "--num-epochs", "2")
    assert run_main(args, preempt) == 128 + signal.SIGTERM
    ckpt = load(tmp_path / "last.pth")
    assert ckpt["epoch"] == 0 and 0 < ckpt["step"] < STEPS
    first = len(consumed)
    assert first == ckpt["step"]  # the step in flight was finished, nothing more

    def record(epoch, step, indices):
        consumed.append((epoch, indices.tolist()))

    assert run_main(parse(data, tmp_path, "--num-epochs", "2", "--resume", "auto"), record) == 0
    epoch0 = [i for epoch, batch in consumed if epoch == 0 for i in batch]
    sampler = TrainSampler(TRAIN_IMAGES, seed=0)
    sampler.set_epoch(0)
    assert epoch0 == list(sampler)[:STEPS * BATCH]  # every sample of the epoch exactly once, in order
    assert len(set(epoch0)) == len(epoch0)
    assert [m["epoch"] for m in load(tmp_path / "last.pth")["metrics"]] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_mid_epoch_resume_is_bit_exact_with_and_without_loader_processes(data, tmp_path, workers):
    """Each sample's augmentation draws from a seed of (seed, epoch, position): neither the loader processes'
    own streams nor the iterator a resumed epoch creates change what the run sees."""
    flags = ("--num-epochs", "2", "--num-workers", workers, "--auto-augment", "ta_wide", "--random-erase", "0.25",
             "--mixup-alpha", "0.2", "--dropout", "0.2")
    assert run_main(parse(data, tmp_path / "straight", *flags)) == 0

    def preempt(epoch, step, indices):
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    assert run_main(parse(data, tmp_path / "resumed", *flags), preempt) == 128 + signal.SIGTERM
    assert 0 < load(tmp_path / "resumed" / "last.pth")["step"] < STEPS
    assert run_main(parse(data, tmp_path / "resumed", *flags, "--resume", "auto")) == 0
    straight, resumed = load(tmp_path / "straight" / "last.pth"), load(tmp_path / "resumed" / "last.pth")
    for key in ("model", "optimizer", "sampler", "epoch"):
        assert_same_tensors(resumed[key], straight[key])


@pytest.mark.slow
def test_the_number_of_loader_processes_does_not_change_the_run(data, tmp_path):
    for workers in ("0", "2"):
        assert run_main(parse(data, tmp_path / workers, "--num-workers", workers, "--auto-augment", "ra")) == 0
    assert_same_tensors(load(tmp_path / "2" / "last.pth")["model"], load(tmp_path / "0" / "last.pth")["model"])


# ----------------------------------------------------------------------------------------------------
# Faults while saving


@pytest.mark.slow
def test_disk_full_while_saving_keeps_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    assert run_main(parse(data, tmp_path)) == 0
    before = (tmp_path / "last.pth").read_bytes()
    real_fsync = os.fsync

    synced = []

    def full(fd):  # the disk fills once the resumed run has started (its args.yaml written)
        synced.append(fd)
        if len(synced) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert run_main(parse(data, tmp_path, "--num-epochs", "2", "--resume", "auto")) == 1
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch_2.pth" in err[0] and "No space left" in err[0]
    assert (tmp_path / "last.pth").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp-*")) and not (tmp_path / "epoch_2.pth").exists()
    path, ckpt = checkpoint.find_latest(tmp_path)
    assert ckpt["epoch"] == 1


@pytest.mark.slow
def test_sigkill_while_writing_keeps_previous_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    # Killed inside the second epoch's first checkpoint write, after its bytes went to the temporary file.
    script.write_text(textwrap.dedent(f"""
        import os, signal, train
        real = os.fsync
        def fsync(fd):
            if ".epoch_2.pth.tmp" in os.readlink(f"/proc/self/fd/{{fd}}"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(fd)
        os.fsync = fsync
        args = train.get_args_parser().parse_args({[
            "--data-dir", str(data), "--save-path", str(out), "--batch-size", str(BATCH), "--num-epochs", "2",
            "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--device", "cpu"]!r})
        train.main(args)
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(out.glob(".epoch_2.pth.tmp-*"))  # the partial write is there, under a name never resumed
    assert not (out / "epoch_2.pth").exists()
    assert (out / "last.pth").read_bytes() == (out / "epoch_1.pth").read_bytes()  # untouched
    assert run_main(parse(data, out, "--num-epochs", "2", "--resume", "auto")) == 0
    assert load(out / "last.pth")["epoch"] == 2 and not list(out.glob(".*.tmp-*"))


@pytest.mark.slow
def test_keep_last_deletes_only_after_successor_is_written(data, tmp_path, monkeypatch):
    assert run_main(parse(data, tmp_path, "--num-epochs", "3", "--keep-last", "1")) == 0
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["best.pth", "epoch_3.pth", "last.pth"]

    # A failing write of epoch 4 must not cost epoch 3, the only epoch file.
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert run_main(parse(data, tmp_path, "--num-epochs", "4", "--keep-last", "1", "--resume", "auto")) == 1
    monkeypatch.undo()
    assert (tmp_path / "epoch_3.pth").is_file() and checkpoint.read(tmp_path / "epoch_3.pth")["epoch"] == 3


def test_atomic_write_never_leaves_a_mix(tmp_path, monkeypatch):
    target = tmp_path / "last.pth"
    outputs.atomic_write(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(outputs.OutputError, match=re.escape(str(target))):
        outputs.atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.slow
def test_killed_loader_worker_gives_a_clear_error_not_a_hang(data, tmp_path, capsys):
    import multiprocessing

    def kill_worker(epoch, step, indices):
        if step == 1:  # batches 4 and 5 are not requested yet (1 worker x prefetch 2): the loss is noticed
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                child.join(5)  # the loader's SIGCHLD check fires here, inside the run, not in a later test

    started = time.monotonic()
    assert run_main(parse(data, tmp_path, "--num-workers", "1"), kill_worker) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data loader process died" in err[0]
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------------------------------
# Non-finite loss


NanAt = helpers.NanAt


@pytest.mark.slow
def test_one_nan_loss_is_skipped_and_training_goes_on(data, tmp_path, monkeypatch):
    monkeypatch.setattr(optimization, "build_criterion", lambda label_smoothing=0.0: NanAt({2}))
    assert run_main(parse(data, tmp_path)) == 0
    ckpt = load(tmp_path / "last.pth")
    assert ckpt["metrics"][0]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_losses_in_a_row_stop_cleanly_keeping_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    assert run_main(parse(data, tmp_path)) == 0
    good = (tmp_path / "last.pth").read_bytes()
    monkeypatch.setattr(optimization, "build_criterion", lambda label_smoothing=0.0: NanAt(range(2, 100)))
    code = run_main(parse(data, tmp_path, "--num-epochs", "2", "--resume", "auto", "--max-nonfinite", "3"))
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "3 steps in a row" in err[0]
    assert (tmp_path / "last.pth").read_bytes() == good and not (tmp_path / "epoch_2.pth").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="NaN"):
        checkpoint.write({"model": model.state_dict(), "model_ema": None}, [tmp_path / "last.pth"])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# Flags and errors


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-4"], "--batch-size"),
    (["--class-order", "alphabetical"], "--class-order"),
    (["--lr", "nan"], "--lr"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args_parser().parse_args(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_missing_data_and_mismatched_flags_exit_2_with_one_line(data, two_epochs, tmp_path, capsys):
    cases = [
        (parse(tmp_path / "nowhere", tmp_path), "no such directory"),
        (parse(data, tmp_path, "--resume", str(tmp_path / "missing.pth")), "no such file"),
        (parse(data, tmp_path, "--num-class", "10"), "--num-class"),
        (parse(data, tmp_path, "--resume", str(two_epochs / "last.pth"), "--width-mult", "0.5"), "--width-mult"),
        (parse(data, tmp_path, "--batch-size", "1000"), "--batch-size"),
    ]
    for args, message in cases:
        assert run_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_num_classes_mismatch_names_the_parameter(data, tmp_path):
    saved = MobileNetV2(num_classes=10, width_mult=0.25).state_dict()
    model = MobileNetV2(num_classes=1000, width_mult=0.25)
    with pytest.raises(cli.UsageError, match=r"classifier\.1\.weight.*--num-class"):
        state.load_state_checked(model, saved, "x.pth")


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path / "missing"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such directory" in proc.stderr


def test_demo_settings_apply_and_explicit_flags_win():
    args = config.check_args(train.get_args_parser().parse_args(["--demo", "--num-epochs", "2"]))
    assert args.num_epochs == 2  # given explicitly
    assert (args.input_size, args.save_path, args.device) == (64, "output/demo", "cpu")
    assert args.data_dir == "output/demo/data" and args.val_resize_size == 73
    assert args.train_crop_size == args.val_crop_size == 64


@pytest.mark.parametrize("flag, value, attribute", [("--lr", "0.045", "lr"), ("--hflip", "0.5", "hflip"),
                                                    ("--crop-scale-min", "0.08", "crop_scale_min")])
def test_a_flag_given_with_the_plain_default_value_still_wins_over_demo(flag, value, attribute):
    parser = train.get_args_parser()
    assert parser.get_default(attribute) == float(value) != recipes.named("demo").flags[attribute]
    args = parser.parse_args(["--demo", flag, value])
    assert getattr(args, attribute) == float(value)
    assert parser.parse_args(["--demo"]).__dict__[attribute] == recipes.named("demo").flags[attribute]
    assert parser.get_default(attribute) == float(value)  # the parser's own defaults are left as they were


@pytest.mark.parametrize("script, old, new, attribute", [
    ("train", "--num-class", "--num-classes", "num_classes"), ("train", "--workers", "--num-workers", "num_workers"),
    ("train", "--epochs", "--num-epochs", "num_epochs"), ("evaluate", "--crop", "--input-size", "input_size"),
    ("evaluate", "--num-class", "--num-classes", "num_classes"), ("evaluate", "--workers", "--num-workers", "num_workers"),
    ("evaluate", "--val-resize-size", "--resize", "resize"), ("evaluate", "--val-crop-size", "--input-size", "input_size"),
    ("train", "--resize", "--val-resize-size", "val_resize_size"),
])
def test_one_flag_spelling_across_scripts_with_the_old_ones_as_aliases(script, old, new, attribute):
    module = __import__(script)
    required = ["--weights", "w.pth"] if script == "evaluate" else []
    parse = module.get_args_parser().parse_args
    assert getattr(parse(required + [old, "7"]), attribute) == getattr(parse(required + [new, "7"]), attribute) == 7


# ----------------------------------------------------------------------------------------------------
# Schedules and helpers


def test_lr_schedules():
    seed = optimization.LRSchedule(0.045, 400)
    assert seed(0) == 0.045 and seed(200, 7, 10) == pytest.approx(0.045 * 0.98 ** 200)
    cosine = optimization.LRSchedule(0.1, 10, "cosine", warmup_epochs=1, min_lr=0.0)
    assert cosine(0, 0, 10) == pytest.approx(0.01) and cosine(0, 9, 10) == pytest.approx(0.1)
    assert cosine(1, 0, 10) == pytest.approx(0.1) and cosine(10, 0, 10) == pytest.approx(0.0, abs=1e-12)


def test_no_decay_on_norm_and_bias():
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    groups = optimization.parameter_groups(model, 4e-5, decay_norm_and_bias=False)
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------------
# Several processes (gloo on the CPU, launched by torchrun)


DDP_SCRIPT = """
import sys, torch
from mnv2 import distributed
from mnv2.training import loop, optimization
from mnv2.training.learner import Learner
from MobileNetV2 import MobileNetV2
torch.manual_seed(0)
context = distributed.setup("cpu")
images = torch.randint(0, 256, (3, 8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
targets = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(2))
half = slice(4 * context.rank, 4 * context.rank + 4)  # each rank: its half of each global batch of 8
loader = [(images[s, half], targets[s, half], torch.arange(4), torch.zeros(4, dtype=torch.int64)) for s in range(3)]
torch.manual_seed(0)
model = MobileNetV2(num_classes=10, width_mult=0.25).double()
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(optimization.parameter_groups(model, 4e-5), lr=0.01, momentum=0.9)
# float64 and NCHW: at initialisation, BatchNorm over 4 images amplifies rounding differences (a
# different summation order of the gradients) by ~1e4 per step, beyond the tolerance in float32.
learner = Learner(ddp, model, torch.nn.CrossEntropyLoss(), optimizer, optimization.LRSchedule(0.01, 1),
                        torch.device("cpu"), channels_last=False)
loop.train_one_epoch(learner, loader, 0, 3, context)
if context.is_main:
    torch.save({k: v.detach().contiguous() for k, v in model.named_parameters()}, sys.argv[1])
distributed.cleanup()
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_averaging_half_batch_losses(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = helpers.torchrun(script, tmp_path / "ddp.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    # What DDP computes: each half-batch through the model on its own (its own BatchNorm statistics),
    # the gradients averaged, i.e. the gradient of the mean of the two half-batch losses.
    images = torch.randint(0, 256, (3, 8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, width_mult=0.25).double()
    optimizer = torch.optim.SGD(optimization.parameter_groups(model, 4e-5), lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for s in range(3):
        halves = [slice(0, 4), slice(4, 8)]
        losses = [criterion(model(normalize(images[s, h]).double()), targets[s, h]) for h in halves]
        optimizer.zero_grad()
        ((losses[0] + losses[1]) / 2).backward()
        optimizer.step()
    reference = dict(model.named_parameters())
    worst = max((ddp[k] - reference[k]).abs().max().item() for k in reference)
    assert ddp.keys() == reference.keys() and worst <= 1e-5
    torch.manual_seed(0)
    initial = MobileNetV2(num_classes=10, width_mult=0.25).double()
    moved = max((ddp[k] - p).abs().max().item() for k, p in initial.named_parameters())
    assert moved > 1e-3  # the test would notice a run that did nothing


MAIN_SCRIPT = """
import os, sys, train
fail = os.environ.get("FAIL_RANK")
def on_step(epoch, step, indices):
    if fail is not None and os.environ["RANK"] == fail and step == 2:
        raise RuntimeError(f"injected failure on rank {fail}")
train.main(train.get_args_parser().parse_args(sys.argv[1:]), on_step=on_step)
"""


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_and_loads_for_evaluation(data, tmp_path):
    script = tmp_path / "main.py"
    script.write_text(MAIN_SCRIPT)
    out = tmp_path / "out"
    flags = ["--data-dir", data, "--save-path", out, "--batch-size", BATCH, "--num-epochs", "1",
             "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--device", "cpu"]
    proc = helpers.torchrun(script, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x 4" in proc.stdout  # the log names the per-process share of the global batch
    ckpt = load(out / "last.pth")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1
    assert load_model(out / "last.pth").config["num_classes"] == 1000
    assert run_main(parse(data, out, "--num-epochs", "2", "--resume", "auto")) == 0
    assert load(out / "last.pth")["epoch"] == 2 and load(out / "last.pth")["world_size"] == 1
    flags[flags.index("--num-epochs") + 1] = "3"
    proc = helpers.torchrun(script, *flags, "--resume", "auto")  # and back to two processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["epoch"] for m in load(out / "last.pth")["metrics"]] == [1, 2, 3]


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_in_bounded_time(data, tmp_path):
    script = tmp_path / "main.py"
    script.write_text(MAIN_SCRIPT)
    started = time.monotonic()
    env_flags = ["--data-dir", data, "--save-path", tmp_path / "out", "--batch-size", BATCH, "--num-epochs", "1",
                 "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--device", "cpu"]
    os.environ["FAIL_RANK"] = "1"
    try:
        proc = helpers.torchrun(script, *env_flags, timeout=180)
    finally:
        del os.environ["FAIL_RANK"]
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.monotonic() - started < 150


# ----------------------------------------------------------------------------------------------------
# SLURM: srun starts the tasks, each finds its rank in SLURM's variables


def test_slurm_node_lists_expand_as_scontrol_would():
    from mnv2 import distributed
    assert distributed.expand_hostlist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert distributed.expand_hostlist("gpu5") == ["gpu5"]
    assert distributed.expand_hostlist("r[1-2]n[9-10]") == ["r1n9", "r1n10", "r2n9", "r2n10"]
    assert distributed.expand_hostlist("a-1,b[8-10]") == ["a-1", "b8", "b9", "b10"]
    for broken in ("node[01-03", "node[3-1]", "node[a-b]", ""):
        with pytest.raises(distributed.UsageError):
            distributed.expand_hostlist(broken)


def test_a_slurm_task_is_described_as_torchrun_would_describe_it():
    from mnv2 import distributed
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[007-009],cpu1"}
    assert distributed.slurm_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                  "MASTER_ADDR": "gpu007", "MASTER_PORT": str(29500 + 3456)}
    assert distributed.slurm_environment({**env, "MASTER_PORT": "4000"})["MASTER_PORT"] == "4000"
    assert distributed.slurm_environment({**env, "SLURM_NTASKS": "1"}) == {}  # one task: no process group
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert distributed.slurm_environment({**env, **torchrun}) == {}  # torchrun inside an allocation wins
    with pytest.raises(distributed.UsageError):
        distributed.slurm_environment({k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"})


@pytest.mark.slow
def test_two_slurm_tasks_train_as_one_job_like_torchrun(data, tmp_path):
    """What `srun --ntasks 2 python train.py ...` starts: two plain processes that differ only in SLURM's
    variables; together they are one job of two ranks (gloo on the CPU)."""
    out = tmp_path / "out"
    flags = ["--data-dir", data, "--save-path", out, "--batch-size", BATCH, "--num-epochs", "1",
             "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--device", "cpu"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="localhost,node[2-3]", MASTER_PORT=str(helpers.free_port()))
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, flags)], cwd=REPO,
                              env=dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "2 x 4" in results[0][0]  # the log names the per-process share of the global batch
    ckpt = load(out / "last.pth")
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 1




@pytest.mark.slow
def test_a_batch_script_without_srun_says_so_in_one_line_within_the_join_time(data, tmp_path):
    """`python train.py` in a batch script of 4 tasks: one process, SLURM_NTASKS=4, no peers ever."""
    flags = ["--data-dir", data, "--save-path", tmp_path / "out", "--batch-size", BATCH, "--num-epochs", "1",
             "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0", "--device", "cpu",
             "--dist-timeout", "0.05"]  # 3 s
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLURM_NTASKS="4", SLURM_JOB_ID="4243", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(helpers.free_port()))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, flags)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr[-2000:]
    assert "rank 0 of 4" in err[0] and "srun python train.py" in err[0] and "Traceback" not in proc.stderr
    assert "waiting up to 0.05 min for the others" in proc.stdout

@pytest.mark.parametrize("flags", [["--batch-size", "1"], ["--batch-size", "4", "--accum-steps", "4"]])
def test_one_image_per_batchnorm_pass_at_a_1x1_map_is_refused_at_start(data, tmp_path, capsys, flags):
    args = parse(data, tmp_path, *flags)  # 32 px crops: the last feature maps are 1x1
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 image through BatchNorm" in err[0] and "Expected more than" not in err[0]
    assert not (tmp_path / "last.pth").exists()
