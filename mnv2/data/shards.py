"""Tar shards in timm's imagenet-1k-wds format: written from any layout this repo reads, and read (a local
folder, an http(s) URL, an fsspec URL) with random access through a member index.

    python read_ImageNetData.py --data-dir /data/imagenet --write-shards /data/imagenet-wds
    python train.py --data-dir /data/imagenet-wds          # or https://host/imagenet-wds/ (its _info.json)

The format is the one of timm's `wds/` reader and of the Hugging Face dataset timm/imagenet-1k-wds:
shards `<prefix>-train-0000.tar` and `<prefix>-validation-0000.tar`, each sample `KEY.jpg` (the original
image bytes), `KEY.cls` (its class index as text) and `KEY.json` (file name, label, class), and `_info.json`
with each split's name, filenames, shard_lengths and num_samples. Beside them this repo keeps the class
order (`classes` in _info.json: order, WNIDs, names), `_index.json.gz` (per shard: its size, sha256 and
each sample's key, label and the byte range of its image, so a sample is one ranged read and the samplers
index the shards as they index files) and `SHA256SUMS` (`sha256sum -c SHA256SUMS` checks the shards).
The tar files are written with the standard library's tarfile: a shard is a plain POSIX tar, which is all
the format asks, and the index needs the offsets that tarfile reports.
"""
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
from pathlib import Path

from PIL import Image

from mnv2.cli import UsageError
from mnv2.data import archives, folders, transforms
from mnv2.data.archives import Packed, open_archives, tar_members
from mnv2.data.imagenet import CLASS_ORDERS, NUM_CLASSES, Classes, DataError
from mnv2.data.loaders import ImageNetDataset
from mnv2.data.ranges import Cache, Member, SourceError, Store, is_url, read_bytes

INFO, INDEX, SUMS, REJECTED = "_info.json", "_index.json.gz", "SHA256SUMS", "_rejected.tsv"
PARTS = "_parts"                                   # the finished shards' records while a set is being written
SPLIT_NAMES = {"train": "train", "val": "validation"}  # this repo's split -> the name in the shards' names
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the keys timm's reader takes an image from
DEFAULT_SHARD_MB = 256
INDEX_VERSION = 1

log = logging.getLogger("mnv2.data")


# --------------------------------------------------------------------------------------------------
# Which data a --data-dir names


def is_shard_set(location):
    """A URL (shards are the one remote data), or a local folder (or its _info.json, or a shard) with _info.json."""
    if is_url(location):
        return True
    return Path(_base(location), INFO).is_file()


def exists(location):
    """Whether --data-dir can name this: a URL (checked when read) or a local folder (or a shard set's file)."""
    return is_url(location) or Path(location).is_dir() or is_shard_set(location)


def _base(location):
    text = str(location).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    return text.rsplit("/", 1)[0] if name in (INFO, INDEX) or name.endswith(".tar") or "{" in name else text


def open_data(location, class_order="sorted", cache=None, note=log.warning, strict_order=True):
    """Packed data (archives.Packed) for the official archives or a shard set at `location`, else None.
    A shard set is labelled in one class order: another `class_order` is refused unless not `strict_order`
    (scoring maps the labels to the weights' classes by WNID instead)."""
    if archives.is_archive_folder(location):
        return open_archives(location, class_order if class_order in CLASS_ORDERS else "sorted", cache, note)
    if not is_shard_set(location):
        return None
    packed = open_shards(location, cache, note)
    if strict_order and packed.imagenet and class_order != packed.classes.order:
        raise UsageError(f"--class-order {class_order}: the shards at {packed.where} are labelled in "
                         f"{packed.classes.order} order (their {INFO}); drop the flag or write them again "
                         f"with --class-order {class_order}")
    return packed


