"""Stored teacher outputs: N augmented views of every training image with the teacher's top-k logits, written
once and read while training instead of running the teacher (dataset reinforcement, Faghri et al. 2023;
FKD, Shen & Xing 2022).

    python train.py --data-dir D --teacher T --write-teacher-outputs DIR [--teacher-views 10 --teacher-top-k 10]
    python train.py --data-dir D --teacher-outputs DIR --distill-loss dist ...

A view is rebuilt, not stored: its record is the seed its augmentation drew from (torch's, Python's and NumPy's
generators seeded with it, then the training transform: crop, flip, policy, erasing), the crop box and flip
it drew, and the CRC-32 of its pixels. Training draws one view per image and epoch (seeded by the run's seed
and the epoch), rebuilds it, and checks its pixels' CRC-32 against the record: a view that comes out
differently (an image file or the augmentation changed) stops the run in one line instead of teaching the
student another image's soft labels. The teacher's logits are kept for its k largest classes; the others
count as probability 0.

Files in DIR (NumPy .npy, memory-mapped; rows are images in the training set's order):
    outputs.json  what was stored and how: images, views, k, the teacher (name, sha256), the data's fingerprint
                  and class order, the view flags, the seed, and once complete each file's sha256
    seeds.npy     uint32 [images, views]      boxes.npy  int32 [images, views, 4] (top, left, height, width)
    flips.npy     uint8 [images, views]       crc.npy    uint32 [images, views] (CRC-32 of the uint8 pixels)
    logits.npy    float16 [images, views, k]  classes.npy int16 (int32 past 32,767 classes) [images, views, k]
    done.npy      uint8 [images]: the images written so far, so a killed writer continues where it stopped
"""
import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mnv2 import distributed, outputs
from mnv2.cli import UsageError
from mnv2.data.imagenet import DataError
from mnv2.data.loaders import seeded
from mnv2.data.ranges import Member, SourceError
from mnv2.data.transforms import normalize
from mnv2.training import distill
from mnv2.weights import sha256_of

FORMAT = "mobilenetv2-teacher-outputs"
META = "outputs.json"
# The flags that decide what a view is: training with stored outputs must draw its views the same way.
VIEW_FLAGS = ("augment", "train_crop_size", "val_crop_size", "val_resize_size", "crop_scale_min", "hflip",
              "interpolation", "auto_augment", "random_erase", "ra_magnitude", "augmix_severity")
# Teacher logits outside the stored top k: far enough below any logit that their probability is exactly 0
# at any temperature, finite so that the losses' 0 * log 0 terms stay 0.
ABSENT = -1e9


def files(views, k, num_classes):
    """name -> (dtype, shape after the images axis) of the arrays DIR holds."""
    classes = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    return {"seeds": (np.uint32, (views,)), "boxes": (np.int32, (views, 4)), "flips": (np.uint8, (views,)),
            "crc": (np.uint32, (views,)), "logits": (np.float16, (views, k)), "classes": (classes, (views, k)),
            "done": (np.uint8, ())}


def fingerprint(samples, data_dir, wnids):
    """sha256 of the training samples (file relative to the data folder, label) in order, and the class order."""
    root = Path(data_dir).resolve() if "://" not in str(data_dir) else Path("/")
    digest = hashlib.sha256("\n".join(wnids).encode())
    for ref, label in samples:
        if isinstance(ref, Member):  # in a shard or an archive: the same name wherever the shards are served
            name = f"{ref.location.rstrip('/').rsplit('/', 1)[-1]}/{ref.name}"
        else:
            path = Path(ref).resolve()
            name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        digest.update(f"\n{name}\t{int(label)}".encode())
    return digest.hexdigest()


def view_record(args):
    return {flag: getattr(args, flag) for flag in VIEW_FLAGS}


def view_seeds(seed, images, views):
    """The seed of every stored view: a function of the run's seed alone, so a resumed writer draws the same."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**32, (images, views), generator=generator, dtype=torch.int64).numpy().astype(np.uint32)


def epoch_views(seed, epoch, images, views):
    """Which stored view each image shows in this epoch."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randint(0, views, (images,), generator=generator).numpy()


