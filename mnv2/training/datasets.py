"""The data a training run needs, built once: the training and validation loaders, the sampler whose state
a checkpoint keeps, the class order and the preprocessing recorded with the weights.
"""
import functools
from dataclasses import dataclass

from mnv2 import checkpoint
from mnv2.cli import UsageError
from mnv2.data import augment
from mnv2.data import folders as image_folders
from mnv2.data import gpu_decode as gpu_data
from mnv2.data import shards
from mnv2.data.loaders import EvalSampler, RASampler, SeededDraws, TrainSampler, build_loader
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, eval_transform
from mnv2.training import teacher_outputs
from mnv2.training.learner import caches_features


@dataclass
class Data:
    train_loader: object
    val_loader: object
    sampler: TrainSampler       # or its subclass RASampler
    classes: object
    train_images: int
    val_images: int
    batch_per_rank: int         # samples per rank per optimizer step (the loader's batches: / accum_steps)
    steps_per_epoch: int
    preprocessing: dict
    stored: object = None       # teacher_outputs.StoredOutputs: the views and teacher outputs of --teacher-outputs

    @property
    def num_classes(self):
        return len(self.classes.wnids)


@dataclass(kw_only=True)  # 21 fields: built by keyword, so no swapped pair passes silently
class DataSpec:
    """What `build_data` builds: the data, its sizes and augmentation, the batch and how it is sampled.
    `after_crop` (augment.after_crop) runs after the crop in the loader processes; `ra_reps` > 0 samples
    with repeated augmentation; each optimizer step takes `accum_steps` loader batches; `backend` "gpu":
    the loader processes read bytes and draw the crops, `gpu_data` decodes and crops on the device;
    `train_augment` False trains on the validation transform; `recorded_split`: the held-out files of the
    checkpoint being resumed."""
    data_dir: str
    class_order: str
    num_classes: int            # None: as many as the data has
    train_crop_size: int
    val_crop_size: int
    val_resize_size: int
    interpolation: str
    crop_scale_min: float
    hflip: float
    batch_size: int             # global
    num_workers: int
    seed: int
    after_crop: object = None
    ra_reps: int = 0
    accum_steps: int = 1
    backend: str = "cpu"
    val_split: float = None
    recorded_split: dict = None
    train_augment: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    stored_outputs: object = None  # (samples, data_dir, classes, log) -> teacher_outputs.StoredOutputs

    @classmethod
    def from_args(cls, args, saved):
        """As the command line asks; `saved`: the checkpoint being resumed (its held-out files)."""
        return cls(data_dir=args.data_dir, class_order=args.class_order, num_classes=args.num_classes,
                   train_crop_size=args.train_crop_size, val_crop_size=args.val_crop_size,
                   val_resize_size=args.val_resize_size, interpolation=args.interpolation,
                   crop_scale_min=args.crop_scale_min, hflip=args.hflip, batch_size=args.batch_size,
                   num_workers=args.num_workers, seed=args.seed,
                   after_crop=augment.after_crop(args.auto_augment, args.random_erase, args.interpolation,
                                                 args.ra_magnitude, args.augmix_severity),
                   ra_reps=args.ra_reps if args.ra_sampler else 0, accum_steps=args.accum_steps,
                   backend="cpu" if caches_features(args) else args.data_backend,  # images are read once then
                   val_split=args.val_split,
                   recorded_split=(checkpoint.meta(saved).get("data") or {}).get("val_split"),
                   train_augment=args.augment, mean=tuple(args.mean), std=tuple(args.std),
                   stored_outputs=(functools.partial(teacher_outputs.open_for_training, args.teacher_outputs,
                                                     args=args) if args.teacher_outputs else None))


