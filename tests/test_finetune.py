"""Fine-tuning on your own images end to end: --pretrained, --freeze-backbone and its cached features,
--val-split, --mean/--std, and class names through training, checkpoints and evaluate.py.

    python -m pytest tests/test_finetune.py -q

A width-0.25 network trained for a few seconds on the demo digits in folders named zero..nine stands for
ImageNet weights; the user's photos are other digits as class folders with odd names and mixed files.
"""
import csv
import hashlib
import shutil
import socket

import pytest
import torch
from PIL import Image
from torch import nn

import evaluate
import quantize
import train
from helpers import load_checkpoint, run_main, run_script
from mnv2 import outputs, scoring, weights
from mnv2.data import folders as image_folders
from mnv2.data.demo import make_folder_demo
from mnv2.training import config, finetune
from mnv2.weights import load_model
from MobileNetV2 import MobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")

# The digit folders get the names a user might give them: spaces, capitals, accents, other scripts.
ODD_NAMES = {"zero": "Zéro", "one": "one 1", "two": "TWO", "three": "drei", "four": "四",
             "five": "five", "six": "Six (6)", "seven": "sept", "eight": "ocho", "nine": "ninë"}
COMMON = ["--device", "cpu", "--num-workers", "0", "--input-size", "32", "--print-freq", "1000"]


