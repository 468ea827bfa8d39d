"""ImageNet (ILSVRC2012) input pipeline: from files on disk to uint8 batches with exact labels.

Reads the ImageNet layouts in use (the ILSVRC2012 archive layout with a flat val folder and the devkit,
val sorted into <wnid>/ folders, torchvision's train/ + val/), takes the 1000 classes from the devkit's
meta.mat, builds fast train/eval transforms that hand the device uint8 images, and writes a small demo
dataset in the exact archive layout from scikit-learn's bundled digits.

Usage: python read_ImageNetData.py --data-dir /data/imagenet [--check] [--list val] [--class-order devkit]
"""
import io
import json
import logging
import math
import os
import re
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

import cli
from cli import ScriptError

try:  # optional: decodes JPEGs for training faster than PIL; PIL does everything without it
    import simplejpeg
except ImportError:
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
SPLIT_DIRS = {"seed": ("ILSVRC2012_img_train", "ILSVRC2012_img_val"), "torchvision": ("train", "val")}

log = logging.getLogger("read_ImageNetData")


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


def _val_is_flat(val_dir):
    has_files = has_dirs = False
    with os.scandir(val_dir) as entries:
        for e in entries:
            if e.is_dir() and WNID.match(e.name):
                has_dirs = True
            elif e.is_file() and is_image(e.name):
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


def read_meta_mat(path):
    """The leaf synsets of a devkit meta.mat as [(ILSVRC2012_ID, WNID, words)], checked to be ILSVRC2012's 1000."""
    import scipy.io  # only needed here; keeps `import read_ImageNetData` light

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
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
    leaves = read_meta_mat(layout.meta_mat)
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
        wnids = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and WNID.match(e.name))
        if len(wnids) == NUM_CLASSES:
            log.warning("%s: no devkit meta.mat, so classes are the %d sorted folder names, without "
                        "class names", layout.root, NUM_CLASSES)
            return Classes(order="sorted", wnids=wnids, names=list(wnids), ilsvrc_ids=[0] * NUM_CLASSES)
        raise DataError(f"{need}; {split_dir} has {len(wnids)} <wnid>/ folders, so its labels cannot be "
                        f"trusted without it")
    raise DataError(need)


