"""The evaluation sets beyond ImageNet val, each read with its own label mapping: ImageNet-V2 (three variants),
ImageNet-A, ImageNet-R, ImageNet-Sketch, and ReaL (val relabelled).

    found = robust.recognise(data_dir)                 # or robust.recognise(data_dir, "imagenet-r")
    samples, report = robust.samples(found, model_index)   # [(path, label)], what is missing

Each set's trap, and what is done about it:
  * ImageNet-V2's folders are named 0..999, the class indices in sorted-WNID order: read as numbers (as text,
    as torchvision's ImageFolder sorts them, "10" comes before "2" and almost every label is wrong).
  * ImageNet-A and -R hold 200 of the 1000 classes: the logits are restricted to those 200 indices, in
    ascending order (which is the sorted-WNID order of their folders), before the top-k (`Restricted`).
  * ReaL relabels the val images by their original file numbers (ILSVRC2012_val_00000001.JPEG is entry 0): a
    top-k is right when any of its k is in the image's label set; images with an empty set are not scored.
  * ImageNet-Sketch has 1000 WNID folders; some files are not JPEGs despite their name: images are opened by
    their content, as everywhere in this repo.
The 200-class lists and ReaL's labels are the copies timm ships (timm/data/_info); a partial copy of a set is
scored with its full mapping and mask, and the report says how many classes are missing.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mnv2.data.imagenet import NUM_CLASSES, WNID, DataError, is_image

V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")
SETS = ("imagenet-v2", *(f"imagenet-v2-{v}" for v in V2_VARIANTS), "imagenet-a", "imagenet-r", "imagenet-sketch")
CLEAN = ("imagenet-a-clean", "imagenet-r-clean")  # ImageNet val restricted to A's / R's 200 classes
# timm's published mobilenetv2_100.ra_in1k top-1 (pytorch-image-models results/*.csv), for comparison
TIMM_MOBILENETV2_100 = {"imagenet": 72.910, "imagenet-real": 80.225, "imagenet-v2-matched-frequency": 60.220,
                        "imagenet-sketch": 20.765, "imagenet-a": 2.173, "imagenet-r": 32.593,
                        "imagenet-a-clean": 89.610, "imagenet-r-clean": 89.860}
REAL_IMAGES, REAL_SCORED = 50000, 46837
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def _timm_info(name):
    try:
        import timm.data
    except ImportError:
        raise DataError(f"the {name} list comes with timm: pip install timm") from None
    path = Path(timm.data.__file__).parent / "_info" / name
    if not path.is_file():
        raise DataError(f"this timm has no {name}; pip install -U timm")
    return path


def subset_wnids(name):
    """The WNIDs of ImageNet-A ("imagenet-a") or -R ("imagenet-r"), ascending: their 200 classes."""
    wnids = _timm_info(f"{name.replace('-', '_')}_synsets.txt").read_text().split()
    if len(wnids) != 200 or wnids != sorted(wnids):
        raise DataError(f"timm's {name} list is not 200 sorted WNIDs")
    return wnids


def subset_indices(name):
    """The 200 class indices (sorted-WNID order, ascending) of ImageNet-A or -R, as timm lists them."""
    indices = [int(n) for n in _timm_info(f"{name.replace('-', '_')}_indices.txt").read_text().split()]
    if len(indices) != 200 or indices != sorted(indices):
        raise DataError(f"timm's {name} indices are not 200 ascending class numbers")
    return indices


def clean_val(samples, name, model_index):
    """ImageNet val restricted to the 200 classes of `name` ("imagenet-a-clean" / "imagenet-r-clean"): the
    samples of those classes relabelled by their position among the 200, and the model outputs to keep."""
    restrict = [model_index[i] for i in subset_indices(name.removesuffix("-clean"))]
    position = {output: k for k, output in enumerate(restrict)}
    return [(path, position[label]) for path, label in samples if label in position], restrict


def real_labels(path=None):
    """ReaL's label sets, one list per val image in file-number order (timm's copy by default)."""
    path = Path(path) if path is not None else _timm_info("imagenet_real_labels.json")
    if not path.is_file():
        raise DataError(f"--real-labels {path}: no such file; give ReaL's real.json (github.com/google-research/"
                        "reassessed-imagenet), or --real-labels alone for the copy timm ships")
    try:
        labels = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--real-labels {path}: not a readable JSON file ({type(e).__name__}); use ReaL's "
                        "real.json") from None
    if not (isinstance(labels, list) and len(labels) == REAL_IMAGES
            and all(isinstance(s, list) and all(isinstance(i, int) and 0 <= i < NUM_CLASSES for i in s)
                    for s in labels)):
        raise DataError(f"--real-labels {path}: expected {REAL_IMAGES} lists of class indices (ReaL's real.json)")
    return labels


@dataclass
class Found:
    """A recognised set: its name, root, and the class folders it holds -> their sorted-WNID index."""
    name: str
    root: Path
    folders: dict = field(default_factory=dict)   # folder name -> index in the 1000 sorted-WNID classes
    expected: int = NUM_CLASSES                   # classes the full set has
    subset: list | None = None                    # the 1000-class indices the logits are restricted to


def _class_folders(root):
    return sorted(e.name for e in Path(root).iterdir() if e.is_dir() and not e.name.startswith("."))


def named_as(name, root):
    """Whether the folder's own name says it holds set `name` (imagenet-a, imagenet-r, sketch, imagenetv2)."""
    hint = Path(root).resolve().name.lower().replace("_", "-")
    if name.startswith("imagenet-v2"):
        return "imagenetv2" in hint or "imagenet-v2" in hint
    return {"imagenet-a": hint.startswith("imagenet-a") and not hint.startswith("imagenet-all"),
            "imagenet-r": hint.startswith("imagenet-r") and not hint.startswith("imagenet-real"),
            "imagenet-sketch": "sketch" in hint}.get(name, False)