def build_datasets(data_dir, class_order="sorted", input_size=224, resize=256, interpolation="bilinear", *,
                   val_split=None, cache=None, log=print):
    """folders.FolderData for a shard set or the official archives (the transforms of any layout), or None."""
    packed = open_data(data_dir, class_order, cache, note=log)
    if packed is None:
        return None
    if val_split:
        raise UsageError(f"--val-split: {data_dir} has its own validation split; drop the flag")
    train = val = None
    if packed.splits.get("train"):
        train = ImageNetDataset(packed.splits["train"], transforms.train_transform(input_size, interpolation),
                                train=True)
    if packed.splits.get("val"):
        val = ImageNetDataset(packed.splits["val"], transforms.eval_transform(input_size, resize, interpolation),
                              train=False)
    return folders.FolderData(train, val, packed.classes, packed.kind)


# --------------------------------------------------------------------------------------------------
# Reading


def open_shards(location, cache=None, note=log.warning):
    """The shard set at `location` as Packed data; a missing or cut shard (local: checked now) or an index
    that does not match _info.json is a DataError naming the file."""
    base = _base(location)
    remote = is_url(base)
    store = Store((cache or Cache.default()) if remote else None)
    try:
        info = json.loads(store.read_all(f"{base}/{INFO}"))
    except SourceError:  # not there or not reachable: its own line says which
        raise
    except ValueError as e:
        raise DataError(f"{base}/{INFO}: not JSON ({e})") from None
    splits_info = info.get("splits") or {}
    index = _read_index(base, splits_info, store, cache, note)
    classes = _classes(info, base, note)
    splits = {}
    for split, wds_name in SPLIT_NAMES.items():
        entry = splits_info.get(wds_name) or splits_info.get(split)
        if not entry:
            continue
        samples = []
        for name, count in zip(entry["filenames"], entry.get("shard_lengths") or [None] * len(entry["filenames"])):
            shard = index.get(name)
            if shard is None:
                raise DataError(f"{base}/{INDEX} does not list {name}, which {INFO} names; write the index again")
            if count is not None and len(shard["samples"]) != count:
                raise DataError(f"{base}/{name}: {len(shard['samples'])} samples in the index, {count} in {INFO}")
            where = f"{base}/{name}"
            if not remote:
                _check_size(where, shard["bytes"])
            samples += [(Member(where, offset, size, f"{key}.{ext}", store), label)
                        for key, ext, label, offset, size in shard["samples"]]
        if any(not 0 <= label < len(classes.wnids) for _, label in samples):
            raise DataError(f"{base}: a label of the {wds_name} split is outside the {len(classes.wnids)} classes "
                            f"of {INFO}")
        splits[split] = samples
    return Packed("shards", base, classes, splits, imagenet=classes.order in CLASS_ORDERS)


def _check_size(where, expected):
    try:
        size = os.stat(where).st_size
    except OSError:
        raise SourceError(f"{where}: missing (the index lists it, {expected} bytes); restore it") from None
    if size != expected:
        raise SourceError(f"{where}: truncated at byte {size}, the index says {expected} bytes; copy it again"
                          if size < expected else f"{where}: {size} bytes, the index says {expected}: "
                          "a different file; write the index again")


def _classes(info, base, note):
    saved = info.get("classes")
    if saved:
        names = list(saved["names"])
        return Classes(order=saved["order"], wnids=list(saved.get("wnids") or [""] * len(names)), names=names,
                       ilsvrc_ids=list(saved.get("ilsvrc_ids") or [0] * len(names)))
    # timm's imagenet-1k-wds carries no class list: its .cls labels are the sorted-WNID indices
    wnids, names, _ = folders.imagenet_classes()
    note(f"note: {base}/{INFO} has no class list: taking ImageNet's {NUM_CLASSES} classes in sorted-WNID "
         "order, as timm's imagenet-1k-wds labels them")
    return Classes(order="sorted", wnids=list(wnids), names=list(names), ilsvrc_ids=[0] * NUM_CLASSES)


