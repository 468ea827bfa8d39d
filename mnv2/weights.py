"""Weight files of every public MobileNetV2 layout, and the public files this repo knows by checksum.

    model = weights.load_model("pretrained/mobilenet_v2-b0353104.pth")   # any layout, ready for eval
    path = weights.fetch_public_weights("torchvision-v2")                 # into pretrained/, verified

Parameter names of `MobileNetV2` equal torchvision's, so its files load with `strict=True`; the other
public layouts (the seed repo, tonylins, d-li14, timm) are converted by the explicit key mappings in
`LAYOUTS`. `KNOWN_WEIGHTS` recognises published files by sha256 and carries their preprocessing.
"""
import hashlib
import re
from pathlib import Path

import torch

from mnv2 import checkpoint
from mnv2.checkpoint import WeightsError
from MobileNetV2 import STAGES, STEM_CHANNELS, MobileNetV2, make_divisible

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


# Public weight files, recognised by sha256. Sources, published figures and how each was measured are in
# pretrained/README.md; tests check the torchvision entries against torchvision's own weights API.
KNOWN_WEIGHTS = {
    "torchvision-v1": {
        "file": "mobilenet_v2-b0353104.pth",
        "url": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        "sha256": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "torchvision": "IMAGENET1K_V1",
        "published": {"top1": 71.878, "top5": 90.286},
        "preprocessing": {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "class_order": "sorted",
    },
    "torchvision-v2": {
        "file": "mobilenet_v2-7ebf99e0.pth",
        "url": "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        "sha256": "7ebf99e03e254b273379b23edca7ec0da9f48273b23a332b93c1c99d49e86e8f",
        "torchvision": "IMAGENET1K_V2",
        "published": {"top1": 72.154, "top5": 90.822},
        # The V2 recipe was tuned with a 232 px resize before the 224 px crop.
        "preprocessing": {"resize": 232, "input_size": 224, "interpolation": "bilinear",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "class_order": "sorted",
    },
    "tonylins": {
        "file": "mobilenetv2.pth.tar",
        "url": "https://drive.google.com/open?id=1jlto6HRVD3ipNkAl1lNhDbkBp7HylaqR",
        "sha256": "ecbe2b568c8602549fa9e1d5833c63848f490a48d92e5d224d1eb2063e152cf8",
        "torchvision": None,
        "published": {"top1": 71.8, "top5": None},
        "preprocessing": {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "class_order": "sorted",
    },
}
DOWNLOADABLE = ("torchvision-v1", "torchvision-v2")


def sha256_of(path):
    """sha256 of a file's bytes; of a Hub folder, of its model.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / checkpoint.HUB_WEIGHTS
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def known_weights(sha256):
    """(name, entry) of the public file with this sha256, or (None, None)."""
    for name, entry in KNOWN_WEIGHTS.items():
        if entry["sha256"] == sha256:
            return name, entry
    return None, None


def fetch_public_weights(name, directory=PRETRAINED_DIR, log=print):
    """Path of torchvision's `name` weights in `directory`, downloaded (and checksum-verified) if missing.

    The URL comes from torchvision's weights API; the download goes through torch.hub and is checked
    against the full sha256, so a corrupt or substituted file is never used. Offline, the error says
    where to get the file and where to put it.
    """
    entry = KNOWN_WEIGHTS[name]
    directory = Path(directory)
    path = directory / entry["file"]
    url = _torchvision_url(entry) or entry["url"]
    if path.is_file():
        if sha256_of(path) != entry["sha256"]:
            raise WeightsError(f"{path}: not the published {name} file (sha256 differs); delete it to "
                               f"download again from {url}")
        return path
    log(f"downloading {name} weights from {url} to {path}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=entry["sha256"], progress=False)
    except RuntimeError as e:  # torch.hub's checksum mismatch; it already removed the partial file
        raise WeightsError(f"{url}: downloaded file failed its sha256 check ({str(e).splitlines()[0]}); "
                           f"download it by hand and put it at {path}") from None
    except Exception as e:  # offline: URLError, socket errors, proxies; all end the same way
        reason = (str(getattr(e, "reason", e)).splitlines() or [""])[0][:120]
        raise WeightsError(f"cannot download {name} weights from {url} ({type(e).__name__}: {reason}); "
                           f"download the file by hand and put it at {path}") from None
    return path


def _torchvision_url(entry):
    if not entry.get("torchvision"):
        return None
    try:
        from torchvision.models import MobileNet_V2_Weights
        return getattr(MobileNet_V2_Weights, entry["torchvision"]).url
    except (ImportError, AttributeError):
        return None


def torchvision_categories():
    """torchvision's 1000 ImageNet class names, in sorted-WNID order; None when torchvision is absent."""
    try:
        from torchvision.models import MobileNet_V2_Weights
        return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    except (ImportError, AttributeError, KeyError):
        return None


# --------------------------------------------------------------------------------------------------
# Export



# --------------------------------------------------------------------------------------------------
# Layouts


# Each public layout is an explicit mapping from its block names to torchvision's. The older layouts
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
    if not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError("holds no weight tensors; use a MobileNetV2 weight file")
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
    if checkpoint.is_checkpoint(data):
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


def load_model(source, num_classes=None, width_mult=None, dropout=0.0, use_ema=False):
    """Build a MobileNetV2 from a weight file (path) or from the dict `read_weights` returned.

    The layout, width and number of classes come from the file; `num_classes`/`width_mult`, when given,
    must agree with it. Returns the model on the CPU in eval mode.
    """
    name = str(source) if isinstance(source, (str, Path)) else None
    data = checkpoint.read_weights(source) if isinstance(source, (str, Path)) else source
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
            load_strict(model, state)
        except WeightsError:
            if width_mult is not None and width_mult != file_width:
                raise WeightsError(f"the file holds a width {file_width:g} model, not width {width_mult:g}; "
                                   "drop --width-mult or pass the matching one") from None
            raise
    except WeightsError as e:
        raise WeightsError(f"{name}: {e}" if name else str(e)) from None
    return model.eval()


def batchnorm_folded(source):
    """Whether a weight file's BatchNorm was folded into its convolutions, as converters from TFLite and other
    frameworks leave it: every running mean 0 and every running variance 1 (or 1 - eps). Such weights are
    exact in eval mode, but a BatchNorm that trains normalises by batch statistics those weights never saw."""
    data = checkpoint.read_weights(source) if isinstance(source, (str, Path)) else source
    state, _ = to_torchvision_keys(_model_state(data, False)[0])
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    return bool(means) and all(bool((m == 0).all()) for m in means) and \
        all(bool(((v - 1).abs() <= 1e-3).all()) for v in variances)


def file_config(source):
    """(num_classes, width_mult) of the MobileNetV2 in a weight file (path or the dict `read_weights` returned)."""
    data = checkpoint.read_weights(source) if isinstance(source, (str, Path)) else source
    state, _ = to_torchvision_keys(_model_state(data, False)[0])
    return infer_config(state)


def load_matching(model, source, skip=()):
    """Load every tensor of a weight file (path, or the dict `read_weights` returned; any layout) whose name
    and shape fit `model`, except names starting with one of `skip`; the rest of the model keeps its
    initialisation. Returns (loaded, initialised, unused): the model's keys taken from the file, the model's
    keys left as they were, the file's keys that were not used. A backbone that mostly does not fit (another
    width) is a WeightsError."""
    name = str(source) if isinstance(source, (str, Path)) else "weights"
    data = checkpoint.read_weights(source) if isinstance(source, (str, Path)) else source
    try:
        state, _ = _model_state(data, False)
        state, _ = to_torchvision_keys(state)
    except WeightsError as e:
        raise WeightsError(f"{name}: {e}") from None
    own = model.state_dict()
    fits = {k: v for k, v in state.items()
            if k in own and tuple(v.shape) == tuple(own[k].shape) and not k.startswith(tuple(skip))}
    backbone = [k for k in own if not k.startswith("classifier.")]
    if sum(k in fits for k in backbone) < len(backbone) / 2:  # a few 1280-channel head tensors fit any width
        _, width = infer_config(state)
        raise WeightsError(f"{name}: most of its backbone tensors do not fit this model (the file holds a width "
                           f"{width:g} MobileNetV2); pass --width-mult {width:g}")
    model.load_state_dict(fits, strict=False)
    return list(fits), [k for k in own if k not in fits], [k for k in state if k not in fits]


def load_strict(model, state, source=None):
    """The one strict loader: every tensor of `model` from `state`, names and shapes exactly as the model has
    them, or a WeightsError that names `source`, the first offending tensors and the flag to change."""
    prefix = f"{source}: " if source else ""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(prefix + "keys that do not fit: " + "; ".join(
            part for part in (missing and f"missing {_some(missing)}",
                              unexpected and f"unexpected {_some(unexpected)}") if part))
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if not wrong:
        broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                      None)
        if broken is not None:
            raise WeightsError(prefix + f"{broken} holds NaN or infinite values (the weights of a run that "
                                        "diverged); use an earlier checkpoint")
    if wrong:
        hint = "--num-classes" if wrong[0].startswith("classifier") else "--width-mult"
        raise WeightsError(prefix + "shapes that do not fit: " + _some(
            [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong], 2) + f"; check {hint}")
    model.load_state_dict(state, strict=True)