def draw_view(transform, source, seed):
    """(uint8 image, its record: (top, left, height, width, flipped) or None, CRC-32 of its pixels) of a path
    or a shard's member."""
    if isinstance(source, Member):
        source = source.read()
    with seeded(seed):
        image = transform(source)
    first = getattr(transform, "transforms", (transform,))[0]
    drawn = getattr(first, "drawn", None)
    return image, drawn, zlib.crc32(image.contiguous().numpy())


def _unreadable(path, error):
    return DataError(f"{path}: cannot be read ({type(error).__name__}: {error}); fix or remove it "
                     "(read_ImageNetData.py --check lists every such file), then run the same command again")


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
class _AllViews(Dataset):
    """Image i's stored views, drawn from their seeds: (uint8 [V,3,H,W], boxes [V,4], flips [V], crc [V], i)."""

    def __init__(self, samples, transform, seeds, order):
        self.samples, self.transform, self.seeds, self.order = samples, transform, seeds, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, position):
        index = int(self.order[position])
        path = self.samples[index][0]
        images, boxes, flips, crcs = [], [], [], []
        for seed in self.seeds[index]:
            try:
                image, drawn, crc = draw_view(self.transform, path, seed)
            except SourceError:
                raise
            except Exception as e:
                raise _unreadable(path, e) from None
            images.append(image)
            boxes.append(drawn[:4] if drawn else (-1, -1, -1, -1))
            flips.append(int(drawn[4]) if drawn else 0)
            crcs.append(crc)
        return (torch.stack(images), torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips),
                torch.tensor(crcs, dtype=torch.int64), index)


def _open_arrays(folder, meta, mode):
    shapes = files(meta["views"], meta["top_k"], len(meta["classes"]["wnids"]))
    if mode == "w+":
        return {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                shape=(meta["images"], *shape)) for name, (dtype, shape) in shapes.items()}
    arrays = {}
    for name, (dtype, shape) in shapes.items():
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot be read ({type(e).__name__}: {e}); write the outputs again") from None
        if array.dtype != dtype or array.shape != (meta["images"], *shape):
            raise UsageError(f"{path}: holds {array.dtype} {list(array.shape)}, {META} says "
                             f"{np.dtype(dtype)} {[meta['images'], *shape]}; write the outputs again")
        arrays[name] = array
    return arrays


def _read_meta(folder, flag):
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {folder}: {META} cannot be read ({type(e).__name__}); write the outputs "
                         "with train.py --write-teacher-outputs") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{flag} {folder}: {META} is not a teacher-outputs description")
    return meta


def _differences(stored, wanted):
    keys = ("images", "views", "top_k", "teacher", "teacher_sha256", "data_fingerprint", "view", "seed")
    return [key for key in keys if stored.get(key) != wanted.get(key)]


def prepare(folder, meta, context, log):
    """Create DIR's files (rank 0), or open those a previous run of the same command left. Returns the
    memory-mapped arrays, or None when DIR is already complete."""
    flag = "--write-teacher-outputs"
    folder = Path(folder)
    if context.is_main:
        if (folder / META).is_file():
            stored = _read_meta(folder, flag)
            differ = _differences(stored, meta)
            if differ:
                raise UsageError(f"{flag} {folder}: holds outputs written with another {', '.join(differ)}; "
                                 "give an empty folder, or the flags it was written with")
        elif folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag} {folder}: a file, not a folder; give an empty or new folder")
        elif folder.exists() and not _only_our_arrays(folder):
            raise UsageError(f"{flag} {folder}: not empty and not teacher outputs; give an empty or new folder")
        else:  # new, empty, or the arrays of a creation that was stopped before outputs.json
            try:
                create(folder, meta)
            except OSError as e:
                raise UsageError(f"{flag} {folder}: cannot be written ({e.strerror or e}); give a folder with room "
                                 f"for {meta['images'] * bytes_per_image(meta['views'], meta['top_k'], len(meta['classes']['wnids'])) / 1e6:.1f} MB") from None
    distributed.barrier(context)
    stored = _read_meta(folder, flag)
    if stored.get("complete"):
        return None
    return _open_arrays(folder, stored, "r+")


