"""Stored teacher outputs: a view rebuilt from its record is the view the pipeline drew, bit for bit; the stored
loss is the papers' loss on the teacher's top k; a killed or two-process writer ends with the same files as
one uninterrupted writer; training from stored outputs records them and resumes bit-exactly; and every
mismatch (data, teacher, view flags, a damaged or unfinished folder) is one line."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import train
from helpers import (assert_same_tensors, load_checkpoint, make_fake_imagenet, one_line, run_main, run_script, torchrun,
                     save_checkpoint, write_jpeg)
from mnv2 import checkpoint
from mnv2.data import folders as image_folders
from mnv2.data.transforms import normalize
from mnv2.training import distill, teacher_outputs
from mnv2.training.datasets import DataSpec, training_transform
from MobileNetV2 import MobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--batch-size", "4", "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0",
          "--print-freq", "100", "--device", "cpu", "--lr", "0.01", "--hflip", "0.5", "--auto-augment", "ta_wide",
          "--random-erase", "0.5", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored") / "imagenet"
    make_fake_imagenet(root, num_image_classes=3, train_per_class=8, num_val=6, image_size=(53, 41))
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A MobileNetV2 checkpoint with ImageNet's 1000 outputs, normalised with its own mean/std (0.5)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = MobileNetV2(num_classes=1000, width_mult=0.25).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    return save_checkpoint(path, model, {"input_size": 32, "resize": 36, "interpolation": "bilinear",
                                         "mean": [0.5] * 3, "std": [0.5] * 3})


def parse(data, *extra):
    return train.get_args_parser().parse_args(["--data-dir", str(data), *COMMON, *map(str, extra)])


def write(data, teacher, folder, *extra):
    code, err, _ = run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                              folder, "--teacher-views", 3, "--teacher-top-k", 5, *extra)
    assert code == 0, err
    return folder


@pytest.fixture(scope="module")
def stored(data, teacher, tmp_path_factory):
    return write(data, teacher, tmp_path_factory.mktemp("outputs") / "views")


def test_a_stored_view_rebuilt_from_its_record_is_the_view_the_pipeline_drew_bit_for_bit(data, teacher, stored):
    args = train.config.check_args(parse(data, "--teacher-outputs", stored))
    spec = DataSpec.from_args(args, None)
    found = image_folders.build_datasets(str(data), "sorted", 32, 36, "bilinear", log=lambda *a: None)
    meta = json.loads((stored / "outputs.json").read_text())
    store = teacher_outputs.open_for_training(stored, found.train.samples, str(data), found.classes, args,
                                              log=lambda *a: None)
    found.train.transform = training_transform(spec)
    dataset = teacher_outputs.StoredViewDataset(found.train, store)
    model = distill.load_teacher(str(teacher), log=lambda *a: None).model
    arrays = store.arrays
    flips = set()
    for epoch in range(3):
        store.set_epoch(epoch)
        for index, (path, _) in enumerate(found.train.samples):
            view = int(store.views[index])
            rebuilt, _, _, _ = dataset[index]
            # the pipeline as train.py runs it, its generators seeded with the record's seed
            with torch.random.fork_rng(devices=[]):
                checkpoint.seed_everything(int(arrays["seeds"][index, view]))
                drawn = found.train.transform(path)
                box = found.train.transform.transforms[0].drawn
            assert torch.equal(rebuilt, drawn)
            assert list(arrays["boxes"][index, view]) == list(box[:4]) and arrays["flips"][index, view] == box[4]
            flips.add(box[4])
            # and the stored logits are the teacher's on exactly these pixels
            with torch.no_grad():
                logits = model(normalize(drawn[None], (0.5,) * 3, (0.5,) * 3))[0]
            top = logits.topk(meta["top_k"])
            assert np.array_equal(arrays["classes"][index, view], top.indices.numpy())
            assert np.array_equal(arrays["logits"][index, view], top.values.numpy().astype(np.float16))
    assert flips == {True, False}
    assert len({tuple(row) for row in arrays["boxes"].reshape(-1, 4)}) > 10  # the views differ


def test_the_stored_loss_is_the_papers_loss_on_the_teachers_top_k():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 6, generator=generator) * 3, torch.randn(4, 6, generator=generator) * 3
    top = teacher.topk(3, dim=1)

    class Store:
        num_classes, views = 6, np.zeros(4, dtype=np.int64)
        arrays = {"logits": top.values.numpy().astype(np.float16)[:, None],
                  "classes": top.indices.numpy().astype(np.int16)[:, None]}
    Store.teacher_logits = teacher_outputs.StoredOutputs.teacher_logits
    rounded = torch.from_numpy(top.values.numpy().astype(np.float16).astype(np.float32))
    for loss, temperature in (("kd", 1.0), ("kd", 3.0), ("dist", 2.0)):
        got = teacher_outputs.StoredDistillation(Store(), loss, temperature, alpha=0.25, beta=0.5, gamma=2.0)(
            torch.tensor(1.5), student, None, torch.arange(4))
        # the teacher's distribution: softmax over its k largest logits, 0 elsewhere
        p_t = torch.zeros(4, 6, dtype=torch.float64).scatter_(
            1, top.indices, torch.softmax(rounded.double() / temperature, 1))
        p_s = torch.softmax(student.double() / temperature, 1)
        if loss == "kd":
            term = temperature ** 2 * (torch.xlogy(p_t, p_t) - p_t * p_s.log()).sum() / 4
        else:
            def pearson(a, b):
                a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
                return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            term = temperature ** 2 * (0.5 * (1 - pearson(p_s, p_t).mean()) + 2.0 * (1 - pearson(p_s.t(), p_t.t()).mean()))
        assert got.item() == pytest.approx(0.25 * 1.5 + 0.75 * term.item(), rel=1e-5)


def same_files(a, b):
    for name in ("seeds", "boxes", "flips", "crc", "logits", "classes", "done"):
        assert (a / f"{name}.npy").read_bytes() == (b / f"{name}.npy").read_bytes(), name
    meta_a, meta_b = (json.loads((d / "outputs.json").read_text()) for d in (a, b))
    assert meta_a["sha256"] == meta_b["sha256"] and meta_a["complete"] and meta_b["complete"]


def test_a_killed_writer_continues_where_it_stopped_and_ends_with_the_same_files(data, teacher, stored, tmp_path,
                                                                                  monkeypatch):
    real = teacher_outputs._AllViews.__getitem__
    seen = []

    def dies_at_the_seventh_image(self, position):
        seen.append(position)
        if len(seen) == 7:
            raise KeyboardInterrupt  # as a kill would: nothing after this point runs
        return real(self, position)
    monkeypatch.setattr(teacher_outputs._AllViews, "__getitem__", dies_at_the_seventh_image)
    folder = tmp_path / "views"
    with pytest.raises(KeyboardInterrupt):
        run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs", folder,
                   "--teacher-views", 3, "--teacher-top-k", 5)
    done = np.load(folder / "done.npy")
    assert done.sum() == 6 and not json.loads((folder / "outputs.json").read_text())["complete"]  # one image a batch
    monkeypatch.setattr(teacher_outputs._AllViews, "__getitem__", real)
    code, err, out = run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                                folder, "--teacher-views", 3, "--teacher-top-k", 5)
    assert code == 0, err
    assert "18 images left" in out
    same_files(folder, stored)


@pytest.mark.slow
def test_two_processes_write_their_halves_into_the_same_files_and_train_from_them(data, teacher, stored, tmp_path):
    result = torchrun(train.__file__, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                      tmp_path / "views", "--teacher-views", 3, "--teacher-top-k", 5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "12 images left for this process of 2" in result.stdout + result.stderr
    same_files(tmp_path / "views", stored)
    # and two processes train from them, each reading the stored outputs of its own share of the images
    result = torchrun(train.__file__, "--data-dir", data, *COMMON, "--teacher-outputs", tmp_path / "views",
                      "--distill-loss", "dist", "--num-epochs", "1", "--save-path", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["world_size"] == 2 and saved["args"]["teacher_outputs"] == str(tmp_path / "views")


@pytest.mark.slow
def test_training_from_stored_outputs_records_them_and_resumes_mid_epoch_bit_exactly(data, teacher, stored, tmp_path):
    flags = ["--teacher-outputs", stored, "--distill-loss", "dist", "--distill-temperature", "2",
             "--label-smoothing", "0.1", "--model-ema", "--batch-size", "8", "--accum-steps", "2"]

    def args(out, *extra):
        return parse(data, "--save-path", out, *flags, *extra)
    assert run_main(train, args(tmp_path / "straight", "--num-epochs", "3")) == 0

    def preempt(epoch, step, indices):
        if epoch == 1 and step == 1:  # in the middle of the second epoch: its views are drawn again on resume
            os.kill(os.getpid(), signal.SIGTERM)
    assert run_main(train, args(tmp_path / "resumed", "--num-epochs", "3"), on_step=preempt) == 128 + signal.SIGTERM
    assert 0 < load_checkpoint(tmp_path / "resumed" / "last.pth")["step"] < 3  # saved mid-epoch (3 steps of 8)
    assert run_main(train, args(tmp_path / "resumed", "--num-epochs", "3", "--resume", "auto")) == 0
    straight, resumed = load_checkpoint(tmp_path / "straight" / "last.pth"), load_checkpoint(tmp_path / "resumed" / "last.pth")
    for key in ("model", "model_ema", "optimizer", "epoch", "sampler"):
        assert_same_tensors(resumed[key], straight[key])
    saved = straight["args"]
    assert saved["teacher_outputs"] == str(stored) and saved["teacher"] == str(teacher)
    assert saved["teacher_sha256"] == json.loads((stored / "outputs.json").read_text())["teacher_sha256"]
    assert len(saved["teacher_outputs_sha256"]) == 64
    assert set(straight["model"]) == set(MobileNetV2(num_classes=1000, width_mult=0.25).state_dict())
    # the stored outputs changed the training: the same run on labels alone ends elsewhere
    assert run_main(train, parse(data, "--save-path", tmp_path / "plain", "--label-smoothing", "0.1",
                                 "--model-ema", "--num-epochs", "3")) == 0
    plain = load_checkpoint(tmp_path / "plain" / "last.pth")
    assert not torch.equal(plain["model"]["classifier.1.weight"], straight["model"]["classifier.1.weight"])


def damaged(stored, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(stored, copy)
    logits = np.load(copy / "logits.npy", mmap_mode="r+")
    logits[0, 0, 0] += 1
    logits.flush()
    return copy


def unfinished(stored, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(stored, copy)
    meta = json.loads((copy / "outputs.json").read_text())
    meta["complete"] = False
    (copy / "outputs.json").write_text(json.dumps(meta))
    return copy


def other_data(data, tmp_path):
    copy = tmp_path / "other"
    shutil.copytree(data, copy)
    next((copy / "ILSVRC2012_img_train").rglob("*.JPEG")).unlink()
    return copy


@pytest.mark.parametrize("case, words", [
    ("other data", ["written for other training images", "23"]),
    ("other teacher", ["stores the outputs of another teacher"]),
    ("other crop", ["--train-crop-size 32", "this run has 40"]),
    ("damaged", ["logits.npy does not match the sha256"]),
    ("unfinished", ["not complete", "--write-teacher-outputs"]),
    ("mixup", ["--mixup-alpha with --teacher-outputs", "unmixed"]),
    ("no folder", ["no such folder"]),
])
def test_stored_outputs_that_do_not_match_the_run_are_one_line(data, teacher, stored, tmp_path, case, words):
    folder, extra, data_dir = stored, [], data
    if case == "other data":
        data_dir = other_data(data, tmp_path)
    elif case == "other teacher":
        other = tmp_path / "other.pth"
        saved = torch.load(teacher, weights_only=True)
        saved["epoch"] = 2
        torch.save(saved, other)
        extra = ["--teacher", other]
    elif case == "other crop":
        extra = ["--train-crop-size", "40"]
    elif case == "damaged":
        folder = damaged(stored, tmp_path)
    elif case == "unfinished":
        folder = unfinished(stored, tmp_path)
    elif case == "mixup":
        extra = ["--mixup-alpha", "0.2"]
    elif case == "no folder":
        folder = tmp_path / "nothing"
    code, err, _ = run_script(train, "--data-dir", data_dir, *COMMON, "--save-path", tmp_path / "out",
                              "--teacher-outputs", folder, "--num-epochs", "1", *extra)
    line = one_line(err)
    assert code != 0 and all(w in line for w in words), line
    assert not (tmp_path / "out" / "last.pth").exists()


def test_writing_into_a_foreign_folder_or_with_other_flags_is_one_line(data, teacher, stored, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err, _ = run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                              foreign)
    assert code != 0 and "not empty and not teacher outputs" in one_line(err)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    copy = tmp_path / "copy"
    shutil.copytree(stored, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    code, err, _ = run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                              copy, "--teacher-views", 4, "--teacher-top-k", 5)
    assert code != 0 and "written with another views" in one_line(err)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing of the good folder was touched
    code, err, _ = run_script(train, "--data-dir", data, *COMMON, "--write-teacher-outputs", tmp_path / "x")
    assert code != 0 and "--write-teacher-outputs needs --teacher" in one_line(err)
    (tmp_path / "a-file").write_text("mine")
    code, err, _ = run_script(train, "--data-dir", data, *COMMON, "--teacher", teacher, "--write-teacher-outputs",
                              tmp_path / "a-file")
    assert code != 0 and "a file, not a folder" in one_line(err) and (tmp_path / "a-file").read_text() == "mine"


def test_arrays_left_by_a_creation_stopped_before_its_description_are_made_again(data, teacher, stored, tmp_path):
    folder = tmp_path / "views"
    shutil.copytree(stored, folder)
    (folder / "outputs.json").unlink()  # as a kill between the arrays and their description leaves it
    np.save(folder / "logits.npy", np.zeros(3))  # and a half-made array
    write(data, teacher, folder)
    same_files(folder, stored)


def test_a_view_that_comes_out_differently_stops_the_run_in_one_line(data, stored, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    victim = sorted((copy / "ILSVRC2012_img_train").rglob("*.JPEG"))[0]
    write_jpeg(victim, size=(53, 41), seed=99)  # same name and size, other pixels
    code, err, _ = run_script(train, "--data-dir", copy, *COMMON, "--save-path", tmp_path / "out",
                              "--teacher-outputs", stored, "--num-epochs", "1")
    # the file list is the same, so the outputs are accepted, and the changed image is caught when rebuilt
    line = one_line(err)
    assert code != 0 and victim.name in line and "comes out different" in line, line


@pytest.mark.slow
def test_fine_tuning_a_folder_from_stored_outputs_then_evaluating_it(teacher, tmp_path):
    """The pair: --pretrained on the user's folders (LP-FT default) learning from stored outputs of a teacher
    for those classes, then evaluate.py on the result."""
    import evaluate
    for split, count in (("train", 4), ("val", 2)):
        for k, name in enumerate(("cat", "dog", "fox")):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            for i in range(count):
                write_jpeg(tmp_path / "photos" / split / name / f"{i}.jpg", size=(45, 38), seed=100 * k + 10 * i)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        three = save_checkpoint(tmp_path / "three.pth", MobileNetV2(num_classes=3, width_mult=0.25).eval(),
                                {"input_size": 32, "resize": 36, "interpolation": "bilinear", "mean": [0.5] * 3,
                                 "std": [0.5] * 3})
    flags = ["--data-dir", tmp_path / "photos", "--pretrained", teacher, "--width-mult", "0.25", "--input-size", "32",
             "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--print-freq", "100"]
    code, err, out = run_script(train, *flags, "--teacher", three, "--write-teacher-outputs", tmp_path / "views",
                                "--teacher-views", 2, "--teacher-top-k", 2)
    assert code == 0, err
    assert "12 images x 2 views" in out
    code, err, out = run_script(train, *flags, "--teacher-outputs", tmp_path / "views", "--distill-loss", "dist",
                                "--num-epochs", "2", "--lp-epochs", "1", "--save-path", tmp_path / "run")
    assert code == 0, err
    assert "from stored outputs" in out and "LP-FT: the classifier first" in out, out
    saved = load_checkpoint(tmp_path / "run" / "best.pth")
    assert saved["args"]["teacher_sha256"] == checkpoint_sha(three) and saved["classes"]["names"] == ["cat", "dog", "fox"]
    code, err, out = run_script(evaluate, "--weights", tmp_path / "run" / "best.pth", "--data-dir",
                                tmp_path / "photos", "--device", "cpu", "--num-workers", "0", "--no-progress")
    assert code == 0, err
    top1 = float(out.split("top-1")[1].split()[0].strip(":%"))
    assert top1 == pytest.approx(max(m["val_top1"] for m in saved["metrics"]), abs=1e-3)  # printed to 3 places


def checkpoint_sha(path):
    from mnv2.weights import sha256_of
    return sha256_of(path)


@pytest.mark.slow
def test_teacher_outputs_written_from_shards_train_from_the_same_shards(data, teacher, tmp_path):
    """The writer reads --data-dir as training does: a shard set too (its members fingerprinted by shard and
    name, so the outputs follow the shards wherever they are served)."""
    import read_ImageNetData
    code, err, _ = run_script(read_ImageNetData, "--data-dir", data, "--write-shards", tmp_path / "wds",
                              "--shard-size", "0.01", "-j", "1")
    assert code == 0, err
    write(tmp_path / "wds", teacher, tmp_path / "views")
    code, err, out = run_script(train, "--data-dir", tmp_path / "wds", *COMMON, "--teacher-outputs", tmp_path / "views",
                                "--num-epochs", "1", "--save-path", tmp_path / "run")
    assert code == 0, err
    assert "from stored outputs" in out
    assert load_checkpoint(tmp_path / "run" / "last.pth")["args"]["teacher_outputs"] == str(tmp_path / "views")
