"""MobileNetV2 as in "Inverted Residuals and Linear Bottlenecks" (Sandler et al., arXiv 1801.04381),
and a loader for MobileNetV2 weight files of every public layout.

    model = load_model("pretrained/mobilenet_v2-b0353104.pth")   # any layout, ready for eval

Parameter names and shapes equal torchvision's ``mobilenet_v2`` for every width, so its weight files load
with ``strict=True``; the other public layouts (the seed repo, tonylins, d-li14, timm) are converted by
the explicit key mappings in ``LAYOUTS``.
"""
import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

# Paper, Table 2: each row is one stage of `n` inverted-residual blocks.
STAGES = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(value, divisor=8):
    """Round a channel count to the nearest multiple of `divisor`, never dropping more than 10%.

    The same rule as the reference TensorFlow implementation and torchvision, so widths like 0.35 give
    the published channel counts (and so the published weight files fit).
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class _ClampInPlace(torch.autograd.Function):
    """min(max(x, 0), 6) written over x; the backward pass reads the kept result."""

    @staticmethod
    def forward(ctx, x):
        x.clamp_(0, 6)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (result,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, result, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``nn.ReLU6(inplace=True)`` that is truly in place while training.

    Under autograd, PyTorch's in-place ``hardtanh_`` copies its input, clamps into a new tensor and copies
    the result back: three passes over a layer's activations where one does. Same numbers, same gradient;
    tracing, compiling and inference take the plain path.
    """

    def __init__(self):
        super().__init__(inplace=True)

    def forward(self, x):
        # is_compiling() first: torch.compile must not look at grad_fn (it would break the graph there)
        if (not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.is_grad_enabled()
                and x.grad_fn is not None):
            return _ClampInPlace.apply(x)
        return super().forward(x)


