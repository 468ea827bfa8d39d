"""Weights that leave the repo: safetensors files and timm / Hugging Face Hub folders.

    hub.write_safetensors("output/model.safetensors", model.state_dict(), meta)  # this repo's layout, no pickle
    hub.write_folder(model, "hub/", classes, preprocessing, card)         # timm's layout + config + card
    timm.create_model("local-dir:hub/", pretrained=True)                  # the same logits

A Hub folder is what timm's `save_for_hf` writes (timm writes it here, from a timm model holding these
weights): `model.safetensors` with timm's tensor names for the matching `mobilenetv2_*` architecture,
`config.json` (architecture, class count, label names, the preprocessing as timm's pretrained_cfg, and
this repo's class order and preprocessing under "mobilenetv2"), plus a model card (`README.md`). Every
script reads such a folder, a .safetensors file and `hf-hub:ORG/NAME` back (`checkpoint.read_weights`).
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mnv2 import checkpoint, weights
from mnv2.checkpoint import SAFETENSORS_METADATA_KEY, unwrap
from mnv2.cli import ScriptError
from mnv2.outputs import atomic_write

# width multiplier -> timm architecture whose every tensor has this repo's shape (checked on writing)
TIMM_ARCHITECTURES = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 0.75: "mobilenetv2_075",
                      1.0: "mobilenetv2_100", 1.4: "mobilenetv2_140"}


class HubError(ScriptError, ValueError):
    """Weights that cannot be written in a shared format (exit code 1)."""


def write_safetensors(path, state, meta=None):
    """A state_dict (this repo's, torchvision's layout) as a .safetensors file, atomically; `meta`
    ({"classes", "data", "model_config"}) kept as JSON in the file's metadata, so every script reads the
    class names and preprocessing back without flags."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    metadata = {SAFETENSORS_METADATA_KEY: json.dumps(meta)} if meta else None
    atomic_write(path, save(tensors, metadata=metadata))


def timm_architecture(width_mult):
    for width, name in TIMM_ARCHITECTURES.items():
        if width_mult is not None and math.isclose(width, width_mult):
            return name
    known = ", ".join(f"{name} (width {width:g})" for width, name in TIMM_ARCHITECTURES.items())
    raise HubError(f"width {width_mult:g} has no timm architecture with the same tensors (timm defines {known}); "
                   "a Hub folder needs one of those widths, a .safetensors file of this repo's layout does not")


def to_timm(model):
    """(architecture, the timm model holding `model`'s weights in eval mode), every tensor checked."""
    try:
        import timm
    except ImportError:
        raise HubError("a timm / Hub folder is written by timm: pip install timm") from None
    config = unwrap(model).config
    arch = timm_architecture(config["width_mult"])
    target = timm.create_model(arch, pretrained=False, num_classes=config["num_classes"])
    ours = unwrap(model).state_dict()
    state, mismatched = {}, []
    for key, value in target.state_dict().items():
        source = weights._timm(key)
        if source not in ours or ours[source].shape != value.shape:
            mismatched.append(key)
            continue
        state[key] = ours[source].detach().cpu().clone()
    if mismatched:
        raise HubError(f"the weights do not fit timm's {arch}: {weights._some(mismatched)}")
    target.load_state_dict(state, strict=True)
    return arch, target.eval()


def card_facts(raw, path, sha256):
    """What a weights file knows about how it was made, for the model card: recipe, epochs, data, top-1."""
    facts = {"source": Path(path).name, "sha256": sha256}
    if not checkpoint.is_checkpoint(raw):
        return facts
    args = raw.get("args") or {}
    metrics = [m for m in raw.get("metrics") or [] if m.get("val_top1") is not None]
    facts["recipe"] = args.get("recipe") or ("fine-tuned from " + Path(str(args["pretrained"])).name
                                             if args.get("pretrained") else None)
    facts["epochs"] = raw.get("epoch")
    facts["data"] = Path(str(args["data_dir"])).name if args.get("data_dir") else None
    if metrics:
        best = max(metrics, key=lambda m: m["val_top1"])
        where = f"{args['val_split']:g} of the training folders held out" if args.get("val_split") else \
            "the validation images of the training data"
        facts["top1"] = f"{best['val_top1']:.2f}% (epoch {best.get('epoch', '?')}, on {where}, during training)"
    return facts