def train_args(data, out, *extra):
    return train.get_args_parser().parse_args(["--data-dir", str(data), "--save-path", str(out), *COMMON,
                                               *map(str, extra)])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The weights to start from: trained on 40 digits per class in folders named zero..nine (seconds)."""
    root = tmp_path_factory.mktemp("source")
    data = make_folder_demo(root / "digits", seed=1, per_class=40)
    args = train_args(data, root / "out", "--width-mult", "0.25", "--batch-size", "16", "--num-epochs", "10",
                      "--lr", "0.02", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--no-augment",
                      "--save-epoch-freq", "100")
    assert run_main(train, args) == 0
    return root / "out" / "last.pth"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """photos/<odd name>/ with 16 digits each, .jpg and .png mixed, plus a note and a hidden file."""
    root = make_folder_demo(tmp_path_factory.mktemp("photos") / "photos", seed=5, per_class=16)
    for plain, odd in ODD_NAMES.items():
        if plain != odd:
            (root / plain).rename(root / odd)
    (root / "Zéro" / "notes.txt").write_text("scanned")
    (root / "TWO" / ".DS_Store").write_bytes(b"\0")
    return root


def finetune_run(photos, out, *extra):
    """Two epochs on half of each class, validated on the other half; the fine-tuning recipe's lr and
    schedule spelled out, so a run from scratch gets the same budget."""
    args = train_args(photos, out, "--val-split", "0.5", "--num-epochs", "3", "--batch-size", "16",
                      "--width-mult", "0.25", "--lr-schedule", "cosine", "--hflip", "0", "--crop-scale-min", "0.35",
                      *extra)
    assert run_main(train, args) == 0
    return load_checkpoint(out / "last.pth")


@pytest.fixture(scope="module")
def finetuned(source, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned")
    return out, finetune_run(photos, out, "--pretrained", source, "--lr", "0.01", "--warmup-epochs", "1")


@pytest.mark.slow
def test_finetune_from_a_trained_checkpoint_beats_training_from_scratch(finetuned, photos, tmp_path):
    out, tuned = finetuned
    scratch = finetune_run(photos, tmp_path / "scratch", "--lr", "0.01", "--warmup-epochs", "1")
    best_tuned = max(m["val_top1"] for m in tuned["metrics"])
    best_scratch = max(m["val_top1"] for m in scratch["metrics"])
    # the source itself reaches about 70% on its own digits; from scratch stays near chance (10%)
    assert best_tuned >= 40 and best_tuned - best_scratch >= 25, (best_tuned, best_scratch)


@pytest.mark.slow
def test_names_travel_from_the_folders_through_the_checkpoint_to_evaluate(finetuned, photos, capsys):
    out, tuned = finetuned
    names = sorted(ODD_NAMES.values())
    assert tuned["classes"] == {"order": "folders", "wnids": [""] * 10, "names": names}
    assert tuned["model_config"]["num_classes"] == 10
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split = tuned["data"]["val_split"]
    assert split["fraction"] == 0.5 and len(split["files"]) == 80
    # one image: its predictions are printed with the folder names
    photo = photos / split["files"][0]
    capsys.readouterr()
    code, err, printed = run_script(evaluate, "--weights", out / "last.pth", photo, "--num-workers", 0)
    assert code == 0, err
    assert str(photo) in printed and any(name in printed for name in names)
    # the data folder: scored on the images held out in training, by name; each class reported
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "last.pth"), "--data-dir", str(photos), "--num-workers", "0", "--no-progress",
         "--per-class", "--confusion", str(out / "eval_confusion.png")]))
    printed = capsys.readouterr().out
    assert result["images"] == 80 and result["top1"] == pytest.approx(tuned["metrics"][-1]["val_top1"])
    assert result["mean_class_top1"] == pytest.approx(tuned["metrics"][-1]["val_mean_class_top1"])
    assert [row["name"] for row in result["per_class"]] == names
    assert all(row["count"] == 8 for row in result["per_class"])
    assert "mean per-class top-1" in printed and all(f"  {name}\n" in printed for name in names)
    assert (out / "eval_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pretrained_loads_every_tensor_that_fits_and_starts_the_classifier_afresh(source, photos, tmp_path, capsys):
    capsys.readouterr()
    tuned = finetune_run(photos, tmp_path / "out", "--pretrained", source, "--num-epochs", "1", "--freeze-backbone")
    printed = capsys.readouterr().out
    assert (f"--pretrained {source}: loaded 312 of the model's 314 tensors; initialised afresh: "
            "classifier.1.weight, classifier.1.bias (the file's classes are others than this data's)") in printed
    file = load_checkpoint(source)["model"]
    model = tuned["model"]
    # frozen: every backbone tensor, BatchNorm statistics included, is the file's; the classifier learned
    assert all(torch.equal(model[k], file[k]) for k in model if not k.startswith("classifier."))
    assert model["classifier.1.weight"].shape == (10, 1280) and model["classifier.1.weight"].abs().sum() > 0
    assert "training the classifier only (12,810 parameters)" in printed
    # without --freeze-backbone every weight trains; BatchNorm statistics stay the file's unless --no-freeze-bn
    full = finetune_run(photos, tmp_path / "full", "--pretrained", source, "--num-epochs", "1")
    assert not torch.equal(full["model"]["features.0.0.weight"], file["features.0.0.weight"])
    assert torch.equal(full["model"]["features.0.1.running_mean"], file["features.0.1.running_mean"])
    free = finetune_run(photos, tmp_path / "free", "--pretrained", source, "--num-epochs", "1", "--no-freeze-bn")
    assert not torch.equal(free["model"]["features.0.1.running_mean"], file["features.0.1.running_mean"])


@pytest.mark.slow
def test_cached_features_give_the_plain_loop_result_and_resume_bit_exactly(source, photos, tmp_path):
    flags = ("--pretrained", source, "--freeze-backbone", "--num-epochs", "2", "--dropout", "0.2")
    cached = finetune_run(photos, tmp_path / "cached", *flags)
    plain = finetune_run(photos, tmp_path / "plain", *flags, "--no-cache-features")
    for key in ("classifier.1.weight", "classifier.1.bias"):
        torch.testing.assert_close(cached["model"][key], plain["model"][key], atol=1e-4, rtol=1e-3)
    assert [m["val_top1"] for m in cached["metrics"]] == [m["val_top1"] for m in plain["metrics"]]
    # 1 epoch, then a resume with another --val-split (the recorded split stays), then epoch 2
    finetune_run(photos, tmp_path / "resumed", *flags[:-4], "--num-epochs", "1", "--dropout", "0.2")
    resumed = finetune_run(photos, tmp_path / "resumed", *flags[:-4], "--num-epochs", "2", "--dropout", "0.2",
                           "--resume", "auto", "--val-split", "0.25")
    assert resumed["data"]["val_split"] == cached["data"]["val_split"]
    for key in cached["model"]:
        assert torch.equal(resumed["model"][key], cached["model"][key]), key
    timing = ("seconds", "images_per_s")
    assert ([{k: v for k, v in m.items() if k not in timing} for m in resumed["metrics"]]
            == [{k: v for k, v in m.items() if k not in timing} for m in cached["metrics"]])


def test_the_pretrained_recipe_is_a_set_of_defaults_that_flags_override():
    plain = train.get_args_parser().parse_args([])
    assert (plain.num_epochs, plain.lr, plain.lr_schedule, plain.augment) == (400, 0.045, "exponential", True)
    tuned = train.get_args_parser().parse_args(["--pretrained", "x.pth"])
    assert (tuned.num_epochs, tuned.lr, tuned.lr_schedule, tuned.warmup_epochs, tuned.batch_size) == \
        (5, 0.002, "cosine", 0.5, 32)
    assert (tuned.lp_epochs, tuned.freeze_bn, tuned.clip_grad_norm) == (10, True, 10.0)  # LP-FT
    assert tuned.width_mult is None and tuned.augment  # the width comes from the file
    probe = train.get_args_parser().parse_args(["--pretrained", "x.pth", "--freeze-backbone"])
    assert (probe.lr, probe.augment, probe.num_epochs) == (0.1, False, 10)
    mine = train.get_args_parser().parse_args(["--pretrained", "x.pth", "--freeze-backbone", "--lr", "0.045",
                                               "--augment", "--num-epochs", "400", "--width-mult", "1.0"])
    assert (mine.lr, mine.augment, mine.num_epochs, mine.width_mult) == (0.045, True, 400, 1.0)


@pytest.mark.slow
def test_mean_and_std_are_recorded_and_a_recognised_file_brings_its_own(source, photos, tmp_path, monkeypatch):
    bare = tmp_path / "bare.pth"
    torch.save(load_checkpoint(source)["model"], bare)
    digest = hashlib.sha256(bare.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "lab-weights", {
        "file": "bare.pth", "url": "", "sha256": digest, "torchvision": None, "published": {"top1": 1, "top5": 2},
        "preprocessing": {"resize": 36, "input_size": 32, "interpolation": "bilinear",
                          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "class_order": "sorted"})
    brought = finetune_run(photos, tmp_path / "brought", "--pretrained", bare, "--freeze-backbone", "--num-epochs", 1)
    assert (brought["data"]["mean"], brought["data"]["std"]) == ([0.5] * 3, [0.25] * 3)
    given = finetune_run(photos, tmp_path / "given", "--pretrained", bare, "--freeze-backbone", "--num-epochs", 1,
                         "--mean", 0.4, 0.45, 0.5, "--std", 0.2, 0.2, 0.3)
    assert (given["data"]["mean"], given["data"]["std"]) == ([0.4, 0.45, 0.5], [0.2, 0.2, 0.3])
    # evaluate.py reads them from the checkpoint: same score as validation, no flags
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(tmp_path / "given" / "last.pth"), "--data-dir", str(photos), "--num-workers", "0",
         "--no-progress"]))
    assert result["preprocessing"]["mean"] == [0.4, 0.45, 0.5] and result["preprocessing"]["std"] == [0.2, 0.2, 0.3]
    assert result["top1"] == pytest.approx(given["metrics"][-1]["val_top1"])


def test_named_pretrained_weights_offline_fail_with_url_and_destination(photos, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    code, err, _ = run_script(train, "--data-dir", photos, "--pretrained", "torchvision-v1", "--pretrained-dir",
                              tmp_path, "--save-path", tmp_path / "out", *COMMON)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("train.py: error: cannot download torchvision-v1")
    assert "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth" in lines[0]
    assert str(tmp_path / "mobilenet_v2-b0353104.pth") in lines[0]


@pytest.mark.slow
def test_wnid_folders_are_scored_with_imagenet_weights_by_their_true_index(tmp_path):
    wnids = image_folders.imagenet_classes()[0]
    always, other = wnids[500], wnids[20]  # sorted: `other` is folder 0, `always` folder 1, but class 500
    model = MobileNetV2(width_mult=0.35)
    with torch.no_grad():
        model.classifier[1].weight.zero_()
        model.classifier[1].bias.zero_()
        model.classifier[1].bias[500] = 10.0
    torch.save(model.state_dict(), tmp_path / "imagenet.pth")
    for folder, count in ((always, 3), (other, 2)):
        for k in range(count):
            path = tmp_path / "imagenette" / "val" / folder / f"{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(tmp_path / "imagenet.pth"), "--data-dir", str(tmp_path / "imagenette"), "--num-workers",
         "0", "--no-progress", "--resize", "36", "--crop", "32"]))
    assert result["images"] == 5 and result["top1"] == pytest.approx(60.0)
    assert result["mean_class_top1"] == pytest.approx(50.0)


class FixedLogits(nn.Module):
    """Predicts class (first pixel value) for each image: the scores are known in advance."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].round().long(), self.classes).float() + self.anchor