def _read_index(base, splits_info, store, cache, note):
    """{shard name: {"bytes", "sha256", "samples": [[key, ext, label, offset, size]]}} from _index.json.gz;
    a local set without one (timm's download) is indexed once, from its tar headers."""
    try:
        raw = store.read_all(f"{base}/{INDEX}")
    except SourceError:
        if is_url(base):
            raise DataError(f"{base}: no {INDEX} beside the shards; index a local copy once (python "
                            f"read_ImageNetData.py --data-dir COPY writes it there) and upload it") from None
        return _index_local_set(base, splits_info, cache, note)
    try:
        saved = json.loads(gzip.decompress(raw))
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{base}/{INDEX}: unreadable ({e}); write the index again") from None
    return saved["shards"]


def _index_local_set(base, splits_info, cache, note):
    names = [n for entry in splits_info.values() for n in entry.get("filenames", ())]
    note(f"{base}: no {INDEX}: indexing the {len(names)} shards' tar headers once")
    shards = {}
    for name in names:
        where = f"{base}/{name}"
        if not os.path.isfile(where):
            raise SourceError(f"{where}: missing ({INFO} lists it); restore it")
        with open(where, "rb") as f:
            shards[name] = {"bytes": os.fstat(f.fileno()).st_size, "sha256": None,
                            "samples": _samples_of_tar(f, where)}
    target = Path(base, INDEX)
    if not os.access(base, os.W_OK):
        target = (cache or Cache.default()).folder / "indexes" / (
            hashlib.sha256(str(Path(base).resolve()).encode()).hexdigest()[:16] + INDEX)
        note(f"{base} is read-only: the index goes to {target}, where it is not looked for; copy it beside the shards")
    _write_json_gz(target, {"version": INDEX_VERSION, "shards": shards})
    return shards


def _samples_of_tar(f, where):
    """[[key, image extension, label, offset, size]] of a webdataset tar: members grouped by key (the name
    up to the first dot of its base name), the image from .jpg/.jpeg/.png/.webp, the label from .cls."""
    samples, by_key = [], {}
    for name, offset, size in tar_members(f, where):
        folder, _, base = name.rpartition("/")
        key, _, ext = base.partition(".")
        by_key.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = (offset, size)
    for key, parts in by_key.items():
        image = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None or "cls" not in parts:
            raise DataError(f"{where}: sample {key} has no image or no .cls label ({', '.join(sorted(parts))})")
        f.seek(parts["cls"][0])
        label = int(f.read(parts["cls"][1]).decode("ascii").strip())
        samples.append([key, image, label, *parts[image]])
    return samples


# --------------------------------------------------------------------------------------------------
# Writing


def _size_of(ref):
    return ref.size if isinstance(ref, Member) else os.path.getsize(ref)


def sample_keys(refs):
    """Keys of the samples: the original file names without extension where those are unique and hold no
    dot (ImageNet's n01440764_10026, ILSVRC2012_val_00000001, as timm's shards name them), else numbers."""
    stems = [Path(str(r)).name.split(".", 1)[0] for r in refs]
    if len(set(stems)) == len(stems) and all(stems):
        return stems
    return [f"{i:08d}" for i in range(len(refs))]


def plan(samples, shard_bytes):
    """The samples cut, in order, into consecutive shards of about `shard_bytes` each."""
    groups, current, size = [], [], 0
    for sample in samples:
        if current and size + _size_of(sample[0]) > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(sample)
        size += _size_of(sample[0]) + 3 * 1024  # three members: headers and padding
    return groups + ([current] if current else [])


def _plan_digest(jobs, classes):
    h = hashlib.sha256(json.dumps([classes.order, classes.wnids, classes.names]).encode())
    for name, _, group in jobs:
        h.update(json.dumps([name, [(str(r), label, key) for r, label, key in group]]).encode())
    return h.hexdigest()