def model_card(arch, classes, preprocessing, card):
    """README.md for the folder: what the run's files know, the license left for the user to set."""
    facts = [f"- architecture: MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381), timm `{arch}`",
             f"- classes: {len(classes['names'])} ({', '.join(map(str, classes['names'][:10]))}"
             f"{', ...' if len(classes['names']) > 10 else ''}); label order: {classes['order']}",
             f"- preprocessing: resize {preprocessing['resize']}, centre crop {preprocessing['input_size']}, "
             f"{preprocessing['interpolation']}, mean {list(preprocessing['mean'])}, std {list(preprocessing['std'])}"]
    labels = {"recipe": "recipe", "epochs": "epochs trained", "data": "training data", "top1": "top-1",
              "source": "weights file", "sha256": "sha256 of that file"}
    facts += [f"- {labels[key]}: {card[key]}" for key in labels if card and card.get(key) not in (None, "")]
    return "\n".join([
        "---", "library_name: timm", "tags:", "- image-classification", "- timm", "- mobilenetv2",
        "# license: set the license of these weights before publishing (for example apache-2.0)", "---", "",
        f"# MobileNetV2 ({arch}, {len(classes['names'])} classes)", "", *facts, "",
        "## Use", "", "```python", "import timm, torch", 'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", '
        "pretrained=True).eval()  # or hf-hub:ORG/NAME once uploaded",
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)", "```", ""])


def write_folder(model, folder, classes, preprocessing, card=None, tolerance=1e-4):
    """Write a timm / Hub folder for `model` (see the module docstring). `classes` is {"order", "wnids",
    "names"} in label order, `preprocessing` {"resize", "input_size", "interpolation", "mean", "std"},
    `card` the facts for the model card. Before the folder appears, timm loads it and its logits must be
    within `tolerance` of `model`'s on real-looking images. A folder that exists and is not empty is
    refused; the folder appears whole or not at all. Returns (architecture, max |logit difference|)."""
    from timm.models import save_for_hf

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise HubError(f"{folder}: already exists and is not an empty folder; name a new folder")
    arch, timm_model = to_timm(model)
    names = [str(n) for n in classes["names"]]
    pre = preprocessing
    data_config = {"input_size": (3, pre["input_size"], pre["input_size"]), "interpolation": pre["interpolation"],
                   "mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
                   "crop_pct": pre["input_size"] / pre["resize"], "crop_mode": "center"}
    ours = {"classes": classes, "data": dict(pre), "model_config": dict(unwrap(model).config)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        save_for_hf(timm_model, staging, model_config={"label_names": names, SAFETENSORS_METADATA_KEY: ours},
                    safe_serialization=True, data_config=data_config)
        # the weights file carries the classes and preprocessing too, so it is complete on its own
        weights_path = staging / checkpoint.HUB_WEIGHTS
        from safetensors.torch import load_file, save_file
        save_file(load_file(str(weights_path)), str(weights_path),
                  metadata={"format": "pt", SAFETENSORS_METADATA_KEY: json.dumps(ours)})
        config_path = staging / checkpoint.HUB_CONFIG
        config = json.loads(config_path.read_text())
        for key in ("tag", "license"):  # timm's defaults describe its own ImageNet weights, not these
            config["pretrained_cfg"].pop(key, None)
        # transformers' TimmWrapper passes num_classes itself and fails on a second one in model_args; the
        # rest are timm's defaults. timm reads the class count from the config's num_classes.
        config.pop("model_args", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(arch, classes, pre, card or {}))
        x = _parity_images(pre)
        with torch.no_grad():
            diff = (timm_logits(staging, x) - unwrap(model).cpu().eval()(x)).abs().max().item()
        if not diff <= tolerance:
            raise HubError(f"{folder}: timm's logits from the folder differ from this model's by {diff:.2e} "
                           f"(> {tolerance:g}); not written")
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return arch, diff


def _parity_images(pre, batch=3):
    """Smooth random images in 0..1, normalised with the weights' own mean and std."""
    generator = torch.Generator().manual_seed(1)
    size = pre["input_size"]
    images = torch.nn.functional.interpolate(torch.rand(batch, 3, 8, 8, generator=generator), size=(size, size),
                                             mode="bilinear", align_corners=False)
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def timm_logits(folder, images):
    """Logits of the Hub folder as timm loads it (for checks): `timm.create_model("local-dir:...")`."""
    import timm
    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    with torch.no_grad():
        return model(images)
