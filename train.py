"""Train MobileNetV2 on ImageNet with the seed's recipe, on the CPU or on every visible GPU, with exact resume.

    python train.py --data-dir /ImageNet --batch-size 256

A plain launch with N visible GPUs starts one process per GPU (DistributedDataParallel); `torchrun`
works the same way (`torchrun --nproc_per_node=2 train.py --device cpu ...` on the CPU with gloo);
`python train.py --demo` trains on a small generated dataset on the CPU in a few minutes.

Checkpoints (epoch_N.pth, last.pth, best.pth in --save-path) are one dict of plain data, written
atomically by rank 0 only; `--resume auto` continues from the newest one that loads, also from the middle
of an epoch after SIGTERM/SIGUSR1 (cluster preemption). On the CPU a resumed run is bit-identical to an
uninterrupted one.
"""
import argparse
import copy
import csv
import ctypes
import functools
import math
import os
import platform
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import distributed
import fused_batchnorm
from evaluate import evaluate, non_negative_int, positive_float, positive_int
from MobileNetV2 import MobileNetV2, WeightsError, checkpoint_digest, load_model, read_weights
from read_ImageNetData import (IMAGENET_MEAN, IMAGENET_STD, DataError, EvalSampler, TrainSampler, TrainTransform,
                               build_datasets, build_loader, make_demo, normalize)

CHECKPOINT_FORMAT = "mobilenetv2-checkpoint"
CHECKPOINT_VERSION = 1
# Files `--resume auto` considers, newest first; temporary files (".name.tmp-PID") never match.
CHECKPOINT_NAME = re.compile(r"^(last|best|epoch_(\d+))\.pth$")
# How gloo and NCCL report a rank that died: the job stops with one line here, the cause is that rank's.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
             "NCCL communicator was aborted")
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                 "ema_val_top1", "ema_val_top5", "images_per_s", "seconds", "skipped_steps", "failed_images"]

# `--demo`: the settings that reach >= 90% val top-1 on the generated digits data in a few minutes on two
# CPU cores (measured; see README). Flags given explicitly still win.
DEMO_SETTINGS = {
    "data_dir": "output/demo/data", "save_path": "output/demo", "device": "cpu", "input_size": 64,
    "width_mult": 0.5, "batch_size": 32, "num_epochs": 15, "lr": 0.05, "lr_schedule": "cosine",
    "warmup_epochs": 1.0, "num_workers": 0, "print_freq": 15, "save_epoch_freq": 5,
    # 32 px digits: a crop of 8% of one is no longer a digit, and a mirrored digit is another symbol.
    "crop_scale_min": 0.35, "hflip": 0.0,
}


