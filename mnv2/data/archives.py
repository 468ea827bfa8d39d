"""The three official ILSVRC2012 archives read as they are, nothing extracted:

    python train.py --data-dir /data/ilsvrc2012    # ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, devkit

`ILSVRC2012_img_train.tar` is a tar of 1,000 uncompressed per-class tars (`n01440764.tar`, ...), so every
training JPEG is one byte range of the outer file; `ILSVRC2012_img_val.tar` holds the 50,000 val JPEGs
flat; the classes and the val labels come from `ILSVRC2012_devkit_t12.tar.gz` (data/meta.mat and the ground
truth), as from the extracted devkit. Walking the tar headers of the train archive takes minutes, so the
member index (name, offset, size) is written once beside the archive (or in the cache folder when that
folder is read-only) with the archive's size and modification time; an index of a changed archive is
refused and built again.
"""
import gzip
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mnv2.data.imagenet import (CLASS_ORDERS, GROUND_TRUTH_NAME, SPLIT_DIRS, VAL_NAME, WNID, DataError,
                                classes_from_leaves, is_image, read_ground_truth, read_meta_mat)
from mnv2.data.ranges import Cache, Member, SourceError, Store, is_url

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
INDEX_SUFFIX = ".index.json.gz"
INDEX_VERSION = 1

log = logging.getLogger("mnv2.data")


@dataclass
class Packed:
    """Data read from inside tar files: its classes and, per split ("train", "val"), [(Member, label)]."""
    kind: str          # "shards" or "archives"
    where: str
    classes: object    # imagenet.Classes
    splits: dict
    imagenet: bool     # ImageNet's classes (WNIDs in sorted or devkit order), not a folder dataset's


def is_archive_folder(location):
    """The archives, and no extracted copy beside them (that one is read as before: no index to build)."""
    if is_url(location):
        return False
    root = Path(location)
    extracted = any((root / d).is_dir() for names in SPLIT_DIRS.values() for d in names)
    return not extracted and any((root / n).is_file() for n in (TRAIN_TAR, VAL_TAR))


# --------------------------------------------------------------------------------------------------
# Tar headers -> (name, offset, size)


def tar_members(f, where, start=0, end=None):
    """[(name, offset of its data, size)] of the regular files of the tar that starts at byte `start` of
    the open file `f` (and ends by byte `end`). A tar cut short or damaged is a SourceError naming the
    file and the byte where it breaks."""
    end = os.fstat(f.fileno()).st_size if end is None else end
    f.seek(start)
    found, position = [], start
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                position = info.offset_data + info.size
                if position > end:
                    raise SourceError(f"{where}: truncated at byte {end}: {info.name} needs bytes "
                                      f"{info.offset_data}..{position}; copy the file again")
                if info.isfile():
                    found.append((info.name, info.offset_data, info.size))
            position = tar.offset
    except tarfile.TarError as e:
        raise SourceError(f"{where}: not a readable tar after byte {position} ({e}); copy the file again") from None
    f.seek(position)
    if position >= end or f.read(512) != bytes(512):  # tarfile ends quietly at a header cut in two
        raise SourceError(f"{where}: truncated or damaged at byte {position} (no end-of-archive marker); "
                          "copy the file again")
    return found


def fingerprint(path):
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _index_path(archive, cache):
    beside = archive.with_name(archive.name + INDEX_SUFFIX)
    if os.access(archive.parent, os.W_OK) or beside.exists():
        return beside
    import hashlib
    return cache.folder / "indexes" / (hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
                                       + "-" + beside.name)