def test_mean_per_class_accuracy_and_the_confusion_matrix_count_exactly(tmp_path):
    # 6 images of class 0 (5 right), 2 of class 1 (0 right), 2 of class 2 (2 right)
    targets = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 0, 0, 2, 0, 0, 2, 2])
    images = predicted.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    loader = [(images, targets, torch.arange(10), torch.zeros(10, dtype=torch.int64))]
    result = scoring.evaluate(FixedLogits(3), loader, "cpu", channels_last=False, progress=False, per_class=True,
                               confusion=True)
    assert result["top1"] == pytest.approx(70.0)
    assert result["mean_class_top1"] == pytest.approx((100 * 5 / 6 + 0 + 100) / 3)
    assert result["confusion"].tolist() == [[5, 0, 1], [2, 0, 0], [0, 0, 2]]
    assert outputs.confused_pairs(result["confusion"]) == [(1, 0, 2), (0, 2, 1)]
    outputs.plot_confusion(result["confusion"], ["a", "b", "c"], tmp_path / "matrix.png")
    many = torch.zeros(40, 40, dtype=torch.int64)
    many[3, 7], many[5, 5] = 4, 9
    outputs.plot_confusion(many, [f"class {i}" for i in range(40)], tmp_path / "pairs.png")
    for name in ("matrix.png", "pairs.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_load_matching_takes_what_fits_and_names_a_width_that_does_not(tmp_path):
    torch.manual_seed(0)
    imagenet = MobileNetV2(width_mult=0.25)
    torch.save({"module." + k: v for k, v in imagenet.state_dict().items()}, tmp_path / "imagenet.pth")
    model = MobileNetV2(num_classes=3, width_mult=0.25)
    init = model.classifier[1].weight.clone()
    loaded, initialised, unused = weights.load_matching(model, tmp_path / "imagenet.pth")
    assert (len(loaded), initialised, unused) == (312, ["classifier.1.weight", "classifier.1.bias"],
                                                  ["classifier.1.weight", "classifier.1.bias"])
    assert torch.equal(model.features[5].conv[1][0].weight, imagenet.features[5].conv[1][0].weight)
    assert torch.equal(model.classifier[1].weight, init)
    with pytest.raises(weights.WeightsError, match=r"width 0.25 MobileNetV2\); pass --width-mult 0.25"):
        weights.load_matching(MobileNetV2(num_classes=3, width_mult=0.5), tmp_path / "imagenet.pth")


@pytest.mark.slow
def test_a_folder_trained_checkpoint_exports_and_quantizes_with_its_names_and_held_out_images(finetuned, photos,
                                                                                               tmp_path):
    """The float ONNX export and quantize.py's INT8 file of a fine-tuned checkpoint carry the folder names and
    the held-out images: evaluate.py scores each file on exactly those images, by name, with no flags;
    quantize.py calibrates on the other images and scores the held-out ones."""
    out, tuned = finetuned
    names = sorted(ODD_NAMES.values())
    float_file, int8_file = tmp_path / "tuned.onnx", tmp_path / "tuned.int8.onnx"
    assert run_main(evaluate, evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "last.pth"), "--export-onnx", str(float_file), "--num-workers", "0"])) == 0
    made = quantize.main(quantize.get_args_parser().parse_args(
        ["--weights", str(out / "last.pth"), "--data-dir", str(photos), "--out", str(int8_file),
         "--calibration-images", "32", "--num-workers", "0", "--no-speed", "--no-progress"]))
    assert made["calibration_images"] == 32
    assert made["accuracy"]["images"] == 80 and made["accuracy"]["scored_on"] == "held-out"
    float_top1 = tuned["metrics"][-1]["val_top1"]
    assert made["accuracy"]["float"]["top1"] == pytest.approx(float_top1, abs=1e-6)
    for path in (float_file, int8_file):
        result = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--weights", str(path), "--data-dir", str(photos), "--num-workers", "0", "--no-progress",
             "--per-class", "-"]))
        assert result["images"] == 80, path
        assert [row["name"] for row in result["per_class"]] == names
        assert all(row["count"] == 8 for row in result["per_class"])
        if path == float_file:
            assert result["top1"] == pytest.approx(float_top1, abs=1e-6)
        else:
            assert result["top1"] == pytest.approx(made["accuracy"]["INT8 ONNX"]["top1"], abs=1e-6)