class UsageError(ValueError):
    """A flag value that cannot work; reported like argparse does (one line, exit code 2)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unwritable checkpoint, a lost rank); one line, exit code 1."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written or read back."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a resumable checkpoint was saved. Exits with 128 + the signal number."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# --------------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # Helps that already say their default (a derived one) are not followed by a second one.
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, exit code 2, as argparse does, without the many-line usage block in front of it.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _unit_interval(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def get_args_parser(add_help=True):
    p = _Parser(prog="train.py", add_help=add_help, formatter_class=_HelpFormatter,
                description="Train MobileNetV2 on ImageNet. Defaults are the seed repository's recipe "
                            "(SGD momentum 0.9, lr 0.045 x0.98 per epoch, weight decay 4e-5, batch 256, "
                            "400 epochs, no dropout), which follows the paper (Sandler et al. 2018, Sec. 6.1: "
                            "RMSProp there; the seed reproduced it with SGD).")
    seed = p.add_argument_group("the seed's flags (same meaning)")
    seed.add_argument("--data-dir", default="/ImageNet", help="ImageNet root in the seed's layout or train/ + val/")
    seed.add_argument("--batch-size", type=positive_int, default=256,
                      help="global batch, split evenly over the processes (seed)")
    seed.add_argument("--num-class", type=positive_int, default=1000, help="number of classes (seed)")
    seed.add_argument("--num-epochs", type=positive_int, default=400, help="total epochs (seed)")
    seed.add_argument("--lr", type=positive_float, default=0.045, help="base learning rate (seed, paper)")
    seed.add_argument("--num-workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                      help="loader processes per training process (default: min(8, CPU count))")
    seed.add_argument("--print-freq", type=positive_int, default=10,
                      help="steps between plain log lines when the output is not a terminal (seed)")
    seed.add_argument("--save-epoch-freq", type=positive_int, default=1,
                      help="write epoch_N.pth every N epochs (seed)")
    seed.add_argument("--save-path", default="output", help="checkpoints, metrics and curves go here (seed)")
    seed.add_argument("--resume", default="", metavar="FILE|auto",
                      help="continue from a checkpoint; 'auto': the newest one in --save-path that loads. "
                           "A seed-format weights file resumes at --start-epoch")
    seed.add_argument("--start-epoch", type=non_negative_int, default=None,
                      help="epochs already done (default: the checkpoint's, else 0); sets lr 0.045 x 0.98^N")
    seed.add_argument("--gpus", default=None, help="seed flag: comma-separated GPU ids to use "
                                                    "(same as CUDA_VISIBLE_DEVICES)")

    opt = p.add_argument_group("optimisation (defaults: the seed's recipe; off switches are the seed's)")
    opt.add_argument("--momentum", type=_fraction, default=0.9, help="SGD momentum (seed)")
    opt.add_argument("--weight-decay", type=_non_negative_float, default=4e-5, help="L2 weight decay (seed, paper)")
    opt.add_argument("--no-decay-norm-bias", action="store_true",
                     help="no weight decay on BatchNorm weights and biases (seed: decayed)")
    opt.add_argument("--lr-schedule", choices=["exponential", "cosine"], default="exponential",
                     help="exponential: lr x gamma every epoch (seed); cosine: per-step cosine to --min-lr")
    opt.add_argument("--lr-gamma", type=positive_float, default=0.98, help="per-epoch lr factor (seed, paper)")
    opt.add_argument("--warmup-epochs", type=_non_negative_float, default=0.0,
                     help="linear lr warm-up from ~0, per step (seed: none)")
    opt.add_argument("--min-lr", type=_non_negative_float, default=0.0, help="final lr of the cosine schedule")
    opt.add_argument("--label-smoothing", type=_fraction, default=0.0, help="label smoothing (seed: none)")
    opt.add_argument("--crop-scale-min", type=positive_float, default=0.08,
                     help="smallest area fraction of the random-resized crop (Inception, torchvision)")
    opt.add_argument("--hflip", type=_unit_interval, default=0.5,
                     help="probability of a horizontal flip (Inception, torchvision)")
    opt.add_argument("--dropout", type=_fraction, default=0.0,
                     help="dropout before the classifier (seed: none; the paper used 0.2 in TensorFlow)")
    opt.add_argument("--model-ema", action="store_true",
                     help="keep an exponential moving average of the weights, validated each epoch too")
    opt.add_argument("--model-ema-decay", type=_fraction, default=0.9999, help="EMA decay per optimizer step")
    opt.add_argument("--max-nonfinite", type=positive_int, default=3,
                     help="stop after this many non-finite losses in a row (each such step is skipped)")

    model = p.add_argument_group("model and data")
    model.add_argument("--width-mult", type=positive_float, default=1.0, help="width multiplier (paper: 1.0)")
    model.add_argument("--input-size", type=positive_int, default=224, help="training/validation crop (paper: 224)")
    model.add_argument("--resize", type=positive_int, default=None,
                       help="validation resize before the centre crop (default: input size x 256/224)")
    model.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear",
                       help="validation resize interpolation (torchvision's reference)")
    model.add_argument("--class-order", choices=["sorted", "devkit"], default="sorted",
                       help="class index order: sorted WNIDs (torchvision, timm, public weights) or devkit "
                            "ILSVRC2012_ID - 1 (the seed repo's)")
    model.add_argument("--seed", type=non_negative_int, default=0, help="seed for init, sampling and augmentation")

    dev = p.add_argument_group("devices and speed")
    dev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: every visible GPU, else the CPU")
    dev.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision: bf16 where supported, else fp16 with a grad scaler "
                          "(default: on for CUDA, off on the CPU)")
    dev.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC memory format: same results, faster convolutions on CPU and tensor cores")
    dev.add_argument("--compile", action="store_true", help="torch.compile the model")
    dev.add_argument("--fused-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="CPU training with channels_last: BatchNorm (+ ReLU6) as one compiled kernel each way, "
                          "about 20%% faster, equal to float32 rounding (built once with the C++ compiler PyTorch "
                          "extensions use; without one, PyTorch's layers run)")
    dev.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    dev.add_argument("--dist-timeout", type=positive_float, default=30.0,
                     help="minutes a rank waits for a silent peer before failing")

    out = p.add_argument_group("output")
    out.add_argument("--keep-last", type=non_negative_int, default=0,
                     help="keep only the newest k epoch_N.pth files (0: keep all); last/best always stay")
    out.add_argument("--tensorboard", action="store_true", help="also log to <save-path>/tensorboard")
    out.add_argument("--demo", action="store_true",
                     help="build a small digits dataset in output/demo/data if absent and train on it on the CPU")
    return p


def resolve_args(args):
    """Apply --demo settings (explicit flags win), derived defaults and the checks argparse cannot do."""
    args = argparse.Namespace(**vars(args))
    if args.demo:
        defaults = get_args_parser()
        for key, value in DEMO_SETTINGS.items():
            if getattr(args, key) == defaults.get_default(key):
                setattr(args, key, value)
    if args.resize is None:
        args.resize = int(round(args.input_size * 256 / 224))
    if args.resize < args.input_size:
        raise UsageError(f"--resize {args.resize} is smaller than --input-size {args.input_size}")
    if args.crop_scale_min > 1:
        raise UsageError(f"--crop-scale-min {args.crop_scale_min} is above 1 (the whole image)")
    if args.input_size < 32:
        raise UsageError(f"--input-size {args.input_size} is below MobileNetV2's 32 px minimum")
    if args.sync_bn and args.device == "cpu":
        raise UsageError("--sync-bn needs CUDA; BatchNorm on the CPU is per process")
    if args.gpus:
        if not re.fullmatch(r"\d+(,\d+)*", args.gpus.strip()):
            raise UsageError(f"--gpus {args.gpus!r}: expected comma-separated GPU ids like 0,1")
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus.strip()
    if not (args.demo and not Path(args.data_dir).exists()) and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (point it at the ImageNet root, "
                         "or try --demo)")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (or use --resume auto)")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return args


def plain_args(args):
    """vars(args) with plain types only, so `torch.load(weights_only=True)` reads it back."""
    return {k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in vars(args).items()}


# --------------------------------------------------------------------------------------------------
# Randomness: seeded per (seed, epoch, rank) at each epoch start, saved mid-epoch


def epoch_seed(seed, epoch, rank):
    # A fresh, reproducible stream per epoch makes an epoch's shuffling, augmentation and dropout depend
    # on nothing but (seed, epoch, rank): a resumed run sees exactly what an uninterrupted one saw.
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**32


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Let glibc keep the memory a CPU training step frees, so that the next step reuses it.

    By default glibc gives each large block (a batch's activations: up to hundreds of MB) a fresh mmap
    and unmaps it when freed, so every step pays the kernel to fault in and zero the same pages again:
    about a third of a CPU step at batch 32 x 224 px here (bench/bench_train.py). Taking every block from
    the heap and not trimming it changes where the bytes live, not one result; the process keeps up to its
    peak memory until it exits, as PyTorch's CUDA caching allocator does. Returns True when applied;
    elsewhere than glibc (macOS, Windows, musl) it does nothing.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def use_fused_batchnorm(model, log):
    """Train `model`'s BatchNorm (+ ReLU6) layers with the fused CPU kernel; say so, or why not."""
    start = time.perf_counter()
    try:
        swapped = fused_batchnorm.use_for_cpu_training(model)
    except RuntimeError as e:
        log(f"note: {e}; PyTorch's BatchNorm and ReLU6 run instead (--no-fused-bn hides this note)")
        return 0
    seconds = time.perf_counter() - start
    log(f"fused CPU BatchNorm kernel for {swapped} layers"
        + (f" (built in {seconds:.0f} s, cached for later runs)" if seconds > 5 else ""))
    return swapped