def read_ground_truth(path, num_classes=NUM_CLASSES):
    """Devkit IDs of ILSVRC2012_validation_ground_truth.txt: element n-1 belongs to ILSVRC2012_val_<n>."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
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
        if not entry.is_dir():
            continue
        if entry.name not in index:
            unknown.append(entry.name)
            continue
        label = index[entry.name]
        names = sorted(e.name for e in os.scandir(entry.path) if e.is_file() and is_image(e.name))
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
        if not (entry.is_file() and is_image(entry.name)):
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


# ----------------------------------------------------------------------------------------------------
# Transforms: uint8 CHW out, normalisation happens on the device (normalize())
# ----------------------------------------------------------------------------------------------------
def _open(src):
    """A lazily decoded PIL image; ImageNet holds CMYK, grayscale and PNG-in-.JPEG files, all opened by content."""
    return src if isinstance(src, Image.Image) else Image.open(src)


def _to_rgb(im):
    if im.mode.startswith("I;16"):
        # 16-bit greyscale (PNG): keep the top 8 bits; convert() would clip every value above 255 to white
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    # convert() also decodes; for RGB files load() avoids convert()'s full copy
    if im.mode != "RGB":
        return im.convert("RGB")
    im.load()
    return im


def _to_tensor(im):
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def _decode_jpeg_reduced(data, width, height, reduce):
    """HWC uint8 array of a JPEG decoded straight by libjpeg-turbo (simplejpeg) at about 1/reduce scale, or
    None when simplejpeg is missing or declines the file (CMYK, recoverable damage): then PIL decodes it.

    Faster than PIL here: no RGB->RGBX->RGB repacking, and the fast IDCT and chroma upsampling, whose
    differences (about one grey level) are far below what the augmentation changes anyway.
    """
    if simplejpeg is None:
        return None
    try:
        return simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True,
                                      min_height=-(-height // reduce), min_width=-(-width // reduce))
    except ValueError:
        return None


def _jpeg_size(data):
    """(width, height) from a JPEG header without decoding, or None (not a JPEG, or simplejpeg missing)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":  # judged by content: ImageNet has PNGs named .JPEG
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _refuse_bomb(width, height):
    """Pillow's decompression-bomb rule for images that Pillow does not open: over twice
    Image.MAX_IMAGE_PIXELS is refused (a small file can declare gigapixels)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise Image.DecompressionBombError(f"image size ({width * height} pixels) exceeds limit of "
                                           f"{2 * limit} pixels, could be decompression bomb DOS attack")


class TrainTransform:
    """RandomResizedCrop + horizontal flip with torchvision's sampling, decoding JPEGs at reduced scale.

    The crop box and flip come from torch's global RNG in the same draws and order as torchvision's
    RandomResizedCrop.get_params and RandomHorizontalFlip, so seeded runs sample identical boxes. When the
    box is at least 2x/4x/8x the output size, libjpeg decodes at 1/2, 1/4 or 1/8 scale (its DCT scaling:
    still a downscale, so no detail the output could show is lost), and box edges move by under one
    reduced pixel. Resizing uses torch's antialiased uint8 kernel, within one grey level of PIL's.
    """

    def __init__(self, input_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.input_size = int(input_size)
        self.scale, self.ratio, self.hflip, self.interpolation = tuple(scale), tuple(ratio), hflip, interpolation
        # float32 like torchvision's torch.log(torch.tensor(ratio)), so the same draws give the same boxes
        self._log_ratio = torch.log(torch.tensor(ratio)).tolist()

    def get_params(self, width, height):
        """(top, left, height, width) of the crop, drawn exactly as RandomResizedCrop.get_params."""
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(self._log_ratio[0], self._log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, src):
        data = None
        if isinstance(src, Image.Image):
            im, size = src, src.size
        else:
            with open(src, "rb") as f:
                data = f.read()
            size = _jpeg_size(data)
            if size:
                _refuse_bomb(*size)  # libjpeg would decode it: Pillow's limit has to be applied here
            im = None if size else Image.open(io.BytesIO(data))
            size = size or im.size
        width, height = size
        i, j, h, w = self.get_params(width, height)
        reduce = next(s for s in (8, 4, 2, 1) if s == 1 or min(h, w) >= s * self.input_size)
        pixels = _decode_jpeg_reduced(data, width, height, reduce) if im is None else None
        if pixels is not None:
            scale = width / pixels.shape[1]
            pixels = torch.from_numpy(pixels)
        else:
            im = im or Image.open(io.BytesIO(data))
            drafted = im.draft(None, (width // reduce, height // reduce)) if reduce > 1 and im.format == "JPEG" else None
            # draft's box is the full image in reduced pixels: libjpeg's scale, 1 when nothing was reduced
            scale = width / drafted[1][2] if drafted else 1
            im = _to_rgb(im)
        left, top = round(j / scale), round(i / scale)
        right, bottom = max(round((j + w) / scale), left + 1), max(round((i + h) / scale), top + 1)
        if pixels is not None:
            crop = pixels[top:bottom, left:right].permute(2, 0, 1)
        else:
            crop = _to_tensor(im.crop((left, top, right, bottom)))
        # channels-last uint8 is the layout torch's vectorised antialiased resize runs fastest on
        crop = crop[None].contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(crop, size=(self.input_size, self.input_size),
                                              mode=self.interpolation, antialias=True, align_corners=False)[0]
        if torch.rand(1) < self.hflip:
            out = out.flip(-1)
        return out


def _resized_size(width, height, size):
    # torchvision's Resize(int): the short side becomes `size`, the long side is truncated, not rounded
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _exact_span(n_in, n_out, start, count):
    """Source span (lo, hi) whose resize to `count` pixels gives output pixels [start, start + count) of the
    full n_in -> n_out resize bit for bit, or None.

    PIL computes each output pixel from center = lo + (x + 0.5) * (hi - lo) / count with lo, hi in float32.
    When n_in / n_out is a binary fraction (the short side resized to 256) every step is exact, so the
    taps and weights equal those of the full resize. Otherwise no box reproduces them and that axis is
    resized in full.
    """
    scale = Fraction(n_in, n_out)
    if scale.denominator & (scale.denominator - 1):
        return None
    lo, hi = start * scale, (start + count) * scale
    if any(float(np.float32(v)) != v for v in (lo, hi, hi - lo)):
        return None
    return float(lo), float(hi)


def _source_lines(n_in, n_out, start, count, support):
    """Source lines [first, last) that output pixels [start, start + count) read, with a line of margin."""
    scale = Fraction(n_in, n_out)
    reach = support * max(scale, 1)
    first = math.floor((start + Fraction(1, 2)) * scale - reach + Fraction(1, 2)) - 1
    last = math.floor((start + count - Fraction(1, 2)) * scale + reach + Fraction(1, 2)) + 1
    return max(first, 0), min(last, n_in)


def _probe_pass_order():
    """How this Pillow orders the two passes of a resize: a function (w, h, new_w, new_h) -> vertical first.

    Each pass rounds to uint8, so the order changes pixels and the fast path must follow Pillow's. Pillow
    up to 12 always runs the horizontal pass first; Pillow 13 runs the vertical one first when the height
    shrinks by more than twice as many pixels as the width. None when neither rule explains this Pillow.
    """
    rng = np.random.default_rng(0)
    rules = (lambda w, h, nw, nh: False,
             lambda w, h, nw, nh: h - nh > 0 and h - nh > 2 * (w - nw))
    probes = [((9, 64), (6, 16)), ((64, 9), (16, 6)), ((40, 50), (17, 13)), ((50, 40), (13, 17))]
    images = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), (nw, nh))
              for (w, h), (nw, nh) in probes]
    for rule in rules:
        for im, (nw, nh) in images:
            w, h = im.size
            if rule(w, h, nw, nh):
                two_pass = im.resize((w, nh), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
            else:
                two_pass = im.resize((nw, h), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
            if two_pass.tobytes() != im.resize((nw, nh), Image.BILINEAR).tobytes():
                break
        else:
            return rule
    return None


_FILTER_SUPPORT = {"bilinear": 1, "bicubic": 2}


class EvalTransform:
    """Resize(resize) + CenterCrop(input_size), bit-identical to torchvision's on PIL images, as uint8.

    The speed comes from not resampling what the crop throws away. Pillow resizes in two 1-D passes, each
    rounded to uint8; this runs the same passes in the same order, as two single-axis resizes, but only
    over the lines the crop keeps, and along an axis whose scale is a binary fraction (the short side at
    resize=256) only for the output pixels the crop keeps. JPEG draft decoding is not used: it changes pixels.
    """

    def __init__(self, input_size=224, resize=256, interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if resize < input_size:
            raise ValueError(f"resize ({resize}) must be at least input_size ({input_size})")
        self.input_size, self.resize, self.interpolation = int(input_size), int(resize), interpolation
        self._vertical_first = _probe_pass_order()

    def __call__(self, src):
        im = _to_rgb(_open(src))
        width, height = im.size
        new_w, new_h = _resized_size(width, height, self.resize)
        crop = self.input_size
        # torchvision's CenterCrop offsets (Python's round: halves go to even)
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        if (new_w, new_h) != (width, height):
            if self._vertical_first is None:  # unknown Pillow: the reference resize, then crop
                im = im.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
            else:
                im, left, top = self._resize_kept(im, new_w, new_h, left, top)
        if im.size != (crop, crop):
            im = im.crop((left, top, left + crop, top + crop))
        return _to_tensor(im)

    def _resize_kept(self, im, new_w, new_h, left, top):
        """The kept part of im.resize((new_w, new_h)), plus the crop offsets left in it."""
        crop, filt, support = self.input_size, INTERPOLATIONS[self.interpolation], _FILTER_SUPPORT[self.interpolation]
        width, height = im.size
        # axis: (input size, output size, crop offset); transposed so "first" is the pass Pillow runs first
        axes = [(width, new_w, left), (height, new_h, top)]
        vertical_first = self._vertical_first(width, height, new_w, new_h)
        first, second = axes[::-1] if vertical_first else axes

        def box(lo_first, hi_first, lo_second, hi_second):
            return ((lo_second, lo_first, hi_second, hi_first) if vertical_first
                    else (lo_first, lo_second, hi_first, hi_second))

        def size(n_first, n_second):
            return (n_second, n_first) if vertical_first else (n_first, n_second)

        span_first, span_second = _exact_span(*first, crop), _exact_span(*second, crop)
        # 1. the first pass only over the source lines that the kept output lines of the second pass read
        if span_second:
            lo2, hi2 = _source_lines(*second, crop, support)
            im = im.crop(box(0, first[0], lo2, hi2))
        else:
            lo2, hi2 = 0, second[0]
        n2 = hi2 - lo2
        if span_first:
            im = im.resize(size(crop, n2), filt, box=box(span_first[0], span_first[1], 0, n2))
            off_first = 0
        else:
            im = im.resize(size(first[1], n2), filt, box=box(0, first[0], 0, n2))
            off_first = first[2]
            im = im.crop(box(off_first, off_first + crop, 0, n2))
        # 2. the second pass
        if span_second:
            im = im.resize(size(crop, crop), filt, box=box(0, crop, span_second[0] - lo2, span_second[1] - lo2))
            off_second = 0
        else:
            im = im.resize(size(crop, second[1]), filt, box=box(0, crop, 0, second[0]))
            off_second = second[2]
        left, top = (off_second, 0) if vertical_first else (0, off_second)
        return im, left, top


def train_transform(input_size=224, interpolation="bilinear"):
    """Callable(path or PIL image) -> uint8 [3, input_size, input_size]: RandomResizedCrop + flip."""
    return TrainTransform(input_size, interpolation=interpolation)


def eval_transform(input_size=224, resize=256, interpolation="bilinear"):
    """Callable(path or PIL image) -> uint8 [3, input_size, input_size]: Resize + CenterCrop."""
    return EvalTransform(input_size, resize, interpolation)


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last=False):
    """uint8 images -> float, with torchvision's ToTensor + Normalize arithmetic (same bits), on their device."""
    x = images_uint8
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div_(255).sub_(m).div_(s)