def split_folders(photos, root):
    """photos/<class>/ laid out as root/train/<class>/ + root/val/<class>/ (every fourth image held out)."""
    for folder in sorted(p for p in photos.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))):
            target = root / ("val" if i % 4 == 0 else "train") / folder.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target / f.name)
    return root


@pytest.mark.slow
def test_a_model_fine_tuned_on_train_and_val_folders_is_scored_and_quantized_on_them(source, photos, tmp_path):
    data = split_folders(photos, tmp_path / "D")   # also torchvision's ImageNet layout, to the eye
    out = tmp_path / "out"
    assert run_main(train, train_args(data, out, "--pretrained", source, "--num-epochs", "1", "--batch-size", "16",
                                      "--freeze-backbone")) == 0
    tuned = load_checkpoint(out / "best.pth")
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "best.pth"), "--data-dir", str(data), "--num-workers", "0", "--per-class"]))
    assert result["images"] == 40 and result["top1"] == pytest.approx(tuned["metrics"][-1]["val_top1"])
    assert [row["name"] for row in result["per_class"]] == sorted(ODD_NAMES.values())
    code, err, _ = run_script(quantize, "--weights", out / "best.pth", "--data-dir", data, "--out",
                              tmp_path / "model.int8.onnx", "--num-workers", 0, "--no-speed",
                              "--calibration-images", 32)
    assert code == 0, err
    scored = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(tmp_path / "model.int8.onnx"), "--data-dir", str(data), "--num-workers", "0"]))
    assert scored["images"] == 40 and scored["class_order"] == "folders"