def capture_rng():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, EMA


def build_criterion(label_smoothing=0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def parameter_groups(model, weight_decay, decay_norm_and_bias=True):
    """SGD groups; BatchNorm scales/shifts and biases (1-D tensors) can be left undecayed: shrinking
    them only fights the normalisation and does not regularise (as in later MobileNet recipes)."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LRSchedule:
    """The learning rate as a pure function of the position in training (epoch, step), so a run resumed at
    any step, or from weights alone at --start-epoch, gets exactly the lr an uninterrupted run had.

    exponential: lr x gamma^epoch, constant within an epoch (the seed's StepLR(step_size=1, gamma=0.98)).
    cosine: per-step half cosine from lr to min_lr over the epochs after warm-up.
    """

    def __init__(self, base_lr, epochs, kind="exponential", gamma=0.98, warmup_epochs=0.0, min_lr=0.0):
        self.base_lr, self.epochs, self.kind = float(base_lr), int(epochs), kind
        self.gamma, self.warmup_epochs, self.min_lr = float(gamma), float(warmup_epochs), float(min_lr)

    def __call__(self, epoch, step=0, steps_per_epoch=1):
        t = epoch + step / max(steps_per_epoch, 1)
        if t < self.warmup_epochs:
            # (step + 1): the very first step already moves, instead of a wasted lr-0 step.
            done = epoch * steps_per_epoch + step + 1
            return self.base_lr * min(1.0, done / (self.warmup_epochs * steps_per_epoch))
        if self.kind == "exponential":
            return self.base_lr * self.gamma ** epoch
        span = max(self.epochs - self.warmup_epochs, 1e-8)
        progress = min(1.0, (t - self.warmup_epochs) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def state_dict(self):
        return dict(vars(self))


class ModelEma:
    """Exponential moving average of every floating-point entry of the model's state (weights and
    BatchNorm statistics), updated after each optimizer step and validated beside the model."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._pairs = None

    @torch.no_grad()
    def update(self, model):
        if self._pairs is None:
            own, other = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in own.items() if v.is_floating_point()]
            self._pairs = ([own[k] for k in floats], [other[k] for k in floats],
                           [(own[k], other[k]) for k in own if not own[k].is_floating_point()])
        ema, current, rest = self._pairs
        torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        for e, c in rest:  # BatchNorm's num_batches_tracked
            e.copy_(c)