# ----------------------------------------------------------------------------------------------------
# Dataset, samplers, loader
# ----------------------------------------------------------------------------------------------------
class ImageNetDataset(Dataset):
    """(image uint8 [3,H,W], target, index, n_failed) for each (path, label) sample.

    Unreadable files (truncated, empty, not an image, decompression bombs) are logged once per process.
    Train: the next sample takes the place of a bad one and n_failed counts the bad files skipped;
    more than max_consecutive_failures bad files in a row raise DataError. Eval: a zero image with
    n_failed=1, so the evaluation counts it as a miss instead of dropping it.
    `index` is always the index asked for, so a loop can log which sampler slots it consumed.
    """

    def __init__(self, samples, transform, train, max_consecutive_failures=10):
        self.samples, self.transform, self.train = samples, transform, train
        self.max_consecutive_failures = max_consecutive_failures
        self._logged = set()

    def __len__(self):
        return len(self.samples)

    def _report(self, path, error):
        if path not in self._logged:
            self._logged.add(path)
            log.warning("unreadable image %s: %s: %s", path, type(error).__name__, error)

    def __getitem__(self, index):
        if not self.train:
            path, target = self.samples[index]
            try:
                return self.transform(path), target, index, 0
            except Exception as e:  # any decoder error: the image counts as a miss, never silently dropped
                self._report(path, e)
                size = getattr(self.transform, "input_size", 224)
                return torch.zeros(3, size, size, dtype=torch.uint8), target, index, 1
        for n_failed in range(self.max_consecutive_failures + 1):
            path, target = self.samples[(index + n_failed) % len(self.samples)]
            try:
                return self.transform(path), target, index, n_failed
            except Exception as e:
                self._report(path, e)
                error = e
        raise DataError(f"{self.max_consecutive_failures + 1} images in a row failed to decode, last {path}: "
                        f"{type(error).__name__}: {error}; find them with read_ImageNetData.py --check")