def global_average_pool(x):
    """Mean over height and width: (N, C, H, W) -> (N, C).

    For a channels_last x the mean runs over the (N, H*W, C) view of its memory, so the gradient flowing
    back is channels_last too (average pooling hands back a (N, C, H, W)-ordered one, which puts the last
    BatchNorm's backward on a slow mixed-layout path). Bit-identical to adaptive_avg_pool2d(x, 1).
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).flatten(1, 2).mean(1)
    return nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


class ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm, ReLU6: the non-linear unit of the paper (ReLU6 for low-precision robustness)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            ReLU6(),
        )


class InvertedResidual(nn.Module):
    """Bottleneck residual block (paper, Table 1): expand (1x1), depthwise (3x3), project (1x1, linear)."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        # The shortcut joins the thin bottlenecks, not the wide expansions (paper, Sec. 3.3).
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))  # expand
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            # project: a linear bottleneck. A ReLU here would destroy information in the
            # low-dimensional space (paper, Sec. 3.2), so there is none, and none after the add.
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)  # the name torchvision's weight files use

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width_mult=1.0, dropout=0.0, round_nearest=8):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        # Constructor arguments as plain data: saved with every checkpoint to rebuild the model without flags.
        self.config = {"num_classes": int(num_classes), "width_mult": float(width_mult),
                       "dropout": float(dropout), "round_nearest": int(round_nearest)}
        channels = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
        # The head is only widened, never thinned: thinning it hurts small models (paper, Sec. 6.1).
        self.last_channel = make_divisible(HEAD_CHANNELS * max(1.0, width_mult), round_nearest)

        features = [ConvBNReLU6(3, channels, stride=2)]
        for t, c, n, s in STAGES:
            out_channels = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                # Only the first block of a stage downsamples.
                features.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        features.append(ConvBNReLU6(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self):
        # torchvision's scheme, so a run started from scratch here matches one started there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        # Adaptive pooling lets any input of 32 px or more through (the paper's 96..224 px trade-off).
        x = global_average_pool(x)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------------
# Weight files


class WeightsError(ValueError):
    """A weight file that cannot be used; the message is one line naming the file and what to do."""


def read_weights(path):
    """Read a weight or checkpoint file as plain data, refusing anything that would run code.

    `torch.load(weights_only=True)` never unpickles arbitrary objects; there is no unsafe fallback.
    `argparse.Namespace` (which torchvision's reference scripts save as "args") is allowed: it only holds
    attributes.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file; check the path")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download or save?); "
                           "use another copy")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(f"{path}: refused, the file holds Python objects that could run code, not "
                               "plain weights; re-save it as a state_dict from a trusted source") from None
        raise WeightsError(f"{path}: not a readable weight file ({_first_line(e)}); "
                           "it is corrupt or truncated, use another copy") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: not a readable weight file ({_first_line(e)}); "
                           "it is corrupt or truncated, use another copy") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: holds a {type(data).__name__}, expected a dict of weights")
    if "sha256" in data and data["sha256"] != checkpoint_digest(data):
        raise WeightsError(f"{path}: contents differ from the checksum saved inside it (a damaged copy "
                           "or bit rot); use another checkpoint")
    return data


def checkpoint_digest(data):
    """sha256 over everything in a checkpoint dict except its own "sha256" entry.

    A zip checkpoint with a flipped bit inside a tensor still loads, silently different; this digest,
    saved inside the file by train.py, makes such damage an error instead.
    """
    digest = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {tensor.dtype} {tuple(obj.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            digest.update(f"dict {len(obj)};".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"{type(obj).__name__} {len(obj)};".encode())
            for value in obj:
                feed(value)
        else:
            digest.update(f"{type(obj).__name__} {obj!r};".encode())

    feed({key: value for key, value in data.items() if key != "sha256"})
    return digest.hexdigest()


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# Each public layout is an explicit mapping from its block names to torchvision's. The older layouts
# (the seed repo, tonylins, d-li14) keep a block's layers in one flat Sequential with the ReLU6s at
# indices 2 and 5; torchvision nests conv+BN+ReLU6 units.
_FLAT_EXPANDED = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}  # t != 1
_FLAT_UNEXPANDED = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}                         # t == 1 (block 1)
_TIMM_IR = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "conv_pwl": "2", "bn3": "3"}
_TIMM_DS = {"conv_dw": "0.0", "bn1": "0.1", "conv_pw": "1", "bn2": "2"}  # timm's first, unexpanded block
_NUM_BLOCKS = sum(n for _, _, n, _ in STAGES)
_HEAD = _NUM_BLOCKS + 1  # index of the final 1x1 conv in `features`


def _flat_block(index, rest):
    mapping = _FLAT_UNEXPANDED if index == 1 else _FLAT_EXPANDED
    layer, _, tensor = rest.partition(".")
    if layer not in mapping:
        return None
    return f"features.{index}.conv.{mapping[layer]}.{tensor}"


def _flat_layout(prefix, head):
    """The seed repo (prefix 'network') and tonylins ('features'): stem, 17 flat blocks, head, Linear."""
    def rename(key):
        m = re.fullmatch(rf"{prefix}\.(\d+)\.(.+)", key)
        if m:
            index, rest = int(m.group(1)), m.group(2)
            if index == 0 or (head and index == _HEAD):
                return f"features.{index}.{rest}"
            if 1 <= index <= _NUM_BLOCKS and rest.startswith("conv."):
                return _flat_block(index, rest[len("conv."):])
            return None
        return _classifier(key)
    return rename


def _classifier(key):
    m = re.fullmatch(r"classifier\.(?:1\.)?(weight|bias)", key)
    return f"classifier.1.{m.group(1)}" if m else None


def _dli14(key):
    """d-li14/mobilenetv2.pytorch: like tonylins for the stem and blocks, head as top-level `conv`."""
    m = re.fullmatch(r"conv\.([01])\.(.+)", key)
    if m:
        return f"features.{_HEAD}.{m.group(1)}.{m.group(2)}"
    return _flat_layout("features", head=False)(key)


def _timm(key):
    """timm `mobilenetv2_*`: conv_stem/bn1, blocks.<stage>.<block>.*, conv_head/bn2, classifier."""
    m = re.fullmatch(r"(conv_stem|bn1|conv_head|bn2)\.(.+)", key)
    if m:
        unit = {"conv_stem": "0.0", "bn1": "0.1", "conv_head": f"{_HEAD}.0", "bn2": f"{_HEAD}.1"}[m.group(1)]
        return f"features.{unit}.{m.group(2)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key)
    if m:
        stage, block, layer, tensor = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if stage >= len(STAGES) or block >= STAGES[stage][2]:
            return None
        index = 1 + sum(n for _, _, n, _ in STAGES[:stage]) + block
        mapping = _TIMM_DS if index == 1 else _TIMM_IR
        return f"features.{index}.conv.{mapping[layer]}.{tensor}" if layer in mapping else None
    m = re.fullmatch(r"classifier\.(weight|bias)", key)
    return f"classifier.1.{m.group(1)}" if m else None


def _torchvision(key):
    return key


# name -> (a key that only this layout has, the renaming function)
LAYOUTS = {
    "torchvision": ("features.1.conv.0.0.weight", _torchvision),
    "seed": ("network.0.0.weight", _flat_layout("network", head=True)),
    "tonylins": (f"features.{_HEAD}.0.weight", _flat_layout("features", head=True)),
    "d-li14": ("conv.0.weight", _dli14),
    "timm": ("conv_stem.weight", _timm),
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile


def strip_prefixes(state_dict):
    """Drop `module.` and `_orig_mod.` however they are nested."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def to_torchvision_keys(state_dict):
    """Rename a MobileNetV2 state_dict of any public layout to torchvision's names: (state_dict, layout)."""
    state_dict = strip_prefixes(state_dict)
    for name, (marker, rename) in LAYOUTS.items():
        if marker not in state_dict:
            continue
        out, unknown = {}, []
        for key, value in state_dict.items():
            new = rename(key)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
        if unknown:
            raise WeightsError(f"keys that do not fit the {name} MobileNetV2 layout: {_some(unknown)}")
        return out, name
    raise WeightsError(f"not a MobileNetV2 weight layout this repo knows ({', '.join(LAYOUTS)}); "
                       f"first keys: {_some(list(state_dict))}")


def _some(keys, count=4):
    return ", ".join(keys[:count]) + (f" (+{len(keys) - count} more)" if len(keys) > count else "")


_WIDTHS = sorted({0.35, 0.5, 0.75, 1.0, 1.3, 1.4} | {round(0.05 * i, 2) for i in range(2, 41)})


def infer_config(state_dict):
    """(num_classes, width_mult) of a torchvision-named state_dict, from its tensor shapes."""
    try:
        num_classes = state_dict["classifier.1.weight"].shape[0]
        stem = state_dict["features.0.0.weight"].shape[0]
        last = state_dict[f"features.{_NUM_BLOCKS}.conv.2.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"missing tensor {e.args[0]}: not a complete MobileNetV2 state_dict") from None
    for width in _WIDTHS:
        if make_divisible(STEM_CHANNELS * width) == stem and make_divisible(STAGES[-1][1] * width) == last:
            return num_classes, width
    raise WeightsError(f"no width multiplier gives {stem} stem and {last} last-block channels")


def _model_state(data, use_ema):
    """The weights inside whatever dict a file holds: a repo checkpoint, a training checkpoint of
    another project (`state_dict`/`model` entries), or a bare state_dict."""
    if data.get("format") == "mobilenetv2-checkpoint":
        if use_ema:
            if data.get("model_ema") is None:
                raise WeightsError("this checkpoint has no EMA weights (trained without --model-ema)")
            return data["model_ema"], data.get("model_config")
        return data["model"], data.get("model_config")
    ema_keys = ("state_dict_ema", "model_ema") if use_ema else ()
    for key in ema_keys + ("state_dict", "model", "net"):
        if isinstance(data.get(key), dict):
            return data[key], None
    if use_ema:
        raise WeightsError("no EMA weights in this file")
    return data, None


def checkpoint_meta(data):
    """Class order and preprocessing saved in a repo checkpoint; {} for bare weight files."""
    if data.get("format") != "mobilenetv2-checkpoint":
        return {}
    return {key: data[key] for key in ("classes", "data", "model_config", "epoch") if key in data}


def load_model(source, num_classes=None, width_mult=None, dropout=0.0, use_ema=False):
    """Build a MobileNetV2 from a weight file (path) or from the dict `read_weights` returned.

    The layout, width and number of classes come from the file; `num_classes`/`width_mult`, when given,
    must agree with it. Returns the model on the CPU in eval mode.
    """
    name = str(source) if isinstance(source, (str, Path)) else "weights"
    data = read_weights(source) if isinstance(source, (str, Path)) else source
    try:
        state, config = _model_state(data, use_ema)
        state, _ = to_torchvision_keys(state)
        file_classes, file_width = infer_config(state)
        if num_classes is not None and num_classes != file_classes:
            raise WeightsError(f"classifier.1.weight has {file_classes} classes, but {num_classes} were "
                               "asked for; drop the flag or use weights for that many classes")
        config = dict(config or {"num_classes": file_classes, "width_mult": file_width, "dropout": dropout})
        if width_mult is not None:
            config["width_mult"] = width_mult
        model = MobileNetV2(**config)
        try:
            _load_strict(model, state)
        except WeightsError:
            if width_mult is not None and width_mult != file_width:
                raise WeightsError(f"the file holds a width {file_width:g} model, not width {width_mult:g}; "
                                   "drop --width-mult or pass the matching one") from None
            raise
    except WeightsError as e:
        raise WeightsError(f"{name}: {e}") from None
    return model.eval()


def _load_strict(model, state):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError("keys that do not fit: " + "; ".join(
            part for part in (missing and f"missing {_some(missing)}",
                              unexpected and f"unexpected {_some(unexpected)}") if part))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"shapes that do not fit: {_some(wrong, 2)}")
    model.load_state_dict(state, strict=True)
