"""evaluate.py: exact scores, every image counted once, single images, exports, named public weights."""
import contextlib
import csv
import hashlib
import json
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import evaluate as ev
import helpers
from helpers import LAYOUTS as PUBLIC_LAYOUTS  # each public layout written independently of the loader
from helpers import RunsCode
from mnv2 import evaluation, scoring, weights
from mnv2.data.demo import make_demo
from mnv2.data.imagenet import find_layout, list_samples, read_classes
from mnv2.data.loaders import EvalSampler
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from mnv2.deploy import export, inference
from MobileNetV2 import MobileNetV2

SIZE, RESIZE = 32, 36  # tiny images keep every end-to-end run well under a second
PRE = ["--resize", str(RESIZE), "--crop", str(SIZE)]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    """evaluate.main on a parsed command line, as the shell would run it (single process, no workers).
    On the CPU unless argv names a device: these tests check CPU scoring, also on a machine with a GPU."""
    argv = [str(a) for a in argv]
    return ev.main(ev.get_args_parser().parse_args(argv + ["--no-progress"]
                                                   + ([] if "--device" in argv else ["--device", "cpu"])))


def error_of(capsys, *argv):
    """(exit code, stderr) of a command that must fail with one line."""
    with pytest.raises(SystemExit) as failure:
        run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    return failure.value.code, err


# ---- a tiny world: demo ImageNet and weights that really classify it ---------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("imagenet"), val_per_class=4, train_per_class=0, image_size=SIZE)