class TrainSampler(Sampler):
    """Shuffled indices for one rank, resumable mid-epoch.

    Each epoch is one permutation seeded by (seed, epoch), padded by wrapping to a multiple of
    num_replicas (as DistributedSampler), and rank r takes positions r, r + R, ... . After every rank has
    consumed k samples the first k * R positions are done, so `skip` carries over to another world size.
    """

    def __init__(self, n, num_replicas=1, rank=0, seed=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.n, self.num_replicas, self.rank, self.seed = n, num_replicas, rank, seed
        self.num_samples = math.ceil(n / num_replicas)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in 0..{self.num_samples}, got {skip}")
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        total = self.num_samples * self.num_replicas
        if total > self.n:
            order = order.repeat(math.ceil(total / self.n))[:total]
        return iter(order[self.rank:total:self.num_replicas][self.skip:].tolist())

    def __len__(self):
        return self.num_samples - self.skip

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.skip * self.num_replicas, "n": self.n}

    def load_state_dict(self, state):
        if state["n"] != self.n:
            raise ValueError(f"sampler state is for {state['n']} samples, this dataset has {self.n}")
        self.seed = state["seed"]
        # floor: with a different world size a few samples may be seen twice, never skipped
        self.set_epoch(state["epoch"], min(state["consumed"] // self.num_replicas, self.num_samples))


class RASampler(TrainSampler):
    """Repeated augmentation (Hoffer et al. 2020; torchvision's RASampler): each epoch's permutation with
    every index repeated `repetitions` times in a row, dealt to the ranks in turn, so the copies of an image
    go to different ranks (in one process: into the same batch) and get their own augmentation.

    An epoch takes as many samples per rank as torchvision's: the dataset size rounded down to a multiple
    of 256 (not rounded below 256 images, where it would leave nothing), split over the ranks, so each
    epoch shows a 1/repetitions share of the images, `repetitions` times each. The same (seed, epoch)
    permutation as TrainSampler; resumable mid-epoch the same way (positions r, r + R, ... of one
    sequence that does not depend on R, so `consumed` carries over to another world size).
    """

    def __init__(self, n, num_replicas=1, rank=0, seed=0, repetitions=3):
        super().__init__(n, num_replicas, rank, seed)
        if repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, got {repetitions}")
        self.repetitions = repetitions
        kept = n // 256 * 256 if n >= 256 else n
        self.num_samples = kept // num_replicas
        self.total = math.ceil(n * repetitions / num_replicas) * num_replicas

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).repeat_interleave(self.repetitions)
        if self.total > len(order):
            order = torch.cat([order, order[:self.total - len(order)]])
        return iter(order[self.rank:self.total:self.num_replicas][:self.num_samples][self.skip:].tolist())

    def state_dict(self):
        return dict(super().state_dict(), repetitions=self.repetitions)


class EvalSampler(Sampler):
    """Indices rank, rank + R, ...: every image exactly once over all ranks (no padding duplicates)."""

    def __init__(self, n, num_replicas=1, rank=0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))


