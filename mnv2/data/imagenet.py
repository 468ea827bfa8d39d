"""The ImageNet (ILSVRC2012) layouts on disk, the devkit's classes and ground truth, and the labelled samples."""
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnv2.cli import ScriptError

NUM_CLASSES = 1000
NUM_VAL_IMAGES = 50000
CLASS_ORDERS = ("sorted", "devkit")
# The devkit archive unpacks to ILSVRC2012_devkit_t12; some guides (and older READMEs) spell it dev_kit.
DEVKIT_DIRS = ("ILSVRC2012_devkit_t12", "ILSVRC2012_dev_kit_t12")
GROUND_TRUTH_NAME = "ILSVRC2012_validation_ground_truth.txt"
# Files read as images everywhere (datasets, evaluate.py's single images); anything else is skipped.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d+)\.[A-Za-z]+$")
WNID = re.compile(r"^n\d{8}$")
SPLIT_DIRS = {"seed": ("ILSVRC2012_img_train", "ILSVRC2012_img_val"), "torchvision": ("train", "val")}

log = logging.getLogger("mnv2.data")


class DataError(ScriptError, ValueError):
    """A problem with the data on disk: one line that names the file or folder and what to do."""


# ----------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------
@dataclass
class ImageNetLayout:
    kind: str                  # "seed" (ILSVRC2012_img_*) or "torchvision" (train/, val/)
    root: Path
    train_dir: Path | None
    val_dir: Path | None
    val_flat: bool             # ILSVRC2012_val_%08d.JPEG files labelled by the ground truth, not <wnid>/ folders
    meta_mat: Path | None
    ground_truth: Path | None


def is_image(name):
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def entry_is_dir(entry):
    """os.DirEntry.is_dir, False for what cannot be followed (a symbolic link loop, a vanished target)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def entry_is_file(entry):
    """os.DirEntry.is_file, False for what cannot be followed (a link loop is no image: it is not listed)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _val_is_flat(val_dir):
    has_files = has_dirs = False
    with os.scandir(val_dir) as entries:
        for e in entries:
            if entry_is_dir(e) and WNID.match(e.name):
                has_dirs = True
            elif entry_is_file(e) and is_image(e.name):
                has_files = True
    if has_files and has_dirs:
        raise DataError(f"{val_dir} holds both image files and <wnid>/ folders: keep one val layout")
    return not has_dirs