def _reference_logits(model, files):
    """Logits the slow, obvious way: torchvision's transforms one image at a time, the plain model."""
    t = torchvision.transforms
    pipeline = t.Compose([t.Resize(RESIZE), t.CenterCrop(SIZE), t.ToTensor(),
                          t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        return torch.cat([model(pipeline(Image.open(f).convert("RGB"))[None]) for f in files])


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A width-0.35 MobileNetV2 that really classifies the demo val images (sorted class order), many but
    not all of them right: its random features vary enough from image to image (about 30 %) for a
    classifier set to the nearest neighbour among one pooled feature vector per class."""
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35)
    layout = find_layout(demo)
    classes = read_classes(layout, "sorted")
    samples = list_samples(layout, "val", classes)
    transform = eval_transform(SIZE, RESIZE)
    x = normalize(torch.stack([transform(p) for p, _ in samples]))
    model.eval()
    with torch.no_grad():
        features = F.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
    labels = torch.tensor([label for _, label in samples])
    centre = features.mean(0)
    weight = torch.zeros(1000, features.shape[1])
    bias = torch.full((1000,), -30.0)  # classes without images stay far below
    digits = labels.unique()
    for c in digits:
        mean = features[labels == c][0] - centre  # one example per class: right often, not always
        weight[c], bias[c] = mean, -mean.dot(centre) - 0.5 * mean.dot(mean)
    # ImageNet-like magnitudes (tens), so 1e-4 parity checks mean what they say in float32
    scale = 10 / (features @ weight[digits].T + bias[digits]).abs().max()
    weight[digits], bias[digits] = weight[digits] * scale, bias[digits] * scale
    model.classifier[1].weight.data.copy_(weight)
    model.classifier[1].bias.data.copy_(bias)
    path = tmp_path_factory.mktemp("weights") / "sorted.pth"
    torch.save(model.state_dict(), path)
    logits = _reference_logits(model, [p for p, _ in samples])
    hits1 = logits.argmax(1).eq(labels)
    hits5 = logits.topk(5, 1).indices.eq(labels[:, None]).any(1)
    assert 0 < hits1.sum() < len(labels) and hits1.sum() < hits5.sum(), "some right, not all"
    # rankings with a clear margin: float32 rounding of another code path cannot reorder them
    ranked = logits.topk(6, dim=1).values
    assert (ranked[:, 0] - ranked[:, 1]).min() > 1e-3 and (ranked[:, 4] - ranked[:, 5]).min() > 1e-3
    return {"model": model, "path": path, "samples": samples, "classes": classes, "labels": labels,
            "hits1": hits1, "hits5": hits5, "logits": logits}


def _devkit_state_dict(trained, demo):
    """The same network with its outputs in devkit (ILSVRC2012_ID) order, as the seed repo trains."""
    layout = find_layout(demo)
    sorted_wnids = read_classes(layout, "sorted").wnids
    devkit_wnids = read_classes(layout, "devkit").wnids
    perm = torch.tensor([sorted_wnids.index(w) for w in devkit_wnids])
    state = {k: v.clone() for k, v in trained["model"].state_dict().items()}
    state["classifier.1.weight"] = state["classifier.1.weight"][perm]
    state["classifier.1.bias"] = state["classifier.1.bias"][perm]
    return state


# ---- accuracy and the loop -----------------------------------------------------------------------

def test_accuracy_counts_equal_hand_computed_values():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],    # target 0: top-1
                           [1., 9, 8, 7, 6, 5, 4],    # target 6: rank 7, a miss in top-5
                           [1., 2, 3, 4, 5, 6, 9],    # target 2: rank 5, a top-5 hit
                           [5., 4, 3, 2, 1, 0, 9]])   # target 0: rank 2
    targets = torch.tensor([0, 6, 2, 0])
    assert scoring.accuracy_counts(logits, targets) == [1, 3]
    assert scoring.accuracy_counts(logits, targets, topk=(1, 2, 7)) == [1, 2, 4]
    # fewer classes than k: top-5 of 3 classes is every class
    assert scoring.accuracy_counts(logits[:, :3], torch.tensor([0, 1, 2, 1])) == [3, 4]


class TableModel(nn.Module):
    """Returns a fixed row of logits per image; the image's first pixel carries its row number."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].round().long()]


def _table_batches(n_images, batch_size, failed=()):
    batches = []
    for start in range(0, n_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_images))
        images = torch.zeros(len(idx), 3, 2, 2)
        images[:, 0, 0, 0] = idx.float()
        batches.append((images, idx % 3, idx, torch.tensor([int(i) in failed for i in idx.tolist()])))
    return batches


def test_evaluate_scores_failed_images_as_misses_and_keeps_them_out_of_the_loss():
    # 7 images, 6 classes; targets are index % 3: 0 1 2 0 1 2 0
    table = torch.tensor([[9., 0, 0, 0, 0, 0],   # target 0: top-1
                          [0., 9, 0, 0, 0, 0],   # target 1: top-1, but it failed to decode: a miss
                          [9., 8, 7, 6, 5, 0],   # target 2: rank 3
                          [0., 9, 8, 7, 6, 5],   # target 0: rank 6, a miss
                          [0., 9, 0, 0, 0, 0],   # target 1: top-1
                          [1., 2, 3, 4, 5, 9],   # target 2: rank 4
                          [5., 9, 8, 7, 0, 0]])  # target 0: rank 4
    result = scoring.evaluate(TableModel(table), _table_batches(7, 3, failed={1}), "cpu", progress=False)
    assert result["images"] == 7 and result["failed"] == 1
    assert result["top1"] == pytest.approx(100 * 2 / 7)   # images 0 and 4
    assert result["top5"] == pytest.approx(100 * 5 / 7)   # images 0, 2, 4, 5, 6
    ok = [0, 2, 3, 4, 5, 6]
    want_loss = F.cross_entropy(table[ok], torch.tensor(ok) % 3).item()
    assert result["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert result["images_per_s"] > 0 and result["seconds"] > 0


def test_evaluate_restores_training_mode_and_returns_sorted_predictions():
    table = torch.randn(5, 4)
    model = TableModel(table).train()
    result = scoring.evaluate(model, list(reversed(_table_batches(5, 2))), "cpu", progress=False,
                         collect_predictions=True, per_class=True)
    assert model.training
    assert [p["index"] for p in result["predictions"]] == [0, 1, 2, 3, 4]
    assert all(p["top5"] == table[p["index"]].topk(4).indices.tolist() for p in result["predictions"])
    assert result["per_class_count"] == [2, 2, 1, 0]
    assert sum(result["per_class_correct"]) == round(result["top1"] * 5 / 100)


def _distributed_worker(rank, world, port, table, n_images, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        images = _table_batches(n_images, 1, failed={3})
        mine = [images[i] for i in EvalSampler(n_images, world, rank)]
        shard = [tuple(torch.cat(parts) for parts in zip(*mine[i:i + 2])) for i in range(0, len(mine), 2)]
        result = scoring.evaluate(TableModel(table), shard, "cpu", progress=False, collect_predictions=True,
                             per_class=True)
        torch.save(result, f"{out}/rank{rank}.pt")
        # fewer images than processes: a rank with nothing to do still takes part
        alone = scoring.evaluate(TableModel(table), shard[:1] if rank == 0 else [], "cpu", progress=False,
                            per_class=True)
        torch.save(alone, f"{out}/alone{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_evaluation_counts_every_image_exactly_once(tmp_path):
    torch.manual_seed(0)
    n_images, table = 7, torch.randn(7, 5)   # 7 images over 2 ranks: 4 + 3, no padding duplicates
    mp.spawn(_distributed_worker, args=(2, helpers.free_port(), table, n_images, str(tmp_path)), nprocs=2, join=True)
    single = scoring.evaluate(TableModel(table), _table_batches(n_images, 3, failed={3}), "cpu", progress=False,
                         collect_predictions=True, per_class=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["images"] == n_images and result["failed"] == 1
        for key in ("top1", "top5", "loss", "per_class_count", "per_class_correct"):
            assert result[key] == pytest.approx(single[key]), key
        assert [p["index"] for p in result["predictions"]] == list(range(n_images))
        alone = torch.load(tmp_path / f"alone{rank}.pt", weights_only=False)
        assert alone["images"] == 2 and len(alone["per_class_count"]) == 5   # rank 0's first batch of 2


# ---- inference speed path --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("width", [0.35, 1.0])
def test_prepare_for_inference_folds_every_batchnorm_and_keeps_logits_within_1e4(width):
    from bench.bench_eval import random_model  # BatchNorm statistics far from the identity
    model = random_model(width_mult=width)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference.prepare_for_inference(model, input_size=SIZE, batch_size=4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    if torch.backends.mkldnn.is_available():
        assert sum(isinstance(m, inference.PackedConv2d) for m in fast.modules()) == 52
    x = torch.randn(3, 3, 48, 48)  # another batch and size than it was packed for
    with torch.inference_mode():
        got = fast(x.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        want = model(x)
    assert (got - want).abs().max().item() < 1e-4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "original changed"


@pytest.mark.slow
def test_eval_loop_agrees_with_torchvision_plain_loop():
    import bench.bench_eval as bench  # the benchmark's own check, at a size that runs in a second
    result = bench.run(batch_size=4, batches=2, repeats=1, image_size=64)
    assert result["max_abs_diff"] < 1e-4 and result["ours"] > 0 and result["reference"] > 0


# ---- scoring from the command line --------------------------------------------------------------

@pytest.mark.slow
def test_scores_equal_a_per_image_computation_by_hand(trained, demo, tmp_path):
    result = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, "--batch-size", 7,
                 "--json", tmp_path / "r.json", *PRE)
    n = len(trained["labels"])
    assert result["images"] == n and result["failed"] == 0
    assert result["top1"] == pytest.approx(100 * trained["hits1"].sum().item() / n)
    assert result["top5"] == pytest.approx(100 * trained["hits5"].sum().item() / n)
    want_loss = F.cross_entropy(trained["logits"], trained["labels"]).item()
    assert result["loss"] == pytest.approx(want_loss, rel=1e-4)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["top1"] == pytest.approx(result["top1"]) and saved["images"] == n
    assert saved["class_order"] == "sorted" and saved["preprocessing"]["resize"] == RESIZE


@pytest.mark.slow
def test_plain_and_fast_paths_give_the_same_scores(trained, demo):
    fast = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, *PRE)
    plain = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, "--plain", *PRE)
    assert (fast["top1"], fast["top5"]) == (plain["top1"], plain["top5"])
    assert fast["loss"] == pytest.approx(plain["loss"], abs=1e-4)


@pytest.mark.slow
def test_onnxruntime_and_torch_backends_give_the_same_scores(trained, demo):
    runs = {backend: run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0,
                         "--backend", backend, *PRE) for backend in ("onnxruntime", "torch")}
    assert {backend: r["backend"] for backend, r in runs.items()} == {"onnxruntime": "onnxruntime",
                                                                      "torch": "torch"}
    ort, pt = runs["onnxruntime"], runs["torch"]
    assert (ort["top1"], ort["top5"], ort["images"]) == (pt["top1"], pt["top5"], pt["images"])
    assert ort["loss"] == pytest.approx(pt["loss"], abs=1e-4)


def test_auto_scores_small_data_in_pytorch_and_large_data_in_onnxruntime(trained, demo, monkeypatch):
    assert run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, *PRE)["backend"] == "torch"
    monkeypatch.setattr(evaluation, "ONNX_MIN_IMAGES", 2)  # as if the demo were large enough to repay the export
    assert run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, *PRE)["backend"] == "onnxruntime"


def test_without_onnxruntime_scoring_falls_back_to_pytorch_with_a_note(trained, demo, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(evaluation, "ONNX_MIN_IMAGES", 2)
    result = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, *PRE)
    assert result["backend"] == "torch" and result["images"] == len(trained["labels"])
    assert "onnxruntime not used" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run("--weights", trained["path"], "--data-dir", demo, "--backend", "onnxruntime", *PRE)


@contextlib.contextmanager
def pretended_gpu():
    """torch.cuda.is_available() says True inside; it and the TF32 flags are put back on exit, whatever happens.

    By hand, not with monkeypatch: torch.backends.cuda.matmul serves allow_tf32 through __getattr__, so
    monkeypatch records no old value, its undo raises, and the patches made before it stay in place.
    """
    saved = torch.cuda.is_available, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_on_cuda_onnxruntime_is_refused_and_fp32_scoring_turns_tf32_off(demo, tmp_path, capsys):
    # Both checks come before anything touches a GPU, so a pretended one is enough to exercise them.
    with pretended_gpu():
        code, err = error_of(capsys, "--device", "cuda", "--backend", "onnxruntime", "--weights",
                             tmp_path / "w.pth", "--data-dir", demo)
        assert code == 2 and len(err) == 1
        assert "--backend onnxruntime scores on the CPU" in err[0] and "--device cpu" in err[0]
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        code, err = error_of(capsys, "--device", "cuda", "--weights", tmp_path / "missing.pth", "--data-dir", demo)
        assert code == 2 and "missing.pth" in err[0]  # stopped at the weights, after the precision was set
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        error_of(capsys, "--device", "cuda", "--amp", "--weights", tmp_path / "missing.pth", "--data-dir", demo)
        assert torch.backends.cudnn.allow_tf32  # --amp asks for speed: left as it was


def test_amp_on_cpu_counts_every_image(trained, demo):
    result = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, "--amp", *PRE)
    assert result["images"] == len(trained["labels"]) and 0 <= result["top1"] <= result["top5"] <= 100


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    model, messages = nn.Linear(4, 3), []
    assert inference.maybe_compile(model, torch.randn(2, 4), messages.append) is model
    assert len(messages) == 1 and "no C++ compiler" in messages[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(PUBLIC_LAYOUTS))
