"""The evaluation sets beyond ImageNet val, on tiny fake copies in each layout: ImageNet-V2's numbered folders
read as numbers, ImageNet-A/-R scored on their 200 classes, Sketch's mislabelled files, ReaL's label sets
against a hand-computed expectation, partial copies, and the --sets table.

The weights are a width-0.35 MobileNetV2 that ignores its input: classifier weights zero, the bias ranks a
few classes on top. Its prediction is known for every image, so each expected score is computed by hand.
"""
import csv
import json

import pytest
import torch
from PIL import Image

import evaluate
from helpers import make_fake_imagenet, one_line, run_script
from mnv2.data import robust
from mnv2.data.folders import imagenet_classes
from MobileNetV2 import MobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("timm")  # the 200-class lists and ReaL's labels are timm's copies

WNIDS = imagenet_classes()[0]
A_WNIDS, R_WNIDS = robust.subset_wnids("imagenet-a"), robust.subset_wnids("imagenet-r")
A_INDEX = [WNIDS.index(w) for w in A_WNIDS]
COMMON = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--backend", "torch", "--input-size", "32",
          "--resize", "32"]


def constant_weights(path, ranking):
    """Weights whose logits are the same for every image: `ranking` (class indices) from highest down."""
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=1000, width_mult=0.35)
    with torch.no_grad():
        model.classifier[1].weight.zero_()
        model.classifier[1].bias.zero_()
        for rank, c in enumerate(ranking):
            model.classifier[1].bias[c] = 10.0 - rank
    torch.save(model.state_dict(), path)
    return path


def image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 36), (value, 100, 200)).save(path, "JPEG")


def scores(tmp_path, weights, *flags):
    out = tmp_path / "scores.json"
    code, err, text = run_script(evaluate, "--weights", weights, *COMMON, "--json", out, *flags)
    assert code == 0, err
    return json.loads(out.read_text()), text


