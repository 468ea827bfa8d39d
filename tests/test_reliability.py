"""Reliability and security promises, through the command lines and the real loader: damaged and untrusted
weight files, odd and hostile images, a fuzzed decoder, devkit faults and bad flags, each ending in a
documented outcome (a result, a counted failure, or one line and a non-zero exit), never a traceback or a hang.

    python -m pytest tests/test_reliability.py -q

The scenarios the other test files already prove (atomic checkpoints, exact resume, preemption, DDP,
retention, non-finite losses) are not repeated here; README.md lists which test proves which promise.
"""
import errno
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import count_flops
import evaluate as ev
import read_ImageNetData as data
import train
from helpers import RunsCode, fake_synsets, one_line, run_script, write_jpeg, write_meta_mat
from mnv2 import checkpoint, outputs, scoring
from mnv2 import evaluation as ev_run
from mnv2.data import imagenet, loaders, transforms
from MobileNetV2 import MobileNetV2

REPO = Path(__file__).resolve().parent.parent
SIZE, RESIZE = 32, 36
TRAIN_FLAGS = ["--batch-size", "8", "--num-epochs", "1", "--width-mult", "0.25", "--input-size", str(SIZE),
               "--num-workers", "0", "--print-freq", "100", "--device", "cpu"]
PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Image.MAX_IMAGE_PIXELS as Pillow ships it


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """The save folder of a 1-epoch run: epoch_1.pth, last.pth, best.pth (checkpoints with their sha256)."""
    out = tmp_path_factory.mktemp("trained")
    assert run_script(train, "--data-dir", demo, "--save-path", out, *TRAIN_FLAGS)[0] == 0
    return out


@pytest.fixture(scope="module")
def bare_weights(tmp_path_factory):
    """A plain torchvision-named state_dict of a width-0.25 model with 1000 classes."""
    path = tmp_path_factory.mktemp("weights") / "bare.pth"
    torch.manual_seed(0)
    torch.save(MobileNetV2(width_mult=0.25).state_dict(), path)
    return path