def member_index(archive, build, cache, note=log.warning):
    """[(name, offset, size)] of `archive`: from its index when that was made of this very file (size and
    modification time), else `build(f)` once, written where `_index_path` says."""
    archive = Path(archive)
    path = _index_path(archive, cache)
    now = fingerprint(archive)
    if path.exists():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError, EOFError):
            saved = {}
        if saved.get("version") == INDEX_VERSION and saved.get("fingerprint") == now:
            return [tuple(m) for m in saved["members"]]
        note(f"{path}: made of another {archive.name} (size or time differ): indexing the archive again")
    else:
        note(f"{archive}: indexing its members once (written to {path})")
    with open(archive, "rb") as f:
        members = build(f)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump({"version": INDEX_VERSION, "archive": archive.name, "fingerprint": now, "members": members}, f)
    os.replace(tmp, path)
    return members


def _train_members(f, where):
    """Members of the tar of per-class tars as ("n01440764.tar/n01440764_10026.JPEG", offset, size)."""
    members = []
    for name, offset, size in tar_members(f, where):
        if not name.endswith(".tar"):
            continue
        members += [(f"{name}/{inner}", o, s) for inner, o, s in
                    tar_members(f, f"{where}/{name}", offset, offset + size)]
    return members


# --------------------------------------------------------------------------------------------------
# The devkit, the classes, the samples


def read_devkit(path, class_order):
    """(Classes, ground-truth IDs or None) from the devkit archive, read in memory."""
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                for want in ("data/meta.mat", f"data/{GROUND_TRUTH_NAME}"):
                    if info.isfile() and info.name.endswith(want):
                        found[want] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise SourceError(f"{path}: not a readable devkit archive ({e}); download {DEVKIT_TAR} again") from None
    if "data/meta.mat" not in found:
        raise DataError(f"{path}: no data/meta.mat inside; is this {DEVKIT_TAR}?")
    classes = classes_from_leaves(read_meta_mat(f"{path}/data/meta.mat", io.BytesIO(found["data/meta.mat"])),
                                  class_order)
    truth = found.get(f"data/{GROUND_TRUTH_NAME}")
    truth = read_ground_truth(f"{path}/data/{GROUND_TRUTH_NAME}", text=truth.decode("ascii")) if truth else None
    return classes, truth


def open_archives(root, class_order="sorted", cache=None, note=log.warning):
    """The official archives in `root` as Packed data, labels exactly as the extracted layout gives them."""
    if class_order not in CLASS_ORDERS:
        raise DataError(f"{root} holds ImageNet's archives: --class-order {class_order} is not one of "
                        f"{', '.join(CLASS_ORDERS)}")
    root, cache = Path(root), cache or Cache.default()
    devkit = root / DEVKIT_TAR
    if not devkit.is_file():
        raise DataError(f"{root}: {DEVKIT_TAR} is missing; put it beside the image archives (it holds the classes "
                        "and the validation labels)")
    classes, truth = read_devkit(devkit, class_order)
    index, store = classes.index_of(), Store(cache)
    splits = {}
    train = root / TRAIN_TAR
    if train.is_file():
        members = member_index(train, lambda f: _train_members(f, str(train)), cache, note)
        samples = []
        for name, offset, size in sorted(members):
            wnid = name.split(".tar/", 1)[0]
            if WNID.match(wnid) and wnid in index and is_image(name):
                samples.append((Member(str(train), offset, size, name, store), index[wnid]))
        splits["train"] = samples
    val = root / VAL_TAR
    if val.is_file():
        if truth is None:
            raise DataError(f"{devkit}: no data/{GROUND_TRUTH_NAME} inside to label {VAL_TAR}")
        label_of_id = {ilsvrc_id: i for i, ilsvrc_id in enumerate(classes.ilsvrc_ids)}
        numbered = []
        for name, offset, size in member_index(val, lambda f: tar_members(f, str(val)), cache, note):
            match = VAL_NAME.match(Path(name).name)
            if match and 1 <= int(match.group(1)) <= len(truth):
                numbered.append((int(match.group(1)), Member(str(val), offset, size, name, store)))
        splits["val"] = [(m, label_of_id[truth[n - 1]]) for n, m in sorted(numbered)]
    return Packed("archives", str(root), classes, splits, imagenet=True)
