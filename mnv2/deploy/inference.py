"""Running a trained MobileNetV2 for inference on the CPU: BatchNorm folded into the convolutions, weights
pre-packed for oneDNN, onnxruntime's fused graph, torch.compile where it helps; each keeps the model's function.

    fast, channels_last, backend = inference.inference_model(model, "cpu")   # onnxruntime or packed oneDNN
"""
import copy
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from mnv2.checkpoint import unwrap
from mnv2.deploy.export import InferenceError, export_onnx, parity_input


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    At inference a BatchNorm is a fixed per-channel affine map, so conv+BN is one conv with scaled
    weights and a bias: one pass over the activations instead of two, identical outputs up to rounding.
    Works on the Sequential units MobileNetV2 (and torchvision's) are built from. Returns the count.
    """
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
                    and bn.track_running_stats and bn.running_mean is not None):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded



class PackedConv2d(nn.Module):
    """A CPU convolution whose weights are reordered once into oneDNN's blocked layout, with the
    following ReLU6 (if any) applied inside the convolution.

    Eager PyTorch hands oneDNN plain-layout weights on every call, to be reordered each time, and runs
    ReLU6 as a separate pass over the widest activations of each block (the 6x expansions); both costs
    go. Inference only: the packed weights are
    constants. CPU only.
    """

    def __init__(self, conv, relu6, input_shape):
        super().__init__()
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        padding, stride, dilation, groups = self.geometry
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), padding, stride, dilation, groups, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.attr, self.scalars = ("hardtanh", [0.0, 6.0]) if relu6 else ("none", [])

    def forward(self, x):
        padding, stride, dilation, groups = self.geometry
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight, self.bias, padding, stride,
                                                       dilation, groups, self.attr, self.scalars, "")


def pack_for_cpu(model, input_size=224, batch_size=32):
    """Replace the convolutions of a BatchNorm-folded, channels_last `model` by `PackedConv2d`, in place.

    Returns the number replaced: 0 (model untouched) where this PyTorch build lacks the oneDNN ops or
    the packed model does not reproduce the logits within 1e-5 (relative to their largest magnitude).
    """
    if not (hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()):
        return 0
    shapes = {}

    def record(conv, inputs, output):
        shapes[conv] = tuple(inputs[0].shape)  # returns None: a hook's return value replaces the output

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    example = parity_input(input_size, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(example)
    for h in hooks:
        h.remove()
    replaced = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Sequential):
                continue
            names = list(module._modules)
            for i, name in enumerate(names):
                conv = module._modules[name]
                if type(conv) is not nn.Conv2d or conv not in shapes or conv.padding_mode != "zeros":
                    continue
                # the next layer that computes something (a folded BatchNorm left an Identity)
                after = [n for n in names[i + 1:] if type(module._modules[n]) is not nn.Identity]
                relu6 = bool(after) and isinstance(module._modules[after[0]], nn.ReLU6)
                act_name = after[0] if relu6 else None
                replaced.append((module, name, conv, act_name, module._modules[act_name] if relu6 else None))
                module._modules[name] = PackedConv2d(conv, relu6, (batch_size,) + shapes[conv][1:])
                if relu6:
                    module._modules[act_name] = nn.Identity()
        with torch.inference_mode():
            diff = (model(example) - want).abs().max().item()
        # float32 rounding grows with the logits' magnitude; ImageNet logits are tens at most
        if not diff <= 1e-5 * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"packed convolutions change the logits by {diff:.2e}")
    except RuntimeError as e:  # an op missing or behaving differently in this build: stay unpacked
        for module, name, conv, act_name, act in reversed(replaced):
            module._modules[name] = conv
            if act_name is not None:
                module._modules[act_name] = act
        warnings.warn(f"oneDNN packed convolutions not used ({e})")
        return 0
    return len(replaced)


def prepare_for_inference(model, channels_last=True, device="cpu", pack=True, input_size=224, batch_size=32):
    """A copy of `model` made fast for inference on `device`; the original is untouched.

    BatchNorm folded into the convolutions, parameters frozen, channels_last memory layout (on CPU the
    depthwise and pointwise convolutions run much faster on NHWC data), and on CPU the convolutions
    packed for oneDNN with ReLU6 fused in (`pack_for_cpu`, unless pack=False: for autocast or
    torch.compile, which packs by itself; a packed copy stays on the CPU). Logits stay
    within 1e-4 of the plain model. Run it under `torch.inference_mode()`, as `evaluate` does.
    `input_size`/`batch_size` only tune the packed layout; any batch and size still work.
    """
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if pack and torch.device(device).type == "cpu":
            pack_for_cpu(model, input_size, batch_size)
    return model.to(device)


class OnnxRuntimeModel(nn.Module):
    """The model exported to ONNX and run by onnxruntime on the CPU: the fastest CPU path here.

    onnxruntime fuses each convolution with its folded BatchNorm and ReLU6 and runs them in its blocked
    layout, about twice the speed of the best eager PyTorch path on MobileNetV2 (bench/run_all.py).
    Takes and returns torch tensors, so `evaluate` runs it like any model.
    """

    def __init__(self, model, input_size=224, threads=None):
        super().__init__()
        import onnxruntime  # ImportError: the caller falls back to PyTorch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            self.max_abs_diff = export_onnx(model, path, input_size=input_size)
            if not self.max_abs_diff <= 1e-4:
                raise InferenceError(f"onnxruntime's logits differ by {self.max_abs_diff:.1e} from PyTorch's")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()  # the cores PyTorch would use
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, images):
        logits = self.session.run(None, {"images": images.float().contiguous().numpy()})[0]
        return torch.from_numpy(logits)



def inference_model(model, device, backend="auto", input_size=224, batch_size=32, log=print):
    """The fastest faithful way to run `model` for scoring: (model, wants channels_last input, backend).

    On the CPU, onnxruntime when it is installed and reproduces the logits within 1e-4 ("auto"), else
    PyTorch with `prepare_for_inference`; on CUDA always PyTorch.
    """
    if backend != "torch" and torch.device(device).type == "cpu":
        try:
            return OnnxRuntimeModel(model, input_size), False, "onnxruntime"
        except (ImportError, InferenceError) as e:
            if backend == "onnxruntime":
                raise InferenceError(f"--backend onnxruntime: {e}") from None
            log(f"note: scoring in PyTorch, onnxruntime not used ({e})")
    fast = prepare_for_inference(model, device=device, input_size=input_size, batch_size=batch_size)
    return fast, True, "torch"


def maybe_compile(model, example, log=print):
    """`model` compiled by torch.compile, or `model` itself when compiling fails here (on CPU inductor
    needs a C++ toolchain). `example` is a batch to compile with, so failures show up now, not mid-loop.

    Freezing turns the weights into constants, which lets inductor pre-pack them for oneDNN and fuse
    each ReLU6 into its convolution: the model must not be trained afterwards (use a copy from
    `prepare_for_inference`). The result is checked against the eager model on `example`.
    """
    try:
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
        with torch.inference_mode():
            got, want = compiled(example), model(example)
        diff = (got.float() - want.float()).abs().max().item()
        if not diff <= 1e-4:
            raise InferenceError(f"compiled model differs from eager by {diff:.2e}")
    except Exception as e:  # whatever the compiler raises, the evaluation goes on in eager mode
        log(f"torch.compile not used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "running eager")
        return model
    return compiled


# --------------------------------------------------------------------------------------------------
# Weight files: named public weights, checksums
