"""Any folder of classes as a dataset: the class names are the folder names, as torchvision's ImageFolder reads them.

    python read_ImageNetData.py --data-dir my_photos --val-split 0.1              # what train.py will see there
    python read_ImageNetData.py --make-demo my_photos --demo-layout folders      # the demo digits as class folders

Two layouts: `D/train/<class>/` + `D/val/<class>/`, or `D/<class>/` alone, from which `holdout` takes a
seeded, class-stratified validation split. Classes come from the training folders, sorted as
ImageFolder sorts them (code-point order: capitals first), spelled exactly as on disk; val folders are
matched to them by name. Hidden files and folders and files that are not images are skipped and counted.
The ImageNet layouts (a devkit, ILSVRC2012_img_* folders, a flat val, all 1000 WNID folders) are read by
`mnv2.data.imagenet` exactly as before. Folders named by ImageNet WNIDs are mapped to their true index among
the 1000 classes through `imagenet_classes.tsv`, never by position.
"""
import logging
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mnv2 import cli
from mnv2.cli import UsageError
from mnv2.data import loaders, transforms
from mnv2.data.imagenet import (DEVKIT_DIRS, IMAGE_EXTENSIONS, NUM_CLASSES, SPLIT_DIRS, WNID, Classes, DataError,
                                entry_is_dir, is_image)
from mnv2.data.loaders import ImageNetDataset

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.tsv"
VAL_NAMES = ("val", "validation", "valid")  # the names timm and common datasets give the held-out split
FOLDER_ORDER = "folders"                    # Classes.order of a folder dataset: sorted folder names

log = logging.getLogger("mnv2.data")


@lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ILSVRC2012 classes in sorted-WNID order as (wnids, names, words): from imagenet_classes.tsv."""
    rows = [line.split("\t") for line in IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")][1:]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def display_name(name):
    """A class name for people: a bare ImageNet WNID becomes its name ('n01440764' -> 'tench'); control
    characters are shown escaped, so a folder name cannot drive the terminal it is printed on."""
    return _imagenet_names().get(name, name) if WNID.match(name) else cli.printable(name)


@lru_cache(maxsize=1)
def _imagenet_names():
    wnids, names, _ = imagenet_classes()
    return dict(zip(wnids, names))


# --------------------------------------------------------------------------------------------------
# Layout


@dataclass
class FolderLayout:
    root: Path
    train_dir: Path | None  # the folder whose subfolders are the classes (root itself when there is no split)
    val_dir: Path | None
    split: bool             # train/ (+ val/) folders, as opposed to <class>/ folders directly in root


def is_imagenet_layout(root):
    """Whether `root` is one of the ImageNet layouts `read_ImageNetData` reads (its behaviour stays exact
    there): ILSVRC2012_img_* folders, a devkit, a flat val/ of files, or a complete set of 1000 WNID folders."""
    root = Path(root)
    if any((root / d).is_dir() for d in SPLIT_DIRS["seed"]):
        return True
    if any((root / d).is_dir() for d in DEVKIT_DIRS):
        return True
    val = root / "val"
    if val.is_dir() and any(is_image(e.name) and e.is_file() for e in os.scandir(val)):
        return True
    train = root / "train"
    return train.is_dir() and sum(1 for e in os.scandir(train) if e.is_dir() and WNID.match(e.name)) == NUM_CLASSES


def find_folder_layout(root):
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist or is not a directory")
    train = root / "train"
    val = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if train.is_dir() or val is not None:
        return FolderLayout(root, train if train.is_dir() else None, val, split=True)
    return FolderLayout(root, root, None, split=False)


@dataclass
class Skipped:
    """Files a scan passed over, counted for one note."""
    hidden: int = 0
    not_images: int = 0
    outside: int = 0        # files beside the class folders instead of inside one
    extensions: tuple = ()
    loops: int = 0          # links back to a folder already walked (each image is read once)

    def add(self, other):
        return Skipped(self.hidden + other.hidden, self.not_images + other.not_images, self.outside + other.outside,
                       tuple(sorted(set(self.extensions) | set(other.extensions))), self.loops + other.loops)

    def note(self, where):
        parts = [f"{n} {one if n == 1 else many}" for n, one, many in (
            (self.hidden, "hidden file or folder", "hidden files or folders"),
            (self.not_images, "file that is not an image", "files that are not images"),
            (self.outside, "file outside the class folders", "files outside the class folders"),
            (self.loops, "link back to a folder already read", "links back to folders already read")) if n]
        if not parts:
            return None
        shown = f" ({', '.join(self.extensions[:6])}{' ...' if len(self.extensions) > 6 else ''})" \
            if self.extensions else ""
        return f"note: {where}: skipped {', '.join(parts)}{shown}"


def scan_classes(split_dir):
    """({class folder name: [image paths relative to split_dir ("<class>/..."), sorted as ImageFolder walks
    them]}, Skipped).

    Every non-hidden folder of split_dir is a class, also an empty one (the caller names it); images are
    found at any depth below it, following links, as ImageFolder does.
    """
    split_dir = Path(split_dir)
    classes, hidden, not_images, outside, extensions, loops = {}, 0, 0, 0, set(), 0
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            hidden += 1
        elif entry_is_dir(entry):
            classes[entry.name] = []
        else:
            outside += 1
    for name, files in classes.items():
        walked, listed = set(), []  # real folders already read: a link back to one (a loop) would list them again
        for folder, dirs, names in os.walk(split_dir / name, followlinks=True):  # top-down, so it can be pruned
            real = os.path.realpath(folder)
            if real in walked:
                loops += 1
                dirs[:] = []
                continue
            walked.add(real)
            hidden += sum(d.startswith(".") for d in dirs)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            listed.append((folder, names))
        for folder, names in sorted(listed):  # the order of ImageFolder's sorted(os.walk(...))
            relative = Path(folder).relative_to(split_dir)
            for file in sorted(names):
                if file.startswith("."):
                    hidden += 1
                elif is_image(file):
                    files.append((relative / file).as_posix())
                else:
                    not_images += 1
                    extensions.add(Path(file).suffix.lower() or file)
    return classes, Skipped(hidden, not_images, outside, tuple(sorted(extensions)), loops)


def _refuse_empty(found, split_dir):
    empty = [c for c, files in found.items() if not files]
    if not found:
        raise DataError(f"{split_dir}: no class folders; put each class's images in {split_dir}/<class name>/")
    if len(empty) == len(found):
        raise DataError(f"{split_dir}: no images in any of its {len(found)} class folders "
                        f"(image files end in {', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise DataError(f"{split_dir / empty[0]}: class folder without images"
                        + (f" (and {len(empty) - 1} more: {', '.join(empty[1:4])})" if len(empty) > 1 else "")
                        + "; add images or remove the folder")


# --------------------------------------------------------------------------------------------------
# Classes and labels


def folder_classes(names, num_classes=None):
    """Classes of a folder dataset: the sorted folder names. With num_classes 1000 and folders that are all
    ImageNet WNIDs (a partial copy, a subset such as Imagenette), the 1000 ILSVRC2012 classes in sorted
    order instead, so each folder keeps its true ImageNet index."""
    names = sorted(names)
    wnids, imagenet_names, _ = imagenet_classes()
    known = set(wnids)
    if num_classes == NUM_CLASSES and len(names) != NUM_CLASSES and all(n in known for n in names):
        return Classes(order="sorted", wnids=list(wnids), names=list(imagenet_names), ilsvrc_ids=[0] * NUM_CLASSES)
    if num_classes is not None and num_classes != len(names):
        raise UsageError(f"--num-classes {num_classes}, but the data has {len(names)} class folders"
                         + (" (1000 asks for ImageNet's classes: only for folders named by ImageNet WNIDs)"
                            if num_classes == NUM_CLASSES else "") + "; drop the flag to take them from the folders")
    return Classes(order=FOLDER_ORDER, wnids=[n if n in known else "" for n in names], names=list(names),
                   ilsvrc_ids=[0] * len(names))


def identities(classes):
    """What identifies each class index: the folder name of a folder dataset, else the WNID."""
    return list(classes.names) if classes.order == FOLDER_ORDER else list(classes.wnids)


def labelled(split_dir, found, index):
    """[(path, label)] in ImageFolder's order (classes sorted, then files) for the folders in `index`."""
    return [(str(Path(split_dir) / f), index[c]) for c in sorted(found) for f in found[c]]


# --------------------------------------------------------------------------------------------------
# The held-out split