@pytest.mark.slow
def test_qat_with_a_val_split_writes_an_int8_file_scored_on_the_held_out_images_only(source, photos, tmp_path):
    out = tmp_path / "qat"
    assert run_main(train, train_args(photos, out, "--qat", source, "--val-split", "0.25", "--num-epochs", "1",
                                      "--batch-size", "16", "--calibration-images", "32")) == 0
    held_out = load_checkpoint(out / "last.pth")["data"]["val_split"]["files"]
    scored = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "model.int8.onnx"), "--data-dir", str(photos), "--num-workers", "0"]))
    assert scored["images"] == len(held_out) == 40  # not all 160 photos, 120 of them trained on


def folded(source, path):
    """`source`'s weights as converters leave them: BatchNorm folded into the convolutions (eval-mode outputs
    unchanged), every running mean 0 and variance 1."""
    model = load_model(source)
    for conv, bn in [(m[i], m[i + 1]) for m in model.modules() if isinstance(m, nn.Sequential)
                     for i in range(len(m) - 1) if isinstance(m[i], nn.Conv2d) and isinstance(m[i + 1], nn.BatchNorm2d)]:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bn.bias.copy_(bn.bias - bn.running_mean * scale)
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_folded_batchnorm_weights_are_recognised_and_fine_tune_with_frozen_statistics(source, photos, tmp_path, capsys):
    start = folded(source, tmp_path / "folded.pth")
    reference, converted = load_model(source), load_model(start)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reference(x), converted(x), atol=1e-4)  # the same function in eval mode
    capsys.readouterr()
    tuned = finetune_run(photos, tmp_path / "frozen", "--pretrained", start, "--num-epochs", "1")
    printed = capsys.readouterr().out
    assert "BatchNorm is folded" in printed and "--freeze-bn: BatchNorm statistics of" in printed
    means = [v for k, v in tuned["model"].items() if k.endswith("running_mean")]
    assert all(bool((m == 0).all()) for m in means)  # never re-estimated from the small batches
    tuned = finetune_run(photos, tmp_path / "free", "--pretrained", start, "--num-epochs", "1", "--no-freeze-bn")
    assert "--freeze-bn" not in capsys.readouterr().out
    assert any(bool((v != 0).any()) for k, v in tuned["model"].items() if k.endswith("running_mean"))


def test_batchnorm_folded_tells_converted_weights_from_trained_ones(tmp_path):
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    assert weights.batchnorm_folded(model.state_dict())  # a fresh model's statistics are 0 and 1 too
    model.features[0][1].running_mean.add_(0.1)
    assert not weights.batchnorm_folded(model.state_dict())


def test_freeze_bn_keeps_every_batchnorm_in_eval_mode_and_its_affine_trainable():
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    frozen = finetune.freeze_batchnorm(model, True, log=lambda *a: None)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen == len(norms) == 52 and not any(m.training for m in norms)
    assert all(m.weight.requires_grad for m in norms) and model.classifier.training
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))