def bytes_per_image(views, k, num_classes):
    """What DIR holds per training image at these sizes (the .npy headers aside)."""
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
               for dtype, shape in files(views, k, num_classes).values())


def _only_our_arrays(folder):
    ours = {f"{name}.npy" for name in files(1, 1, 1)}
    return all(path.name in ours or path.name.startswith(f".{META}.tmp-") for path in folder.iterdir())


def create(folder, meta):
    """DIR's arrays at their full size, the disk space taken now (a full disk is one line here, not a crash
    mid-write on a sparse file), the seeds filled in, and outputs.json last: its presence says the files are
    whole."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _open_arrays(folder, meta, "w+")
    for name, array in arrays.items():
        array.flush()
        if hasattr(os, "posix_fallocate"):
            with open(folder / f"{name}.npy", "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    arrays["seeds"][:] = view_seeds(meta["seed"], meta["images"], meta["views"])
    arrays["seeds"].flush()
    del arrays
    outputs.atomic_write(folder / META, json.dumps(meta, indent=1))


def write(args, data_dir, found, transform, context, log=print):
    """`train.py --write-teacher-outputs DIR`: every training image's views through the teacher, this rank's
    share (images rank, rank + R, ...), resumable. `found` (what datasets.find_data found in `data_dir`) and
    `transform` are the training set's, as train.py builds them. Returns 0."""
    samples, classes = found.train.samples, found.classes
    teacher = distill.load_teacher(args.teacher, log=log)
    distill.check_classes(teacher, args.teacher, len(classes.wnids), list(classes.names))
    k = min(args.teacher_top_k, teacher.num_classes)
    meta = {"format": FORMAT, "version": 1, "images": len(samples), "views": args.teacher_views, "top_k": k,
            "teacher": teacher.name, "teacher_sha256": teacher.sha256,
            "teacher_mean": list(teacher.mean), "teacher_std": list(teacher.std),
            "data_fingerprint": fingerprint(samples, data_dir, list(classes.wnids)),
            "data_dir": str(data_dir), "val_split": found.val_split,
            "classes": {"order": classes.order, "wnids": list(classes.wnids), "names": list(classes.names)},
            "view": view_record(args), "seed": args.seed, "complete": False}
    folder = Path(args.write_teacher_outputs)
    arrays = prepare(folder, meta, context, log)
    if arrays is None:
        log(f"{folder}: already complete ({meta['images']} images x {meta['views']} views)")
        return 0
    done = arrays["done"]
    todo = [i for i in range(context.rank, meta["images"], context.world_size) if not done[i]]
    log(f"teacher outputs: {meta['images']} images x {meta['views']} views, top {k} logits of {teacher.name}; "
        f"{len(todo)} images left for this process" + (f" of {context.world_size}" if context.world_size > 1 else ""))
    device = context.device
    if not isinstance(teacher.model, distill.onnx_weights.OnnxFileModel):
        teacher.model.to(device)
    per_batch = max(1, args.batch_size // context.world_size // meta["views"])
    loader = DataLoader(_AllViews(samples, transform, arrays["seeds"], todo), batch_size=per_batch,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    started, written = time.perf_counter(), 0
    for images, boxes, flips, crcs, indices in loader:
        views = images.flatten(0, 1).to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, enabled=bool(args.amp)):
            logits = teacher.model(normalize(views, teacher.mean, teacher.std)).float()
        top = logits.topk(k, dim=1)
        rows = indices.numpy()
        shape = (len(rows), meta["views"], k)
        # float16 holds logits to about 3 significant digits; beyond its range they are clamped, never inf
        values = top.values.clamp(-65504, 65504)
        arrays["logits"][rows] = values.reshape(shape).cpu().numpy().astype(np.float16)
        arrays["classes"][rows] = top.indices.reshape(shape).cpu().numpy()
        arrays["boxes"][rows] = boxes.numpy()
        arrays["flips"][rows] = flips.numpy()
        arrays["crc"][rows] = crcs.numpy()
        for name in ("logits", "classes", "boxes", "flips", "crc"):
            arrays[name].flush()
        done[rows] = 1  # only once the rows are on disk: a kill before this line redoes these images
        done.flush()
        written += len(rows)
        if context.is_main and (written // per_batch) % max(1, args.print_freq) == 0:
            rate = written * context.world_size / (time.perf_counter() - started)
            log(f"teacher outputs: {written}/{len(todo)} images here, {rate:.1f} images/s")
    distributed.barrier(context)
    if context.is_main:
        finish(folder, arrays, log)
    return 0


def finish(folder, arrays, log):
    """Check every image is written, record each file's sha256 and mark DIR complete."""
    missing = int((arrays["done"] == 0).sum())
    if missing:
        raise UsageError(f"--write-teacher-outputs {folder}: {missing} images are not written yet; run the same "
                         "command again")
    for array in arrays.values():
        array.flush()
    meta = _read_meta(folder, "--write-teacher-outputs")
    meta["sha256"] = {name: sha256_of(folder / f"{name}.npy") for name in arrays}
    meta["complete"] = True
    outputs.atomic_write(folder / META, json.dumps(meta, indent=1))
    size = sum((folder / f"{name}.npy").stat().st_size for name in arrays)
    per_image = size / meta["images"]
    log(f"wrote {folder}: {meta['images']} images x {meta['views']} views, top {meta['top_k']} logits, "
        f"{size / 1e6:.1f} MB, {per_image:.0f} bytes per image (ImageNet's 1,281,167 training images: "
        f"{per_image * 1_281_167 / 1e9:.2f} GB)")


# --------------------------------------------------------------------------------------------------------
# Reading while training
# --------------------------------------------------------------------------------------------------------
class StoredOutputs:
    """DIR opened for training: the arrays (read-only memory maps), what they were written from, and the
    view each image shows in the current epoch (`set_epoch`)."""

    def __init__(self, folder, meta, arrays, seed):
        self.folder, self.meta, self.arrays, self.seed = Path(folder), meta, arrays, seed
        self.num_classes = len(meta["classes"]["wnids"])
        self.views = epoch_views(seed, 0, meta["images"], meta["views"])

    def set_epoch(self, epoch):
        self.views = epoch_views(self.seed, epoch, self.meta["images"], self.meta["views"])

    def teacher_logits(self, indices):
        """The teacher's logits for these images' views of this epoch, [B, classes]: the stored top k, the
        rest ABSENT."""
        rows = np.asarray(indices)
        views = self.views[rows]
        values = torch.from_numpy(self.arrays["logits"][rows, views].astype(np.float32))
        classes = torch.from_numpy(self.arrays["classes"][rows, views].astype(np.int64))
        dense = torch.full((len(rows), self.num_classes), ABSENT)
        return dense.scatter_(1, classes, values)

    def record(self):
        """What a checkpoint keeps: the folder, the sha256 of its description (which holds every file's), the
        teacher it stores."""
        return {"teacher_outputs": str(self.folder), "teacher_outputs_sha256": sha256_of(self.folder / META),
                "teacher": self.meta["teacher"], "teacher_sha256": self.meta["teacher_sha256"]}


def open_for_training(folder, samples, data_dir, classes, args, log=print):
    """`--teacher-outputs DIR` checked against this run's training set, classes, view flags and `--teacher`
    (when given), with every file's sha256."""
    flag = "--teacher-outputs"
    folder = Path(folder)
    meta = _read_meta(folder, flag)
    if not meta.get("complete"):
        raise UsageError(f"{flag} {folder}: not complete; run the train.py --write-teacher-outputs command that "
                         "wrote it again to finish it")
    if meta["images"] != len(samples) or meta["data_fingerprint"] != fingerprint(samples, data_dir, list(classes.wnids)):
        raise UsageError(f"{flag} {folder}: written for other training images ({meta['images']} in "
                         f"{meta.get('data_dir')}, this run has {len(samples)} in {data_dir}, or another class order "
                         "or --val-split); write the outputs for this data")
    for name, value in view_record(args).items():
        if meta["view"].get(name) != value:
            shown = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {folder}: its views were drawn with {shown} {meta['view'].get(name)}, this "
                             f"run has {value}; give {shown} {meta['view'].get(name)} (or write outputs for {value})")
    if args.teacher:
        check_teacher(args.teacher, meta, folder)
    arrays = _open_arrays(folder, meta, "r")
    for name in arrays:
        if sha256_of(folder / f"{name}.npy") != meta["sha256"].get(name):
            raise UsageError(f"{flag} {folder}: {name}.npy does not match the sha256 in {META} (changed or "
                             "damaged); write the outputs again")
    log(f"teacher outputs {folder}: {meta['images']} images x {meta['views']} views, top {meta['top_k']} logits of "
        f"{meta['teacher']}; one view per image and epoch, no teacher run while training")
    return StoredOutputs(folder, meta, arrays, args.seed)


def check_teacher(spec, meta, folder):
    """`--teacher` beside `--teacher-outputs` names the teacher the outputs must come from."""
    path = Path(spec)
    if path.exists():
        same = meta["teacher_sha256"] is not None and sha256_of(path) == meta["teacher_sha256"]
    else:
        same = spec == meta["teacher"]
    if not same:
        raise UsageError(f"--teacher {spec}: {folder} stores the outputs of another teacher ({meta['teacher']}); "
                         "give that teacher, or drop --teacher to learn from the stored outputs")


class StoredViewDataset(Dataset):
    """The training set showing each image's stored view of the epoch, rebuilt from its seed and checked
    against its CRC-32: (uint8 image, target, index, 0)."""

    def __init__(self, base, stored):
        self.base, self.stored = base, stored
        self.samples, self.transform = base.samples, base.transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item  # the view's own seed, not the position's, draws
        path, target = self.samples[index]
        view = int(self.stored.views[index])
        try:
            image, _, crc = draw_view(self.transform, path, self.stored.arrays["seeds"][index, view])
        except SourceError:
            raise
        except Exception as e:
            raise _unreadable(path, e) from None
        if crc != int(self.stored.arrays["crc"][index, view]):
            raise DataError(f"{path}: its stored view {view} comes out different from when the teacher saw it "
                            f"(the file or the augmentation code changed); write the outputs in "
                            f"{self.stored.folder} again")
        return image, target, index, 0


class StoredDistillation:
    """distill.Distillation's loss, with the teacher's logits read from the stored outputs."""

    def __init__(self, stored, loss="kd", temperature=1.0, alpha=0.5, beta=1.0, gamma=1.0):
        if loss not in distill.LOSSES:
            raise ValueError(f"distillation loss must be one of {distill.LOSSES}, got {loss!r}")
        self.stored, self.loss, self.temperature = stored, loss, temperature
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def __call__(self, label_loss, student_logits, x, indices):
        teacher = self.stored.teacher_logits(indices).to(student_logits.device)
        return distill.combine(label_loss, student_logits.float(), teacher, self.loss, self.temperature,
                               self.alpha, self.beta, self.gamma)


def check_args(args):
    """The refusals of the two flags (in check_args of train.py's settings)."""
    if args.write_teacher_outputs and not args.teacher:
        raise UsageError("--write-teacher-outputs needs --teacher: the model whose outputs it stores")
    if args.write_teacher_outputs and args.teacher_outputs:
        raise UsageError("--write-teacher-outputs writes the outputs, --teacher-outputs trains on them; give one")
    if args.teacher_outputs:
        for flag, on in (("--mixup-alpha", args.mixup_alpha > 0), ("--cutmix-alpha", args.cutmix_alpha > 0)):
            if on:
                raise UsageError(f"{flag} with --teacher-outputs: the stored outputs are the teacher's view of "
                                 f"unmixed images; drop {flag}, or use an online --teacher")
        if args.ra_sampler:
            raise UsageError("--ra-sampler with --teacher-outputs: an image's copies would show the same stored "
                             "view; drop --ra-sampler")
        if args.data_backend == "gpu":
            raise UsageError("--data-backend gpu with --teacher-outputs: stored views are rebuilt in the loader "
                             "processes; use --data-backend cpu")
        if args.freeze_backbone or args.qat is not None:
            raise UsageError("--teacher-outputs trains on images: drop --freeze-backbone / --qat")
    if args.teacher_outputs and not Path(args.teacher_outputs).is_dir():
        raise UsageError(f"--teacher-outputs {args.teacher_outputs}: no such folder; write it with "
                         "train.py --write-teacher-outputs")