def recognise(root, dataset=None, sorted_wnids=None):
    """The set at `root` (`dataset` names it; otherwise judged from its layout), or None when `root` holds
    none of them. `sorted_wnids`: the 1000 WNIDs in sorted order. A folder that matches no known layout
    while `dataset` was given is one line saying what was expected."""
    root = Path(root)
    folders = _class_folders(root)
    numeric = [f for f in folders if f.isdigit() and str(int(f)) == f and int(f) < NUM_CLASSES]
    wnid_folders = [f for f in folders if WNID.fullmatch(f)]
    wanted = dataset or ""
    if wanted.startswith("imagenet-v2") or not wanted and folders and len(numeric) == len(folders):
        if not numeric or len(numeric) != len(folders):
            raise DataError(f"{root}: ImageNet-V2 holds folders named 0..999 (class indices); found "
                            f"{len(folders)} folders, {len(numeric)} of them numbers")
        variant = wanted if wanted not in ("", "imagenet-v2") else next(
            (f"imagenet-v2-{v}" for v in V2_VARIANTS if v in root.name.lower()), "imagenet-v2")
        return Found(variant, root, {f: int(f) for f in numeric})  # as numbers: "10" is class 10, not 2
    if wanted and wanted not in SETS:
        raise DataError(f"--dataset {wanted}: one of {', '.join(SETS)} (ReaL: the val set with --real-labels)")
    if not folders or len(wnid_folders) != len(folders):
        if wanted:
            raise DataError(f"{root}: {wanted} holds one folder per WNID (n01440764, ...); found "
                            f"{len(folders)} folders, {len(wnid_folders)} of them WNIDs")
        return None
    index = {w: i for i, w in enumerate(sorted_wnids)}
    unknown = [w for w in wnid_folders if w not in index]
    if unknown:
        raise DataError(f"{root}: {len(unknown)} folders are not ImageNet-1k WNIDs ({', '.join(unknown[:3])}); "
                        "not a set these weights can be scored on")
    candidates = []
    for name in ("imagenet-a", "imagenet-r"):
        if wanted in ("", name) and set(wnid_folders) <= set(subset_wnids(name)):
            candidates.append(name)
    if wanted == "imagenet-sketch" or not wanted and not candidates:
        return Found("imagenet-sketch", root, {w: index[w] for w in wnid_folders})
    if len(candidates) > 1:  # a small partial copy fits both 200-class lists: the folder's name decides
        candidates = [c for c in candidates if named_as(c, root)] or candidates
        if len(candidates) > 1:
            raise DataError(f"{root}: its {len(wnid_folders)} class folders are in both ImageNet-A's and -R's "
                            "200 classes; say which with --dataset imagenet-a or --dataset imagenet-r")
    if not candidates:
        raise DataError(f"{root}: {wanted}'s 200 classes do not include every folder here; check --dataset")
    name = candidates[0]
    subset = [index[w] for w in subset_wnids(name)]
    return Found(name, root, {w: index[w] for w in wnid_folders}, expected=200, subset=subset)