@pytest.mark.slow
def test_a_resume_after_a_class_folder_was_added_names_it_and_the_ways_on(source, photos, tmp_path, capsys):
    data = tmp_path / "photos"
    shutil.copytree(photos, data)
    out = tmp_path / "out"
    assert run_main(train, train_args(data, out, "--pretrained", source, "--num-epochs", "1", "--batch-size", "16",
                                      "--val-split", "0.25", "--freeze-backbone")) == 0
    shutil.copytree(data / "drei", data / "vier\x1b[2J")  # a new folder, its name holding a terminal escape
    capsys.readouterr()
    code = run_main(train, train_args(data, out, "--pretrained", source, "--num-epochs", "2", "--batch-size", "16",
                                      "--val-split", "0.25", "--freeze-backbone", "--resume", "auto"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "new: vier\\x1b[2J" in err[0] and "\x1b" not in err[0] and "put the folders back" in err[0]
    assert "--num-classes" not in err[0]


def test_a_named_recipe_keeps_the_width_from_the_file_and_a_linear_probe_a_linear_probe(source, photos):
    args = config.check_args(train_args(photos, "out", "--recipe", "torchvision-v2", "--pretrained", source,
                                        "--freeze-backbone", "--val-split", "0.2"))
    assert args.width_mult == 0.25                                   # the file's, no --width-mult needed
    assert (args.augment, args.lr, args.cache_features) == (False, 0.1, True)  # the probe's own
    assert args.opt == "sgd" and args.label_smoothing == 0.1         # the recipe's method otherwise


@pytest.mark.slow
def test_a_two_class_run_reports_no_top5_names_its_predictions_and_samples_every_class(source, photos, tmp_path,
                                                                                      capsys):
    data = tmp_path / "two"
    for name in ("drei", "sept"):
        shutil.copytree(photos / name, data / name)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(train, train_args(data, out, "--pretrained", source, "--num-epochs", "1", "--batch-size", "16",
                                      "--val-split", "0.25", "--freeze-backbone", "--no-cache-features")) == 0
    printed = capsys.readouterr().out
    assert "top1" in printed and "top5" not in printed               # 2 classes: top-5 is 100% by definition
    assert "note: each epoch leaves out 8 of 24 training images" in printed  # 24 images, batches of 16
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--weights", str(out / "best.pth"), "--data-dir", str(data), "--num-workers", "0", "--max-images", "2",
         "--predictions", str(tmp_path / "predictions.csv")]))
    assert "top-5" not in capsys.readouterr().out and result["images"] == 2
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["target_name"] for row in rows) == ["drei", "sept"]  # one of each class, by name
    assert all(row["name1"] in ("drei", "sept") for row in rows)


def test_pretrained_selects_lp_ft_with_frozen_batchnorm_and_each_part_has_a_flag(source, photos):
    args = config.check_args(train_args(photos, "out", "--pretrained", source, "--val-split", "0.2"))
    assert (args.lp_epochs, args.lp_lr, args.num_epochs, args.lr, args.freeze_bn, args.clip_grad_norm) == \
        (10, 0.01, 5, 0.002, True, 10.0)
    args = config.check_args(train_args(photos, "out", "--pretrained", source, "--val-split", "0.2",
                                        "--lp-epochs", "0", "--no-freeze-bn", "--lr", "0.01"))
    assert (args.lp_epochs, args.freeze_bn, args.lr) == (0, False, 0.01)
    assert config.check_args(train_args(photos, "out", "--val-split", "0.2")).lp_epochs == 0  # from scratch: none


@pytest.mark.slow
def test_lp_ft_trains_the_head_first_says_so_and_resumes_bit_exactly(source, photos, tmp_path, capsys):
    flags = ["--pretrained", source, "--val-split", "0.25", "--batch-size", "16", "--lp-epochs", "3"]
    capsys.readouterr()
    straight = finetune_run(photos, tmp_path / "straight", *flags, "--num-epochs", "2")
    assert "LP-FT: the classifier first, 3 epochs on cached features of 120 centre crops" in capsys.readouterr().out
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "epoch_1.pth", tmp_path / "resumed" / "epoch_1.pth")
    resumed = finetune_run(photos, tmp_path / "resumed", *flags, "--num-epochs", "2", "--resume",
                           tmp_path / "resumed" / "epoch_1.pth")
    assert "LP-FT" not in capsys.readouterr().out  # a resumed run does not probe again
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    plain = finetune_run(photos, tmp_path / "plain", *flags[:-2], "--lp-epochs", "0", "--num-epochs", "2")
    assert not torch.equal(plain["model"]["classifier.1.weight"], straight["model"]["classifier.1.weight"])
