"""Datasets, samplers (the RA sampler too) and loaders that hand the device uint8 batches with exact labels."""
import contextlib
import logging
import math
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from mnv2.data.imagenet import DataError, find_layout, list_samples, read_classes
from mnv2.data.ranges import Member, SourceError
from mnv2.data.transforms import eval_transform, train_transform

try:  # optional: decodes JPEGs for training faster than PIL; PIL does everything without it
    import simplejpeg
except ImportError:
    simplejpeg = None

log = logging.getLogger("mnv2.data")


def _load(ref):
    """What a transform takes: a path as it is, a member of a shard or an archive as its bytes (a file that
    is missing or cut short there raises SourceError: the data is broken, not one image)."""
    return ref.read() if isinstance(ref, Member) else ref


class ImageNetDataset(Dataset):
    """(image uint8 [3,H,W], target, index, n_failed) for each (path or ranges.Member, label) sample.

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

    def __getitem__(self, item):
        """`item`: an index, or (index, seed) from SeededDraws: the augmentation then draws from `seed` alone."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            return self._sample(index)

    def _sample(self, index):
        if not self.train:
            path, target = self.samples[index]
            try:
                return self.transform(_load(path)), target, index, 0
            except SourceError:
                raise
            except Exception as e:  # any decoder error: the image counts as a miss, never silently dropped
                self._report(path, e)
                size = getattr(self.transform, "input_size", 224)
                return torch.zeros(3, size, size, dtype=torch.uint8), target, index, 1
        for n_failed in range(self.max_consecutive_failures + 1):
            path, target = self.samples[(index + n_failed) % len(self.samples)]
            try:
                return self.transform(_load(path)), target, index, n_failed
            except SourceError:
                raise
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


def draw_seed(seed, epoch, position):
    """The seed of the augmentation of an epoch's `position`-th sample (splitmix64 of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB + 1) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


class SeededDraws(Sampler):
    """A training sampler's indices, each with the seed its augmentation draws from (`draw_seed` of the run's
    seed, the epoch and the sample's position in the epoch's sequence over all ranks). A sample's crop, flip
    and policy then depend on nothing else: not on which loader process reads it, how many there are, the
    world size, nor on where a resumed epoch starts, so a mid-epoch resume sees exactly the augmentations
    the uninterrupted run saw. The wrapped sampler keeps the state (set_epoch, state_dict)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        for k, index in enumerate(s):
            # TrainSampler and RASampler: the k-th index after `skip` is position rank + (skip + k) x R
            yield index, draw_seed(s.seed, s.epoch, s.rank + (s.skip + k) * s.num_replicas)

    def __len__(self):
        return len(self.sampler)


@contextlib.contextmanager
def seeded(seed):
    """torch's (CPU), Python's and NumPy's generators seeded with `seed` inside. Outside, as they were in the
    main process; a loader process's generators serve nothing but the samples, so they are not restored
    there (saving and restoring NumPy's state alone costs about 70 us a sample)."""
    seed = int(seed)
    restore = get_worker_info() is None
    if restore:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also visit every accelerator's
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


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
                 drop_last=False, collate_fn=None):
    """DataLoader of (images uint8 [B,3,H,W], targets, indices, n_failed) int64 tensors (or what
    `collate_fn` makes of the samples: `gpu_data.collate` for the GPU backend's raw samples).

    pin_memory defaults to whether CUDA is present; persistent_workers to num_workers > 0 (workers keep
    their file caches and skip a fork per epoch).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    # A generator of its own for the loader processes' base seed: creating an iterator then leaves the
    # process's stream (dropout, mixup) as it was, also when a resumed epoch creates one mid-way.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
                      drop_last=drop_last, worker_init_fn=_ignore_interrupts if num_workers else None,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))


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