def samples(found, model_index):
    """([(path, label)], report) of a recognised set. `model_index` maps a sorted-WNID index to the
    model's output index. Labels are the model's indices, or positions in `found.subset` (the restricted
    logits) for ImageNet-A and -R. The report counts images, classes present and missing."""
    if found.subset is not None:
        position = {model_index[i]: k for k, i in enumerate(found.subset)}
    out, empty = [], 0
    for folder, sorted_index in sorted(found.folders.items(), key=lambda kv: kv[1]):
        label = model_index[sorted_index]
        if found.subset is not None:
            label = position[label]
        files = sorted(p for p in (found.root / folder).iterdir() if p.is_file() and not p.name.startswith(".")
                       and is_image(p.name))
        empty += not files
        out += [(p, label) for p in files]
    report = {"set": found.name, "images": len(out), "classes": len(found.folders) - empty,
              "classes_expected": found.expected, "classes_missing": found.expected - len(found.folders) + empty}
    return out, report


class Restricted(nn.Module):
    """`model`'s logits at `indices` only (ImageNet-A/-R: their 200 classes), in that order."""

    def __init__(self, model, indices):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x):
        logits = self.model(x)
        return logits.index_select(1, self.indices.to(logits.device))


def real_targets(samples, labels):
    """For each val sample, its ReaL label set (model indices as the samples' labels are), or raises
    when a file name does not carry its original val number."""
    sets = []
    for path, _ in samples:
        m = VAL_NUMBER.search(Path(path).name)
        if not m or not 1 <= int(m.group(1)) <= REAL_IMAGES:
            raise DataError(f"{path}: ReaL needs the original val file names (ILSVRC2012_val_00000001.JPEG ...) "
                            "to find each image's labels")
        sets.append(labels[int(m.group(1)) - 1])
    return sets


def real_scores(predictions, label_sets, model_index):
    """ReaL top-1/top-5 from `evaluate`'s per-image predictions ({"index", "top5", "failed"}, in dataset
    order) and each image's label set (sorted-WNID indices): a top-k is right when any of its k is in the
    set; images with an empty set are skipped; an image that did not decode is a miss."""
    top1 = top5 = scored = 0
    for p in predictions:
        labels = {model_index[i] for i in label_sets[p["index"]]}
        if not labels:
            continue
        scored += 1
        if p["failed"]:
            continue
        top1 += p["top5"][0] in labels
        top5 += any(i in labels for i in p["top5"][:5])
    return {"top1": 100.0 * top1 / scored if scored else float("nan"),
            "top5": 100.0 * top5 / scored if scored else float("nan"),
            "images": scored, "skipped": len(predictions) - scored}


def markdown_table(rows, weights):
    """The --sets table: one row per set, this model's top-1/top-5 beside timm's published mobilenetv2_100."""
    lines = ["| set | top-1 | top-5 | images | classes missing | timm mobilenetv2_100 top-1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        timm_top1 = f"{r['timm_mobilenetv2_100_top1']:.3f}" if r["timm_mobilenetv2_100_top1"] is not None else ""
        top5 = f"{r['top5']:.3f}" if r["top5"] == r["top5"] else ""
        lines.append(f"| {r['set']} | {r['top1']:.3f} | {top5} | {r['images']} | {r['classes_missing']} | "
                     f"{timm_top1} |")
    return f"Weights: {weights}\n\n" + "\n".join(lines)
