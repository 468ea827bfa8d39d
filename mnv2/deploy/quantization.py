"""INT8 MobileNetV2: post-training static quantization into ONNX Runtime's QDQ format, checked and measured.

    report = quantization.quantize_onnx(model, calibration, "model.int8.onnx", input_size=224, metadata=meta)

`calibration` is a re-iterable of normalised float batches (a few hundred training images). The recipe,
each step to be checked on given weights with bench/bench_int8.py (README, "INT8 for CPUs and phones"):
  1. BatchNorm folded into the convolutions (a QDQ graph has no BatchNorm kernel; folding first also
     quantizes the weights that actually run);
  2. empirical bias correction: rounding the weights to int8 shifts each output channel's mean by
     (Q(W) - W) E[x]; that shift, measured on the calibration images, is taken out of the bias;
  3. ONNX Runtime's quantizer: weights int8, symmetric, one scale per output channel (a depthwise
     filter's range differs by orders of magnitude from its neighbours'); activations uint8 with one
     scale per tensor, calibrated (`CALIBRATION_METHODS`) on the calibration images, streamed one batch
     at a time so memory does not grow with their number. uint8 activations with int8 weights is the
     pairing x86 CPUs run fastest (VNNI's u8 x s8 dot product); ReLU6 disappears into the range of the
     convolution's uint8 output.
"""
import contextlib
import copy
import io
import logging
import random
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnv2.checkpoint import unwrap
from mnv2.cli import ScriptError
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader
from mnv2.data.transforms import eval_transform, normalize
from mnv2.deploy import export, inference
from mnv2.outputs import atomic_write

# name -> (onnxruntime CalibrationMethod name, extra calibrator options)
CALIBRATION_METHODS = {
    "minmax": ("MinMax", {}),
    "entropy": ("Entropy", {}),
    "percentile": ("Percentile", {"CalibPercentile": 99.999}),
}
WEIGHT_QMAX = 127  # ONNX Runtime's symmetric int8 weights use [-127, 127]


class QuantizationError(ScriptError, RuntimeError):
    """Quantization that cannot run or gives a model not fit to deploy (exit code 1)."""


def _onnxruntime_quantization():
    try:
        from onnxruntime import quantization
    except ImportError:
        raise QuantizationError("INT8 quantization needs onnxruntime: pip install onnxruntime") from None
    return quantization


# --------------------------------------------------------------------------------------------------
# Weight rounding and bias correction


def quantize_weight(weight):
    """`weight` rounded as ONNX Runtime's per-channel QDQ quantizer rounds it: one symmetric scale
    max|w| / 127 per output channel, round half to even, clamp to [-127, 127]; back in float."""
    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1) / WEIGHT_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
    return (q * scale[:, None]).reshape(weight.shape)


