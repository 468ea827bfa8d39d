"""quantize.py and INT8: the QDQ file's contents, its metadata, its scores in evaluate.py, bias correction,
the calibration draw, and the INT8 ExecuTorch program."""
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate as ev
import quantize
from helpers import run_script
from mnv2.data.demo import make_demo
from mnv2.data.imagenet import find_layout, list_samples, read_classes
from mnv2.data.transforms import eval_transform, normalize
from mnv2.deploy import export, inference, onnx_weights, ptq, quantization
from MobileNetV2 import MobileNetV2

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE, RESIZE = 32, 36
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo digits in the ImageNet layout: 10 classes x 30 train + 3 val images at 32 px."""
    return make_demo(tmp_path_factory.mktemp("digits"), train_per_class=30, val_per_class=3, image_size=SIZE)


def _images(samples):
    x = normalize(torch.stack([eval_transform(SIZE, RESIZE)(p) for p, _ in samples]))
    return x, torch.tensor([label for _, label in samples])


@pytest.fixture(scope="module")
def weights(data, tmp_path_factory):
    """A checkpoint of this repo (class order, names and preprocessing inside): width 0.35 trained for 150
    steps on the 300 training digits (about 10 s on one thread), BatchNorm statistics then recomputed over
    all of them. It scores about 80% on the val digits, with logits of ImageNet-like magnitude (tens): a
    trained network's features, where the classes are far apart, not random ones, where INT8 rounding
    hides the small differences between classes."""
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35)
    layout = find_layout(data)
    classes = read_classes(layout, "sorted")
    x, y = _images(list_samples(layout, "train", classes))
    generator = torch.Generator().manual_seed(0)
    model.train()
    environ = dict(os.environ)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        for _ in range(150):
            batch = torch.randint(len(x), (32,), generator=generator)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:  # importing torch._dynamo (PyTorch's optimizers do) sets TORCHINDUCTOR_CACHE_DIR
        os.environ.clear()
        os.environ.update(environ)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches
            m.reset_running_stats()
    with torch.no_grad():
        model(x)
    model.eval()
    path = tmp_path_factory.mktemp("weights") / "digits.pth"
    torch.save({"format": "mobilenetv2-checkpoint", "version": 1, "model": model.state_dict(), "model_ema": None,
                "model_config": dict(model.config),
                "classes": {"order": "sorted", "wnids": list(classes.wnids), "names": list(classes.names)},
                "data": {"input_size": SIZE, "resize": RESIZE, "interpolation": "bilinear",
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "epoch": 1, "step": 0}, path)
    return {"path": path, "model": model, "classes": classes}


def quantize_run(*argv):
    code, err, out = run_script(quantize, *[str(a) for a in argv], "--num-workers", 0, "--no-progress")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def int8(weights, data, tmp_path_factory):
    """One quantize.py run on the digits: (its results as JSON, the INT8 file, its stdout)."""
    folder = tmp_path_factory.mktemp("int8")
    out = quantize_run("--weights", weights["path"], "--data-dir", data, "--out", folder / "digits.int8.onnx",
                       "--calibration-images", 24, "--json", folder / "result.json")
    return json.loads((folder / "result.json").read_text()), folder / "digits.int8.onnx", out


def evaluate_run(*argv):
    return ev.main(ev.get_args_parser().parse_args([str(a) for a in argv] + ["--no-progress", "--num-workers", "0"]))


def _initializers(graph):
    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}


# ---- the file ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_file_holds_int8_weights_one_scale_per_output_channel_rounded_as_bias_correction_assumes(int8,
                                                                                                     weights):
    _, path, _ = int8
    graph = onnx.load(str(path)).graph
    stored = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 52  # every convolution of MobileNetV2, BatchNorm folded into them
    folded = inference.prepare_for_inference(weights["model"], channels_last=False)
    folded_convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    for conv, module in zip(convs, folded_convs):
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q, scale = stored[dq.input[0]], stored[dq.input[1]]
        assert q.dtype == np.int8 and scale.shape == (module.out_channels,)
        assert np.abs(q).max() <= 127
        # what onnxruntime stored is what quantization.quantize_weight computes (bias correction relies on it)
        got = torch.from_numpy(q.astype(np.float32) * scale.reshape(-1, 1, 1, 1))
        assert torch.allclose(got, quantization.quantize_weight(module.weight), rtol=0, atol=1e-6)
    # activations are uint8; the logits leave the classifier in float, never rounded to 8 bits
    assert all(stored[n.input[2]].dtype == np.uint8 for n in graph.node if n.op_type == "QuantizeLinear")
    assert producer[graph.output[0].name].op_type == "Gemm"


@pytest.mark.slow
def test_the_file_carries_class_order_names_preprocessing_and_recipe(int8, weights):
    result, path, _ = int8
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[export.METADATA_KEY])
    classes = weights["classes"]
    assert meta["classes"] == {"order": "sorted", "wnids": classes.wnids, "names": classes.names}
    assert meta["data"] == {"input_size": SIZE, "resize": RESIZE, "interpolation": "bilinear",
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["model_config"]["width_mult"] == 0.35
    assert meta["int8"]["calibration_images"] == 24 and meta["int8"]["calibration_method"] == "minmax"
    assert meta["int8"]["bias_correction"] is True and meta["int8"]["source_sha256"] == result["sha256"]


@pytest.mark.slow
def test_int8_logits_follow_the_float_model_in_a_quarter_of_the_bytes(int8, weights, data):
    result, path, out = int8
    assert result["onnx"]["bytes"] < 0.35 * result["onnx"]["float_bytes"]
    acc = result["accuracy"]
    assert acc["scored_on"] == "val" and acc["images"] == 30
    assert acc["INT8 ONNX"]["top1_agreement"] >= 90
    assert abs(acc["INT8 ONNX"]["top1"] - acc["float"]["top1"]) <= 10
    assert acc["float"]["top1"] >= 50  # the weights really classify: the comparison means something
    # the INT8 logits on the val images, against the float model
    layout = find_layout(data)
    val = list_samples(layout, "val", weights["classes"])
    x = normalize(torch.stack([eval_transform(SIZE, RESIZE)(p) for p, _ in val]))
    with torch.no_grad():
        want = weights["model"](x)
    got = onnx_weights.OnnxFileModel(path)(x)
    sqnr = 10 * torch.log10((want ** 2).sum() / ((got - want) ** 2).sum())
    assert sqnr > 25, f"signal-to-quantization-noise {sqnr:.1f} dB"
    assert "INT8 ONNX: top-1" in out and "speed in onnxruntime" in out
    assert result["speed"]["int8_images_per_s"] > 0 and result["speed"]["float_latency_ms"] > 0


# ---- evaluate.py reads it like any weights -------------------------------------------------------

@pytest.mark.slow
def test_evaluate_scores_the_int8_file_without_flags_as_quantize_reported(int8, data, tmp_path):
    result, path, _ = int8
    per_class = tmp_path / "per_class.csv"
    scored = evaluate_run("--weights", path, "--data-dir", data, "--per-class", per_class, "--json",
                          tmp_path / "eval.json")
    assert scored["preprocessing"]["input_size"] == SIZE and scored["preprocessing"]["resize"] == RESIZE
    assert scored["class_order"] == "sorted" and scored["backend"] == "onnxruntime, INT8"
    assert scored["top1"] == pytest.approx(result["accuracy"]["INT8 ONNX"]["top1"])
    assert scored["top5"] == pytest.approx(result["accuracy"]["INT8 ONNX"]["top5"])
    rows = per_class.read_text().strip().splitlines()[1:]
    assert len(rows) == 10 and sum(int(r.split(",")[-1]) for r in rows) == 30
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == pytest.approx(scored["top1"])


@pytest.mark.slow
def test_single_images_get_the_names_the_file_carries(int8, data, weights, capsys):
    _, path, _ = int8
    image = sorted((data / "ILSVRC2012_img_val").iterdir())[0]
    predictions = evaluate_run("--weights", path, image)  # no --data-dir: names from the file
    top = predictions["image_predictions"][0]["top"]
    names = weights["classes"].names
    assert len(top) == 5 and all(t["name"] == names[t["index"]] for t in top)
    assert top[0]["name"].startswith("digit ")
    assert top[0]["name"] in capsys.readouterr().out


# ---- the recipe ----------------------------------------------------------------------------------

def test_bias_correction_removes_the_mean_shift_that_rounding_the_weights_causes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    layers = (0, 2, 4)
    with torch.no_grad():  # one large weight per channel sets a coarse step the small ones round to
        for i in layers:
            model[i].weight.mul_(0.1).view(model[i].weight.shape[0], -1)[:, 0] = 1.0
    batches = [torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(3)]

    def apply(layer, x, weight, bias):
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups).mean((0, 2, 3))
        return F.linear(x, weight, bias).mean(0)

    def mean_shift(candidate):
        """Per layer: the largest per-channel gap between the float layer's mean output and that of
        `candidate`'s layer with rounded weights, both on the float model's activations."""
        gaps = []
        for i in layers:
            seen = []
            hook = model[i].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
            with torch.no_grad():
                for x in batches:
                    model(x)
            hook.remove()
            x = torch.cat(seen)
            want = apply(model[i], x, model[i].weight, model[i].bias)
            got = apply(model[i], x, quantization.quantize_weight(candidate[i].weight), candidate[i].bias)
            gaps.append((got - want).abs().max().item())
        return gaps

    corrected = copy.deepcopy(model)
    assert quantization.correct_bias(corrected, batches) == 3
    before, after = mean_shift(model), mean_shift(corrected)
    assert min(before) > 1e-3
    assert all(a < b / 100 for a, b in zip(after, before)), (before, after)


@pytest.mark.slow
def test_calibration_draw_is_seeded_and_never_meets_the_scored_images(data, weights, tmp_path):
    classes = weights["classes"]
    quiet = [].append
    a = ptq.split_images(data, classes, 20, None, 0, quiet)
    again = ptq.split_images(data, classes, 20, None, 0, quiet)
    other = ptq.split_images(data, classes, 20, None, 1, quiet)
    assert a[0] == again[0] and a[0] != other[0] and len(a[0]) == 20
    assert a[2] == "val" and not {p for p, _ in a[0]} & {p for p, _ in a[1]}
    assert all("ILSVRC2012_img_train" in str(p) for p, _ in a[0])
    # without val images: training images held out from the calibration draw are scored
    no_val = make_demo(tmp_path / "no_val", train_per_class=6, val_per_class=0, image_size=SIZE)
    (no_val / "ILSVRC2012_img_val").rmdir()
    (no_val / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").unlink()
    calibration, scored, on = ptq.split_images(no_val, classes, 20, 15, 0, quiet)
    assert on == "held-out train" and len(scored) == 15 and not {p for p, _ in calibration} & {p for p, _ in scored}
    # without training images: one part of val calibrates, the other is scored
    no_train = make_demo(tmp_path / "no_train", train_per_class=0, val_per_class=3, image_size=SIZE)
    for wnid_dir in (no_train / "ILSVRC2012_img_train").iterdir():
        wnid_dir.rmdir()
    (no_train / "ILSVRC2012_img_train").rmdir()
    calibration, scored, on = ptq.split_images(no_train, classes, 20, None, 0, quiet)
    assert len(calibration) == 15 and len(scored) == 15 and not {p for p, _ in calibration} & {p for p, _ in scored}


@pytest.mark.slow
@pytest.mark.parametrize("argv, code, needle", [
    (["--calibration-images", "0"], 2, "--calibration-images"),
    (["--calibration-method", "mse"], 2, "--calibration-method"),
    ([], 2, "nothing to write"),
    (["--out", "model.int8.pt"], 2, "*.onnx"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, code, needle, weights, data):
    got, err, _ = run_script(quantize, "--weights", weights["path"], "--data-dir", data, *argv)
    assert got == code and len(err.strip().splitlines()) == 1, err
    assert err.startswith("quantize.py: error:") and needle in err


@pytest.mark.slow
def test_onnx_weights_and_data_of_another_class_count_are_refused_in_one_line(int8, weights, data, tmp_path):
    _, path, _ = int8
    code, err, _ = run_script(quantize, "--weights", path, "--data-dir", data, "--out", tmp_path / "again.onnx")
    assert code == 2 and "PyTorch weights" in err and len(err.strip().splitlines()) == 1
    ten = tmp_path / "ten.pth"
    torch.save(MobileNetV2(num_classes=10, width_mult=0.35).state_dict(), ten)
    code, err, _ = run_script(quantize, "--weights", ten, "--data-dir", data, "--out", tmp_path / "ten.onnx")
    assert code == 1 and "10 classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ten.onnx").exists()


# ---- phones: the INT8 ExecuTorch program ---------------------------------------------------------

@pytest.mark.slow
def test_int8_executorch_program_runs_in_executorch_like_the_quantized_model(weights, data, tmp_path, monkeypatch):
    pytest.importorskip("executorch", reason="optional: pip install executorch (about 230 MB with its dependencies)")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # torch.export would set it
    from executorch.runtime import Runtime
    path = tmp_path / "digits.int8.pte"
    quantize_run("--weights", weights["path"], "--data-dir", data, "--export-pte", path, "--calibration-images", 24,
                 "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["pte"]["max_abs_error"] <= 2 * result["pte"]["max_abs_error_pytorch_int8"] + 1
    assert result["accuracy"]["INT8 ExecuTorch"]["top1_agreement"] >= 90
    program = Runtime.get().load_program(path.read_bytes())
    meta = json.loads(program.load_method("metadata").execute([])[0])
    assert meta["classes"]["names"] == weights["classes"].names and meta["data"]["input_size"] == SIZE
    # the val image the float model is surest of (its top two logits furthest apart)
    x, _ = _images(list_samples(find_layout(data), "val", weights["classes"]))
    with torch.no_grad():
        top2 = weights["model"](x).topk(2).values
    x = x[(top2[:, 0] - top2[:, 1]).argmax()][None]
    logits = program.load_method("forward").execute([x])[0]
    with torch.no_grad():
        want = weights["model"](x)
    assert logits.shape == (1, 1000) and logits.argmax() == want.argmax()
    assert (logits - want).abs().max() <= 0.1 * want.abs().max()
    assert path.stat().st_size < 0.35 * sum(p.numel() * 4 for p in weights["model"].parameters())


@pytest.mark.slow
def test_without_executorch_export_pte_is_one_line_naming_the_package(weights, data, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "executorch"] + ["executorch"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import executorch...` raises ImportError
    code, err, _ = run_script(quantize, "--weights", weights["path"], "--data-dir", data, "--export-pte",
                              tmp_path / "m.pte", "--num-workers", 0)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "pip install executorch" in err, err
    assert not (tmp_path / "m.pte").exists()


# ---- train.py --qat ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qat_run(weights, data, tmp_path_factory):
    """train.py --qat from the digits weights (width 0.35, taken from the file): 2 epochs, BatchNorm
    statistics frozen after 1 and activation ranges after 1 (the recipe's 3 and 4, scaled down), lr 1e-4
    (the recipe's)."""
    import train
    out = tmp_path_factory.mktemp("qat")
    environ = dict(os.environ)
    try:
        code = run_main_quiet(train, ["--qat", weights["path"], "--data-dir", data, "--save-path", out,
                                      "--num-epochs", 2, "--qat-bn-epochs", 1, "--qat-observer-epochs", 1,
                                      "--input-size", SIZE, "--val-resize-size", RESIZE,  # the width: the file's
                                      "--batch-size", 32, "--num-workers", 0, "--device", "cpu",
                                      "--calibration-images", 64])
    finally:  # importing torch._dynamo (PyTorch's optimizers do) sets TORCHINDUCTOR_CACHE_DIR
        os.environ.clear()
        os.environ.update(environ)
    assert code == 0
    return out


def run_main_quiet(module, argv):
    from helpers import run_main
    return run_main(module, module.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.mark.slow
def test_qat_writes_an_int8_file_whose_weights_are_the_ones_training_rounded(qat_run, weights):
    path = qat_run / "model.int8.onnx"
    trained = MobileNetV2(width_mult=0.35)
    trained.load_state_dict(torch.load(qat_run / "last.pth", weights_only=True)["model"])
    trained.eval()
    folded = inference.prepare_for_inference(trained, channels_last=False)
    graph = onnx.load(str(path)).graph
    stored = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for conv, module in zip(convs, [m for m in folded.modules() if isinstance(m, nn.Conv2d)]):
        dq = producer[conv.input[1]]
        got = torch.from_numpy(stored[dq.input[0]].astype(np.float32) * stored[dq.input[1]].reshape(-1, 1, 1, 1))
        assert torch.allclose(got, quantization.quantize_weight(module.weight), rtol=0, atol=1e-6)
    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[export.METADATA_KEY])
    assert meta["classes"]["names"] == weights["classes"].names and meta["data"]["input_size"] == SIZE
    assert meta["int8"]["bias_correction"] is False
    assert meta["int8"]["quantization_aware_training"] == {"freeze_bn_epochs": 1, "freeze_observer_epochs": 1}


@pytest.mark.slow
def test_qat_freezes_batchnorm_statistics_after_the_given_epochs(qat_run, weights):
    first = torch.load(qat_run / "epoch_1.pth", weights_only=True)["model"]
    second = torch.load(qat_run / "epoch_2.pth", weights_only=True)["model"]
    start = weights["model"].state_dict()
    stats = [k for k in first if k.endswith("running_mean") or k.endswith("running_var")]
    assert len(stats) == 2 * 52
    assert any(not torch.equal(first[k], start[k]) for k in stats)  # epoch 1 still updated them
    assert all(torch.equal(first[k], second[k]) for k in stats)      # epoch 2 did not
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith(".weight"))  # weights did learn


@pytest.mark.slow
def test_qat_int8_file_scores_in_evaluate_like_the_fine_tuned_weights(qat_run, data):
    float_scores = evaluate_run("--weights", qat_run / "last.pth", "--data-dir", data, "--backend", "torch")
    int8_scores = evaluate_run("--weights", qat_run / "model.int8.onnx", "--data-dir", data)
    assert int8_scores["backend"] == "onnxruntime, INT8" and int8_scores["images"] == 30
    assert float_scores["top1"] >= 60
    assert abs(int8_scores["top1"] - float_scores["top1"]) <= 10  # at most 3 of the 30 images


@pytest.mark.slow
def test_qat_fake_quantization_computes_what_the_int8_file_computes(tmp_path):
    """After the freezes, the fake-quantized model in PyTorch is closer to the INT8 file than the float
    model is, by a wide margin: training optimises the function that is deployed."""
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=0.35, num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(32, 3, SIZE, SIZE))
    reference = copy.deepcopy(model).eval()
    names = list(model.state_dict())
    qat = quantization.QuantizationAwareTraining(model, freeze_bn_epochs=1, freeze_observer_epochs=1)
    assert list(model.state_dict()) == names  # checkpoints and EMA read the model as before
    batches = [torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model.train()
    with torch.no_grad():
        for x in batches:  # the observers see the training batches
            model(x)
    assert qat.start_epoch(1) == ["BatchNorm statistics", "activation ranges"]
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = batches[0]
    with torch.no_grad():
        fake, want = model(x), reference(x)
    qat.remove()
    assert "forward" not in vars(model.features[0][0])
    quantization.quantize_onnx(model, batches, tmp_path / "m.onnx", SIZE, bias_correction=False)
    got = onnx_weights.OnnxFileModel(tmp_path / "m.onnx")(x)
    assert (got - fake).abs().max() < 0.25 * (got - want).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--out", "--json", "--export-pte"])
def test_an_output_that_cannot_be_written_is_refused_before_any_calibration(flag, weights, data, tmp_path):
    taken = tmp_path / "a folder.onnx"  # a folder where the file would go
    taken.mkdir()
    argv = {"--out": ["--out", taken], "--json": ["--out", tmp_path / "m.onnx", "--json", taken],
            "--export-pte": ["--out", tmp_path / "m.onnx", "--export-pte", taken]}[flag]
    code, err, printed = run_script(quantize, "--weights", weights["path"], "--data-dir", data, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{flag} {taken}" in err, err
    assert "calibrated" not in printed and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_a_missing_output_folder_is_made(weights, data, tmp_path):
    out = tmp_path / "not" / "there" / "model.int8.onnx"
    code, err, _ = run_script(quantize, "--weights", weights["path"], "--data-dir", data, "--out", out,
                              "--calibration-images", 16, "--no-speed", "--max-images", 10)
    assert code == 0, err
    assert out.stat().st_size > 0


def test_qat_trains_at_the_resolution_its_weights_were_trained_at_unless_told(weights, data):
    import train
    args = train.get_args_parser().parse_args(["--qat", str(weights["path"]), "--data-dir", str(data)])
    assert (args.input_size, args.val_resize_size) == (SIZE, RESIZE)
    args = train.get_args_parser().parse_args(["--qat", str(weights["path"]), "--data-dir", str(data),
                                               "--input-size", "64"])
    assert args.input_size == 64