def find_layout(data_dir):
    """Detect which ImageNet layout `data_dir` holds; DataError shows what was expected and found."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist or is not a directory")
    for kind, (train_name, val_name) in SPLIT_DIRS.items():
        train_dir, val_dir = root / train_name, root / val_name
        if train_dir.is_dir() or val_dir.is_dir():
            break
    else:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise DataError(
            f"no ImageNet layout in {root}: expected ILSVRC2012_img_train/ + ILSVRC2012_img_val/ + "
            f"ILSVRC2012_devkit_t12/ (or train/ + val/); found {shown}")
    devkit = next((root / d / "data" for d in DEVKIT_DIRS if (root / d / "data").is_dir()), None)
    meta_mat = devkit / "meta.mat" if devkit and (devkit / "meta.mat").is_file() else None
    ground_truth = devkit / GROUND_TRUTH_NAME if devkit and (devkit / GROUND_TRUTH_NAME).is_file() else None
    val_dir = val_dir if val_dir.is_dir() else None
    return ImageNetLayout(kind=kind, root=root, train_dir=train_dir if train_dir.is_dir() else None,
                          val_dir=val_dir, val_flat=bool(val_dir and _val_is_flat(val_dir)),
                          meta_mat=meta_mat, ground_truth=ground_truth)


# ----------------------------------------------------------------------------------------------------
# Devkit: classes and ground truth
# ----------------------------------------------------------------------------------------------------
@dataclass
class Classes:
    order: str                 # "sorted" (torchvision/timm/public weights) or "devkit" (ILSVRC2012_ID - 1)
    wnids: list                # in class-index order
    names: list
    ilsvrc_ids: list

    def index_of(self):
        return {w: i for i, w in enumerate(self.wnids)}


def read_meta_mat(path, fileobj=None):
    """The leaf synsets of a devkit meta.mat as [(ILSVRC2012_ID, WNID, words)], checked to be ILSVRC2012's 1000.
    `fileobj`: its bytes, read from inside an archive (`path` then only names it)."""
    import scipy.io  # only needed here; keeps `import read_ImageNetData` light

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path if fileobj is None else fileobj, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for a non-MATLAB file
        raise DataError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}); "
                        "re-extract ILSVRC2012_devkit_t12.tar.gz") from None
    if "synsets" not in mat:
        names = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DataError(f"{path} has no 'synsets' variable (variables: {names}); is this the ILSVRC2012 devkit?")
    synsets = np.atleast_1d(mat["synsets"])
    fields = synsets.dtype.names or ()
    missing = [f for f in ("ILSVRC2012_ID", "WNID", "words", "num_children") if f not in fields]
    if missing:
        raise DataError(f"{path}: 'synsets' lacks field(s) {', '.join(missing)}; is this the ILSVRC2012 devkit?")
    try:
        leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
                  for s in synsets if int(s["num_children"]) == 0]
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: unreadable synset entry ({e}); re-extract the ILSVRC2012 devkit") from None
    if len(leaves) != NUM_CLASSES:
        raise DataError(f"{path} has {len(leaves)} leaf synsets (num_children == 0), ILSVRC2012 has "
                        f"{NUM_CLASSES}; use the ILSVRC2012 devkit's meta.mat")
    if sorted(i for i, _, _ in leaves) != list(range(1, NUM_CLASSES + 1)):
        raise DataError(f"{path}: leaf ILSVRC2012_IDs are not 1..{NUM_CLASSES}; use the ILSVRC2012 devkit's meta.mat")
    wnids = [w for _, w, _ in leaves]
    if len(set(wnids)) != NUM_CLASSES or not all(WNID.match(w) for w in wnids):
        raise DataError(f"{path}: leaf WNIDs are not {NUM_CLASSES} distinct nXXXXXXXX ids")
    return leaves


def read_classes(layout, class_order="sorted"):
    """The 1000 classes of meta.mat in index order: sorted WNIDs (default) or ILSVRC2012_ID - 1 ("devkit").

    The index never depends on which class folders exist, so a partial train copy keeps the true labels.
    """
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {class_order!r}")
    if layout.meta_mat is None:
        return _classes_from_folders(layout, class_order)
    return classes_from_leaves(read_meta_mat(layout.meta_mat), class_order)


def classes_from_leaves(leaves, class_order):
    """Classes of meta.mat's leaves [(ILSVRC2012_ID, WNID, words)] in the given order."""
    # devkit order: ILSVRC2012_ID 1 is index 0; sorted order: what torchvision's ImageFolder and every
    # public weight file use, so the same weights score right only in the order they were trained in.
    leaves.sort(key=(lambda s: s[1]) if class_order == "sorted" else (lambda s: s[0]))
    return Classes(order=class_order, wnids=[w for _, w, _ in leaves], names=[n for _, _, n in leaves],
                   ilsvrc_ids=[i for i, _, _ in leaves])


def _classes_from_folders(layout, class_order):
    """Without a devkit, a complete train/ (or sorted val/) of 1000 <wnid>/ folders still gives the sorted
    order exactly; anything less could shift every label after a missing class, so it is refused."""
    need = (f"no devkit meta.mat in {layout.root}: expected {DEVKIT_DIRS[0]}/data/meta.mat "
            "(extract ILSVRC2012_devkit_t12.tar.gz there)")
    if class_order != "sorted":
        raise DataError(f"{need}; --class-order {class_order} needs its ILSVRC2012 IDs")
    for split_dir in (layout.train_dir, None if layout.val_flat else layout.val_dir):
        if split_dir is None:
            continue
        wnids = sorted(e.name for e in os.scandir(split_dir) if entry_is_dir(e) and WNID.match(e.name))
        if len(wnids) == NUM_CLASSES:
            log.warning("%s: no devkit meta.mat, so classes are the %d sorted folder names, without "
                        "class names", layout.root, NUM_CLASSES)
            return Classes(order="sorted", wnids=wnids, names=list(wnids), ilsvrc_ids=[0] * NUM_CLASSES)
        raise DataError(f"{need}; {split_dir} has {len(wnids)} <wnid>/ folders, so its labels cannot be "
                        f"trusted without it")
    raise DataError(need)