def correct_bias(model, batches):
    """Empirical bias correction of every convolution and linear layer of a BatchNorm-folded model, in place.

    For each layer the mean, per output channel, of (Q(W) - W) * x over the calibration activations x is
    the systematic shift that rounding its weights adds to that channel; it is subtracted from the bias.
    Inputs are the float model's activations (Nagel et al. 2019, "Data-Free Quantization", Sec. 4.2, in its
    empirical form). Returns the number of layers corrected.
    """
    layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    sums, counts = {}, {}

    def record(layer, inputs, output):
        x = inputs[0]
        error = quantize_weight(layer.weight) - layer.weight
        if isinstance(layer, nn.Conv2d):
            shift = F.conv2d(x, error, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            total, n = shift.sum(dim=(0, 2, 3)), shift.shape[0] * shift.shape[2] * shift.shape[3]
        else:
            shift = F.linear(x, error)
            total, n = shift.sum(dim=0), shift.shape[0]
        sums[layer] = sums.get(layer, 0) + total.double()
        counts[layer] = counts.get(layer, 0) + n

    hooks = [layer.register_forward_hook(record) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    with torch.no_grad():
        for layer in layers:
            if layer not in counts:
                continue
            shift = (sums[layer] / counts[layer]).to(layer.weight.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
            layer.bias -= shift
    return len(counts)


# --------------------------------------------------------------------------------------------------
# Calibration and the QDQ file


def _quiet_onnxruntime():
    """onnxruntime's quantizer logs advice through the root logger and warns about every unused
    constant; neither helps a user of this script."""
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def calibrate(onnx_path, batches, method="minmax", workdir=None):
    """Activation ranges of the float ONNX model at `onnx_path` over `batches` (float tensors), fed one
    batch at a time, so memory does not grow with their number. Returns onnxruntime's TensorsData."""
    q = _onnxruntime_quantization()
    name, extra = CALIBRATION_METHODS[method]

    class OneBatch(q.CalibrationDataReader):
        def __init__(self, x):
            self.items = [{"images": x.detach().float().contiguous().numpy()}]

        def get_next(self):
            return self.items.pop() if self.items else None

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        calibrator = q.create_calibrator(Path(onnx_path), None,
                                         augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                         calibrate_method=getattr(q.CalibrationMethod, name),
                                         extra_options=dict(extra))
        seen = 0
        for x in batches:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                calibrator.collect_data(OneBatch(x))
            seen += len(x)
        if not seen:
            raise QuantizationError("no calibration images")
        with contextlib.redirect_stdout(io.StringIO()):
            ranges = calibrator.compute_data()
        del calibrator
    return ranges


def quantize_onnx(model, calibration, path, input_size=224, method="minmax", bias_correction=True,
                  metadata=None, opset=None, log=print):
    """Write `model` as an INT8 QDQ ONNX file at `path` (atomically), calibrated on `calibration`.

    Returns {"path", "bytes", "float_bytes", "max_abs_diff" (float export vs PyTorch), "method",
    "bias_correction", "corrected_layers", "calibration_images"}. `metadata` (a dict) is embedded as
    `inference.write_metadata` does, so evaluate.py reads the file without flags.
    """
    q = _onnxruntime_quantization()
    _quiet_onnxruntime()
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
    deploy = copy.deepcopy(unwrap(model)).cpu().eval()
    inference.fold_batchnorm(deploy)
    corrected = correct_bias(deploy, calibration) if bias_correction else 0
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as tmp:
        tmp = Path(tmp)
        float_path = tmp / "float.onnx"
        # the float graph must compute the folded model (the corrected biases differ on purpose)
        diff = export.export_onnx(deploy, float_path, input_size=input_size, opset=opset)
        if diff is not None and not diff <= 1e-4:
            raise QuantizationError(f"the float ONNX graph differs from PyTorch by {diff:.1e}")
        ranges = calibrate(float_path, calibration, method, workdir=tmp)
        cache = tmp / "ranges.json"
        q.calibrate.save_tensors_data(ranges, cache)
        int8_path = tmp / "int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_static(str(float_path), str(int8_path), None, quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8,
                              calibrate_method=getattr(q.CalibrationMethod, CALIBRATION_METHODS[method][0]),
                              calibration_cache_path=str(cache),
                              extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})
        data = int8_path.read_bytes()
        if metadata is not None:
            data = export.with_metadata(data, metadata)
        float_bytes = float_path.stat().st_size
    atomic_write(path, data)
    return {"path": str(path), "bytes": len(data), "float_bytes": float_bytes, "max_abs_diff": diff,
            "method": method, "bias_correction": bool(bias_correction), "corrected_layers": corrected}


# --------------------------------------------------------------------------------------------------
# INT8 for ExecuTorch (phones)


def quantize_pt2e(model, calibration, input_size=224, bias_correction=True):
    """`model` quantized for ExecuTorch's XNNPACK delegate by PyTorch 2 export quantization: the same
    recipe as `quantize_onnx` (BatchNorm folded, bias correction, int8 weights symmetric per output
    channel in [-127, 127]), with XNNPACK's signed int8 activations, calibrated on `calibration`. Returns
    the converted torch.fx.GraphModule: the PyTorch reference that `export.export_pte` lowers and checks."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise QuantizationError("an INT8 ExecuTorch program needs the executorch package (about 130 MB, with "
                                "torchao; its release must match this torch): pip install executorch") from None
    deploy = copy.deepcopy(unwrap(model)).cpu().eval()
    inference.fold_batchnorm(deploy)
    for p in deploy.parameters():
        p.requires_grad_(False)
    if bias_correction:
        correct_bias(deploy, calibration)
    example = export.parity_input(input_size, 2)
    with torch.no_grad():
        graph = torch.export.export(deploy, (example,),
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},)).module()
        # The classifier too: keeping it float (ExecuTorch cannot leave only its output float) gave the same
        # top-1 agreement with the float model on the demo weights but a 2.8x larger file.
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(graph, quantizer)
        seen = 0
        for x in calibration:
            prepared(x)
            seen += len(x)
        if not seen:
            raise QuantizationError("no calibration images")
        return convert_pt2e(prepared)


# --------------------------------------------------------------------------------------------------
# Calibration images


class CalibrationImages:
    """The calibration images as normalised float batches, decoded afresh on each pass (a re-iterable, so
    memory does not grow with their number). Images that do not decode are left out and counted."""

    def __init__(self, samples, transform, pre, batch_size, num_workers):
        self.dataset = ImageNetDataset(samples, transform, train=False)
        self.pre, self.batch_size, self.num_workers = pre, batch_size, num_workers
        self.used = self.failed = 0

    def __iter__(self):
        loader = build_loader(self.dataset, self.batch_size, EvalSampler(len(self.dataset)),
                              num_workers=self.num_workers)
        used = failed = 0
        for images, _, _, n_failed in loader:
            ok = n_failed == 0
            failed += int((~ok).sum())
            used += int(ok.sum())
            if ok.any():
                yield normalize(images[ok], self.pre["mean"], self.pre["std"])
        self.used, self.failed = used, failed


def calibration_draw(samples, n, seed=0):
    """`n` of `samples` drawn at random with `seed` (all of them when there are fewer)."""
    pool = list(samples)
    random.Random(seed).shuffle(pool)
    return pool[:n]


# --------------------------------------------------------------------------------------------------
# Quantization-aware fine-tuning (train.py --qat)


def _rounded_with_straight_through_gradient(weight):
    """`quantize_weight(weight)` forward; the identity backward (the straight-through estimator)."""
    return weight + (quantize_weight(weight) - weight).detach()


def _torchao_fake_quantization():
    """torchao's PT2E FakeQuantize and MovingAverageMinMaxObserver (torch's own quantization package, where they
    lived before, is deprecated), imported without the note torch logs while torchao registers its types."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level, pytree_log.level = pytree_log.level, logging.ERROR
    try:
        from torchao.quantization.pt2e import FakeQuantize, MovingAverageMinMaxObserver
    except ImportError:
        raise QuantizationError("quantization-aware training needs torchao (pip install -r requirements.txt "
                                "installs the tested release)") from None
    finally:
        pytree_log.level = level
    return FakeQuantize, MovingAverageMinMaxObserver