def test_imagenet_v2_folders_are_class_numbers_not_text(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for folder, count in (("2", 3), ("10", 1), ("999", 2)):
        for k in range(count):
            image(root / folder / f"{k}.jpeg", k)
    weights = constant_weights(tmp_path / "w.pth", [10])  # always class 10
    result, text = scores(tmp_path, weights, "--data-dir", root)
    # folder "10" is class 10: its one image is right; read as text ("10" < "2"), it would be class 0 or 1
    assert result["set"]["set"] == "imagenet-v2-matched-frequency" and result["images"] == 6
    assert result["top1"] == pytest.approx(100 / 6)
    assert result["set"]["classes_missing"] == 997 and "997 of its 1000 classes missing" in text
    found = robust.recognise(root, None, WNIDS)
    assert found.folders == {"2": 2, "10": 10, "999": 999}


def test_imagenet_a_scores_its_200_classes_only_and_a_partial_copy_keeps_the_full_mask(tmp_path):
    root = tmp_path / "imagenet-a"
    inside, other = A_WNIDS[5], A_WNIDS[17]
    for k in range(2):
        image(root / inside / f"{k}.jpg", k)
        image(root / other / f"{k}.jpg", k)
    outside = next(i for i in range(1000) if i not in A_INDEX)
    # the top class is not one of A's 200: unrestricted, every image would be wrong
    weights = constant_weights(tmp_path / "w.pth", [outside, WNIDS.index(inside), WNIDS.index(other)])
    result, text = scores(tmp_path, weights, "--data-dir", root)
    assert result["set"]["set"] == "imagenet-a" and result["set"]["classes_missing"] == 198
    assert result["top1"] == pytest.approx(50.0) and result["top5"] == pytest.approx(100.0)
    assert "logits restricted to its 200 classes" in text


def test_imagenet_r_is_told_from_a_by_its_classes_and_dataset_names_a_partial_copy(tmp_path):
    only_r = next(w for w in R_WNIDS if w not in A_WNIDS)
    root = tmp_path / "copy"
    image(root / only_r / "0.jpg")
    assert robust.recognise(root, None, WNIDS).name == "imagenet-r"
    weights = constant_weights(tmp_path / "w.pth", [WNIDS.index(only_r)])
    # a partial copy under a neutral name is scored as a folder of classes unless --dataset says what it is
    result, _ = scores(tmp_path, weights, "--data-dir", root, "--dataset", "imagenet-r")
    assert result["set"]["set"] == "imagenet-r" and result["top1"] == 100.0


@pytest.mark.slow
def test_sketch_files_are_opened_by_content_and_named_folders_are_recognised(tmp_path):
    root = tmp_path / "imagenet-sketch"
    cls = WNIDS[3]
    image(root / cls / "a.JPEG")
    Image.new("RGB", (40, 36), (0, 0, 0)).save(root / cls / "b.JPEG", "PNG")  # a PNG named .JPEG
    weights = constant_weights(tmp_path / "w.pth", [3])
    result, _ = scores(tmp_path, weights, "--data-dir", root)
    assert result["set"]["set"] == "imagenet-sketch" and result["images"] == 2 and result["failed"] == 0
    assert result["top1"] == 100.0


def test_folders_that_match_no_layout_are_one_line(tmp_path):
    root = tmp_path / "mixed"
    image(root / "12" / "0.jpg")
    image(root / "cats" / "0.jpg")
    weights = constant_weights(tmp_path / "w.pth", [0])
    code, err, _ = run_script(evaluate, "--weights", weights, *COMMON, "--data-dir", root, "--dataset", "imagenet-v2")
    line = one_line(err)
    assert code == 1 and "ImageNet-V2 holds folders named 0..999" in line and str(root) in line


def test_real_counts_any_label_in_the_set_and_skips_unlabelled_images(tmp_path):
    data = make_fake_imagenet(tmp_path / "imagenet", num_val=6)
    c0, c1, c2, c3, c4, x = 100, 200, 300, 400, 500, 900
    weights = constant_weights(tmp_path / "w.pth", [c0, c1, c2, c3, c4])  # top-5 is c0..c4 for every image
    labels = [[] for _ in range(robust.REAL_IMAGES)]
    labels[:6] = [[c0], [], [x, c0], [c3], [x], [c4, x]]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(labels))
    result, text = scores(tmp_path, weights, "--data-dir", data["root"], "--real-labels", real)
    # by hand: 5 images labelled; top-1 right for images 1 and 3; top-5 right for 1, 3, 4, 6
    assert result["real"] == {"top1": pytest.approx(40.0), "top5": pytest.approx(80.0), "images": 5, "skipped": 1}
    assert "skipped, no ReaL label: 1" in text
    assert "predictions" not in result


@pytest.mark.slow
def test_real_needs_the_original_val_file_names(tmp_path):
    data = make_fake_imagenet(tmp_path / "imagenet", num_val=2, val_folders=True)  # labelled by folder
    for k, path in enumerate(sorted(data["val_dir"].glob("*/*.JPEG"))):
        path.rename(path.with_name(f"renamed_{k}.JPEG"))
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[0]] * robust.REAL_IMAGES))
    weights = constant_weights(tmp_path / "w.pth", [0])
    code, err, _ = run_script(evaluate, "--weights", weights, *COMMON, "--data-dir", data["root"],
                              "--real-labels", real)
    line = one_line(err)
    assert code == 1 and "ReaL needs the original val file names" in line and "renamed_0.JPEG" in line