def read_ground_truth(path, num_classes=NUM_CLASSES, text=None):
    """Devkit IDs of ILSVRC2012_validation_ground_truth.txt: element n-1 belongs to ILSVRC2012_val_<n>.
    `text`: its contents, read from inside an archive (`path` then only names it)."""
    path = Path(path)
    try:
        lines = (path.read_text() if text is None else text).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read ground truth {path}: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"ground truth {path} is empty; re-extract the ILSVRC2012 devkit")
    if len(lines) > NUM_VAL_IMAGES:
        raise DataError(f"ground truth {path} has {len(lines)} lines, ILSVRC2012 val has {NUM_VAL_IMAGES}; "
                        "use the ILSVRC2012 devkit's file")
    ids = []
    for n, line in enumerate(lines, 1):
        try:
            value = int(line)
        except ValueError:
            raise DataError(f"ground truth {path} line {n}: {line.strip()!r} is not a class ID") from None
        if not 1 <= value <= num_classes:
            raise DataError(f"ground truth {path} line {n}: ID {value} is outside 1..{num_classes}; "
                            "is this the ILSVRC2012 devkit?")
        ids.append(value)
    return ids


# ----------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------
def _folder_samples(split_dir, classes):
    index = classes.index_of()
    samples, unknown = [], []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry_is_dir(entry):
            continue
        if entry.name not in index:
            unknown.append(entry.name)
            continue
        label = index[entry.name]
        names = sorted(e.name for e in os.scandir(entry.path) if entry_is_file(e) and is_image(e.name))
        samples.extend((os.path.join(entry.path, n), label) for n in names)
    if unknown:
        log.warning("%s: ignoring %d folder(s) that are not among meta.mat's %d classes: %s",
                    split_dir, len(unknown), NUM_CLASSES, ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return samples


def _flat_val_samples(layout, classes):
    if layout.ground_truth is None:
        raise DataError(f"{layout.val_dir} is flat but there is no {DEVKIT_DIRS[0]}/data/{GROUND_TRUTH_NAME} "
                        f"in {layout.root} to label it")
    truth = read_ground_truth(layout.ground_truth)
    label_of_id = {ilsvrc_id: i for i, ilsvrc_id in enumerate(classes.ilsvrc_ids)}
    numbered = []
    for entry in os.scandir(layout.val_dir):
        if not (entry_is_file(entry) and is_image(entry.name)):
            continue
        match = VAL_NAME.match(entry.name)
        if not match:
            raise DataError(f"cannot label {entry.path}: flat val files must be named ILSVRC2012_val_<number>.JPEG")
        number = int(match.group(1))
        if not 1 <= number <= len(truth):
            raise DataError(f"{entry.path} is number {number} but ground truth {layout.ground_truth} has "
                            f"{len(truth)} lines; use the ILSVRC2012 devkit's file")
        numbered.append((number, entry.path))
    numbered.sort()
    # The label comes from the number in the name, never the position in a listing: any subset is right.
    return [(path, label_of_id[truth[number - 1]]) for number, path in numbered]


def list_samples(layout, split, classes):
    """[(path, label)] for split "train" or "val", sorted by path (val: by file number)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    split_dir = layout.train_dir if split == "train" else layout.val_dir
    if split_dir is None:
        raise DataError(f"no {split} folder in {layout.root} (expected {SPLIT_DIRS[layout.kind][split == 'val']}/)")
    if split == "val" and layout.val_flat:
        return _flat_val_samples(layout, classes)
    return _folder_samples(split_dir, classes)


def summarize(layout, classes, samples):
    """Human-readable lines: layout, classes, images per split, missing/unknown classes."""
    val_how = ("flat, labelled by " + str(layout.ground_truth.relative_to(layout.root))
               if layout.val_flat and layout.ground_truth else "flat, NO ground truth" if layout.val_flat
               else "<wnid>/ folders")
    lines = [f"layout: {layout.kind} in {layout.root}",
             f"  train: {layout.train_dir.name + '/' if layout.train_dir else 'none'}",
             f"  val:   {layout.val_dir.name + '/ (' + val_how + ')' if layout.val_dir else 'none'}",
             f"  devkit: {layout.meta_mat.relative_to(layout.root) if layout.meta_mat else 'none'}",
             f"classes: {len(classes.wnids)} from meta.mat, order {classes.order} "
             f"(index 0 = {classes.wnids[0]} {classes.names[0]})"]
    index = classes.index_of()
    for split, split_samples in samples.items():
        present = {label for _, label in split_samples}
        missing = [classes.wnids[i] for i in range(len(classes.wnids)) if i not in present]
        lines.append(f"{split}: {len(split_samples)} images in {len(present)} classes"
                     + (f"; missing {len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                        if missing else ""))
        split_dir = layout.train_dir if split == "train" else layout.val_dir
        if split == "train" or not layout.val_flat:
            unknown = sorted(e.name for e in os.scandir(split_dir) if entry_is_dir(e) and e.name not in index)
            if unknown:
                lines.append(f"  unknown folders (not in meta.mat, ignored): {', '.join(unknown[:10])}")
    return lines