def test_the_same_weights_in_every_public_layout_score_identically(layout, trained, demo, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(PUBLIC_LAYOUTS[layout](trained["model"].state_dict()), path)
    result = run("--weights", path, "--data-dir", demo, "--num-workers", 0, *PRE)
    n = len(trained["labels"])
    assert result["top1"] == pytest.approx(100 * trained["hits1"].sum().item() / n)
    assert result["top5"] == pytest.approx(100 * trained["hits5"].sum().item() / n)


@pytest.mark.slow
def test_devkit_order_and_sorted_order_weights_both_score_right(trained, demo, tmp_path):
    devkit = tmp_path / "devkit.pth"
    torch.save(_devkit_state_dict(trained, demo), devkit)
    right = 100 * trained["hits1"].sum().item() / len(trained["labels"])
    assert run("--weights", devkit, "--data-dir", demo, "--class-order", "devkit", "--num-workers", 0,
               *PRE)["top1"] == pytest.approx(right)
    # the wrong order scores nothing like it: the labels point at other classes
    assert run("--weights", devkit, "--data-dir", demo, "--num-workers", 0, *PRE)["top1"] < right / 2


def _constant_model(path, levels):
    """Weights whose logits ignore the image: class index -> logit, every other class far below."""
    model = MobileNetV2(width_mult=0.35)
    model.classifier[1].weight.data.zero_()
    model.classifier[1].bias.data.fill_(-10.0)
    for index, value in levels.items():
        model.classifier[1].bias.data[index] = value
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "devkit"])
def test_constant_predictions_score_exactly_the_share_of_their_classes(order, fake_imagenet_factory,
                                                                       tmp_path):
    # labels straight from the files the fixture wrote, not from read_ImageNetData
    fake = fake_imagenet_factory(num_val=7)
    a, b, c = fake["image_wnids"]
    index = fake["sorted_wnids"].index if order == "sorted" else (lambda w: fake["ilsvrc_id"][w] - 1)
    others = [i for i in range(1000) if i not in {index(a), index(b), index(c)}][:3]
    # ranking: a, b, three classes without images, then c (6th: outside the top 5)
    levels = {index(a): 5.0, index(b): 4.0, others[0]: 3.0, others[1]: 2.0, others[2]: 1.0, index(c): 0.5}
    weights = _constant_model(tmp_path / "constant.pth", levels)
    result = run("--weights", weights, "--data-dir", fake["root"], "--class-order", order,
                 "--num-workers", 0, "--resize", 32, "--crop", 28)
    wnids = [w for _, w in fake["val"]]
    assert result["images"] == 7
    assert result["top1"] == pytest.approx(100 * wnids.count(a) / 7)
    assert result["top5"] == pytest.approx(100 * (wnids.count(a) + wnids.count(b)) / 7)