def holdout(found, fraction, seed):
    """The relative paths held out for validation: in each class, round(fraction x n) of its n images (at
    least one, never all) drawn by a generator seeded by (seed, class name), so a class's split does not
    depend on the other classes."""
    held = []
    for name in sorted(found):
        files = found[name]
        n = len(files)
        k = min(n - 1, max(1, int(fraction * n + 0.5))) if n >= 2 and fraction > 0 else 0
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        held += sorted(files[i] for i in rng.permutation(n)[:k])
    return held


def recorded_holdout(root, record):
    """The held-out files a checkpoint recorded, if they are the files of `root`: the list, or None when
    none of them is there (another dataset: the caller splits anew). Some missing: DataError."""
    if not record or not record.get("files"):
        return None
    files = list(record["files"])
    missing = [f for f in files if not (Path(root) / f).is_file()]
    if len(missing) == len(files):
        return None
    if missing:
        raise DataError(f"{Path(root) / missing[0]}: {len(missing)} of the {len(files)} validation images held "
                        "out by the checkpoint are gone; restore them, or start a new run (its own split)")
    return files


# --------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class FolderData:
    """What `build_datasets` found: the datasets, their classes and what a checkpoint records of the split."""
    train: object
    val: object
    classes: Classes
    kind: str                # "imagenet" or "folders"
    val_split: dict = None   # {"fraction", "seed", "files"} when val was held out of the training folders
    note: str = None         # skipped files


def build_datasets(data_dir, class_order="sorted", input_size=224, resize=256, interpolation="bilinear", *,
                   val_split=None, seed=0, recorded_split=None, num_classes=None, log=print):
    """The training and validation datasets of `data_dir`, whichever layout it has (see the docstring).

    val_split: the fraction to hold out when the data has no val/ folder; recorded_split: the split a
    checkpoint recorded (its files win over a new draw, so a resume validates on the same images).
    """
    if is_imagenet_layout(data_dir):
        if val_split:
            raise UsageError(f"--val-split: {data_dir} is an ImageNet layout, which has its own val split; "
                             "drop the flag")
        train, val, classes, _ = loaders.build_datasets(data_dir, class_order, input_size, resize, interpolation)
        return FolderData(train, val, classes, "imagenet")
    layout = find_folder_layout(data_dir)
    if layout.train_dir is None:
        raise DataError(f"{layout.root}: no train/ folder; training needs {layout.root}/train/<class>/ "
                        f"(or the class folders directly in {layout.root})")
    found, skipped = scan_classes(layout.train_dir)
    _refuse_empty(found, layout.train_dir)
    classes = folder_classes(found, num_classes)
    index = {name: i for i, name in enumerate(identities(classes))}
    train_samples = labelled(layout.train_dir, found, index)
    val_samples, record = [], None
    if layout.val_dir is not None:
        if val_split:
            raise UsageError(f"--val-split: {data_dir} already has {layout.val_dir.name}/; drop the flag")
        val_found, val_skipped = scan_classes(layout.val_dir)
        skipped = skipped.add(val_skipped)
        _refuse_empty(val_found, layout.val_dir)
        strangers = sorted(set(val_found) - set(found))
        if strangers:
            raise DataError(f"{layout.val_dir / strangers[0]}: class only in {layout.val_dir.name}/, not in "
                            f"{layout.train_dir}/" + (f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else "")
                            + "; add its training images or remove it")
        val_samples = labelled(layout.val_dir, val_found, index)
    else:
        held = recorded_holdout(layout.train_dir, recorded_split)
        fraction = float((recorded_split or {}).get("fraction", 0.0)) if held is not None else val_split
        if held is not None and val_split and val_split != fraction:
            log(f"note: --val-split {val_split:g} ignored: the checkpoint's held-out split ({fraction:g}) "
                "stays, so validation sees the same images")
        if held is None and fraction:
            held = holdout(found, fraction, seed)
        if held:
            record = {"fraction": float(fraction), "seed": int(seed if recorded_split is None
                                                               else recorded_split.get("seed", seed)),
                      "files": list(held)}
            held_set = set(held)
            train_samples = [(p, label) for p, label in train_samples
                             if Path(p).relative_to(layout.train_dir).as_posix() not in held_set]
            val_samples = [(str(layout.train_dir / f), index[f.split("/", 1)[0]]) for f in held]
            if not train_samples:
                raise DataError(f"{layout.train_dir}: --val-split {fraction:g} leaves no training images")
    train = ImageNetDataset(train_samples, transforms.train_transform(input_size, interpolation), train=True)
    val = (ImageNetDataset(val_samples, transforms.eval_transform(input_size, resize, interpolation), train=False)
           if val_samples else None)
    where = str(layout.root)
    return FolderData(train, val, classes, "folders", record, skipped.note(where))