def _ignore_interrupts(worker_id):
    # Ctrl-C reaches every process of the terminal's group; the main process handles it (it finishes the
    # step and saves) and then stops its workers, so a worker must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset, batch_size, sampler, num_workers=4, pin_memory=None, persistent_workers=None,
                 drop_last=False):
    """DataLoader of (images uint8 [B,3,H,W], targets, indices, n_failed) int64 tensors.

    pin_memory defaults to whether CUDA is present; persistent_workers to num_workers > 0 (workers keep
    their file caches and skip a fork per epoch).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
                      drop_last=drop_last, worker_init_fn=_ignore_interrupts if num_workers else None)


def build_datasets(data_dir, class_order="sorted", input_size=224, resize=256, interpolation="bilinear"):
    """(train dataset or None, val dataset or None, Classes, ImageNetLayout) for data_dir."""
    layout = find_layout(data_dir)
    classes = read_classes(layout, class_order)
    train = val = None
    if layout.train_dir is not None:
        train = ImageNetDataset(list_samples(layout, "train", classes),
                                train_transform(input_size, interpolation), train=True)
    if layout.val_dir is not None:
        val = ImageNetDataset(list_samples(layout, "val", classes),
                              eval_transform(input_size, resize, interpolation), train=False)
    return train, val, classes, layout


# ----------------------------------------------------------------------------------------------------
# Demo dataset
# ----------------------------------------------------------------------------------------------------
# The demo writer's record in the folders it writes: it writes only into an empty folder or its own.
DEMO_MARKER = ".demo-dataset.json"
DEMO_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def demo_synsets():
    """The demo's 1000 leaves (plus one parent) as [(ILSVRC2012_ID, WNID, words, children)], in ID order.

    Devkit IDs follow a fixed stride permutation of the sorted WNIDs, so the two class orders differ;
    the 10 digits are leaves spread over the sorted list.
    """
    wnids = [f"n{1000000 + 7919 * k:08d}" for k in range(NUM_CLASSES)]
    words = [f"synthetic class {k}" for k in range(NUM_CLASSES)]
    for digit, k in enumerate(range(37, NUM_CLASSES, 100)):
        words[k] = f"digit {DEMO_DIGITS[digit]}"
    ids = [(k * 389 + 17) % NUM_CLASSES + 1 for k in range(NUM_CLASSES)]
    synsets = [(ids[k], wnids[k], words[k], ()) for k in range(NUM_CLASSES)]
    digit_ids = tuple(ids[k] for k in range(37, NUM_CLASSES, 100))
    synsets.append((NUM_CLASSES + 1, "n09999999", "digit", digit_ids))
    return sorted(synsets)


def write_meta_mat(path, synsets):
    """Write synsets [(ILSVRC2012_ID, WNID, words, children)] as the devkit's meta.mat struct array."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    table = np.zeros((len(synsets), 1), dtype=[(f, object) for f in fields])
    for row, (ilsvrc_id, wnid, words, children) in enumerate(synsets):
        table[row, 0] = (float(ilsvrc_id), wnid, words, f"gloss of {words}", float(len(children)),
                         np.array(children, dtype=float).reshape(1, -1), float(bool(children)), 0.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})