@pytest.mark.slow
def test_checkpoint_brings_its_own_class_order_and_input_size(trained, demo, tmp_path):
    classes = read_classes(find_layout(demo), "devkit")
    checkpoint = {
        "format": "mobilenetv2-checkpoint", "version": 1,
        "model": _devkit_state_dict(trained, demo), "model_ema": None,
        "model_config": {"num_classes": 1000, "width_mult": 0.35, "dropout": 0.0},
        "classes": {"order": "devkit", "wnids": classes.wnids, "names": classes.names},
        "data": {"input_size": SIZE, "resize": RESIZE, "interpolation": "bilinear",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "epoch": 1, "step": 0,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    # no --class-order, no preprocessing flags; a contradicting --class-order is overruled
    result = run("--weights", path, "--data-dir", demo, "--num-workers", 0, "--class-order", "sorted")
    assert result["class_order"] == "devkit" and result["preprocessing"]["input_size"] == SIZE
    assert result["top1"] == pytest.approx(100 * trained["hits1"].sum().item() / len(trained["labels"]))


@pytest.mark.slow
def test_a_val_subset_is_scored_on_exactly_its_images(trained, demo):
    result = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, "--max-images", 9,
                 *PRE)
    assert result["images"] == 9
    assert result["top1"] == pytest.approx(100 * trained["hits1"][:9].sum().item() / 9)


@pytest.mark.slow
def test_decode_failures_are_counted_as_misses_and_reported(trained, demo, tmp_path, capsys):
    import shutil
    copy = tmp_path / "imagenet"
    shutil.copytree(demo, copy)
    files = sorted((copy / "ILSVRC2012_img_val").iterdir())
    broken = [0, 5]
    for i in broken:
        files[i].write_bytes(files[i].read_bytes()[:40])   # a truncated JPEG
    result = run("--weights", trained["path"], "--data-dir", copy, "--num-workers", 0, *PRE)
    n = len(trained["labels"])
    hits1 = trained["hits1"].clone()
    hits1[broken] = False
    assert result["failed"] == 2 and result["images"] == n
    assert result["top1"] == pytest.approx(100 * hits1.sum().item() / n)
    assert "failed to decode: 2" in capsys.readouterr().out


@pytest.mark.slow
def test_per_class_and_prediction_files_agree_with_the_totals(trained, demo, tmp_path):
    result = run("--weights", trained["path"], "--data-dir", demo, "--num-workers", 0, *PRE,
                 "--per-class", tmp_path / "per_class.csv", "--predictions", tmp_path / "pred.csv")
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert set(rows[0]) == {"index", "wnid", "name", "top1", "count"}
    assert len(rows) == 10 and sum(int(r["count"]) for r in rows) == result["images"]
    correct = sum(float(r["top1"]) * int(r["count"]) / 100 for r in rows)
    assert correct == pytest.approx(result["top1"] * result["images"] / 100, abs=1e-2)
    assert all(r["name"].startswith("digit ") for r in rows)
    preds = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert len(preds) == result["images"]
    labels, samples = trained["labels"], trained["samples"]
    for row in preds:
        i = int(row["index"])
        assert row["file"] == samples[i][0] and int(row["target"]) == labels[i]
        assert int(row["pred1"]) == trained["logits"][i].argmax().item()
    assert sum(float(preds[0][f"prob{k}"]) for k in range(1, 6)) <= 1.0 + 1e-6


# ---- single images ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_single_images_print_top5_names_and_probabilities(trained, demo, capsys):
    files = [p for p, _ in trained["samples"][:2]]
    out = run("--weights", trained["path"], "--data-dir", demo, *files, *PRE)["image_predictions"]
    printed = capsys.readouterr().out
    for i, entry in enumerate(out):
        top = entry["top"]
        assert len(top) == 5 and top[0]["index"] == trained["logits"][i].argmax().item()
        assert top[0]["name"].startswith("digit ") and top[0]["wnid"].startswith("n")
        assert sum(t["prob"] for t in top) <= 1 + 1e-6 and top[0]["prob"] >= top[-1]["prob"]
        assert top[0]["name"] in printed and files[i] in printed
    # a directory stands for every image inside it
    out = run("--weights", trained["path"], demo / "ILSVRC2012_img_val", "--topk", 3,
              *PRE)["image_predictions"]
    assert len(out) == len(trained["samples"]) and all(len(e["top"]) == 3 for e in out)


@pytest.mark.slow
def test_single_images_without_devkit_use_torchvision_names(trained, capsys):
    file = trained["samples"][0][0]
    out = run("--weights", trained["path"], file, *PRE)["image_predictions"]
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert out[0]["top"][0]["name"] == categories[out[0]["top"][0]["index"]]


@pytest.mark.slow
def test_an_image_that_does_not_decode_is_one_line_and_a_nonzero_exit(trained, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    good = trained["samples"][0][0]
    code, err = error_of(capsys, "--weights", trained["path"], good, bad, *PRE)
    assert code == 1 and len(err) == 1 and str(bad) in err[0] and "cannot decode" in err[0]


# ---- export ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_exports_from_both_exporters_and_pt2_pass_their_parity_check(trained, tmp_path, exporter):
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    result = run("--weights", trained["path"], "--export-onnx", onnx_path, "--onnx-exporter", exporter,
                 "--export-pt2", pt2_path, "--crop", SIZE)
    assert onnx_path.is_file() and pt2_path.is_file() and result["export"]["onnx"]["exporter"] == exporter
    for kind in ("onnx", "pt2"):
        diff = result["export"][kind]["max_abs_diff"]
        assert diff is not None and diff <= 1e-4
    onnx = pytest.importorskip("onnx")
    opset = {entry.domain: entry.version for entry in onnx.load(str(onnx_path)).opset_import}[""]
    assert opset == (18 if exporter == "dynamo" else 17)
    # both files take any batch size and agree with the model as trained
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        want = trained["model"](x)
        assert (torch.export.load(str(pt2_path)).module()(x) - want).abs().max() <= 1e-4
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4


def test_parity_inputs_look_like_normalised_photos():
    x = export.parity_input(32, 4)
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # 0..1 images, normalised as the model expects
    # neighbouring pixels are close (photos are smooth): independent noise would differ by about 1/3
    assert (pixels[..., 1:] - pixels[..., :-1]).abs().mean() < 0.12
    assert torch.equal(x, export.parity_input(32, 4)) and not torch.equal(x, export.parity_input(32, 4, seed=1))


def test_an_export_that_disagrees_fails(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "export_pt2", lambda *a, **k: 3e-3)
    code, err = error_of(capsys, "--weights", trained["path"], "--export-pt2", tmp_path / "m.pt2")
    assert code == 1 and len(err) == 1 and "3.00e-03" in err[0] and not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("flags, words", [
    (["--export-torchscript", "m.pt"], ["--export-torchscript", "deprecated", "--export-pt2"]),
    (["--export-onnx", "m.onnx", "--opset", "17"], ["--opset 17", "18", "--onnx-exporter torchscript"]),
])
def test_deprecated_or_impossible_export_flags_are_one_line(trained, tmp_path, capsys, flags, words):
    code, err = error_of(capsys, "--weights", trained["path"], *[str(tmp_path / f) if f.startswith("m.") else f
                                                                 for f in flags])
    assert code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert list(tmp_path.iterdir()) == []


# ---- named public weights ------------------------------------------------------------------------

def test_known_weights_table_matches_torchvision_weights_api():
    api = torchvision.models.MobileNet_V2_Weights
    for name in weights.DOWNLOADABLE:
        entry = weights.KNOWN_WEIGHTS[name]
        enum = getattr(api, entry["torchvision"])
        metrics = enum.meta["_metrics"]["ImageNet-1K"]
        assert enum.url == entry["url"] and enum.url.endswith(entry["file"])
        published = entry["published"]
        assert (metrics["acc@1"], metrics["acc@5"]) == (published["top1"], published["top5"])
        resize = enum.transforms.keywords.get("resize_size", 256)
        assert (resize, enum.transforms.keywords["crop_size"]) == \
            (entry["preprocessing"]["resize"], entry["preprocessing"]["input_size"])
        # torch.hub names files by their sha256's first hex digits
        assert entry["file"].split("-")[1].split(".")[0] == entry["sha256"][:8]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", weights.DOWNLOADABLE)
def test_named_public_weights_offline_fail_with_url_and_destination(name, tmp_path, capsys, no_network):
    code, err = error_of(capsys, "--weights", name, "--pretrained-dir", tmp_path, "--export-onnx",
                         tmp_path / "m.onnx")
    entry = weights.KNOWN_WEIGHTS[name]
    assert code == 1 and len(err) == 1
    assert entry["url"] in err[0] and str(tmp_path / entry["file"]) in err[0]
    assert not any(tmp_path.iterdir()), "nothing partial may be left behind"


@pytest.mark.slow
def test_named_weights_are_checksum_verified_and_recognised(trained, tmp_path, monkeypatch, capsys):
    # a local file stands in for the server: the real download and checksum code runs, offline
    served = tmp_path / "served.pth"
    served.write_bytes(trained["path"].read_bytes())
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "_torchvision_url", lambda entry: served.as_uri())
    store = tmp_path / "pretrained"
    entry = weights.KNOWN_WEIGHTS["torchvision-v2"]

    monkeypatch.setitem(entry, "sha256", "0" * 64)   # the served file is not the published one
    code, err = error_of(capsys, "--weights", "torchvision-v2", "--pretrained-dir", store,
                         "--export-onnx", tmp_path / "m.onnx")
    assert code == 1 and len(err) == 1 and "sha256" in err[0]
    assert not (store / entry["file"]).exists()

    monkeypatch.setitem(entry, "sha256", digest)
    result = run("--weights", "torchvision-v2", "--pretrained-dir", store, trained["samples"][0][0])
    assert (store / entry["file"]).is_file()
    assert result["known_weights"] == "torchvision-v2" and result["preprocessing"]["resize"] == 232
    assert "recognised torchvision-v2" in capsys.readouterr().out


@pytest.mark.slow
def test_a_recognised_file_gets_its_published_preprocessing_unless_flags_say_otherwise(
        trained, demo, monkeypatch):
    digest = hashlib.sha256(trained["path"].read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_WEIGHTS["torchvision-v2"], "sha256", digest)
    file = trained["samples"][0][0]
    auto = run("--weights", trained["path"], file)
    assert auto["known_weights"] == "torchvision-v2"
    assert (auto["preprocessing"]["resize"], auto["preprocessing"]["input_size"]) == (232, 224)
    flagged = run("--weights", trained["path"], file, "--resize", 40, "--crop", 32)
    assert (flagged["preprocessing"]["resize"], flagged["preprocessing"]["input_size"]) == (40, 32)


# ---- bad input: one line, non-zero exit ------------------------------------------------------------

def _other_architecture(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def _ten_classes(tmp_path):
    path = tmp_path / "ten.pth"
    torch.save(MobileNetV2(num_classes=10, width_mult=0.35).state_dict(), path)
    return path


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    return path


def _pickle_payload(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"features.0.0.weight": RunsCode(tmp_path / "ran")}, path)
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    return path


def _truncated(tmp_path, trained):
    path = tmp_path / "truncated.pth"
    path.write_bytes(trained["path"].read_bytes()[:5000])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case, code, needle", [
    ("missing weights", 2, "no such file"),
    ("missing data dir", 2, "no such directory"),
    ("width the file does not have", 2, "width"),
    ("classes the file does not have", 2, "classes"),
    ("crop larger than resize", 2, "crop"),
    ("nothing to do", 2, "nothing to do"),
    ("corrupt weights", 1, "corrupt.pth"),
    ("empty weights", 1, "empty.pth"),
    ("truncated weights", 1, "truncated.pth"),
    ("weights that would run code", 1, "payload.pth"),
    ("another architecture", 1, "resnet.pth"),
    ("num_classes differs from the data", 1, "10 classes"),
    ("missing image", 2, "no such image"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(case, code, needle, trained, demo, tmp_path, capsys):
    w = trained["path"]
    argv = {
        "missing weights": ["--weights", tmp_path / "nope.pth", "--data-dir", demo],
        "missing data dir": ["--weights", w, "--data-dir", tmp_path / "nowhere"],
        "width the file does not have": ["--weights", w, "--data-dir", demo, "--width-mult", "1.0"],
        "classes the file does not have": ["--weights", w, "--data-dir", demo, "--num-classes", "10"],
        "crop larger than resize": ["--weights", w, "--data-dir", demo, "--resize", "32", "--crop", "64"],
        "nothing to do": ["--weights", w],
        "corrupt weights": ["--weights", _corrupt(tmp_path), "--data-dir", demo],
        "empty weights": ["--weights", _empty(tmp_path), "--data-dir", demo],
        "truncated weights": ["--weights", _truncated(tmp_path, trained), "--data-dir", demo],
        "weights that would run code": ["--weights", _pickle_payload(tmp_path), "--data-dir", demo],
        "another architecture": ["--weights", _other_architecture(tmp_path), "--data-dir", demo],
        "num_classes differs from the data": ["--weights", _ten_classes(tmp_path), "--data-dir", demo, *PRE],
        "missing image": ["--weights", w, tmp_path / "nope.jpg"],
    }[case]
    got, err = error_of(capsys, *argv)
    assert got == code, err
    assert len(err) == 1 and err[0].startswith("evaluate.py: error:") and needle in err[0], err
    assert not (tmp_path / "ran").exists(), "an untrusted pickle ran code"


@pytest.mark.parametrize("flags", [["--batch-size", "-4"], ["--class-order", "alphabetical"],
                                   ["--num-workers", "-1"], ["--std", "0", "1", "1"],
                                   ["--interpolation", "lanczos"], ["--device", "gpu0"]])
def test_bad_flag_values_are_argparse_errors_with_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as failure:
        ev.get_args_parser().parse_args(["--weights", "w.pth", "--data-dir", "d", *flags])
    assert failure.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: argument" in err[-1] and flags[0] in err[-1]