def unwrap(model):
    """The plain MobileNetV2 under DDP and torch.compile wrappers: its keys carry no prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cpu_state(model):
    # Contiguous CPU tensors: the file does not depend on the device or memory format trained with.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_state_checked(model, state, source):
    """load_state_dict that names the first offending tensor and the flag to change."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UsageError(f"{source}: tensors do not fit the model built from the flags "
                         f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            hint = ("--num-class" if key.startswith("classifier") else "--width-mult")
            raise UsageError(f"{source}: {key} has shape {list(state[key].shape)} but the model built from "
                             f"the flags has {list(value.shape)}; check {hint}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# One epoch


@dataclass
class EpochMeter:
    """Sums over this epoch's steps, all ranks together (so the numbers are the global ones)."""
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def loss(self):
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def top1(self):
        return 100.0 * self.correct / self.count if self.count else float("nan")


class StopFlag:
    """SIGTERM/SIGUSR1 (cluster preemption) ask the loop to finish the current step, save and exit;
    a second signal exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class Progress:
    """A tqdm bar per epoch on a terminal; plain lines every `print_freq` steps otherwise; silent off rank 0."""

    def __init__(self, enabled, total, initial, desc, print_freq):
        self.enabled, self.total, self.desc, self.print_freq = enabled, total, desc, print_freq
        self.start, self.initial = time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step, loss, top1, lr, images_per_s):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} top1 {top1:.2f} lr {lr:.5f} img/s {images_per_s:.0f}",
                                     refresh=False)
            self.bar.update(1)
        elif step % self.print_freq == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            done = step - self.initial
            eta = elapsed / done * (self.total - step) if done else float("nan")
            print(f"{self.desc} step {step}/{self.total} loss {loss:.4f} top1 {top1:.2f} lr {lr:.5f} "
                  f"img/s {images_per_s:.0f} eta {_hms(eta)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _hms(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_one_epoch(model, loader, criterion, optimizer, schedule, epoch, steps_per_epoch, device, context, *,
                    start_step=0, meter=None, scaler=None, amp_dtype=None, channels_last=True, ema=None,
                    stop=None, max_nonfinite=3, progress=None, on_step=None, log=print):
    """Train over `loader` (which already skips the first `start_step` batches of the epoch).

    Returns (meter, steps done in this epoch, stopped): stopped is True when a preemption signal asked
    to stop, in which case the last step was completed. A non-finite loss on any rank skips the step on
    every rank (gradients dropped, BatchNorm statistics restored); `max_nonfinite` in a row raise.
    """
    model.train()
    meter = meter or EpochMeter()
    step = start_step
    bad_in_a_row = 0
    # BatchNorm statistics were already updated by the forward pass of a step that turns out bad.
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    # Inputs follow the weights' precision (float64 runs serve numerical checks); autocast handles AMP.
    input_dtype = next(model.parameters()).dtype
    last = time.perf_counter()  # step times include waiting for data: images/s is the real throughput
    batches = iter(loader)
    try:
        for images, targets, indices, failed in batches:
            lr = schedule(epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            x = normalize(images, channels_last=channels_last)
            if x.dtype != input_dtype:
                x = x.to(input_dtype)
            saved_buffers = [b.clone() for b in buffers]

            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
                loss = criterion(logits, targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()

            # One small all-reduce per step carries the statistics, the non-finite check and the stop vote,
            # so every rank takes the same decision at the same step.
            n = targets.numel()
            stats = torch.stack([loss.detach().float() * n, (logits.detach().argmax(1) == targets).sum().float(),
                                 torch.tensor(float(n), device=device),
                                 (~torch.isfinite(loss.detach())).float(),
                                 torch.tensor(float(stop is not None and stop.signum is not None), device=device),
                                 failed.sum().float().to(device)]).double()
            totals = distributed.all_reduce_sum(stats, context).tolist()
            loss_sum, correct, count, nonfinite, stop_votes, n_failed = totals

            if nonfinite:
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, s in zip(buffers, saved_buffers):
                        b.copy_(s)
                bad_in_a_row += 1
                meter.skipped += 1
                log(f"warning: non-finite loss at epoch {epoch + 1} step {step + 1}; step skipped "
                    f"({bad_in_a_row} in a row, stop at {max_nonfinite})")
                if bad_in_a_row >= max_nonfinite:
                    raise TrainingError(f"loss was non-finite for {bad_in_a_row} steps in a row (epoch {epoch + 1}, "
                                        f"step {step + 1}); stopped without saving, the last good checkpoint is "
                                        "kept; lower --lr or check the data")
            else:
                bad_in_a_row = 0
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(unwrap(model))
                meter.loss_sum += loss_sum
                meter.correct += correct
                meter.count += count
            meter.failed += int(n_failed)
            step += 1
            now = time.perf_counter()
            seconds, last = now - last, now
            meter.seconds += seconds
            if progress is not None:
                progress.update(step, meter.loss, meter.top1, lr, count / seconds if seconds > 0 else 0.0)
            if on_step is not None:
                on_step(epoch, step, indices)
            if stop_votes:
                return meter, step, True
    finally:
        # Releasing a DataLoader iterator stops its workers, also when an error ends the epoch early.
        del batches
    return meter, step, False


# --------------------------------------------------------------------------------------------------
# Checkpoints: plain data, a content digest, atomic writes


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def serialize(checkpoint):
    import io
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def atomic_write(payload, path):
    """Write bytes so that `path` is either its old content or the complete new one, never a mix:
    temporary file, flush + fsync, rename over, fsync the directory. On failure the old file is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = e.strerror or str(e)
        raise CheckpointError(f"could not write {path}: {reason}; nothing was replaced, the earlier "
                              "checkpoints are intact; free space or fix the path, then --resume auto") from None


def _fsync_dir(directory):
    # The rename lives in the directory; without this a crash can forget it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory):
    """Temporary files of a process killed while writing: never a checkpoint, safe to drop."""
    for tmp in Path(directory).glob(".*.pth.tmp-*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def epoch_files(directory):
    """epoch_N.pth files in `directory` as (N, path), oldest first."""
    found = []
    for path in Path(directory).glob("epoch_*.pth"):
        m = CHECKPOINT_NAME.match(path.name)
        if m and m.group(2):
            found.append((int(m.group(2)), path))
    return sorted(found)


def prune_epoch_files(directory, keep, log=print):
    """Keep the newest `keep` epoch files. Called only after the newest was written and synced, so the
    files deleted always have a safely written successor."""
    if keep <= 0:
        return []
    removed = []
    for _, path in epoch_files(directory)[:-keep]:
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log(f"warning: could not delete old checkpoint {path}: {e.strerror}")
    return removed


def write_checkpoint(checkpoint, paths):
    """Serialise once, check, then write each path atomically (in order: the first is the new epoch file)."""
    for key in ("model", "model_ema"):
        if checkpoint.get(key) is not None and not all_finite(checkpoint[key]):
            raise CheckpointError(f"refusing to write {paths[0]}: the {key} weights hold NaN/inf; the last good "
                                  "checkpoint is kept; lower --lr")
    checkpoint["sha256"] = checkpoint_digest(checkpoint)
    payload = serialize(checkpoint)
    for path in paths:
        atomic_write(payload, path)


def read_checkpoint(path):
    """A checkpoint or weights file as a dict (weights_only, no code runs); repo checkpoints must match
    their digest. Raises WeightsError/CheckpointError with one line naming the file."""
    data = read_weights(path)  # verifies the checksum saved inside
    if data.get("format") == CHECKPOINT_FORMAT:
        missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in data]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; use another one")
    return data


def find_resume_checkpoint(directory, log=print):
    """The newest checkpoint in `directory` that loads: (path, data), or (None, None) if there is none.
    Unreadable files are skipped with a note; if every candidate is unreadable, that is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        return None, None
    priority = {"last.pth": 0, "best.pth": 2}
    candidates = [p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_file()]
    # Newest first; on equal times prefer last.pth, then later epochs, then best.pth (an older epoch).
    candidates.sort(key=lambda p: (-p.stat().st_mtime_ns, priority.get(p.name, 1),
                                   -int(CHECKPOINT_NAME.match(p.name).group(2) or 0)))
    for path in candidates:
        try:
            data = read_checkpoint(path)
        except (WeightsError, CheckpointError) as e:
            log(f"note: --resume auto skips {e}")
            continue
        if data.get("format") != CHECKPOINT_FORMAT:
            log(f"note: --resume auto skips {path}: not a training checkpoint of this repo")
            continue
        return path, data
    if candidates:
        raise CheckpointError(f"--resume auto: none of the {len(candidates)} checkpoints in {directory} loads; "
                              "pass --resume FILE or move them away to start afresh")
    return None, None


# --------------------------------------------------------------------------------------------------
# Reports: metrics.csv, result.txt, curves.png, TensorBoard


def write_reports(metrics, directory):
    directory = Path(directory)
    tmp = directory / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in metrics:
            writer.writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
    os.replace(tmp, directory / "metrics.csv")
    # The seed's result.txt: one readable line per epoch.
    lines = [f"epoch {m['epoch']} lr {m['lr']:.6f} train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2f} "
             f"| val loss {m['val_loss']:.4f} top1 {m['val_top1']:.2f} top5 {m['val_top5']:.2f}"
             + (f" | ema top1 {m['ema_val_top1']:.2f}" if m.get("ema_val_top1") is not None else "")
             + f" | {m['images_per_s']:.0f} img/s {m['seconds']:.0f} s" for m in metrics]
    (directory / "result.txt").write_text("\n".join(lines) + "\n")
    plot_curves(metrics, directory / "curves.png")


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def plot_curves(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    axes[0].plot(epochs, [m["val_loss"] for m in metrics], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [m["train_top1"] for m in metrics], "o-", label="train top-1")
    axes[1].plot(epochs, [m["val_top1"] for m in metrics], "o-", label="val top-1")
    axes[1].plot(epochs, [m["val_top5"] for m in metrics], "o-", label="val top-5")
    if any(m.get("ema_val_top1") is not None for m in metrics):
        axes[1].plot(epochs, [m.get("ema_val_top1") for m in metrics], "o-", label="EMA val top-1")
    axes[1].set_title("accuracy (%)")
    axes[2].plot(epochs, [m["lr"] for m in metrics], "o-")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    tmp = path.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The run


def _logger(context):
    def log(*parts):
        if context.is_main:
            print(*parts, flush=True)
    return log


def resolve_resume(args, context, log):
    """(path, data) of the checkpoint to continue from, or (None, None). Rank 0 chooses for 'auto'."""
    if not args.resume:
        return None, None
    if args.resume == "auto":
        path = None
        if context.is_main:
            path, _ = find_resume_checkpoint(args.save_path, log)
            path = str(path) if path is not None else None
        path = distributed.broadcast_object(path, context)
        if path is None:
            log(f"--resume auto: no checkpoint in {args.save_path} yet, starting afresh")
            return None, None
        return Path(path), read_checkpoint(path)
    return Path(args.resume), read_checkpoint(args.resume)


def check_config(ckpt, args, path):
    config = ckpt.get("model_config") or {}
    for key, flag, value in (("num_classes", "--num-class", args.num_class),
                             ("width_mult", "--width-mult", args.width_mult)):
        if key in config and config[key] != value:
            raise UsageError(f"{path} holds a model with {key}={config[key]} but {flag} is {value}; "
                             f"pass {flag} {config[key]} or another checkpoint")


def amp_dtype_for(args, device):
    enabled = args.amp if args.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def run(args, on_step=None):
    """One training process (a rank of the job, or the only one). Returns the process exit code."""
    device_type = distributed.resolve_device_type(args.device)
    context = distributed.setup(device_type, args.dist_timeout)
    try:
        with StopFlag() as stop:
            return train(args, context, stop, on_step)
    finally:
        distributed.cleanup()


def train(args, context, stop, on_step=None):
    log = _logger(context)
    device = context.device
    save_path = Path(args.save_path)
    if args.batch_size % context.world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {context.world_size} processes")
    per_rank = args.batch_size // context.world_size
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()

    # Data
    train_set, val_set, classes, _ = build_datasets(args.data_dir, args.class_order, args.input_size,
                                                    args.resize, args.interpolation)
    if train_set is None or len(train_set) == 0:
        raise UsageError(f"--data-dir {args.data_dir}: no training images found")
    if (args.crop_scale_min, args.hflip) != (0.08, 0.5):
        train_set.transform = TrainTransform(args.input_size, scale=(args.crop_scale_min, 1.0), hflip=args.hflip,
                                             interpolation=args.interpolation)
    if len(classes.wnids) != args.num_class:
        raise UsageError(f"--num-class {args.num_class}, but {args.data_dir} has {len(classes.wnids)} classes")
    train_sampler = TrainSampler(len(train_set), num_replicas=context.world_size, rank=context.rank, seed=args.seed)
    pin = device.type == "cuda"
    # Workers are not persistent: each epoch's iterator draws its worker seeds from that epoch's stream.
    train_loader = build_loader(train_set, per_rank, train_sampler, num_workers=args.num_workers, pin_memory=pin,
                                persistent_workers=False, drop_last=True)
    samples_per_rank = math.ceil(len(train_set) / context.world_size)
    steps_per_epoch = samples_per_rank // per_rank
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size}: larger than the {len(train_set)} training images")
    val_loader = None
    if val_set is not None and len(val_set):
        val_loader = build_loader(val_set, per_rank, EvalSampler(len(val_set), context.world_size, context.rank),
                                  num_workers=args.num_workers, pin_memory=pin, persistent_workers=False,
                                  drop_last=False)
    else:
        log(f"warning: no validation images in {args.data_dir}; best.pth follows nothing, only last.pth is kept")

    # Model and state to continue from
    seed_everything(args.seed)
    model = MobileNetV2(num_classes=args.num_class, width_mult=args.width_mult, dropout=args.dropout)
    start_epoch, start_step, best_acc1, metrics, ckpt = 0, 0, -1.0, [], None
    resume_path, data = resolve_resume(args, context, log)
    if data is not None and data.get("format") == CHECKPOINT_FORMAT:
        ckpt = data
        check_config(ckpt, args, resume_path)
        load_state_checked(model, ckpt["model"], resume_path)
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        best_acc1, metrics = float(ckpt.get("best_acc1", -1.0)), list(ckpt.get("metrics") or [])
        log(f"resuming from {resume_path}: {start_epoch} epochs done"
            + (f" + {start_step} steps" if start_step else ""))
        if args.start_epoch is not None and args.start_epoch != start_epoch:
            log(f"warning: --start-epoch {args.start_epoch} overrides the checkpoint's {start_epoch} epochs")
            start_epoch, start_step = args.start_epoch, 0
            metrics = [m for m in metrics if m["epoch"] <= start_epoch]
    elif data is not None:
        # Weights alone (the seed's `module.network.*` files, torchvision's, ...): the optimizer starts
        # afresh and --start-epoch says where the schedule stands.
        try:
            weights = load_model(data, num_classes=args.num_class, width_mult=args.width_mult)
        except WeightsError as e:
            raise UsageError(f"{resume_path}: {e}") from None
        load_state_checked(model, weights.state_dict(), resume_path)
        start_epoch = args.start_epoch or 0
        log(f"resuming weights from {resume_path} at epoch {start_epoch} (optimizer state starts afresh)")
    if start_step and ckpt is not None:
        saved = ckpt.get("args") or {}
        if saved.get("batch_size") != args.batch_size or int(ckpt.get("world_size", 1)) != context.world_size:
            log("warning: batch size or process count changed since the mid-epoch checkpoint; "
                "restarting that epoch from its first step")
            start_step = 0
    if start_epoch >= args.num_epochs:
        log(f"nothing to do: {start_epoch} epochs done, --num-epochs {args.num_epochs}")
        return 0

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if device.type == "cpu" and args.channels_last and args.fused_bn:
        use_fused_batchnorm(model, log)
    ema = ModelEma(model, args.model_ema_decay) if args.model_ema else None
    if ema is not None and ckpt is not None and ckpt.get("model_ema") is not None:
        load_state_checked(ema.module, ckpt["model_ema"], resume_path)
    raw = model
    if args.sync_bn and context.distributed:
        raw = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    optimizer = torch.optim.SGD(parameter_groups(raw, args.weight_decay, not args.no_decay_norm_bias),
                                lr=args.lr, momentum=args.momentum, foreach=True)  # one fused update, also on CPU
    amp_dtype = amp_dtype_for(args, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    schedule = LRSchedule(args.lr, args.num_epochs, args.lr_schedule, args.lr_gamma, args.warmup_epochs, args.min_lr)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"{resume_path}: optimizer state does not fit ({e}); keep --no-decay-norm-bias "
                             "as in the original run") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    criterion = build_criterion(args.label_smoothing)
    tensorboard = None
    if context.is_main:
        save_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(save_path)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tensorboard = SummaryWriter(save_path / "tensorboard")

    log(f"MobileNetV2 width {args.width_mult:g}, {args.num_class} classes, {args.input_size} px | "
        f"{len(train_set)} train / {len(val_set) if val_set is not None else 0} val images | "
        f"{context.world_size} process(es) on {device.type}: global batch {args.batch_size} = "
        f"{context.world_size} x {per_rank}, {steps_per_epoch} steps/epoch | "
        f"amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, "
        f"channels_last {args.channels_last}, compile {args.compile}")

    for epoch in range(start_epoch, args.num_epochs):
        if start_step:
            restore_rng(ckpt["rng"])
            meter = EpochMeter(**ckpt.get("partial", {}))
        else:
            seed_everything(epoch_seed(args.seed, epoch, context.rank))
            meter = EpochMeter()
        train_sampler.set_epoch(epoch, skip=start_step * per_rank)
        progress = Progress(context.is_main, steps_per_epoch, start_step, f"epoch {epoch + 1}/{args.num_epochs}",
                            args.print_freq)
        try:
            meter, step, stopped = train_one_epoch(
                model, train_loader, criterion, optimizer, schedule, epoch, steps_per_epoch, device, context,
                start_step=start_step, meter=meter, scaler=scaler, amp_dtype=amp_dtype,
                channels_last=args.channels_last, ema=ema, stop=stop, max_nonfinite=args.max_nonfinite,
                progress=progress, on_step=on_step, log=log)
        finally:
            progress.close()
        start_step = 0

        def make_checkpoint(epochs_done, steps_done, partial=None):
            return {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": cpu_state(raw), "model_ema": cpu_state(ema.module) if ema is not None else None,
                "model_config": dict(raw.config),
                "classes": {"order": classes.order, "wnids": list(classes.wnids), "names": list(classes.names)},
                "data": {"input_size": args.input_size, "resize": args.resize, "interpolation": args.interpolation,
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "epoch": epochs_done, "step": steps_done,
                "optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "best_acc1": best_acc1, "rng": capture_rng(), "sampler": train_sampler.state_dict(),
                "metrics": metrics, "partial": partial, "world_size": context.world_size,
                "args": plain_args(args),
            }

        if stopped:
            name = signal.Signals(stop.signum).name
            if context.is_main:
                write_checkpoint(make_checkpoint(epoch, step, asdict(meter)), [save_path / "last.pth"])
            distributed.barrier(context)
            raise Preempted(stop.signum, f"stopped by {name} at epoch {epoch + 1} step {step}/{steps_per_epoch}; "
                                         f"saved {save_path / 'last.pth'}, continue with --resume auto")

        record = {"epoch": epoch + 1, "lr": schedule(epoch, steps_per_epoch - 1, steps_per_epoch),
                  "train_loss": meter.loss, "train_top1": meter.top1, "val_loss": float("nan"),
                  "val_top1": float("nan"), "val_top5": float("nan"), "ema_val_top1": None, "ema_val_top5": None,
                  "images_per_s": meter.count / meter.seconds if meter.seconds else 0.0,
                  "seconds": meter.seconds, "skipped_steps": meter.skipped, "failed_images": meter.failed}
        if val_loader is not None:
            val = evaluate(raw, val_loader, device, channels_last=args.channels_last,
                           amp=amp_dtype is not None, progress=context.is_main and sys.stderr.isatty())
            record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            if ema is not None:
                val_ema = evaluate(ema.module, val_loader, device, channels_last=args.channels_last,
                                   amp=amp_dtype is not None, progress=False)
                record.update(ema_val_top1=val_ema["top1"], ema_val_top5=val_ema["top5"])
        record["seconds"] = meter.seconds
        metrics.append(record)
        is_best = val_loader is not None and record["val_top1"] > best_acc1
        if is_best:
            best_acc1 = record["val_top1"]
        log(f"epoch {epoch + 1}/{args.num_epochs} lr {record['lr']:.6f} train loss {meter.loss:.4f} "
            f"top1 {meter.top1:.2f} | val loss {record['val_loss']:.4f} top1 {record['val_top1']:.2f} "
            f"top5 {record['val_top5']:.2f}"
            + (f" | ema top1 {record['ema_val_top1']:.2f}" if record["ema_val_top1"] is not None else "")
            + f" | {record['images_per_s']:.0f} img/s, {meter.seconds:.0f} s")

        if context.is_main:
            paths = []
            if (epoch + 1) % args.save_epoch_freq == 0 or epoch + 1 == args.num_epochs:
                paths.append(save_path / f"epoch_{epoch + 1}.pth")
            paths.append(save_path / "last.pth")
            if is_best:
                paths.append(save_path / "best.pth")
            write_checkpoint(make_checkpoint(epoch + 1, 0), paths)
            prune_epoch_files(save_path, args.keep_last, log)
            try:
                write_reports(metrics, save_path)
            except OSError as e:
                raise CheckpointError(f"could not write {e.filename or save_path}: {e.strerror or e}; epoch "
                                      f"{epoch + 1} is saved in its checkpoint: free space, then --resume auto"
                                      ) from None
            if tensorboard is not None:
                for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s"):
                    tensorboard.add_scalar(key, record[key], epoch + 1)
                tensorboard.flush()
        # A signal during validation or saving: the epoch is complete and saved, so stop here.
        votes = torch.tensor([float(stop.signum is not None)], device=device)
        if distributed.all_reduce_sum(votes, context).item():
            distributed.barrier(context)
            signum = stop.signum or signal.SIGTERM
            raise Preempted(signum, f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                                    f"continue with --resume auto")
        distributed.barrier(context)

    if tensorboard is not None:
        tensorboard.close()
    log(f"done: {args.num_epochs} epochs, best val top-1 {best_acc1:.2f}%, checkpoints in {save_path}")
    return 0


def ensure_demo_data(args, log=print):
    root = Path(args.data_dir)
    if not (root / "ILSVRC2012_img_train").is_dir():
        log(f"building the demo dataset in {root} ...")
        make_demo(root, seed=args.seed)
    return root


def _own_message(error):
    """The error's one-line message; raised in a DataLoader worker, it arrives wrapped in that worker's
    traceback, with the original message on the last line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def _guarded(args, on_step=None):
    """run() with the job's errors turned into one line and an exit code (also inside spawned ranks)."""
    prefix = "train.py: error: "
    if distributed.launched_by_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"train.py: error (rank {os.environ.get('RANK')}): "
    try:
        return run(args, on_step)
    except UsageError as e:
        print(prefix + str(e), file=sys.stderr, flush=True)
        return 2
    except Preempted as e:
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (TrainingError, WeightsError, DataError) as e:
        print(prefix + _own_message(e), file=sys.stderr, flush=True)
        return 1
    except dist.DistError as e:
        print(prefix + f"lost contact with another process of the job ({str(e).splitlines()[0]}); "
              "its own error is reported above", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        if any(sign in str(e) for sign in PEER_LOST):
            reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # drop the source path
            print(prefix + f"lost contact with another process of the job ({reason}); its own error is "
                  "reported above", file=sys.stderr, flush=True)
            return 1
        if "DataLoader worker" in str(e):
            print(prefix + f"a data loader process died ({str(e).splitlines()[0]}); "
                  "check memory and the data, then --resume auto", file=sys.stderr, flush=True)
            return 1
        raise


def main(args, on_step=None):
    """Entry point; `on_step(epoch, step, indices)` is called after every training step (tests use it)."""
    try:
        args = resolve_args(args)
        device_type = distributed.resolve_device_type(args.device)
    except (UsageError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.demo and not distributed.launched_by_launcher():
        try:
            ensure_demo_data(args)
        except DataError as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            sys.exit(1)
    code = distributed.launch(functools.partial(_guarded, on_step=on_step), args, device_type)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