def _describe(ref, root):
    if isinstance(ref, Member):
        return ref.name
    try:
        return Path(ref).relative_to(root).as_posix()
    except ValueError:
        return str(ref)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same data gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(out, name, group, identities, root):
    """Write one shard (to a temporary name, then renamed) and return its record for the index: each
    image is decoded once on the way; one that does not decode is listed in "rejected", not written."""
    tmp = out / f".{name}.tmp-{os.getpid()}"
    rejected = []
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for ref, label, key in group:
            try:
                data = read_bytes(ref)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except Exception as e:  # any decoder or read error: listed, never written nor silently dropped
                rejected.append([str(ref), f"{type(e).__name__}: {e}"])
                continue
            meta = {"filename": _describe(ref, root), "label": label, "class": identities[label]}
            _add(tar, f"{key}.jpg", data)
            _add(tar, f"{key}.cls", str(label).encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        samples = _samples_of_tar(f, str(out / name))
    os.replace(tmp, out / name)
    record = {"name": name, "bytes": (out / name).stat().st_size, "sha256": digest.hexdigest(),
              "samples": samples, "rejected": rejected}
    _write_json_gz(out / PARTS / f"{name}.json.gz", record)
    return record


def _write_one(job):
    return write_shard(*job)


def _write_json_gz(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _write_text(path, text):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_shards(out, classes, splits, *, root, prefix="imagenet1k", shard_mb=DEFAULT_SHARD_MB, workers=1,
                 log=print):
    """Write `splits` ({"train"/"val": [(path or Member, label)]}) as a shard set in `out`; returns
    (samples written, rejected [(source, error)]).

    Parallel: one shard per process at a time. Resumable: the plan (the samples, their order, the shard
    size) is fixed by the data, and a shard whose record is in out/_parts is not written again; the index,
    _info.json and SHA256SUMS are written last, from the records.
    """
    out = Path(out)
    jobs = []
    for split, samples in splits.items():
        if not samples:
            continue
        keys = sample_keys([r for r, _ in samples])
        groups = plan([(r, label, k) for (r, label), k in zip(samples, keys)], shard_mb * 1e6)
        width = max(4, len(str(len(groups) - 1)))
        jobs += [(f"{prefix}-{SPLIT_NAMES[split]}-{k:0{width}d}.tar", split, g) for k, g in enumerate(groups)]
    if not jobs:
        raise DataError(f"{root}: no images to write")
    digest = _plan_digest(jobs, classes)
    if (out / INFO).is_file() and not (out / PARTS).exists():
        saved = json.loads((out / INFO).read_text())
        if saved.get("plan") == digest:
            log(f"{out}: these shards are written already")
            return sum(s["num_samples"] for s in saved["splits"].values()), []
        raise UsageError(f"--write-shards {out}: holds another shard set; name an empty folder")
    plan_file = out / PARTS / "plan"
    if plan_file.exists() and plan_file.read_text() != digest:
        raise UsageError(f"--write-shards {out}: its unfinished shards are of other data or another --shard-size; "
                         "name an empty folder, or the same data and size to finish them")
    if not plan_file.exists() and out.exists() and any(p.name != PARTS for p in out.iterdir()):
        raise UsageError(f"--write-shards {out}: not empty; name an empty folder")
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    _write_text(plan_file, digest)
    identities = folders.identities(classes)
    done = {p.name[:-len(".json.gz")] for p in (out / PARTS).glob("*.json.gz")}
    todo = [(out, name, group, identities, root) for name, _, group in jobs
            if name not in done or not (out / name).is_file()]
    if len(todo) < len(jobs):
        log(f"{out}: {len(jobs) - len(todo)} of {len(jobs)} shards were written before; writing the other {len(todo)}")
    from tqdm import tqdm
    images = sum(len(job[2]) for job in todo)
    with tqdm(total=images, desc="writing shards", unit="img", disable=None) as bar:
        if workers > 1 and len(todo) > 1:
            with multiprocessing.Pool(min(workers, len(todo))) as pool:
                for record in pool.imap_unordered(_write_one, todo):
                    bar.update(len(record["samples"]) + len(record["rejected"]))
        else:
            for job in todo:
                record = _write_one(job)
                bar.update(len(record["samples"]) + len(record["rejected"]))
    return _finish(out, jobs, classes, digest)


def _finish(out, jobs, classes, digest):
    records = {}
    for name, _, _ in jobs:
        with gzip.open(out / PARTS / f"{name}.json.gz", "rt", encoding="utf-8") as f:
            records[name] = json.load(f)
    splits = {}
    for name, split, _ in jobs:
        entry = splits.setdefault(SPLIT_NAMES[split], {"name": SPLIT_NAMES[split], "filenames": [],
                                                       "shard_lengths": [], "num_samples": 0})
        entry["filenames"].append(name)
        entry["shard_lengths"].append(len(records[name]["samples"]))
        entry["num_samples"] += len(records[name]["samples"])
    rejected = [r for rec in records.values() for r in rec["rejected"]]
    info = {"name": out.name, "splits": splits,
            "classes": {"order": classes.order, "wnids": list(classes.wnids), "names": list(classes.names),
                        "ilsvrc_ids": list(classes.ilsvrc_ids)},
            "index": INDEX, "checksums": SUMS, "rejected": len(rejected), "plan": digest}
    _write_json_gz(out / INDEX, {"version": INDEX_VERSION, "shards": {
        name: {k: rec[k] for k in ("bytes", "sha256", "samples")} for name, rec in records.items()}})
    _write_text(out / SUMS, "".join(f"{rec['sha256']}  {name}\n" for name, rec in records.items()))
    prefix = jobs[0][0].rsplit("-", 2)[0]
    for split, entry in splits.items():  # the shard list webdataset's indexed reader (wids) opens
        _write_text(out / f"{prefix}-{split}.wids.json", json.dumps({
            "wids_version": 1, "name": f"{out.name} {split}",
            "shardlist": [{"url": name, "nsamples": len(records[name]["samples"]), "filesize": records[name]["bytes"]}
                          for name in entry["filenames"]]}, indent=1) + "\n")
    if rejected:
        _write_text(out / REJECTED, "".join(f"{src}\t{error}\n" for src, error in rejected))
    _write_text(out / INFO, json.dumps(info, indent=1) + "\n")  # last: its presence says the set is complete
    shutil.rmtree(out / PARTS)
    return sum(e["num_samples"] for e in splits.values()), rejected


def summary(packed):
    """One line: what the packed data is, its classes and images per split."""
    classes = packed.classes
    return (f"{packed.where}: {packed.kind}, {len(classes.names)} classes in {classes.order} order (index 0 = "
            f"{classes.wnids[0] or classes.names[0]} {classes.names[0]}); "
            + " / ".join(f"{len(s)} {split}" for split, s in packed.splits.items()) + " images")


def listing(packed, split):
    """Lines 'member<TAB>class index<TAB>WNID or class name' of one split (read_ImageNetData.py --list)."""
    ids = folders.identities(packed.classes)
    return (f"{member}\t{label}\t{ids[label]}" for member, label in packed.splits.get(split, []))


def check(packed):
    """A shard set: every shard against SHA256SUMS; the archives: every image decoded. One line per problem."""
    if packed.kind == "shards":
        return verify(packed.where)
    bad = []
    for samples in packed.splits.values():
        for member, _ in samples:
            try:
                transforms.decode_rgb(member.read())
            except Exception as e:  # any decoder error is one line of the report
                bad.append(f"{member}\t{type(e).__name__}: {e}")
    return bad


def verify(location):
    """Read every shard in full against SHA256SUMS' digests: [one line per shard that differs]."""
    packed_base = _base(location)
    store = Store(None)  # read through, never into the cache
    bad = []
    for line in store.read_all(f"{packed_base}/{SUMS}").decode().splitlines():
        expected, name = line.split(None, 1)
        where = f"{packed_base}/{name.strip()}"
        digest = hashlib.sha256()
        try:
            size = store.size(where)
            for start in range(0, size, 1 << 24):
                digest.update(store.read(where, start, min(1 << 24, size - start)))
        except SourceError as e:
            bad.append(str(e))
            continue
        if digest.hexdigest() != expected:
            bad.append(f"{where}: sha256 differs from {SUMS}; copy it again")
    return bad