class QuantizationAwareTraining:
    """Fake quantization of a MobileNetV2 in training, as the INT8 file will compute it, in place.

    Each convolution followed by a BatchNorm sees its weights as the deployed file holds them: folded
    with the BatchNorm's running statistics, then rounded per output channel (`quantize_weight`), and
    unfolded again, so the BatchNorm that follows still normalises by its batch statistics (Jacob et al.
    2018, Sec. 3.2; torchvision's ConvBn2d). The classifier's weights are rounded the same way. The
    activations the file keeps in uint8 (the image, every convolution unit's output, every block's
    output, the pooled features) pass through fake quantizers with moving-average min/max observers.
    After `freeze_bn_epochs` epochs the BatchNorms use their running statistics (then training computes
    exactly the folded convolution of the file), after `freeze_observer_epochs` the activation ranges
    stop moving: torchvision's recipe (3 and 4 epochs at lr 1e-4).

    Parameter and buffer names do not change (no module is replaced: forwards and hooks are set on the
    instances), so checkpoints, EMA and evaluation read the model as before. `remove()` undoes it all.
    """

    def __init__(self, model, freeze_bn_epochs=3, freeze_observer_epochs=4):
        FakeQuantize, MovingAverageMinMaxObserver = _torchao_fake_quantization()
        self.model, self.freeze_bn_epochs, self.freeze_observer_epochs = model, freeze_bn_epochs, freeze_observer_epochs
        self.quantizers, self.handles, self.patched = [], [], []
        self.observing = True

        def fake_quantizer():
            fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                              qscheme=torch.per_tensor_affine)
            self.quantizers.append(fq)
            return fq

        def quantize_output(fq):
            return lambda module, inputs, output: self._fake_quantize(fq, output)

        first = fake_quantizer()
        self.handles.append(model.register_forward_pre_hook(
            lambda module, inputs: (self._fake_quantize(first, inputs[0]),) + inputs[1:]))
        self.batchnorms = []
        for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            children = list(sequential.children())
            for i, (conv, bn) in enumerate(zip(children, children[1:])):
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    self._fold_and_round(conv, bn)
                    self.batchnorms.append(bn)
                    # the unit's output: after its ReLU6 when it has one (the file fuses it), else after the BatchNorm
                    after = children[i + 2] if i + 2 < len(children) and "ReLU" in type(children[i + 2]).__name__ else bn
                    self.handles.append(after.register_forward_hook(quantize_output(fake_quantizer())))
        for module in model.modules():
            if type(module).__name__ == "InvertedResidual" and getattr(module, "use_residual", False):
                self.handles.append(module.register_forward_hook(quantize_output(fake_quantizer())))
            if type(module) is nn.Linear:
                self._round(module)
                pooled = fake_quantizer()
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, inputs, fq=pooled: (self._fake_quantize(fq, inputs[0]),)))

    def _fake_quantize(self, fq, x):
        # ranges follow the training batches only: validation images must not move them
        if fq.scale.device != x.device:  # the quantizers are not the model's modules: they follow it here
            fq.to(x.device)
        if self.observing and self.model.training:
            fq.enable_observer()
        else:
            fq.disable_observer()
        return fq(x)

    def _fold_and_round(self, conv, bn):
        def forward(x):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            scale = torch.where(scale.abs() > 1e-12, scale, torch.full_like(scale, 1e-12))  # a zeroed channel
            weight = _rounded_with_straight_through_gradient(conv.weight * scale.reshape(-1, 1, 1, 1))
            y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            y = y / scale.reshape(1, -1, 1, 1)
            return y if conv.bias is None else y + conv.bias.reshape(1, -1, 1, 1)
        conv.forward = forward
        self.patched.append((conv, "forward"))

    def _round(self, linear):
        linear.forward = lambda x: F.linear(x, _rounded_with_straight_through_gradient(linear.weight), linear.bias)
        self.patched.append((linear, "forward"))

    def start_epoch(self, epochs_done):
        """Freeze what the recipe freezes once `epochs_done` QAT epochs are behind; returns what is frozen."""
        frozen = []
        if epochs_done >= self.freeze_bn_epochs:
            for bn in self.batchnorms:
                if "train" not in vars(bn):
                    bn.train = lambda mode=True, bn=bn: nn.Module.train(bn, False)
                    self.patched.append((bn, "train"))
                bn.eval()
            frozen.append("BatchNorm statistics")
        if epochs_done >= self.freeze_observer_epochs:
            self.observing = False
            frozen.append("activation ranges")
        return frozen

    def export(self, path, samples, preprocessing, classes, calibration_images=512, batch_size=32, num_workers=0,
               seed=0):
        """Undo the fake quantization (`remove`) and write the trained model as the INT8 QDQ file
        (`quantize_onnx`): the same folding and weight rounding as in training, so the file's weights are
        those training saw; activation ranges set (minmax) on `calibration_images` of `samples` read with
        the validation `preprocessing`; no bias correction (training has absorbed the rounding). The file
        carries `classes` ({"order", "wnids", "names"}) and the preprocessing as quantize.py's does, with the
        images a --val-split run held out.
        Returns quantize_onnx's report."""
        self.remove()
        pre = {key: preprocessing[key] for key in ("resize", "input_size", "interpolation", "mean", "std")}
        drawn = calibration_draw(samples, calibration_images, seed)
        calibration = CalibrationImages(drawn, eval_transform(pre["input_size"], pre["resize"], pre["interpolation"]),
                                        pre, batch_size, num_workers)
        recipe = {"calibration_method": "minmax", "bias_correction": False, "calibration_images": len(drawn),
                  "calibration_seed": seed, "weights": "int8, symmetric, one scale per output channel",
                  "quantization_aware_training": {"freeze_bn_epochs": self.freeze_bn_epochs,
                                                  "freeze_observer_epochs": self.freeze_observer_epochs},
                  "activations": "uint8, one scale per tensor"}
        # the images a --val-split run held out travel with the file, so it is scored on them alone
        deployed = dict(pre, val_split=preprocessing["val_split"]) if preprocessing.get("val_split") else pre
        metadata = export.deployment_metadata(classes, deployed, dict(self.model.config), int8=recipe)
        model = copy.deepcopy(unwrap(self.model)).cpu().float().eval()
        return quantize_onnx(model, calibration, path, pre["input_size"], "minmax", bias_correction=False,
                             metadata=metadata)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        for module, name in self.patched:
            vars(module).pop(name, None)
        self.handles, self.patched = [], []