def flip_a_weight_bit(path):
    """Flip one bit inside the stored classifier weights: the zip container stays valid, the tensor differs."""
    raw = bytearray(path.read_bytes())
    weight = torch.load(path, map_location="cpu", weights_only=True)["model"]["classifier.1.weight"]
    offset = bytes(raw).find(weight.numpy().tobytes()[:64])
    assert offset > 0
    raw[offset + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    return path


def damaged_copy(source, target, damage):
    payload = source.read_bytes()
    target.write_bytes({"truncated": payload[:len(payload) // 2], "empty": b"", "bitflip": payload}[damage])
    return flip_a_weight_bit(target) if damage == "bitflip" else target


# ----------------------------------------------------------------------------------------------------
# Scenario 3: truncated, empty and bit-flipped files given to --weights (and --resume, on the real command line)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "bitflip"])
def test_damaged_weights_stop_count_flops_with_one_line_naming_the_file(damage, trained, tmp_path):
    bad = damaged_copy(trained / "last.pth", tmp_path / f"{damage}.pth", damage)
    code, err, out = run_script(count_flops, "--weights", bad, "--input-size", SIZE)
    assert code == 1 and str(bad) in one_line(err) and out == ""


def test_bit_flipped_checkpoint_stops_evaluate_with_one_line(trained, demo, tmp_path):
    bad = damaged_copy(trained / "last.pth", tmp_path / "flipped.pth", "bitflip")
    code, err, out = run_script(ev, "--weights", bad, "--data-dir", demo, "--num-workers", 0, "--no-progress")
    line = one_line(err)
    assert code == 1 and str(bad) in line and "checksum" in line and "top-1" not in out


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["evaluate.py", "count_flops.py", "train.py"])
def test_bit_flipped_checkpoint_is_one_line_on_each_real_run_script(script, trained, demo, tmp_path):
    bad = damaged_copy(trained / "last.pth", tmp_path / "flipped.pth", "bitflip")
    argv = {"evaluate.py": ["--weights", bad, "--data-dir", demo, "--num-workers", "0", "--device", "cpu"],
            "count_flops.py": ["--weights", bad],
            "train.py": ["--data-dir", demo, "--save-path", tmp_path / "out", "--resume", bad, *TRAIN_FLAGS]}[script]
    proc = subprocess.run([sys.executable, script, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=100, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and str(bad) in line and "checksum" in line
    assert not (tmp_path / "out" / "last.pth").exists()  # train.py wrote nothing over a damaged start


# ----------------------------------------------------------------------------------------------------
# Scenario 4: a pickle that would run code, in either torch.save format, even when the environment asks
# torch for unsafe loading


TOOLS = ["evaluate --weights", "count_flops --weights", "train --resume FILE", "train --resume auto"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("tool", TOOLS)
def test_code_in_a_weight_file_never_runs_from_any_command(tool, zip_format, demo, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch to unsafe loading by default
    marker = tmp_path / "ran"
    save_path = tmp_path / "out"
    save_path.mkdir()
    evil = save_path / "last.pth"
    torch.save({"format": "mobilenetv2-checkpoint", "model": RunsCode(marker), "epoch": 5, "step": 0}, evil,
               _use_new_zipfile_serialization=zip_format)
    module, argv = {
        "evaluate --weights": (ev, ["--weights", evil, "--data-dir", demo, "--no-progress"]),
        "count_flops --weights": (count_flops, ["--weights", evil]),
        "train --resume FILE": (train, ["--data-dir", demo, "--save-path", save_path, *TRAIN_FLAGS,
                                        "--resume", evil]),
        "train --resume auto": (train, ["--data-dir", demo, "--save-path", save_path, *TRAIN_FLAGS,
                                        "--resume", "auto"]),
    }[tool]
    code, err, out = run_script(module, *argv)
    line = one_line(err)
    assert code == 1 and not marker.exists()
    if tool == "train --resume auto":  # the only candidate was skipped, with a note saying why
        assert str(save_path) in line and "refused" in out and str(evil) in out
    else:
        assert str(evil) in line and "refused" in line
    assert sorted(p.name for p in save_path.iterdir()) == ["last.pth"]  # nothing trained, nothing written


# ----------------------------------------------------------------------------------------------------
# Scenario 2: disk full while writing the reports that follow a checkpoint


@pytest.mark.slow
def test_disk_full_while_writing_reports_is_one_line_and_the_checkpoint_resumes(demo, tmp_path, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def full_disk_for_reports(*args, **kwargs):
        if "metrics" in kwargs.get("prefix", ""):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), kwargs["prefix"])
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", full_disk_for_reports)
    code, err, _ = run_script(train, "--data-dir", demo, "--save-path", tmp_path, *TRAIN_FLAGS)
    monkeypatch.undo()
    line = one_line(err)
    assert code == 1 and "metrics.csv" in line and "No space left" in line
    assert checkpoint.read(tmp_path / "last.pth")["epoch"] == 1  # saved before the reports, intact
    path, ckpt = checkpoint.find_latest(tmp_path, log=lambda *a: None)
    assert ckpt["epoch"] == 1


# ----------------------------------------------------------------------------------------------------
# Scenario 10: odd and hostile images through the real loader


def png_declaring(width, height):
    """A valid, tiny PNG whose header claims width x height RGB pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_declaring(width, height):
    """A small baseline JPEG whose frame header (SOF0) claims width x height pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(buffer, "JPEG")
    raw = bytearray(buffer.getvalue())
    sof = raw.find(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, height, width)
    return bytes(raw)


def write_odd(path, kind, seed):
    """Overwrite path with an image file ImageNet-style loaders meet: the name stays, the content changes."""
    rgb = np.random.default_rng(seed).integers(0, 256, (29, 37, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    if kind == "png_as_jpeg":
        Image.fromarray(rgb).save(path, "PNG")
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, "JPEG", quality=95)
    elif kind == "grayscale":
        Image.fromarray(gray).save(path, "JPEG", quality=95)
    elif kind == "png16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path, "PNG")
    elif kind == "palette":
        Image.fromarray(rgb).convert("P").save(path, "PNG")
    return gray


ODD_KINDS = ["png_as_jpeg", "cmyk", "grayscale", "png16", "palette"]


@pytest.mark.slow
def test_odd_image_files_give_rgb_tensors_with_their_labels_through_the_real_loader(fake_imagenet_factory):
    info = fake_imagenet_factory(num_image_classes=3, train_per_class=2, num_val=6)
    for k, kind in enumerate(ODD_KINDS):
        write_odd(info["train"][k][0], kind, seed=k)
        write_odd(info["val"][k][0], kind, seed=k)
    train_set, val_set, classes, _ = loaders.build_datasets(info["root"], input_size=SIZE, resize=RESIZE)
    index = classes.index_of()
    for split, dataset, files in (("train", train_set, info["train"]), ("val", val_set, info["val"])):
        expected = {str(path): index[wnid] for path, wnid in files}
        loader = loaders.build_loader(dataset, 4, loaders.EvalSampler(len(dataset)), num_workers=0)
        images, targets, indices, failed = (torch.cat(t) for t in zip(*loader))
        assert images.shape == (len(files), 3, SIZE, SIZE) and images.dtype == torch.uint8, split
        assert failed.tolist() == [0] * len(files), split  # decoded, not replaced by another image
        assert {dataset.samples[i][0]: t for i, t in zip(indices.tolist(), targets.tolist())} == expected, split
        assert all(images[i].float().std() > 5 for i in range(len(files))), split  # real pictures, not a fill


def test_sixteen_bit_png_keeps_its_picture_instead_of_saturating(tmp_path):
    path = tmp_path / "16bit.JPEG"
    gray = write_odd(path, "png16", seed=3)
    eight_bit = tmp_path / "8bit.png"
    Image.fromarray(gray).save(eight_bit)
    transform = transforms.eval_transform(SIZE, RESIZE)
    assert (transform(str(path)).int() - transform(str(eight_bit)).int()).abs().max() <= 1


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_decompression_bomb_is_refused_before_any_pixel_is_decoded(kind, tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_LIMIT  # importing the project leaves Pillow's limit on
    path = tmp_path / "bomb.JPEG"
    path.write_bytes(png_declaring(100_000, 100_000) if kind == "png" else jpeg_declaring(60_000, 60_000))
    assert path.stat().st_size < 1000
    if transforms.simplejpeg is not None:
        def no_decoding(*args, **kwargs):
            raise AssertionError("a decompression bomb reached the JPEG decoder")
        monkeypatch.setattr(transforms.simplejpeg, "decode_jpeg", no_decoding)
    for transform in (transforms.train_transform(SIZE), transforms.eval_transform(SIZE, RESIZE)):
        with pytest.raises(Image.DecompressionBombError):
            transform(str(path))


BAD_KINDS = ["truncated", "zero_bytes", "random_bytes", "png_bomb", "jpeg_bomb"]


def write_bad(path, kind, seed=0):
    payload = {
        "truncated": lambda: path.read_bytes()[:200],
        "zero_bytes": lambda: b"",
        "random_bytes": lambda: np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "png_bomb": lambda: png_declaring(100_000, 100_000),
        "jpeg_bomb": lambda: jpeg_declaring(60_000, 60_000),
    }[kind]()
    path.write_bytes(payload)


@pytest.mark.slow
def test_eval_counts_every_bad_file_in_the_result_and_drops_none(fake_imagenet_factory):
    info = fake_imagenet_factory(num_image_classes=3, train_per_class=1, num_val=8)
    for (path, _), kind in zip(info["val"][1:], BAD_KINDS):
        write_bad(path, kind)
    _, val_set, _, _ = loaders.build_datasets(info["root"], input_size=SIZE, resize=RESIZE)
    loader = loaders.build_loader(val_set, 3, loaders.EvalSampler(len(val_set)), num_workers=0)
    images, targets, indices, failed = (torch.cat(t) for t in zip(*loader))
    assert indices.tolist() == list(range(8)) and failed.tolist() == [0] + [1] * 5 + [0, 0]
    assert targets.tolist() == [label for _, label in val_set.samples]  # a bad file keeps its label
    model = MobileNetV2(width_mult=0.25).eval()
    result = scoring.evaluate(model, loader, torch.device("cpu"), channels_last=False, progress=False)
    assert result["images"] == 8 and result["failed"] == 5


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_train_run_replaces_logs_and_counts_bad_files(demo, tmp_path, caplog):
    root = shutil.copytree(demo, tmp_path / "demo")
    layout = imagenet.find_layout(root)
    samples = imagenet.list_samples(layout, "train", imagenet.read_classes(layout))
    bad = {samples[i][0]: kind for i, kind in zip((0, 9, 18, 27, 36), BAD_KINDS)}  # none next to another
    for path, kind in bad.items():
        write_bad(Path(path), kind)
    with caplog.at_level(logging.WARNING, logger="mnv2.data"):
        code, err, _ = run_script(train, "--data-dir", root, "--save-path", tmp_path / "out", *TRAIN_FLAGS)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert ckpt["metrics"][0]["failed_images"] == len(bad)  # each bad file met once, and counted
    logged = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert sorted(m.split()[2].rstrip(":") for m in logged) == sorted(bad)  # each logged exactly once


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_train_on_only_unreadable_images_stops_with_one_line(workers, fake_imagenet_factory, tmp_path):
    info = fake_imagenet_factory(num_image_classes=3, train_per_class=2, num_val=3)
    for path, _ in info["train"]:
        path.write_bytes(b"")
    flags = [*TRAIN_FLAGS, "--batch-size", "2", "--num-workers", str(workers)]
    code, err, _ = run_script(train, "--data-dir", info["root"], "--save-path", tmp_path / "out", *flags)
    lines = [line for line in err.strip().splitlines() if not line.startswith("unreadable image")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("train.py: error:") and "in a row failed" in lines[0] and "--check" in lines[0]
    assert not (tmp_path / "out" / "last.pth").exists()


def mutate(original, rng):
    """One random corruption of a file: flipped bits, a cut, a random run, or damage in the headers."""
    raw = bytearray(original)
    kind = rng.integers(4)
    if kind == 0:
        for _ in range(rng.integers(1, 9)):
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        raw = raw[:rng.integers(len(raw))]
    elif kind == 2:
        start, n = int(rng.integers(len(raw))), int(rng.integers(1, 33))
        raw[start:start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:
        for _ in range(rng.integers(1, 5)):
            raw[rng.integers(min(len(raw), 200))] = int(rng.integers(256))
    return bytes(raw)


FUZZ_CASES = 150


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """FUZZ_CASES mutated JPEGs (baseline, progressive and greyscale originals), seeded, plus one good JPEG."""
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(2024)
    originals = []
    for k, (mode, options) in enumerate((("RGB", {}), ("RGB", {"progressive": True}), ("L", {}))):
        pixels = rng.integers(0, 256, (29 + k, 37 + k, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90, **options)
        originals.append(buffer.getvalue())
    files = []
    for case in range(FUZZ_CASES):
        path = folder / f"case_{case:03d}.JPEG"
        path.write_bytes(mutate(originals[case % len(originals)], rng))
        files.append(path)
    return files, write_jpeg(folder / "good.JPEG", seed=7)


@pytest.mark.timeout(120)
def test_fuzzed_jpegs_give_an_image_or_a_counted_failure_in_eval(fuzzed):
    files, _ = fuzzed
    dataset = loaders.ImageNetDataset([(str(p), k) for k, p in enumerate(files)], transforms.eval_transform(SIZE, RESIZE),
                                   train=False)
    loader = loaders.build_loader(dataset, 16, loaders.EvalSampler(len(dataset)), num_workers=0)
    images, targets, indices, failed = (torch.cat(t) for t in zip(*loader))
    assert images.shape == (FUZZ_CASES, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert targets.tolist() == indices.tolist() == list(range(FUZZ_CASES))
    assert set(failed.tolist()) == {0, 1}  # both outcomes happen: the fuzzing reaches the decoder
    assert all(images[i].sum() == 0 for i in range(FUZZ_CASES) if failed[i])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fuzzed_jpegs_give_an_image_or_a_counted_replacement_in_training(fuzzed):
    files, good = fuzzed
    samples = [s for k, p in enumerate(files) for s in ((str(p), k), (str(good), -1))]  # a good file after each
    dataset = loaders.ImageNetDataset(samples, transforms.train_transform(SIZE), train=True)
    loader = loaders.build_loader(dataset, 16, list(range(0, len(samples), 2)), num_workers=0)
    images, targets, indices, failed = (torch.cat(t) for t in zip(*loader))
    assert images.shape == (FUZZ_CASES, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert set(failed.tolist()) == {0, 1}
    expected = [-1 if f else k for k, f in enumerate(failed.tolist())]  # a failed file gave its place to the next
    assert targets.tolist() == expected


# ----------------------------------------------------------------------------------------------------
# Scenario 11: devkit faults, one line from each command line


def _no_leaves(info):
    write_meta_mat(info["meta_mat"], [(i, w, words, (1,)) for i, w, words, _ in fake_synsets()])


def _missing_meta(info):
    info["meta_mat"].unlink()


def _gt_line_count(info):
    info["ground_truth"].write_text("".join(f"{i}\n" for i in info["truth"][:-1]))


def _gt_out_of_range(info):
    info["ground_truth"].write_text("".join(f"{i}\n" for i in info["truth"][:-1]) + "1001\n")


def _val_beyond_truth(info):
    write_jpeg(info["val_dir"] / "ILSVRC2012_val_00000099.JPEG")


DEVKIT_FAULTS = {  # fault: (what breaks the devkit, what the one line must name)
    "missing meta.mat": (_missing_meta, "meta.mat"),
    "meta.mat without leaves": (_no_leaves, "0 leaf synsets"),
    "ground truth with a line missing": (_gt_line_count, "ILSVRC2012_val_00000006"),
    "ground-truth ID out of range": (_gt_out_of_range, "ID 1001"),
    "val file beyond the ground truth": (_val_beyond_truth, "ILSVRC2012_val_00000099"),
}
# read_ImageNetData.py with a missing meta.mat is proven by test_data.py::test_cli_data_error_is_one_line.
DEVKIT_CASES = [(fault, tool) for fault in DEVKIT_FAULTS for tool in ("read_ImageNetData", "evaluate", "train")
                if (fault, tool) != ("missing meta.mat", "read_ImageNetData")]


@pytest.mark.slow
@pytest.mark.parametrize("fault, tool", DEVKIT_CASES)
def test_devkit_fault_is_one_line_from_each_command(fault, tool, fake_imagenet_factory, bare_weights, tmp_path):
    info = fake_imagenet_factory(num_image_classes=3, train_per_class=2, num_val=6)
    breaker, needle = DEVKIT_FAULTS[fault]
    breaker(info)
    module, argv = {
        "read_ImageNetData": (data, ["--data-dir", info["root"]]),
        "evaluate": (ev, ["--weights", bare_weights, "--data-dir", info["root"], "--num-workers", 0,
                          "--no-progress", "--resize", RESIZE, "--crop", SIZE]),
        "train": (train, ["--data-dir", info["root"], "--save-path", tmp_path / "out", *TRAIN_FLAGS]),
    }[tool]
    code, err, out = run_script(module, *argv)
    line = one_line(err)
    assert code == 1 and needle in line and "error" in line
    assert "top-1" not in out and not (tmp_path / "out" / "last.pth").exists()


# ----------------------------------------------------------------------------------------------------
# Scenario 13: wrong flag values, one argparse-style line and exit code 2


FLAG_CASES = [
    ("evaluate", ["--batch-size", "-4"], "--batch-size"),
    ("evaluate", ["--class-order", "alphabetical"], "--class-order"),
    ("evaluate", ["--crop", "many"], "--crop"),
    ("count_flops", ["--input-size", "16"], "--input-size"),
    ("count_flops", ["--width-mult", "-1"], "--width-mult"),
    ("count_flops", ["--num-classes", "0"], "--num-classes"),
    ("count_flops", ["--weights", "{missing}"], "--weights"),
    ("count_flops", ["--weights", "{weights}", "--width-mult", "0.5"], "--width-mult"),
    ("count_flops", ["--weights", "{weights}", "--num-classes", "10"], "--num-classes"),
    ("read_ImageNetData", ["--data-dir", "{missing}"], "--data-dir"),
    ("read_ImageNetData", ["--class-order", "alphabetical"], "--class-order"),
    ("read_ImageNetData", ["--workers", "0"], "--workers"),
    ("read_ImageNetData", ["--list", "test"], "--list"),
]


@pytest.mark.parametrize("tool, flags, flag", FLAG_CASES, ids=[f"{t} {' '.join(f)}" for t, f, _ in FLAG_CASES])
def test_wrong_flag_value_is_one_argparse_line_and_exit_2(tool, flags, flag, bare_weights, demo, tmp_path):
    module, base = {"evaluate": (ev, ["--weights", bare_weights, "--data-dir", demo]),
                    "count_flops": (count_flops, []),
                    "read_ImageNetData": (data, ["--data-dir", demo])}[tool]
    flags = [f.format(missing=tmp_path / "missing", weights=bare_weights) for f in flags]
    code, err, out = run_script(module, *base, *flags)
    line = one_line(err)
    assert code == 2 and line.startswith(f"{tool}.py: error:") and flag in line and out == ""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model written as an ONNX file (under a .pth name too), as a TorchScript program and as a
    torch.export program."""
    import warnings

    from mnv2.deploy import export
    root = tmp_path_factory.mktemp("exported")
    model = MobileNetV2(num_classes=10, width_mult=0.25).eval()
    export.export_onnx(model, root / "model.onnx", input_size=32, check_batch=1)
    shutil.copy(root / "model.onnx", root / "renamed.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is on its way out: a user may still have one
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 32, 32)), root / "model.pt")
    export.export_pt2(model, root / "model.pt2", input_size=32)
    return root


@pytest.mark.parametrize("name, what", [("model.onnx", "an ONNX model"), ("renamed.pth", "an ONNX model"),
                                        ("model.pt", "a TorchScript program"),
                                        ("model.pt2", "a torch.export program")])
def test_a_deployed_file_given_as_weights_is_named_for_what_it_is(exported, name, what):
    code, err, _ = run_script(count_flops, "--weights", exported / name)
    line = one_line(err)
    assert code == 1 and f"{exported / name}: {what}" in line and "exported from" in line
    assert "could run code" not in line and "corrupt" not in line


@pytest.mark.slow
def test_a_deployed_file_given_as_pretrained_is_named_for_what_it_is(exported, demo, tmp_path):
    code, err, _ = run_script(train, "--data-dir", demo, "--pretrained", exported / "model.pt", "--device", "cpu",
                              "--save-path", tmp_path / "out")
    assert code != 0 and "a TorchScript program" in one_line(err)
    assert not (tmp_path / "out" / "last.pth").exists()


def test_weights_holding_nan_are_refused_in_one_line_not_scored(demo, tmp_path):
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    state = model.state_dict()
    state["features.3.conv.1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "diverged.pth")
    code, err, out = run_script(ev, "--weights", tmp_path / "diverged.pth", "--data-dir", demo, "--num-workers", 0)
    line = one_line(err)
    assert code == 1 and "features.3.conv.1.0.weight holds NaN" in line and "top-1" not in out


def test_a_file_name_with_terminal_controls_is_printed_escaped(tmp_path):
    evil = tmp_path / "clear\x1b[2J\x07here.pth"
    evil.write_bytes(b"")
    code, err, _ = run_script(count_flops, "--weights", evil)
    assert code == 1 and "\x1b" not in err and "\x07" not in err and "clear\\x1b[2J\\x07here.pth" in err


def test_a_ten_class_model_is_not_named_with_the_devkits_classes(demo, tmp_path):
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    torch.save(model.state_dict(), tmp_path / "ten.pth")
    image = next((demo / "ILSVRC2012_img_val").iterdir())
    code, err, out = run_script(ev, "--weights", tmp_path / "ten.pth", image, "--data-dir", demo)
    assert code == 0, err
    assert "class " in out and not any(wnid in out for wnid in imagenet.read_classes(imagenet.find_layout(demo)).wnids[:5])


@pytest.mark.parametrize("script, flags", [(train, ["--device", "cpu"]), (ev, ["--weights", "x.pth"])])
def test_a_mean_that_is_not_a_number_is_refused(script, flags, demo):
    code, err, _ = run_script(script, "--data-dir", demo, *flags, "--mean", "nan", "0.5", "0.5")
    assert code == 2 and "--mean" in one_line(err) and "finite" in one_line(err)


@pytest.mark.slow
def test_count_flops_counts_a_checkpoint_at_the_size_it_was_trained_at(trained):
    code, err, out = run_script(count_flops, "--weights", trained / "last.pth")
    assert code == 0, err
    assert ", 32 px," in out.splitlines()[0]  # TRAIN_FLAGS train at 32 px, not the paper's 224


@pytest.mark.slow
def test_ctrl_c_in_evaluate_is_one_line_and_exit_130(trained, demo, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev_run, "evaluate", interrupted)
    code, err, _ = run_script(ev, "--weights", trained / "last.pth", "--data-dir", demo, "--num-workers", 0)
    assert code == 130 and one_line(err) == "evaluate.py: interrupted"