def make_demo(root, seed=0, train_per_class=None, val_per_class=None, image_size=None):
    """Write a small dataset in the exact ILSVRC2012 archive layout under root; returns root as a Path.

    Images: scikit-learn's bundled 8x8 handwritten digits (1,797, no download), upscaled to image_size
    (default 32) RGB JPEGs, for the 10 digit classes among meta.mat's 1000. Each class keeps val_per_class
    (default 20%) for val, the rest (or train_per_class) for train; val files are shuffled and numbered
    like the real ILSVRC2012_val_%08d.JPEG set. Deterministic for a given seed.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    image_size = image_size or 32
    settings = {"seed": seed, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "image_size": image_size}
    made = _demo_marker(root)
    if made is not None and made.get("settings") != settings:
        raise DataError(f"{root} holds a demo dataset made with other settings ({made.get('settings')}); "
                        "delete that folder or choose another one")
    if made is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not empty and was not written by the demo writer: its files are left "
                        "alone; choose an empty or new folder for the demo dataset")
    if made is not None and made.get("complete"):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": False}) + "\n")
    digits = load_digits()
    synsets = demo_synsets()
    by_words = {words: (ilsvrc_id, wnid) for ilsvrc_id, wnid, words, _ in synsets}
    rng = np.random.default_rng(seed)
    train_dir, val_dir = root / "ILSVRC2012_img_train", root / "ILSVRC2012_img_val"
    devkit = root / DEVKIT_DIRS[0] / "data"
    for d in (train_dir, val_dir, devkit):
        d.mkdir(parents=True, exist_ok=True)

    def save(pixels, path):
        im = Image.fromarray(np.uint8(pixels * (255 / 16)), "L").resize((image_size, image_size), Image.BILINEAR)
        im.convert("RGB").save(path, quality=90)

    val_items = []
    for digit, name in enumerate(DEMO_DIGITS):
        ilsvrc_id, wnid = by_words[f"digit {name}"]
        idx = rng.permutation(np.flatnonzero(digits.target == digit))
        n_val = val_per_class if val_per_class is not None else len(idx) // 5
        n_train = train_per_class if train_per_class is not None else len(idx) - n_val
        if n_val + n_train > len(idx):
            raise ValueError(f"digit {digit} has {len(idx)} images, asked for {n_train} train + {n_val} val")
        (train_dir / wnid).mkdir(exist_ok=True)
        for k in idx[n_val:n_val + n_train]:
            save(digits.images[k], train_dir / wnid / f"{wnid}_{k}.JPEG")
        val_items += [(k, ilsvrc_id) for k in idx[:n_val]]
    val_items = [val_items[k] for k in rng.permutation(len(val_items))]
    for number, (k, _) in enumerate(val_items, 1):
        save(digits.images[k], val_dir / f"ILSVRC2012_val_{number:08d}.JPEG")
    (devkit / GROUND_TRUTH_NAME).write_text("".join(f"{ilsvrc_id}\n" for _, ilsvrc_id in val_items))
    write_meta_mat(devkit / "meta.mat", synsets)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": True}) + "\n")
    return root


def _demo_marker(root):
    """What the demo writer recorded in root (its settings, whether it finished), or None."""
    try:
        made = json.loads((Path(root) / DEMO_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return made if isinstance(made, dict) else None


def demo_is_complete(root):
    return bool((_demo_marker(root) or {}).get("complete"))


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _check_one(path):
    try:
        with Image.open(path) as im:
            _to_rgb(im)
        return None
    except Exception as e:
        return f"{path}\t{type(e).__name__}: {e}"


def check_images(paths, workers=1):
    """Decode every image; returns 'path<TAB>error' for each bad one."""
    from tqdm import tqdm

    bad = []
    if workers > 1:
        import multiprocessing
        with multiprocessing.Pool(workers) as pool:
            results = pool.imap(_check_one, paths, chunksize=64)
            bad = [r for r in tqdm(results, total=len(paths), desc="decoding", unit="img") if r]
    else:
        bad = [r for r in map(_check_one, tqdm(paths, desc="decoding", unit="img")) if r]
    return bad


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
            unknown = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in index)
            if unknown:
                lines.append(f"  unknown folders (not in meta.mat, ignored): {', '.join(unknown[:10])}")
    return lines


def get_args_parser():
    parser = cli.Parser(prog="read_ImageNetData.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="ImageNet root (ILSVRC2012_img_train/, ILSVRC2012_img_val/, "
                        "ILSVRC2012_devkit_t12/, or train/ + val/)")
    parser.add_argument("--class-order", default="sorted", choices=CLASS_ORDERS,
                        help="sorted: WNID order of torchvision/timm and public weights; devkit: ILSVRC2012_ID - 1")
    parser.add_argument("--check", action="store_true", help="also decode every image and list the bad ones")
    parser.add_argument("--list", choices=("train", "val"), help="print relative/path<TAB>class_index<TAB>wnid per image")
    parser.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.positive_int,
                        default=min(8, os.cpu_count() or 1), help="processes for --check")
    parser.add_argument("--make-demo", type=Path, metavar="DIR",
                        help="write the demo dataset (digits, ILSVRC2012 layout) to DIR and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo dataset's split and order")
    return parser


def main(args):
    parser = get_args_parser()
    if args.make_demo is None and args.data_dir is None:
        parser.error("one of --data-dir or --make-demo is required")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"argument --data-dir: {args.data_dir} is not a directory")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.make_demo is not None:
            root = make_demo(args.make_demo, seed=args.seed)
            print(f"demo dataset written to {root}")
            return
        layout = find_layout(args.data_dir)
        classes = read_classes(layout, args.class_order)
        if args.list:
            lines = (f"{os.path.relpath(path, layout.root)}\t{label}\t{classes.wnids[label]}"
                     for path, label in list_samples(layout, args.list, classes))
            try:
                sys.stdout.writelines(line + "\n" for line in lines)
                sys.stdout.flush()
            except BrokenPipeError:  # `--list val | head` is a normal way to look
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        samples = {split: list_samples(layout, split, classes)
                   for split, d in (("train", layout.train_dir), ("val", layout.val_dir)) if d is not None}
        print("\n".join(summarize(layout, classes, samples)))
        if args.check:
            bad = check_images([p for s in samples.values() for p, _ in s], args.num_workers)
            print(f"check: {len(bad)} unreadable image(s)" + "".join("\n" + b for b in bad))
            if bad:
                sys.exit(1)  # so a script can stop before a multi-day run
    except DataError as e:
        sys.exit(cli.report(e, parser.prog))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