@pytest.mark.slow
def test_sets_scores_every_set_found_and_writes_the_table(tmp_path):
    root = tmp_path / "sets"
    image(root / "imagenetv2-matched-frequency-format-val" / "7" / "0.jpg")
    image(root / "imagenet-a" / A_WNIDS[0] / "0.jpg")
    image(root / "imagenet-sketch" / WNIDS[7] / "0.jpg")
    (root / "notes").mkdir()
    weights = constant_weights(tmp_path / "w.pth", [7, WNIDS.index(A_WNIDS[0])])
    table = tmp_path / "robustness.md"
    code, err, text = run_script(evaluate, "--weights", weights, *COMMON, "--sets", root, "--table", table)
    assert code == 0, err
    with open(table.with_suffix(".csv"), newline="") as f:
        rows = {r["set"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"imagenet-v2-matched-frequency", "imagenet-a", "imagenet-sketch"}
    assert float(rows["imagenet-v2-matched-frequency"]["top1"]) == 100.0
    assert float(rows["imagenet-sketch"]["top1"]) == 100.0
    assert float(rows["imagenet-a"]["top1"]) == 100.0  # restricted: class 7 is not one of A's 200
    assert float(rows["imagenet-a"]["timm_mobilenetv2_100_top1"]) == 2.173
    assert "| imagenet-sketch | 100.000 |" in table.read_text()


@pytest.mark.slow
def test_two_processes_score_real_and_a_restricted_set_without_double_counting(tmp_path):
    """torchrun with 2 processes: each image counted once, the same ReaL and ImageNet-A figures as one process."""
    import helpers
    data = make_fake_imagenet(tmp_path / "imagenet", num_val=7)
    weights = constant_weights(tmp_path / "w.pth", [100, 200, 300, 400, 500])
    labels = [[] for _ in range(robust.REAL_IMAGES)]
    labels[:7] = [[100], [], [900, 100], [400], [900], [500, 900], [200]]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(labels))
    a_root = tmp_path / "imagenet-a"
    for k in range(3):
        image(a_root / A_WNIDS[k] / "0.jpg", k)
    runs = {}
    for name, flags in (("real", ["--data-dir", data["root"], "--real-labels", real]),
                        ("a", ["--data-dir", a_root])):
        single, _ = scores(tmp_path, weights, *flags)
        out = tmp_path / f"{name}-ddp.json"
        proc = helpers.torchrun(helpers.REPO / "evaluate.py", "--weights", weights, *COMMON, *flags, "--json", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (single, json.loads(out.read_text()))
    single, ddp = runs["real"]
    assert ddp["images"] == single["images"] == 7 and ddp["real"] == single["real"]
    assert single["real"]["images"] == 6 and single["real"]["top1"] == pytest.approx(200 / 6)
    single, ddp = runs["a"]
    assert ddp["images"] == single["images"] == 3 and ddp["top1"] == single["top1"]


def test_a_missing_real_labels_file_is_one_line(tmp_path):
    data = make_fake_imagenet(tmp_path / "imagenet", num_val=2)
    weights = constant_weights(tmp_path / "w.pth", [0])
    code, err, _ = run_script(evaluate, "--weights", weights, *COMMON, "--data-dir", data["root"],
                              "--real-labels", tmp_path / "real.json")
    line = one_line(err)
    assert code == 1 and f"--real-labels {tmp_path / 'real.json'}: no such file" in line


def test_clean_val_on_a_subsets_classes_keeps_their_images_and_restricts_the_logits(tmp_path, monkeypatch):
    """--dataset imagenet-a-clean: val images of A's 200 classes only, top-k among those 200 (timm's clean row)."""
    data = make_fake_imagenet(tmp_path / "imagenet", num_val=6)  # classes 0, 333, 666 in sorted order, 2 each
    subset = sorted({0, 333} | set(range(1, 198)) | {998})  # 200 classes with 0 and 333, without 666
    assert len(subset) == 200
    monkeypatch.setattr(robust, "subset_indices", lambda name: subset)
    weights = constant_weights(tmp_path / "w.pth", [666, 333])  # the top class is outside the 200
    result, text = scores(tmp_path, weights, "--data-dir", data["root"], "--dataset", "imagenet-a-clean")
    assert result["images"] == 4 and result["top1"] == pytest.approx(50.0)  # class 333's two images
    assert result["set"]["classes"] == 2 and result["set"]["classes_missing"] == 198
    assert "restricted to imagenet-a's 200 classes: 4 images" in text