def build_data(spec, context, log):
    """Datasets, samplers and loaders for this rank (`spec`: a DataSpec); labels as `image_folders`
    (ImageNet: `read_ImageNetData`) assigns them."""
    if spec.backend == "gpu":
        check_gpu_backend(spec.after_crop, spec.interpolation)
    if spec.batch_size % (context.world_size * spec.accum_steps):
        raise UsageError(f"--batch-size {spec.batch_size} does not split evenly over {context.world_size} "
                         f"processes x --accum-steps {spec.accum_steps}")
    per_rank = spec.batch_size // context.world_size
    found = find_data(spec, log)
    train_set, val_set, classes = found.train, found.val, found.classes
    train_set.transform = training_transform(spec)
    stored = None
    if spec.stored_outputs is not None:  # each image shows the epoch's stored view, rebuilt and checked
        stored = spec.stored_outputs(train_set.samples, spec.data_dir, classes, log=log)
        train_set = teacher_outputs.StoredViewDataset(train_set, stored)
    if spec.num_classes is not None and len(classes.wnids) != spec.num_classes:
        raise UsageError(f"--num-classes {spec.num_classes}, but {spec.data_dir} has {len(classes.wnids)} classes")
    if spec.ra_reps:
        sampler = RASampler(len(train_set), num_replicas=context.world_size, rank=context.rank, seed=spec.seed,
                            repetitions=spec.ra_reps)
    else:
        sampler = TrainSampler(len(train_set), num_replicas=context.world_size, rank=context.rank,
                               seed=spec.seed)
    pin = context.device.type == "cuda"
    # Workers are not persistent: each epoch's iterator draws its worker seeds from that epoch's stream.
    train_loader = build_loader(train_set, per_rank // spec.accum_steps, SeededDraws(sampler),
                                num_workers=spec.num_workers,
                                pin_memory=pin, persistent_workers=False, drop_last=True)
    if spec.backend == "gpu":
        crop = spec.train_crop_size if spec.train_augment else spec.val_crop_size
        train_loader = on_device(train_set, train_loader, crop, context.device, fallback=train_set)
        log(f"data backend gpu: loader processes read the files, JPEGs are decoded and cropped on "
            f"{context.device.type}" + (" (nvjpeg)" if context.device.type == "cuda" else
                                        " (libjpeg in this process: a check of the GPU path, not a fast one)"))
    steps_per_epoch = sampler.num_samples // per_rank
    _note_left_out(sampler.num_samples, per_rank, log)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {spec.batch_size}: larger than the {len(train_set)} training images")
    val_loader = None
    if val_set is not None and len(val_set):
        val_loader = build_loader(val_set, per_rank, EvalSampler(len(val_set), context.world_size, context.rank),
                                  num_workers=spec.num_workers, pin_memory=pin, persistent_workers=False,
                                  drop_last=False)
        if spec.backend == "gpu":
            val_loader = on_device(val_set, val_loader, spec.val_crop_size, context.device)
    else:
        log(f"warning: no validation images in {spec.data_dir}; best.pth follows nothing, only last.pth is kept")
    preprocessing = {"input_size": spec.val_crop_size, "resize": spec.val_resize_size,
                     "interpolation": spec.interpolation, "mean": [float(v) for v in spec.mean],
                     "std": [float(v) for v in spec.std], "train_crop_size": spec.train_crop_size,
                     "dataset": found.kind, "val_split": found.val_split}
    return Data(train_loader, val_loader, sampler, classes, len(train_set), len(val_set) if val_set else 0,
                per_rank, steps_per_epoch, preprocessing, stored)


def find_data(spec, log):
    """The training and validation sets and classes of `spec.data_dir` (shards and archives, else
    image_folders'); no training image is one line."""
    found = shards.build_datasets(spec.data_dir, spec.class_order, spec.val_crop_size, spec.val_resize_size,
                                  spec.interpolation, val_split=spec.val_split, log=log)  # or None: folders
    found = found or image_folders.build_datasets(spec.data_dir, spec.class_order, spec.val_crop_size,
                                                  spec.val_resize_size, spec.interpolation, val_split=spec.val_split,
                                                  seed=spec.seed, recorded_split=spec.recorded_split,
                                                  num_classes=spec.num_classes, log=log)
    if found.note:
        log(found.note)
    if found.train is None or len(found.train) == 0:
        raise UsageError(f"--data-dir {spec.data_dir}: no training images found")
    return found


def training_transform(spec):
    """What each training image goes through (`spec`: a DataSpec): the random-resized crop and flip, then the
    policy and erasing after the crop; with `train_augment` False, the validation transform."""
    if not spec.train_augment:
        if spec.after_crop is not None:
            raise UsageError("--no-augment trains on centre crops: drop --auto-augment and --random-erase")
        return eval_transform(spec.val_crop_size, spec.val_resize_size, spec.interpolation)
    transform = TrainTransform(spec.train_crop_size, scale=(spec.crop_scale_min, 1.0), hflip=spec.hflip,
                               interpolation=spec.interpolation)
    return augment.Chain(transform, spec.after_crop) if spec.after_crop is not None else transform


def check_gpu_backend(after_crop, interpolation):
    if after_crop is not None:
        raise UsageError("--data-backend gpu crops on the device, where --auto-augment and --random-erase do "
                         "not run; drop them or use --data-backend cpu")
    if interpolation != "bilinear":
        raise UsageError(f"--data-backend gpu resizes bilinearly, not with --interpolation {interpolation}; "
                         "use --data-backend cpu")


def on_device(dataset, loader, size, device, fallback=None):
    """The same loader over raw samples (file bytes and the drawn crop), decoded and cropped on `device`."""
    raw = build_loader(gpu_data.device_dataset(dataset), loader.batch_size, loader.sampler,
                       num_workers=loader.num_workers, pin_memory=loader.pin_memory, persistent_workers=False,
                       drop_last=loader.drop_last, collate_fn=gpu_data.collate)
    return gpu_data.DeviceLoader(raw, gpu_data.Decoder(size, device, fallback))


def _note_left_out(images, per_rank, log):
    """Say how many images each epoch's last partial batch leaves out (drop_last keeps every step's batch whole,
    for BatchNorm and for the processes' equal steps)."""
    left_out = images % per_rank
    if left_out and images >= per_rank:
        log(f"note: each epoch leaves out {left_out} of {images} training images per process (its last partial "
            f"batch of {per_rank}; a different one each epoch): a --batch-size that divides the training images "
            "loses none")