def scoring_samples(data_dir, model_names, recorded_split=None, log=print):
    """[(path, model index)] to score a folder dataset on, and the folder -> index map.

    The images: val/ when there is one, else the files the checkpoint held out (`recorded_split`), else
    every image. `model_names(folders)` gives each folder's index in the model's labels.
    """
    layout = find_folder_layout(data_dir)
    split_dir = layout.val_dir if layout.val_dir is not None else layout.train_dir
    if split_dir is None:
        raise DataError(f"{layout.root}: no val/ folder to score")
    found, skipped = scan_classes(split_dir)
    note = skipped.note(str(layout.root))
    if note:
        log(note)
    _refuse_empty(found, split_dir)
    if layout.val_dir is None:
        held = recorded_holdout(split_dir, recorded_split)
        if held is not None:
            found = {}
            for f in held:
                found.setdefault(f.split("/", 1)[0], []).append(f)
            log(f"scoring the {len(held)} images the checkpoint held out for validation "
                f"(--val-split {float(recorded_split.get('fraction', 0)):g})")
        else:
            log(f"note: {layout.root} has no val/ split and the weights recorded none: scoring all "
                f"{sum(map(len, found.values()))} images")
    index = model_names(sorted(found))
    samples = [(str(split_dir / f), index[c]) for c in sorted(found) for f in sorted(found[c])]
    return samples, index


def model_index(folders, saved, num_classes, order, log=print):
    """{folder: the model's class index}: by the names a checkpoint saved, by WNID for ImageNet weights,
    and by position (ImageFolder's order) only when the weights carry no names and have exactly as many
    classes as there are folders. A folder the model does not know is an error naming it."""
    saved = saved or {}
    if saved.get("order") == FOLDER_ORDER and saved.get("names"):
        known = {name: i for i, name in enumerate(saved["names"])}
        what = "class names"
    elif saved.get("wnids") and any(saved["wnids"]):
        known = {w: i for i, w in enumerate(saved["wnids"]) if w}
        what = "WNIDs"
    elif num_classes == NUM_CLASSES and all(WNID.match(f) for f in folders):
        if order != "sorted":
            raise DataError(f"weights in {order} class order: WNID folders map to them only through the "
                            f"devkit's meta.mat; score the ImageNet layout with its devkit instead")
        known = {w: i for i, w in enumerate(imagenet_classes()[0])}
        what = "ImageNet WNIDs (imagenet_classes.tsv)"
    elif len(folders) == num_classes:
        log("note: the weights carry no class names: folder k (sorted, as ImageFolder) is taken as class k")
        return {f: i for i, f in enumerate(folders)}
    else:
        raise DataError(f"the weights have {num_classes} classes and no class names, the data has "
                        f"{len(folders)} class folders: there is no way to match them; use weights trained on it")
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise DataError(f"class folder {unknown[0]!r} is not among the {len(known)} {what} of the weights"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                        + "; score data of the classes they were trained on")
    return {f: known[f] for f in folders}


def summarize(data_dir, data):
    """Human-readable lines: the layout, its classes and images per split (read_ImageNetData.py's report)."""
    counts = {split: np.bincount([label for _, label in ds.samples], minlength=len(data.classes.names))
              if ds is not None else None for split, ds in (("train", data.train), ("val", data.val))}
    lines = [data.note] if data.note else []
    lines.append(f"{data_dir}: {data.kind} layout, {len(data.classes.names)} classes; "
                 f"{len(data.train) if data.train else 0} train / {len(data.val) if data.val else 0} val images"
                 + (f" (val: {data.val_split['fraction']:g} of each class, seed {data.val_split['seed']})"
                    if data.val_split else ""))
    if data.kind == "folders":
        for i, name in enumerate(data.classes.names):
            val = counts["val"][i] if counts["val"] is not None else 0
            lines.append(f"  {i:4d}  {counts['train'][i]:6d} train  {val:6d} val  {display_name(name)}")
    return lines
