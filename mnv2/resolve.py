"""From what the user named to a model, its preprocessing and its class order: the one resolve step behind
evaluate.py, quantize.py, fine-tuning (--pretrained), QAT (--qat) and every other reader of weights.

    resolved = resolve.weights("torchvision-v2", flag="--weights")        # or a path, or an ONNX file
    resolved.model, resolved.preprocessing, resolved.class_order

A name of a public file is fetched into pretrained/ (with the offline message); a file is recognised by its
sha256 among the public ones; the model is built strictly from the file (any public layout); preprocessing
comes, lowest first, from torchvision's defaults < the published one of a recognised file < the one saved
with the weights < the overrides the caller passes (the user's flags); the class order from the weights'
own record, else the caller's choice, else the published one, else sorted WNIDs.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mnv2 import checkpoint
from mnv2.cli import UsageError
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from mnv2.deploy import onnx_weights
from mnv2.weights import (DOWNLOADABLE, KNOWN_WEIGHTS, PRETRAINED_DIR, WeightsError, fetch_public_weights, file_config,
                          known_weights, load_model, sha256_of)

# torchvision's evaluation preprocessing, the default for files that do not say otherwise.
DEFAULT_PREPROCESSING = {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@dataclass(frozen=True)
class Resolved:
    """A weights file made ready to use, and what it says of itself."""
    path: Path
    sha256: str
    model: nn.Module = None      # on the CPU in eval mode; an onnx_weights.OnnxFileModel for an ONNX file;
                                 # None when resolved with strict=False
    config: tuple = ()           # (num_classes, width_mult) the file holds
    data: dict = None            # the file's contents as read (strict=False: for loaders of what fits)
    known: str = None            # the public file's name, when recognised by sha256
    entry: dict = None           # its weights.KNOWN_WEIGHTS entry
    meta: dict = None            # what a repo checkpoint (or a deployed ONNX file) records of itself
    preprocessing: dict = None   # resize, input_size, interpolation, mean, std
    preprocessing_source: str = ""
    class_order: str = "sorted"


def weights(name, *, flag="--weights", pretrained_dir=PRETRAINED_DIR, num_classes=None, width_mult=None,
            use_ema=False, preprocessing=None, class_order=None, allow_onnx=True, strict=True, log=print):
    """Resolve `name` (a public file's name, a path to weights of any layout, or an ONNX file) into a
    `Resolved`. `preprocessing` holds the caller's overrides (None values are ignored); `num_classes` and
    `width_mult`, when given, must agree with the file. With strict=False no model is built (fine-tuning
    loads what fits instead). Every failure is one line naming `flag`."""
    path = locate(name, flag, pretrained_dir, log)
    digest = sha256_of(path)
    onnx = onnx_weights.is_onnx_file(path)
    if onnx:
        if not allow_onnx:
            raise UsageError(f"{flag} {path}: an ONNX file, where PyTorch weights are needed; pass the checkpoint "
                             "it was exported from")
        model = onnx_weights.OnnxFileModel(path)
        for option, asked, held in (("--num-classes", num_classes, model.config["num_classes"]),
                                    ("--width-mult", width_mult, model.config["width_mult"])):
            if asked is not None and held is not None and asked != held:
                raise UsageError(f"{option} {asked:g}, but {path} holds {held:g}; drop the flag")
        known, entry, meta = None, None, model.meta
        config = (model.config["num_classes"], model.config["width_mult"])
    else:
        known, entry = known_weights(digest)
        if known:
            published = entry["published"]
            figures = " / ".join(f"{v}" for v in (published["top1"], published["top5"]) if v is not None)
            pre = entry["preprocessing"]
            log(f"recognised {known} weights by sha256 (published top-1/top-5 {figures}); using its published "
                f"preprocessing: resize {pre['resize']}, crop {pre['input_size']}, {pre['interpolation']}")
        raw = checkpoint.read_weights(path)
        meta = checkpoint.meta(raw)
        model = build_model(raw, path, flag, num_classes, width_mult, use_ema) if strict else None
        try:
            config = (model.config["num_classes"], model.config["width_mult"]) if strict else file_config(raw)
        except WeightsError as e:
            raise WeightsError(f"{flag} {path}: {e}") from None
    pre, source = resolve_preprocessing(meta, entry, preprocessing or {})
    order = resolve_class_order(meta, entry, class_order, log)
    return Resolved(path=path, model=model, config=config, data=None if strict or onnx else raw, sha256=digest, known=known, entry=entry, meta=meta,
                    preprocessing=pre, preprocessing_source=source, class_order=order)


def locate(name, flag, pretrained_dir=PRETRAINED_DIR, log=print):
    """The file `name` stands for: a public file by name (fetched and verified), or an existing path."""
    if name in KNOWN_WEIGHTS and name in DOWNLOADABLE:
        return fetch_public_weights(name, pretrained_dir, log)
    if str(name).startswith(HF_HUB_PREFIX):
        return hub_folder(str(name), flag, log)
    path = Path(name)
    if path.is_dir():
        if not (path / checkpoint.HUB_WEIGHTS).is_file():
            raise UsageError(f"{flag} {path}: a folder without {checkpoint.HUB_WEIGHTS}; pass a weight file or a "
                             "Hub folder (model.safetensors + config.json)")
        return path
    if not path.is_file():
        hint = f" (named public weights: {', '.join(DOWNLOADABLE)})" if not path.suffix else ""
        raise UsageError(f"{flag} {path}: no such file{hint}")
    return path


HF_HUB_PREFIX = "hf-hub:"
HUB_FILES = [checkpoint.HUB_WEIGHTS, checkpoint.HUB_CONFIG]


def hub_folder(name, flag, log=print):
    """The local folder of Hugging Face Hub model `hf-hub:ORG/NAME[@REVISION]`: from the local Hugging Face
    cache, else downloaded (model.safetensors and config.json only) unless offline; a one-line error
    saying what to fetch when neither works."""
    repo, _, revision = name[len(HF_HUB_PREFIX):].partition("@")
    fetch = (f"where the machine is online, run: hf download {repo} {' '.join(HUB_FILES)} (or set HF_HOME to a "
             "cache that holds it)")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UsageError(f"{flag} {name}: name a Hub model as hf-hub:ORG/NAME")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{flag} {name}: reading from the Hugging Face Hub needs huggingface_hub: "
                         "pip install huggingface_hub") from None
    # read the cache location and offline switch now: the library reads them once, when first imported
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    kwargs = dict(repo_id=repo, revision=revision or None, allow_patterns=HUB_FILES, cache_dir=cache)
    try:
        folder = Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception:  # not cached (the library's errors differ by version): try the network
        if offline:
            raise UsageError(f"{flag} {name}: not in the local Hugging Face cache{f' ({cache})' if cache else ''} "
                             f"and HF_HUB_OFFLINE is set; {fetch}") from None
        try:
            log(f"{repo} is not in the local Hugging Face cache; downloading {', '.join(HUB_FILES)}")
            folder = Path(snapshot_download(**kwargs))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UsageError(f"{flag} {name}: not in the local Hugging Face cache and not downloaded ({reason}); "
                             f"{fetch}") from None
    if not (folder / checkpoint.HUB_WEIGHTS).is_file():
        raise UsageError(f"{flag} {name}: the cached copy has no {checkpoint.HUB_WEIGHTS}; {fetch}")
    return folder


def build_model(raw, path, flag, num_classes=None, width_mult=None, use_ema=False):
    """The model in a weights file's contents, built strictly; a flag contradicting a good file is a usage
    error (exit 2), a bad file is not (exit 1)."""
    try:
        return load_model(raw, num_classes=num_classes, width_mult=width_mult, use_ema=use_ema)
    except WeightsError as e:
        if num_classes is not None or width_mult is not None:
            try:
                load_model(raw, use_ema=use_ema)
            except WeightsError:
                raise e from None
            raise UsageError(f"{flag} {path}: {e}") from None
        raise WeightsError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


def resolve_preprocessing(meta, entry, overrides):
    """Preprocessing and where it came from: overrides > saved with the weights > published > defaults."""
    pre, source = dict(DEFAULT_PREPROCESSING), "torchvision defaults"
    if entry:
        pre.update(entry["preprocessing"])
        source = "published"
    if (meta or {}).get("data"):
        pre.update({k: v for k, v in meta["data"].items() if k in pre})
        source = "saved with the weights"
    given = {k: v for k, v in overrides.items() if v is not None and k in pre}
    if given:
        pre.update(given)
        source += " + flags"
    pre["mean"], pre["std"] = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
    if pre["resize"] < pre["input_size"]:
        raise UsageError(f"--resize {pre['resize']} is smaller than the {pre['input_size']} px crop; "
                         "the centre crop must fit inside the resized image")
    if pre["interpolation"] not in INTERPOLATIONS:
        raise UsageError(f"interpolation {pre['interpolation']!r} saved with the weights is not one of "
                         f"{', '.join(sorted(INTERPOLATIONS))}; pass --interpolation")
    return pre, source


def resolve_class_order(meta, entry, asked=None, log=print):
    """The weights' own class order wins (a flag cannot re-label a trained classifier); else the asked one,
    else a public file's, else sorted WNIDs."""
    saved = ((meta or {}).get("classes") or {}).get("order")
    if saved:
        if asked and asked != saved:
            log(f"ignoring --class-order {asked}: the checkpoint was trained with {saved} order")
        return saved
    if asked:
        return asked
    return entry["class_order"] if entry else "sorted"
