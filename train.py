"""Train MobileNetV2 on ImageNet with the seed's recipe, on the CPU or on every visible GPU, with exact resume.

    python train.py --data-dir /ImageNet --batch-size 256

A plain launch with N visible GPUs starts one process per GPU (DistributedDataParallel); `torchrun`
works the same way (`torchrun --nproc_per_node=2 train.py --device cpu ...` on the CPU with gloo), and so
does `srun python train.py ...` (each SLURM task becomes the rank torchrun would have started);
`python train.py --demo` trains on a small generated dataset on the CPU in a few minutes.

Checkpoints (epoch_N.pth, last.pth, best.pth in --save-path; the format is `checkpoint.py`'s) are written
atomically by rank 0 only; `--resume auto` continues from the newest one that loads, also from the middle
of an epoch after SIGTERM/SIGUSR1 (cluster preemption). On the CPU a resumed run is bit-identical to an
uninterrupted one.
"""
import argparse
import contextlib
import ctypes
import functools
import math
import os
import platform
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import augment
import checkpoint
import cli
import distributed
import finetune
import fused_batchnorm
import gpu_data
import image_folders
import optimization
import outputs
import quantization
from checkpoint import CheckpointError, WeightsError
from cli import UsageError
from evaluate import evaluate
from MobileNetV2 import MobileNetV2
from read_ImageNetData import (DEMO_MARKER, IMAGENET_MEAN, IMAGENET_STD, EvalSampler, RASampler, TrainSampler,
                               TrainTransform, build_loader, demo_is_complete, eval_transform, make_demo, normalize)
from weights import PRETRAINED_DIR, load_model

# `--demo`: the settings that reach >= 90% val top-1 on the generated digits data in a few minutes on two
# CPU cores (measured; see README). They are defaults: a flag given on the command line always wins.
DEMO_SETTINGS = {
    "data_dir": "output/demo/data", "save_path": "output/demo", "device": "cpu", "input_size": 64,
    "train_crop_size": None, "val_resize_size": None, "val_crop_size": None,  # all follow input_size
    "width_mult": 0.5, "batch_size": 32, "num_epochs": 15, "lr": 0.05, "lr_schedule": "cosine",
    "warmup_epochs": 1.0, "num_workers": 0, "print_freq": 15, "save_epoch_freq": 5,
    # 32 px digits: a crop of 8% of one is no longer a digit, and a mirrored digit is another symbol.
    "crop_scale_min": 0.35, "hflip": 0.0,
}
# With --recipe, the recipe's method wins over these demo settings; the rest of the demo's (its data,
# sizes, batch, epochs, device) wins over the recipe's, so any recipe runs on the demo in minutes.
DEMO_METHOD = ("lr", "lr_schedule", "warmup_epochs")


# --qat: torchvision's quantization-aware fine-tuning recipe (references/classification/train_quantization.py:
# SGD momentum 0.9, lr 1e-4 held for its 10 epochs, weight decay 1e-4). The fused BatchNorm kernel would
# replace the BatchNorm layers the fake quantization reads.
QAT_SETTINGS = {"num_epochs": 10, "lr": 1e-4, "weight_decay": 1e-4, "lr_schedule": "step", "lr_step_size": 30.0,
                "lr_gamma": 0.1, "fused_bn": False, "width_mult": None}  # the width: the file's


class TrainingError(cli.ScriptError, RuntimeError):
    """Training cannot go on (non-finite loss, a loader process that died); one line, exit code 1."""


class Preempted(cli.ScriptError):
    """SIGTERM/SIGUSR1 arrived; a resumable checkpoint was saved. Exits with 128 + the signal number."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------------------------------
# Command line


def _presets(args):
    """The defaults the command line selects: the recipe's, then the demo's (see DEMO_METHOD); without a
    named recipe, those of fine-tuning (--pretrained, --freeze-backbone: see finetune.py) last."""
    chosen = recipe_defaults(args.recipe)
    if args.qat:
        chosen.update(QAT_SETTINGS)
    if args.demo:
        chosen.update({k: v for k, v in DEMO_SETTINGS.items() if args.recipe == "seed" or k not in DEMO_METHOD})
    if args.recipe == "seed":
        chosen.update(finetune.presets(args))
    return chosen


def recipe_defaults(name):
    """A recipe's flag defaults; its lr is left unset (None) so that check_args scales it to --batch-size."""
    recipe = optimization.RECIPES[name]
    if not recipe.scale_lr:
        return dict(recipe.settings)
    return {**recipe.settings, "batch_size": recipe.batch_size, "lr": None}


def get_args_parser(add_help=True):
    p = cli.Parser(prog="train.py", add_help=add_help, presets=_presets,
                   description="Train MobileNetV2 on ImageNet. Defaults are the seed repository's recipe "
                               "(SGD momentum 0.9, lr 0.045 x0.98 per epoch, weight decay 4e-5, batch 256, "
                               "400 epochs, no dropout), which follows the paper (Sandler et al. 2018, Sec. 6.1: "
                               "RMSProp there; the seed reproduced it with SGD).")
    seed = p.add_argument_group("the seed's flags (same meaning)")
    seed.add_argument("--data-dir", default="/ImageNet",
                      help="ImageNet root in the seed's layout or train/ + val/; or any folder of classes: "
                           "D/train/<class>/ + D/val/<class>/, or D/<class>/ with --val-split")
    seed.add_argument("--batch-size", "-b", type=cli.positive_int, default=256,
                      help="global batch, split evenly over the processes (seed)")
    seed.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                      help="number of classes (seed: --num-class); default: from the data (ImageNet: 1000), "
                           "which it must agree with")
    seed.add_argument("--num-epochs", "--epochs", dest="num_epochs", type=cli.positive_int, default=400,
                      help="total epochs (seed)")
    seed.add_argument("--lr", type=cli.positive_float, default=0.045, help="base learning rate (seed, paper)")
    seed.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.non_negative_int,
                      default=min(8, os.cpu_count() or 1),
                      help="loader processes per training process (default: min(8, CPU count))")
    seed.add_argument("--print-freq", type=cli.positive_int, default=10,
                      help="steps between plain log lines when the output is not a terminal (seed)")
    seed.add_argument("--save-epoch-freq", type=cli.positive_int, default=1,
                      help="write epoch_N.pth every N epochs (seed)")
    seed.add_argument("--save-path", "--output-dir", dest="save_path", default="output",
                      help="checkpoints, metrics and curves go here (seed)")
    seed.add_argument("--resume", default="", metavar="FILE|auto",
                      help="continue from a checkpoint; 'auto': the newest one in --save-path that loads. "
                           "A seed-format weights file resumes at --start-epoch")
    seed.add_argument("--start-epoch", type=cli.non_negative_int, default=None,
                      help="epochs already done (default: the checkpoint's, else 0); sets lr 0.045 x 0.98^N")
    seed.add_argument("--gpus", default=None, help="seed flag: comma-separated GPU ids to use "
                                                    "(same as CUDA_VISIBLE_DEVICES)")

    opt = p.add_argument_group("optimisation (defaults: the seed's recipe; off switches are the seed's)")
    opt.add_argument("--momentum", type=cli.fraction, default=0.9, help="SGD momentum (seed)")
    opt.add_argument("--weight-decay", "--wd", dest="weight_decay", type=cli.non_negative_float, default=4e-5,
                     help="L2 weight decay (seed, paper)")
    opt.add_argument("--no-decay-norm-bias", action="store_true",
                     help="no weight decay on BatchNorm weights and biases (seed: decayed)")
    opt.add_argument("--lr-schedule", "--lr-scheduler", dest="lr_schedule", type=schedule_name,
                     choices=optimization.SCHEDULES, default="exponential",
                     help="exponential: lr x gamma every epoch (seed); step: x gamma every --lr-step-size epochs; "
                          "cosine: to --min-lr; all per step, after the warm-up (torchvision's steplr, "
                          "cosineannealinglr, exponentiallr are accepted)")
    opt.add_argument("--lr-gamma", type=cli.positive_float, default=0.98, help="per-epoch lr factor (seed, paper)")
    opt.add_argument("--warmup-epochs", "--lr-warmup-epochs", dest="warmup_epochs", type=cli.non_negative_float,
                     default=0.0, help="lr warm-up epochs (fractional allowed), per step; see --lr-warmup-method "
                                       "(seed: none)")
    opt.add_argument("--min-lr", "--lr-min", dest="min_lr", type=cli.non_negative_float, default=0.0,
                     help="final lr of the cosine schedule")
    opt.add_argument("--label-smoothing", type=cli.fraction, default=0.0, help="label smoothing (seed: none)")
    opt.add_argument("--crop-scale-min", type=cli.positive_float, default=0.08,
                     help="smallest area fraction of the random-resized crop (Inception, torchvision)")
    opt.add_argument("--hflip", type=cli.unit_interval, default=0.5,
                     help="probability of a horizontal flip (Inception, torchvision)")
    opt.add_argument("--dropout", type=cli.fraction, default=0.0,
                     help="dropout before the classifier (seed: none; the paper used 0.2 in TensorFlow)")
    opt.add_argument("--model-ema", action="store_true",
                     help="keep an exponential moving average of the weights, validated each epoch too")
    opt.add_argument("--model-ema-decay", type=cli.fraction, default=0.99998,
                     help="EMA decay per update (torchvision's default), adjusted as torchvision does unless "
                          "--no-model-ema-adjust (see --model-ema-steps)")
    opt.add_argument("--max-nonfinite", type=cli.positive_int, default=3,
                     help="stop after this many non-finite losses in a row (each such step is skipped)")

    model = p.add_argument_group("model and data")
    model.add_argument("--width-mult", type=cli.positive_float, default=1.0,
                       help="width multiplier (paper: 1.0; with --pretrained: the file's)")
    model.add_argument("--input-size", type=cli.positive_int, default=224,
                       help="training and validation crop where --train-crop-size/--val-crop-size are not "
                            "given (paper: 224)")
    model.add_argument("--val-resize-size", "--resize", dest="val_resize_size", type=cli.positive_int, default=None,
                       help="validation resize before the centre crop (default: the validation crop x 256/224)")
    model.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear",
                       help="validation resize interpolation (torchvision's reference)")
    model.add_argument("--class-order", choices=["sorted", "devkit"], default="sorted",
                       help="class index order: sorted WNIDs (torchvision, timm, public weights) or devkit "
                            "ILSVRC2012_ID - 1 (the seed repo's)")
    model.add_argument("--seed", type=cli.non_negative_int, default=0,
                       help="seed for init, sampling and augmentation")

    dev = p.add_argument_group("devices and speed")
    dev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: every visible GPU, else the CPU")
    dev.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision: bf16 where supported, else fp16 with a grad scaler "
                          "(default: on for CUDA, off on the CPU)")
    dev.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC memory format: same results, faster convolutions on CPU and tensor cores")
    dev.add_argument("--compile", action="store_true", help="torch.compile the model (the first step's time, "
                                                             "compilation included, is logged)")
    dev.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                     default="default", help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs)")
    dev.add_argument("--data-backend", choices=["cpu", "gpu"], default="cpu",
                     help="cpu: loader processes decode and crop (the default until the GPU backend is measured "
                          "faster); gpu: they only read the files, JPEGs are decoded (nvjpeg) and cropped on the "
                          "device in batches (on a CPU device: libjpeg in this process, for checks)")
    dev.add_argument("--sync-free", action=argparse.BooleanOptionalAction, default=None,
                     help="decide each step on the device, reading the statistics every --print-freq steps "
                          "(default: on CUDA with --opt sgd, sgd-nesterov or adamw and no float16)")
    dev.add_argument("--fused-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="CPU training with channels_last: BatchNorm (+ ReLU6) as one compiled kernel each way, "
                          "about 20%% faster, equal to float32 rounding (built once with the C++ compiler PyTorch "
                          "extensions use; without one, PyTorch's layers run)")
    dev.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    dev.add_argument("--dist-timeout", type=cli.positive_float, default=30.0,
                     help="minutes a rank waits for a silent peer before failing")

    out = p.add_argument_group("output")
    out.add_argument("--keep-last", type=cli.non_negative_int, default=0,
                     help="keep only the newest k epoch_N.pth files (0: keep all); last/best always stay")
    out.add_argument("--tensorboard", action="store_true", help="also log to <save-path>/tensorboard")
    out.add_argument("--start-over", action="store_true",
                     help="--save-path holds another run's files: move them into <save-path>/previous-<run id>/ "
                          "and start a new run there (without it such a start is refused)")
    out.add_argument("--demo", action="store_true",
                     help="train on a small generated digits dataset on the CPU (built in output/demo/data if "
                          "absent); its settings are defaults: flags given explicitly win")
    qat = p.add_argument_group("INT8: quantization-aware fine-tuning (torchvision's recipe as defaults)")
    qat.add_argument("--qat", metavar="WEIGHTS", default=None,
                     help="fine-tune these float weights (any file evaluate.py reads) with INT8 fake quantization "
                          "and write <save-path>/model.int8.onnx, as quantize.py writes it (defaults then: 10 "
                          "epochs at lr 1e-4, weight decay 1e-4)")
    qat.add_argument("--qat-bn-epochs", type=cli.non_negative_int, default=3,
                     help="epochs after which BatchNorm statistics are frozen (torchvision: 3)")
    qat.add_argument("--qat-observer-epochs", type=cli.non_negative_int, default=4,
                     help="epochs after which activation ranges are frozen (torchvision: 4)")
    qat.add_argument("--calibration-images", type=cli.positive_int, default=512,
                     help="training images the INT8 file's activation ranges are set on (as quantize.py)")
    add_recipe_arguments(p)

    tl = p.add_argument_group("fine-tuning on your own images (finetune.py, image_folders.py)")
    tl.add_argument("--pretrained", default=None, metavar="FILE|torchvision-v1|torchvision-v2",
                    help="start from these weights (any layout evaluate.py reads; the names are fetched into "
                         "--pretrained-dir): every tensor that fits is loaded, a classifier for another class "
                         "count starts afresh. Selects the fine-tuning recipe as defaults: "
                         + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in finetune.FINETUNE_RECIPE.items()
                                     if v is not None))
    tl.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR, help="where named public weights are stored")
    tl.add_argument("--freeze-backbone", action="store_true",
                    help="train only the classifier; the backbone's BatchNorm stays in eval mode. Selects as "
                         "defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                                                  f"--{'' if v else 'no-'}{k}" for k, v in
                                                  finetune.LINEAR_PROBE_RECIPE.items()))
    tl.add_argument("--val-split", type=cli.fraction, default=None,
                    help="hold out this fraction of each class for validation when the data has no val/ "
                         "(seeded by --seed, recorded in the checkpoints: a resume and evaluate.py use the same)")
    tl.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), default=None,
                    help="normalisation mean on 0..1 RGB (default: the --pretrained file's, else ImageNet's); "
                         "recorded in the checkpoints for evaluate.py")
    tl.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"), default=None,
                    help="normalisation std (default: the --pretrained file's, else ImageNet's)")
    tl.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="random-resized crops and flips for training; --no-augment trains on the validation "
                         "transform (resize + centre crop)")
    tl.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True,
                    help="with --freeze-backbone and --no-augment: compute the backbone's pooled features once "
                         "and train the classifier on them (same result, seconds instead of minutes)")
    return p


def add_recipe_arguments(p):
    """--recipe and the parts of the published recipes, named as in torchvision's reference script."""
    names = "; ".join(f"{name}: {r.summary()}" for name, r in optimization.RECIPES.items()).replace("%", "%%")
    rec = p.add_argument_group("recipes and their parts (flags of torchvision's references/classification/train.py)")
    rec.add_argument("--recipe", choices=list(optimization.RECIPES), default="seed",
                     help="a published recipe as defaults (explicit flags win; with --demo, the demo's data, "
                          "sizes, batch and epochs win). Its lr scales linearly with --batch-size unless --lr "
                          f"is given (the seed's stays 0.045). {names}")
    rec.add_argument("--opt", choices=optimization.OPTIMIZERS, default="sgd",
                     help="sgd (seed), sgd-nesterov, rmsproptf (TensorFlow's RMSProp, the paper's), rmsprop "
                          "(torch's), adamw; momentum is --momentum, RMSProp's decay 0.9")
    rec.add_argument("--opt-eps", type=cli.positive_float, default=None,
                     help="optimizer epsilon (default: rmsproptf 1e-3, rmsprop 0.0316, adamw 1e-8)")
    rec.add_argument("--norm-weight-decay", type=cli.non_negative_float, default=None,
                     help="weight decay of BatchNorm weights and biases (default: --weight-decay)")
    rec.add_argument("--bias-weight-decay", type=cli.non_negative_float, default=None,
                     help="weight decay of biases (default: --weight-decay)")
    rec.add_argument("--lr-step-size", type=cli.positive_float, default=1.0,
                     help="epochs between the step schedule's decays (fractional allowed, e.g. 2.4)")
    rec.add_argument("--lr-warmup-method", choices=optimization.WARMUP_METHODS, default="linear",
                     help="linear: from --lr-warmup-decay x lr up to lr; constant: --lr-warmup-decay x lr")
    rec.add_argument("--lr-warmup-decay", type=cli.unit_interval, default=0.0,
                     help="lr factor at the start of the warm-up (torchvision's default is 0.01; 0 keeps the "
                          "seed's ramp from the first step)")
    rec.add_argument("--clip-grad-norm", type=cli.positive_float, default=None,
                     help="clip the gradients' global L2 norm to this (default: no clipping)")
    rec.add_argument("--accum-steps", type=cli.positive_int, default=1,
                     help="split each process's share of --batch-size (the global batch) into this many "
                          "forward/backward passes before one optimizer step: a published batch on fewer GPUs")
    rec.add_argument("--drop-path", type=cli.fraction, default=0.0,
                     help="stochastic depth of the residual blocks, rising linearly to this (default: none)")
    rec.add_argument("--auto-augment", type=policy_name, default=None,
                     help="after the crop: ta_wide, ra, imagenet (AutoAugment), augmix, or a timm policy string "
                          "like rand-m9-mstd0.5 (default: none)")
    rec.add_argument("--ra-magnitude", type=cli.non_negative_int, default=9, help="RandAugment's magnitude bin (of 31)")
    rec.add_argument("--augmix-severity", type=cli.positive_int, default=3, help="AugMix's severity (1..10)")
    rec.add_argument("--random-erase", type=cli.unit_interval, default=0.0,
                     help="probability of random erasing, after the policy (default: 0)")
    rec.add_argument("--mixup-alpha", type=cli.non_negative_float, default=0.0, help="mixup's Beta alpha (0: off)")
    rec.add_argument("--cutmix-alpha", type=cli.non_negative_float, default=0.0,
                     help="cutmix's Beta alpha (0: off); with both, each batch gets one of the two at random")
    rec.add_argument("--ra-sampler", action="store_true", help="repeated augmentation (torchvision's RASampler)")
    rec.add_argument("--ra-reps", type=cli.positive_int, default=3, help="repetitions of each image with --ra-sampler")
    rec.add_argument("--train-crop-size", type=cli.positive_int, default=None,
                     help="random-resized crop size for training (default: --input-size)")
    rec.add_argument("--val-crop-size", type=cli.positive_int, default=None,
                     help="centre crop size for validation (default: --input-size)")
    rec.add_argument("--model-ema-steps", type=cli.positive_int, default=32,
                     help="optimizer steps between EMA updates (torchvision's default)")
    rec.add_argument("--model-ema-adjust", action=argparse.BooleanOptionalAction, default=True,
                     help="torchvision's adjustment of the EMA decay: 1 - decay scaled by global batch x "
                          "--model-ema-steps / epochs; --no-model-ema-adjust uses --model-ema-decay as it is")


def schedule_name(text):
    """--lr-scheduler: this repo's names, or torchvision's."""
    return {"steplr": "step", "cosineannealinglr": "cosine", "exponentiallr": "exponential"}.get(text, text)


def policy_name(text):
    """--auto-augment: a policy build_policy knows; a timm string is checked in full."""
    try:
        augment.build_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def check_recipe_args(args):
    """The recipe's lr at this batch, the crop sizes, and the checks of the recipe flags (in place)."""
    recipe = optimization.RECIPES[args.recipe]
    args.lr_from_recipe = args.lr is None
    if args.lr is None:
        args.lr = recipe.lr_for(args.batch_size)
    args.train_crop_size = args.train_crop_size or args.input_size
    args.val_crop_size = args.val_crop_size or args.input_size
    if args.val_resize_size is None:
        args.val_resize_size = int(round(args.val_crop_size * 256 / 224))
    if args.val_resize_size < args.val_crop_size:
        raise UsageError(f"--val-resize-size {args.val_resize_size} is smaller than the validation crop "
                         f"{args.val_crop_size} (--val-crop-size, else --input-size)")
    for flag, size in (("--train-crop-size", args.train_crop_size), ("--val-crop-size", args.val_crop_size)):
        if size < 32:
            raise UsageError(f"{flag} (or --input-size) {size} is below MobileNetV2's 32 px minimum")
    if args.ra_magnitude > 30:
        raise UsageError(f"--ra-magnitude {args.ra_magnitude}: RandAugment's bins are 0..30")
    if args.augmix_severity > 10:
        raise UsageError(f"--augmix-severity {args.augmix_severity}: AugMix's severity is 1..10")
    if args.batch_size % args.accum_steps:
        raise UsageError(f"--batch-size {args.batch_size} does not split into --accum-steps {args.accum_steps}")


def recipe_lines(args):
    """What the run's first lines say about its recipe and where its lr comes from (nothing for the seed's
    recipe, the plain defaults, whose output stays as it was)."""
    recipe = optimization.RECIPES[args.recipe]
    if args.recipe == "seed":
        return []
    lines = [f"recipe {args.recipe}: {recipe.summary()}" + (f" ({recipe.note})" if recipe.note else "")]
    if args.lr_from_recipe and args.batch_size != recipe.batch_size:
        lines.append(f"lr {args.lr:g}: the recipe's {recipe.lr:g} at global batch {recipe.batch_size}, scaled "
                     f"linearly to --batch-size {args.batch_size} (--lr sets it)")
    elif not args.lr_from_recipe:
        lines.append(f"lr {args.lr:g} as given (the recipe's is {recipe.lr:g} at global batch {recipe.batch_size})")
    return lines


def check_args(args):
    """Derived defaults and the checks argparse cannot do; a copy of `args`, which stays untouched."""
    args = argparse.Namespace(**vars(args))
    check_recipe_args(args)
    if args.crop_scale_min > 1:
        raise UsageError(f"--crop-scale-min {args.crop_scale_min} is above 1 (the whole image)")
    if args.sync_bn and args.device == "cpu":
        raise UsageError("--sync-bn needs CUDA; BatchNorm on the CPU is per process")
    if args.gpus:
        if not re.fullmatch(r"\d+(,\d+)*", args.gpus.strip()):
            raise UsageError(f"--gpus {args.gpus!r}: expected comma-separated GPU ids like 0,1")
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus.strip()
    if not (args.demo and not Path(args.data_dir).exists()) and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (point it at the ImageNet root, "
                         "or try --demo)")
    if args.qat is not None:
        if not Path(args.qat).is_file():
            raise UsageError(f"--qat {args.qat}: no such file; give the float weights to fine-tune")
        for flag, given in (("--model-ema", args.model_ema), ("--fused-bn", args.fused_bn)):
            if given:
                raise UsageError(f"{flag} does not combine with --qat (its copies of the layers would not be "
                                 "fake-quantized); drop it")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (or use --resume auto)")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return finetune.resolve(args)


def plain_args(args):
    """vars(args) with plain types only, so `torch.load(weights_only=True)` reads it back."""
    return {k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in vars(args).items()}


# --------------------------------------------------------------------------------------------------
# Set-up: randomness, memory, the CPU kernel


def epoch_seed(seed, epoch, rank):
    # A fresh, reproducible stream per epoch makes an epoch's shuffling, augmentation and dropout depend
    # on nothing but (seed, epoch, rank): a resumed run sees exactly what an uninterrupted one saw.
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**32


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


def set_up_device(device):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()


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


def amp_dtype_for(amp, device):
    """The autocast dtype, or None for float32: `amp` None means on for CUDA, off on the CPU."""
    if not (amp if amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Data


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

    @property
    def num_classes(self):
        return len(self.classes.wnids)


@dataclass
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

    @classmethod
    def from_args(cls, args, saved):
        """As the command line asks; `saved`: the checkpoint being resumed (its held-out files)."""
        return cls(args.data_dir, args.class_order, args.num_classes, args.train_crop_size, args.val_crop_size,
                   args.val_resize_size, args.interpolation, args.crop_scale_min, args.hflip, args.batch_size,
                   args.num_workers, args.seed,
                   augment.after_crop(args.auto_augment, args.random_erase, args.interpolation, args.ra_magnitude,
                                      args.augmix_severity),
                   args.ra_reps if args.ra_sampler else 0, args.accum_steps,
                   "cpu" if caches_features(args) else args.data_backend,  # images are read once then
                   args.val_split, (checkpoint.meta(saved).get("data") or {}).get("val_split"), args.augment,
                   tuple(args.mean), tuple(args.std))


def build_data(spec, context, log):
    """Datasets, samplers and loaders for this rank (`spec`: a DataSpec); labels as `image_folders`
    (ImageNet: `read_ImageNetData`) assigns them."""
    if spec.backend == "gpu":
        check_gpu_backend(spec.after_crop, spec.interpolation)
    if spec.batch_size % (context.world_size * spec.accum_steps):
        raise UsageError(f"--batch-size {spec.batch_size} does not split evenly over {context.world_size} "
                         f"processes x --accum-steps {spec.accum_steps}")
    per_rank = spec.batch_size // context.world_size
    found = image_folders.build_datasets(spec.data_dir, spec.class_order, spec.val_crop_size, spec.val_resize_size,
                                         spec.interpolation, val_split=spec.val_split, seed=spec.seed,
                                         recorded_split=spec.recorded_split, num_classes=spec.num_classes, log=log)
    train_set, val_set, classes = found.train, found.val, found.classes
    if found.note:
        log(found.note)
    if train_set is None or len(train_set) == 0:
        raise UsageError(f"--data-dir {spec.data_dir}: no training images found")
    if not spec.train_augment:
        if spec.after_crop is not None:
            raise UsageError("--no-augment trains on centre crops: drop --auto-augment and --random-erase")
        train_set.transform = eval_transform(spec.val_crop_size, spec.val_resize_size, spec.interpolation)
    else:
        train_set.transform = TrainTransform(spec.train_crop_size, scale=(spec.crop_scale_min, 1.0),
                                             hflip=spec.hflip, interpolation=spec.interpolation)
        if spec.after_crop is not None:
            train_set.transform = augment.Chain(train_set.transform, spec.after_crop)
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
    train_loader = build_loader(train_set, per_rank // spec.accum_steps, sampler, num_workers=spec.num_workers,
                                pin_memory=pin, persistent_workers=False, drop_last=True)
    if spec.backend == "gpu":
        crop = spec.train_crop_size if spec.train_augment else spec.val_crop_size
        train_loader = on_device(train_set, train_loader, crop, context.device, fallback=train_set)
        log(f"data backend gpu: loader processes read the files, JPEGs are decoded and cropped on "
            f"{context.device.type}" + (" (nvjpeg)" if context.device.type == "cuda" else
                                        " (libjpeg in this process: a check of the GPU path, not a fast one)"))
    steps_per_epoch = sampler.num_samples // per_rank
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
                per_rank, steps_per_epoch, preprocessing)


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


# --------------------------------------------------------------------------------------------------
# Model and the state to continue from


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
            hint = ("--num-classes" if key.startswith("classifier") else "--width-mult")
            raise UsageError(f"{source}: {key} has shape {list(state[key].shape)} but the model built from "
                             f"the flags has {list(value.shape)}; check {hint}")
    model.load_state_dict(state)


@dataclass
class Start:
    """Where training starts: after `epoch` epochs and `step` steps, with what a checkpoint carried."""
    epoch: int = 0
    step: int = 0
    best_acc1: float = -1.0
    metrics: list = None
    ckpt: dict = None     # a training checkpoint (None when starting afresh or from weights alone)
    path: Path = None


def find_resume(resume, save_path, context, log):
    """(path, data) of the checkpoint to continue from, or (None, None). Rank 0 chooses for 'auto'."""
    if not resume:
        return None, None
    if resume == "auto":
        path = None
        if context.is_main:
            path, _ = checkpoint.find_latest(save_path, log)
            path = str(path) if path is not None else None
        path = distributed.broadcast_object(path, context)
        if path is None:
            log(f"--resume auto: no checkpoint in {save_path} yet, starting afresh")
            return None, None
        return Path(path), checkpoint.read(path)
    return Path(resume), checkpoint.read(resume)


def check_config(ckpt, num_classes, width_mult, path):
    config = ckpt.get("model_config") or {}
    for key, flag, value in (("num_classes", "--num-classes", num_classes), ("width_mult", "--width-mult", width_mult)):
        if key in config and config[key] != value:
            raise UsageError(f"{path} holds a model with {key}={config[key]} but {flag} is {value}; "
                             f"pass {flag} {config[key]} or another checkpoint")


def restore(model, path, data, start_epoch, num_classes, width_mult, batch_size, train_images, context, log):
    """Load what `data` (read from `path`) holds into `model`; return the Start.

    A training checkpoint restores everything; weights alone (the seed's `module.network.*` files,
    torchvision's, ...) restore the model, and `start_epoch` says where the schedule stands.
    """
    if data is None:
        return Start(metrics=[])
    if not checkpoint.is_checkpoint(data):
        try:
            weights = load_model(data, num_classes=num_classes, width_mult=width_mult)
        except WeightsError as e:
            raise UsageError(f"{path}: {e}") from None
        load_state_checked(model, weights.state_dict(), path)
        log(f"resuming weights from {path} at epoch {start_epoch or 0} (optimizer state starts afresh)")
        return Start(epoch=start_epoch or 0, metrics=[], path=path)
    load_state_checked(model, data["model"], path)
    start = Start(int(data["epoch"]), int(data["step"]), float(data.get("best_acc1", -1.0)),
                  list(data.get("metrics") or []), data, path)
    log(f"resuming from {path}: {start.epoch} epochs done" + (f" + {start.step} steps" if start.step else ""))
    if start_epoch is not None and start_epoch != start.epoch:
        log(f"warning: --start-epoch {start_epoch} overrides the checkpoint's {start.epoch} epochs")
        start.epoch, start.step = start_epoch, 0
        start.metrics = [m for m in start.metrics if m["epoch"] <= start_epoch]
    if start.step:
        saved_images = (data.get("sampler") or {}).get("n", train_images)
        if saved_images != train_images:
            raise UsageError(f"{path} stopped inside epoch {start.epoch + 1} of {saved_images} training images, but "
                             f"--data-dir now has {train_images}: the rest of that epoch cannot be told apart; "
                             "restore the data, or resume from the last epoch_N.pth (an epoch boundary)")
        saved_batch = (data.get("args") or {}).get("batch_size")
        if saved_batch != batch_size or int(data.get("world_size", 1)) != context.world_size:
            # The sampler's position counts samples of the whole job, so it carries over: resume at the
            # last step boundary of the new batch at or before it (at most one batch is seen twice).
            consumed = int((data.get("sampler") or {}).get("consumed", start.step * (saved_batch or batch_size)))
            start.step = consumed // batch_size
            log(f"note: batch size or process count changed since the mid-epoch checkpoint; continuing that "
                f"epoch at step {start.step} of the new batch size")
    return start


def own_output_directory(run_dir, resume_path, resumed, start_over, context, log):
    """Lock --save-path for this run (rank 0) and make sure it holds no other run's files; the run id.

    A run continues in its own directory (`--resume auto`, or a checkpoint of the run recorded there);
    a new run is refused where another run's checkpoints are, unless `start_over` moves them aside first.
    """
    run_id = None
    if context.is_main:
        run_dir.lock()
        run_dir.remove_stale_temporaries()
        owner = run_dir.owner()
        resumed_id = resumed.get("run_id") if checkpoint.is_checkpoint(resumed) else None
        own = resume_path is not None and checkpoint.is_checkpoint(resumed) and (
            (owner is not None and resumed_id == owner)
            or (owner is None and Path(resume_path).resolve().parent == run_dir.path.resolve()))
        present = run_dir.checkpoints()
        if present and not own:
            if not start_over:
                who = f"run {owner}" if owner else "an earlier run"
                raise UsageError(f"--save-path {run_dir.path} holds the checkpoints of {who} ({present[0].name}, ...);"
                                 " continue it with --resume auto, choose another --save-path, or add --start-over "
                                 "to move its files aside")
            log(f"--save-path {run_dir.path}: moved the earlier run's files to {run_dir.move_aside()}")
        # A resumed checkpoint continues its run, wherever it was read from; anything else is a new run.
        run_id = resumed_id or uuid.uuid4().hex[:12]
        if run_dir.owner() != run_id:
            run_dir.claim(run_id, started=time.strftime("%Y-%m-%d %H:%M:%S"), host=socket.gethostname(),
                          pid=os.getpid())
    return distributed.broadcast_object(run_id, context)


def check_compatible(path, saved, data, num_classes, width_mult, model_ema, log):
    """Refuse a resume that would change what the checkpoint's numbers mean: another model, other classes or
    class order, other preprocessing, or its EMA dropped. Weights alone carry none of this and are not checked."""
    if not checkpoint.is_checkpoint(saved):
        return
    check_config(saved, num_classes, width_mult, path)
    classes = saved.get("classes") or {}
    if classes.get("wnids") is not None and list(classes["wnids"]) != list(data.classes.wnids):
        first = next((i for i, (a, b) in enumerate(zip(classes["wnids"], data.classes.wnids)) if a != b),
                     min(len(classes["wnids"]), len(data.classes.wnids)))
        raise UsageError(f"{path} was trained with {classes.get('order')} class order, in which class {first} is "
                         f"{(list(classes['wnids']) + ['(none)'])[first]}; here it is "
                         f"{(list(data.classes.wnids) + ['(none)'])[first]}: pass --class-order "
                         f"{classes.get('order')} and the same data")
    before = saved.get("data") or {}
    for key, flag in (("input_size", "--input-size"), ("resize", "--resize"), ("interpolation", "--interpolation")):
        if key in before and before[key] != data.preprocessing[key]:
            raise UsageError(f"{path} was trained with {flag} {before[key]}, not {data.preprocessing[key]}: pass "
                             f"{flag} {before[key]} to continue it (or fine-tune from it in a new --save-path)")
    if saved.get("model_ema") is not None and not model_ema:
        raise UsageError(f"{path} carries EMA weights: add --model-ema to continue them (without it they would "
                         "be dropped from every later checkpoint)")
    if saved.get("model_ema") is None and model_ema:
        log(f"note: {path} has no EMA weights; the EMA starts from the resumed weights")


@dataclass
class Learner:
    """Everything one optimisation step uses."""
    model: nn.Module            # as it runs: DDP and torch.compile wrappers included
    raw: nn.Module              # the plain MobileNetV2 inside (what is saved and validated)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: optimization.LRSchedule
    device: torch.device
    scaler: object = None       # torch.amp.GradScaler for float16
    amp_dtype: torch.dtype = None
    channels_last: bool = True
    ema: optimization.ModelEma = None
    max_nonfinite: int = 3
    accum_steps: int = 1        # loader batches (forward/backward passes) per optimizer step
    clip_grad_norm: float = None
    mix: augment.MixupCutmix = None
    guard: optimization.StepGuard = None  # set: the step is decided on the device (no per-step host sync)
    read_every: int = 10        # with a guard: steps between reads of the statistics (--print-freq)
    buffers: optimization.BufferKeeper = None  # the BatchNorm statistics of the last good step
    compiled: bool = False      # torch.compile: the first step's time (compilation included) is logged
    mean: tuple = IMAGENET_MEAN  # input normalisation, recorded in the checkpoints
    std: tuple = IMAGENET_STD
    on_features: object = None  # model -> its part that runs on cached backbone features (frozen backbone)


def build_learner(model, args, start, context, log):
    """Put the model on its device with its wrappers; build the optimizer, schedule, scaler and EMA, and
    restore their state from the checkpoint being resumed."""
    device = context.device
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if device.type == "cpu" and args.channels_last and args.fused_bn:
        use_fused_batchnorm(model, log)
    finetune.freeze_backbone(model, args.freeze_backbone, log)
    ema = None
    if args.model_ema:
        decay = optimization.ema_decay(args.model_ema_decay, args.model_ema_steps, args.batch_size, args.num_epochs,
                                       args.model_ema_adjust)
        ema = optimization.ModelEma(model, decay, every=args.model_ema_steps, warmup_epochs=args.warmup_epochs)
        log(f"EMA of the weights: decay {decay:.6f} every {args.model_ema_steps} steps"
            + (f" (--model-ema-decay {args.model_ema_decay:g} adjusted as torchvision's)" if args.model_ema_adjust else ""))
    ckpt = start.ckpt
    if ema is not None and ckpt is not None and ckpt.get("model_ema") is not None:
        load_state_checked(ema.module, ckpt["model_ema"], start.path)
    raw = model
    if args.sync_bn and context.distributed:
        raw = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp_dtype = amp_dtype_for(args.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    sync_free = use_sync_free(args.sync_free, device, args.opt, scaler)
    optimizer = optimization.build_optimizer(raw.classifier if args.freeze_backbone else raw, args.lr, args.momentum,
                                             args.weight_decay, not args.no_decay_norm_bias, opt=args.opt,
                                             eps=args.opt_eps, norm_weight_decay=args.norm_weight_decay,
                                             bias_weight_decay=args.bias_weight_decay, fused=sync_free)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"{start.path}: optimizer state does not fit ({e}); keep --opt, --freeze-backbone, "
                             "--no-decay-norm-bias and --norm/--bias-weight-decay as in the original run") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    guard = optimization.StepGuard(optimizer) if sync_free else None
    buffers = optimization.BufferKeeper(raw)  # before the wrappers below, which keep references to the buffers
    if sync_free:
        log(f"sync-free steps: the step is decided on the device, statistics read every {args.print_freq} "
            "steps (--print-freq)")
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    schedule = optimization.LRSchedule(args.lr, args.num_epochs, args.lr_schedule, args.lr_gamma,
                                       args.warmup_epochs, args.min_lr, args.lr_step_size, args.lr_warmup_method,
                                       args.lr_warmup_decay)
    mix = None
    if args.mixup_alpha > 0 or args.cutmix_alpha > 0:
        mix = augment.MixupCutmix(args.mixup_alpha, args.cutmix_alpha, raw.config["num_classes"])
    return Learner(model, raw, optimization.build_criterion(args.label_smoothing), optimizer, schedule, device,
                   scaler, amp_dtype, args.channels_last, ema, args.max_nonfinite, args.accum_steps,
                   args.clip_grad_norm, mix, guard, args.print_freq, buffers, args.compile,
                   tuple(args.mean), tuple(args.std))


def use_sync_free(asked, device, opt, scaler):
    """Whether the step is decided on the device (`--sync-free`; None: wherever it can be, which is CUDA).

    It needs a fused optimizer kernel (they skip a step on a device flag) and no float16 GradScaler (which
    owns that flag). On the CPU a host read costs nothing, so it is only used when asked for (it then runs
    torch's fused CPU kernels: the same arithmetic, not always the same bits as the multi-tensor ones).
    """
    possible = opt in optimization.FUSED_OPTIMIZERS and scaler is None
    if asked is None:
        return device.type == "cuda" and possible
    if asked and not possible:
        raise UsageError("--sync-free needs --opt " + ", ".join(optimization.FUSED_OPTIMIZERS)
                         + (" and no float16 autocast (its grad scaler)" if scaler is not None else "")
                         + f", got --opt {opt}; drop --sync-free")
    return asked



def caches_features(args):
    return args.freeze_backbone and not args.augment and args.cache_features


def probe_on_cached_features(learner, data, args, context, log):
    """A frozen backbone without augmentation sees the same images every epoch: its features are computed
    once and the classifier trains on them (`finetune.use_cached_features`); otherwise nothing changes."""
    if not caches_features(args):
        return learner, data

    def wrap(head):
        return nn.parallel.DistributedDataParallel(head) if context.distributed else head
    return finetune.use_cached_features(learner, data, args.num_workers, wrap, log)


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


class Interrupted(cli.ScriptError):
    """A second stop signal: the run ends at once, without saving (exit code 128 + the signal number)."""

    def __init__(self, signum, saving):
        name = signal.Signals(signum).name
        super().__init__(f"stopped at once by a second {name}" + (
            f" while writing {saving}: that write was abandoned and its temporary file removed; the previous "
            "checkpoints are intact" if saving else "; the last checkpoint written is kept") + ", continue with "
            "--resume auto")
        self.exit_code = 128 + signum


class StopFlag:
    """SIGTERM/SIGUSR1 (cluster preemption) and SIGINT (Ctrl-C) ask the loop to finish the current step, save
    and exit; a second signal ends the run at once (an interrupted checkpoint write leaves the old file)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self.writing = None  # the checkpoint being written, for the message of a second signal
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum, self.writing)
        self.signum = signum

    @contextlib.contextmanager
    def saving(self, path):
        self.writing = path
        try:
            yield
        finally:
            self.writing = None

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


def _loader_died(batches):
    """Whether a worker process of this DataLoader iterator is gone (killed, out of memory): the loader then
    raises a RuntimeError wherever the main process happens to be when it notices."""
    return any(not worker.is_alive() for worker in getattr(batches, "_workers", None) or [])


def _step_batches(batches, accum_steps):
    """Lists of `accum_steps` consecutive loader batches, one list per optimizer step; a short list left at
    the end of the epoch is dropped (as drop_last drops a short batch)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []


def _apply_step(learner, epoch, step):
    """The optimizer step of a finite step (gradient clipping, the scaler, the EMA)."""
    optimizer = learner.optimizer
    if learner.clip_grad_norm is not None:
        if learner.scaler is not None:
            learner.scaler.unscale_(optimizer)
        optimization.clip_gradients(learner.raw, learner.clip_grad_norm)
    if learner.scaler is not None:
        learner.scaler.step(optimizer)
        learner.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if learner.ema is not None:
        learner.ema.after_step(learner.raw, epoch, step)


def _guarded_step(learner, buffers, ok, epoch, step):
    """The optimizer step applied where the device flag `ok` says the step was finite on every rank, and
    a no-op for weights, optimizer state, BatchNorm statistics and EMA where not; nothing is read."""
    if learner.clip_grad_norm is not None:
        optimization.clip_gradients(learner.raw, learner.clip_grad_norm)
    learner.guard.step(ok)
    buffers.settle(ok)
    learner.optimizer.zero_grad(set_to_none=True)
    if learner.ema is not None:
        learner.ema.after_step(learner.raw, epoch, step, ok)


def _tally(meter, row, streak, max_nonfinite, epoch, step, log):
    """Count one step's all-reduced statistics (loss x n, correct, n, non-finite, stop votes, failed images)
    into the meter; warn of a skipped step and raise at `max_nonfinite` in a row. Returns the stop votes."""
    loss_sum, correct, count, nonfinite, stop_votes, n_failed = row
    if nonfinite:
        streak[0] += 1
        meter.skipped += 1
        log(f"warning: non-finite loss at epoch {epoch + 1} step {step + 1}; step skipped "
            f"({streak[0]} in a row, stop at {max_nonfinite})")
        if streak[0] >= max_nonfinite:
            raise TrainingError(f"loss was non-finite for {streak[0]} steps in a row (epoch {epoch + 1}, "
                                f"step {step + 1}); stopped without saving, the last good checkpoint is "
                                "kept; lower --lr or check the data")
    else:
        streak[0] = 0
        meter.loss_sum += loss_sum
        meter.correct += correct
        meter.count += count
    meter.failed += int(n_failed)
    return stop_votes


def _read_steps(unread, meter, streak, learner, epoch, log):
    """Read the statistics of the steps since the last read in one transfer (the only host sync of a
    guarded step) and count them in order. Returns whether any rank voted to stop."""
    rows = torch.stack([totals for _, totals in unread]).tolist()
    votes = [_tally(meter, row, streak, learner.max_nonfinite, epoch, step, log)
             for (step, _), row in zip(unread, rows)]
    return any(votes)


def train_one_epoch(learner, loader, epoch, steps_per_epoch, context, *, start_step=0, meter=None, stop=None,
                    progress=None, on_step=None, log=print):
    """Train over `loader` (which already skips the first `start_step` steps' batches of the epoch).

    Each optimizer step takes `learner.accum_steps` loader batches (gradients summed, each pass's loss
    divided by their number; DDP synchronises on the last pass only), then clips the gradients
    (`clip_grad_norm`) and steps. Mixup/cutmix (`learner.mix`) mix each pass's batch on the device.
    Returns (meter, steps done in this epoch, stopped): stopped is True when a preemption signal asked
    to stop, in which case the last step was completed. A non-finite loss on any rank skips the step on
    every rank (gradients dropped, BatchNorm statistics restored); `max_nonfinite` in a row raise.
    """
    model, optimizer, device = learner.model, learner.optimizer, learner.device
    model.train()
    meter = meter or EpochMeter()
    step = start_step
    # BatchNorm statistics were already updated by the forward pass of a step that turns out bad.
    buffers = learner.buffers or optimization.BufferKeeper(model, flat=False)
    streak = [0]  # non-finite steps in a row
    unread = []   # with a guard: (step, all-reduced statistics) not yet read by the host
    # Inputs follow the weights' precision (float64 runs serve numerical checks); autocast handles AMP.
    input_dtype = next(model.parameters()).dtype
    amp_dtype = learner.amp_dtype
    last = time.perf_counter()  # step times include waiting for data: images/s is the real throughput
    batches = iter(loader)
    try:
        for group in _step_batches(batches, learner.accum_steps):
            lr = learner.schedule(epoch, step, steps_per_epoch)
            optimization.set_lr(optimizer, lr)
            local = torch.zeros(4, dtype=torch.float64, device=device)  # loss x n, correct, n, non-finite
            n_failed, indices, n_images = 0, [], 0
            for k, (images, targets, batch_indices, failed) in enumerate(group):
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                x = (normalize(images, learner.mean, learner.std, channels_last=learner.channels_last)
                     if images.dtype == torch.uint8 else images)  # uint8 images, or cached backbone features
                if x.dtype != input_dtype:
                    x = x.to(input_dtype)
                target = targets
                if learner.mix is not None:
                    x, target = learner.mix(x, targets)
                syncs = k == len(group) - 1 or not context.distributed
                with contextlib.nullcontext() if syncs else model.no_sync():
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        logits = model(x)
                        if target.is_floating_point() and amp_dtype is None:
                            target = target.to(logits.dtype)
                        loss = learner.criterion(logits, target)
                    scaled = loss / len(group) if len(group) > 1 else loss
                    with distributed.collective() if context.distributed else contextlib.nullcontext():  # DDP syncs here
                        (learner.scaler.scale(scaled) if learner.scaler is not None else scaled).backward()
                n = targets.numel()
                n_images += n
                local += torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == targets).sum().double(),
                                      torch.full((), float(n), dtype=torch.float64, device=device),
                                      (~torch.isfinite(loss.detach())).double()])
                n_failed += int(failed.sum())  # a CPU tensor from the loader: no device sync
                indices.append(batch_indices)
            indices = torch.cat(indices) if len(indices) > 1 else indices[0]

            # One small all-reduce per step carries the statistics, the non-finite check and the stop vote,
            # so every rank takes the same decision at the same step.
            # (Host numbers enter as fills, not copies: a copy from the host would wait for the GPU.)
            stats = torch.empty(6, dtype=torch.float64, device=device)
            stats[:4] = local
            stats[4] = float(stop is not None and stop.signum is not None)
            stats[5] = float(n_failed)
            totals = distributed.all_reduce_sum(stats, context)
            if learner.guard is not None:
                # Decided on the device: the host queues the next step without waiting for this one.
                _guarded_step(learner, buffers, totals[3] == 0, epoch, step)
                unread.append((step, totals))
                step += 1
                stop_votes = 0.0
                if step % learner.read_every == 0 or step == steps_per_epoch:
                    stop_votes = _read_steps(unread, meter, streak, learner, epoch, log)
                    unread = []
                count = float(n_images * context.world_size)
            else:
                row = totals.tolist()
                buffers.settle(not row[3])
                if row[3]:
                    optimizer.zero_grad(set_to_none=True)
                else:
                    _apply_step(learner, epoch, step)
                stop_votes = _tally(meter, row, streak, learner.max_nonfinite, epoch, step, log)
                count = row[2]
                step += 1
            now = time.perf_counter()
            seconds, last = now - last, now
            meter.seconds += seconds
            if learner.compiled:
                # Compilation happens on the host while the first step is queued, so this is its time.
                log(f"torch.compile: the first step took {seconds:.1f} s, compilation included")
                learner.compiled = False
            if progress is not None:
                progress.update(step, meter.loss, meter.top1, lr, count / seconds if seconds > 0 else 0.0)
            if on_step is not None:
                on_step(epoch, step, indices)
            if stop_votes:
                return meter, step, True
        if unread:
            if _read_steps(unread, meter, streak, learner, epoch, log):
                return meter, step, True
    except RuntimeError as e:
        if isinstance(e, cli.ScriptError) or not _loader_died(batches):
            raise
        raise TrainingError(f"a data loader process died ({str(e).splitlines()[0]}); check memory and the data, "
                            "then --resume auto") from None
    finally:
        # Releasing a DataLoader iterator stops its workers, also when an error ends the epoch early.
        del batches
    return meter, step, False


# --------------------------------------------------------------------------------------------------
# Validate and save


def validate(learner, val_loader, show_progress):
    """({val_loss, val_top1, val_top5, val_mean_class_top1, ema_val_top1, ema_val_top5}: NaN/None where there
    is nothing to score, the confusion matrix or None)."""
    out = {"val_loss": float("nan"), "val_top1": float("nan"), "val_top5": float("nan"),
           "val_mean_class_top1": float("nan"), "ema_val_top1": None, "ema_val_top5": None}
    if val_loader is None:
        return out, None
    amp = learner.amp_dtype is not None
    scored = learner.on_features or (lambda model: model)
    channels_last = learner.channels_last and learner.on_features is None
    val = evaluate(scored(learner.raw), val_loader, learner.device, mean=learner.mean, std=learner.std,
                   channels_last=channels_last, amp=amp, progress=show_progress, per_class=True, confusion=True)
    out.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
               val_mean_class_top1=val["mean_class_top1"])
    if learner.ema is not None:
        val_ema = evaluate(scored(learner.ema.module), val_loader, learner.device, mean=learner.mean,
                           std=learner.std, channels_last=channels_last, amp=amp, progress=False)
        out.update(ema_val_top1=val_ema["top1"], ema_val_top5=val_ema["top5"])
    return out, val["confusion"]


def write_confusion(confusion, classes, save_path):
    """confusion.png of the latest validation (rank 0), with the class names."""
    if confusion is not None:
        outputs.plot_confusion(confusion, [image_folders.display_name(n) for n in classes.names],
                               save_path / "confusion.png")


def snapshot(learner, data, epochs_done, steps_done, best_acc1, metrics, run_id, world_size, args, partial=None):
    """The training checkpoint of this moment (see checkpoint.KEYS)."""
    classes = data.classes
    return checkpoint.make(
        model=checkpoint.model_state(learner.raw),
        model_ema=checkpoint.model_state(learner.ema.module) if learner.ema is not None else None,
        model_config=dict(learner.raw.config),
        classes={"order": classes.order, "wnids": list(classes.wnids), "names": list(classes.names)},
        data=dict(data.preprocessing), epoch=epochs_done, step=steps_done,
        optimizer=learner.optimizer.state_dict(),
        scaler=learner.scaler.state_dict() if learner.scaler is not None else None,
        best_acc1=best_acc1, rng=checkpoint.capture_rng(), sampler=data.sampler.state_dict(), metrics=metrics,
        partial=partial, world_size=world_size, args=plain_args(args), run_id=run_id)


def save_epoch(ckpt, save_path, epoch, is_last_epoch, save_epoch_freq, is_best, keep_last, metrics, log):
    """Write the end-of-epoch checkpoint to epoch_N.pth (every `save_epoch_freq`), last.pth and, when it
    is the best so far, best.pth; then prune old epoch files and rewrite the reports."""
    paths = []
    if epoch % save_epoch_freq == 0 or is_last_epoch:
        paths.append(save_path / f"epoch_{epoch}.pth")
    paths.append(save_path / "last.pth")
    if is_best:
        paths.append(save_path / "best.pth")
    checkpoint.write(ckpt, paths)
    checkpoint.prune(save_path, keep_last, log)
    try:
        outputs.write_reports(metrics, save_path)
    except outputs.OutputError as e:
        raise CheckpointError(f"{e}; epoch {epoch} is saved in its checkpoint: free space, then --resume auto"
                              ) from None


def epoch_record(epoch, lr, meter, val):
    return {"epoch": epoch, "lr": lr, "train_loss": meter.loss, "train_top1": meter.top1, **val,
            "images_per_s": meter.count / meter.seconds if meter.seconds else 0.0,
            "seconds": meter.seconds, "skipped_steps": meter.skipped, "failed_images": meter.failed}


def epoch_line(record, num_epochs):
    return (f"epoch {record['epoch']}/{num_epochs} lr {record['lr']:.6f} train loss {record['train_loss']:.4f} "
            f"top1 {record['train_top1']:.2f} | val loss {record['val_loss']:.4f} top1 {record['val_top1']:.2f} "
            f"top5 {record['val_top5']:.2f} mean/class {record['val_mean_class_top1']:.2f}"
            + (f" | ema top1 {record['ema_val_top1']:.2f}" if record["ema_val_top1"] is not None else "")
            + f" | {record['images_per_s']:.0f} img/s, {record['seconds']:.0f} s")


# --------------------------------------------------------------------------------------------------
# The run


def run(args, on_step=None):
    """One training process (a rank of the job, or the only one). Returns the process exit code."""
    device_type = distributed.resolve_device_type(args.device)
    context = distributed.setup(device_type, args.dist_timeout)
    try:
        with StopFlag() as stop, outputs.RunDirectory(args.save_path) as run_dir:
            return train(args, context, stop, run_dir, on_step)
    finally:
        distributed.cleanup()


def train(args, context, stop, run_dir, on_step=None):
    log = cli.logger(context.is_main)
    save_path = Path(args.save_path)
    set_up_device(context.device)
    for line in recipe_lines(args):
        log(line)
    path, saved = find_resume(args.resume, save_path, context, log)
    run_id = own_output_directory(run_dir, path, saved, args.start_over or args.demo, context, log)
    data = build_data(DataSpec.from_args(args, saved), context, log)

    model, start, qat = build_model(args, data, path, saved, context, log)
    del saved
    if start.epoch >= args.num_epochs:
        log(f"nothing to do: {start.epoch} epochs done, --num-epochs {args.num_epochs}")
        return 0
    learner = build_learner(model, args, start, context, log)
    learner, data = probe_on_cached_features(learner, data, args, context, log)
    tensorboard = open_tensorboard(save_path) if context.is_main and args.tensorboard else None
    log(run_summary(args, data, learner, context))

    best_acc1, metrics, step = start.best_acc1, start.metrics, start.step
    for epoch in range(start.epoch, args.num_epochs):
        meter = begin_epoch(epoch, step, start.ckpt, data, args.seed, context)
        if qat is not None:
            frozen = qat.start_epoch(epoch)
            if epoch in (args.qat_bn_epochs, args.qat_observer_epochs):
                log(f"QAT epoch {epoch + 1}: frozen {' and '.join(frozen)}")
        progress = Progress(context.is_main, data.steps_per_epoch, step, f"epoch {epoch + 1}/{args.num_epochs}",
                            args.print_freq)
        try:
            meter, step, stopped = train_one_epoch(learner, data.train_loader, epoch, data.steps_per_epoch, context,
                                                   start_step=step, meter=meter, stop=stop, progress=progress,
                                                   on_step=on_step, log=log)
        finally:
            progress.close()
        if stopped:
            if context.is_main:
                with stop.saving(save_path / "last.pth"):
                    checkpoint.write(snapshot(learner, data, epoch, step, best_acc1, metrics, run_id,
                                              context.world_size, args, asdict(meter)), [save_path / "last.pth"])
            distributed.barrier(context)
            raise Preempted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} at epoch {epoch + 1} "
                                         f"step {step}/{data.steps_per_epoch}; saved {save_path / 'last.pth'}, "
                                         "continue with --resume auto")
        step = 0
        lr = learner.schedule(epoch, data.steps_per_epoch - 1, data.steps_per_epoch)
        val, confusion = validate(learner, data.val_loader, context.is_main and sys.stderr.isatty())
        record = epoch_record(epoch + 1, lr, meter, val)
        metrics.append(record)
        is_best = data.val_loader is not None and record["val_top1"] > best_acc1
        if is_best:
            best_acc1 = record["val_top1"]
        log(epoch_line(record, args.num_epochs))
        if context.is_main:
            with stop.saving(f"the epoch {epoch + 1} checkpoint"):
                save_epoch(snapshot(learner, data, epoch + 1, 0, best_acc1, metrics, run_id, context.world_size, args),
                           save_path, epoch + 1, epoch + 1 == args.num_epochs, args.save_epoch_freq, is_best,
                           args.keep_last, metrics, log)
                write_confusion(confusion, data.classes, save_path)
            log_tensorboard(tensorboard, record)
        stop_if_asked(stop, epoch, context)

    if tensorboard is not None:
        tensorboard.close()
    if qat is not None and context.is_main:
        export_qat(qat, save_path / "model.int8.onnx", data, args, log)
    log(f"done: {args.num_epochs} epochs, best val top-1 {best_acc1:.2f}%, checkpoints in {save_path}")
    return 0


def build_model(args, data, path, saved, context, log):
    """The network to train: seeded and fresh, or from --pretrained, or the checkpoint being resumed
    (`path`, `saved`), fake-quantized for --qat. Returns (model, Start, the QAT state or None)."""
    checkpoint.seed_everything(args.seed)
    model = MobileNetV2(num_classes=data.num_classes, width_mult=args.width_mult, dropout=args.dropout,
                        drop_path=args.drop_path)
    finetune.start_from(model, args.pretrained if path is None else None, data.classes, log)
    check_compatible(path, saved, data, data.num_classes, args.width_mult, args.model_ema, log)
    start = restore(model, path, saved, args.start_epoch, data.num_classes, args.width_mult, args.batch_size,
                    data.train_images, context, log)
    qat = start_qat(model, args.qat, path is not None, args, log) if args.qat else None
    return model, start, qat


def run_summary(args, data, learner, context):
    """The run's first line after set-up: model, data, processes, batch, precision."""
    amp = str(learner.amp_dtype).replace("torch.", "") if learner.amp_dtype else "off"
    return (f"MobileNetV2 width {args.width_mult:g}, {data.num_classes} classes, {args.train_crop_size} px train, "
            f"{args.val_resize_size}/{args.val_crop_size} px val | {data.train_images} train / {data.val_images} "
            f"val images | {context.world_size} process(es) on {context.device.type}: global batch "
            f"{args.batch_size} = {context.world_size} x {data.batch_per_rank}"
            + (f" in {args.accum_steps} passes" if args.accum_steps > 1 else "")
            + f", {data.steps_per_epoch} steps/epoch | amp {amp}, channels_last {args.channels_last}, "
            f"compile {args.compile}")


def start_qat(model, weights_path, resumed, args, log):
    """--qat: load the float weights to start from (a resumed run has its own) and fake-quantize the model."""
    if not resumed:
        float_model = load_model(checkpoint.read_weights(weights_path), num_classes=args.num_classes,
                                 width_mult=args.width_mult)
        load_state_checked(model, float_model.state_dict(), weights_path)
    log(f"quantization-aware training from {weights_path if not resumed else 'the resumed checkpoint'}: "
        f"BatchNorm statistics frozen after {args.qat_bn_epochs} epochs, activation ranges after "
        f"{args.qat_observer_epochs}")
    return quantization.QuantizationAwareTraining(model, args.qat_bn_epochs, args.qat_observer_epochs)


def export_qat(qat, path, data, args, log):
    """The fine-tuned model as the INT8 ONNX file evaluate.py reads without flags."""
    classes = data.classes
    report = qat.export(path, data.train_loader.dataset.samples, data.preprocessing,
                        {"order": classes.order, "wnids": list(classes.wnids), "names": list(classes.names)},
                        args.calibration_images, data.batch_per_rank, args.num_workers, args.seed)
    log(f"wrote {path}: INT8 {report['bytes'] / 1e6:.2f} MB (float {report['float_bytes'] / 1e6:.2f} MB); "
        f"score it with: python evaluate.py --weights {path} --data-dir {args.data_dir}")


def open_tensorboard(save_path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(save_path / "tensorboard")


def begin_epoch(epoch, start_step, ckpt, data, seed, context):
    """Seed the epoch's random streams (or restore them mid-epoch), position the sampler; the meter."""
    if start_step and ckpt is not None and int(ckpt.get("step", 0)):
        if int(ckpt.get("world_size", 1)) == context.world_size:
            checkpoint.restore_rng(ckpt["rng"])
        else:
            checkpoint.seed_everything(epoch_seed(seed, epoch, context.rank) + start_step)
        meter = EpochMeter(**ckpt.get("partial", {}))
    else:
        checkpoint.seed_everything(epoch_seed(seed, epoch, context.rank))
        meter = EpochMeter()
    data.sampler.set_epoch(epoch, skip=start_step * data.batch_per_rank)
    return meter


def log_tensorboard(tensorboard, record):
    if tensorboard is None:
        return
    for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s"):
        tensorboard.add_scalar(key, record[key], record["epoch"])
    tensorboard.flush()


def stop_if_asked(stop, epoch, context):
    """A signal during validation or saving: the epoch is complete and saved, so stop here (all ranks)."""
    votes = torch.tensor([float(stop.signum is not None)], device=context.device)
    if distributed.all_reduce_sum(votes, context).item():
        distributed.barrier(context)
        signum = stop.signum or signal.SIGTERM
        raise Preempted(signum, f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                                "continue with --resume auto")
    distributed.barrier(context)


# --------------------------------------------------------------------------------------------------
# Entry point


def ensure_demo_data(data_dir, seed, log=print):
    root = Path(data_dir)
    if demo_is_complete(root) or ((root / "ILSVRC2012_img_train").is_dir() and not (root / DEMO_MARKER).exists()):
        return root  # built before, or the user's own data given with --data-dir
    log(f"building the demo dataset in {root} ...")
    return make_demo(root, seed=seed)


def _guarded(args, on_step=None):
    """run() with the job's errors turned into one line and an exit code (also inside spawned ranks)."""
    prefix = None
    if distributed.launched_by_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"train.py: error (rank {os.environ.get('RANK')}): "
    try:
        return run(args, on_step)
    except Preempted as e:
        return cli.report(e, "train.py", prefix="train.py: ")
    except cli.ScriptError as e:
        return cli.report(e, "train.py", prefix)


def main(args, on_step=None):
    """Entry point; `on_step(epoch, step, indices)` is called after every training step (tests use it)."""
    try:
        distributed.adopt_slurm()  # `srun python train.py`: each task becomes the rank torchrun would start
        args = check_args(args)
        device_type = distributed.resolve_device_type(args.device)
        if args.demo and not distributed.launched_by_launcher():
            ensure_demo_data(args.data_dir, args.seed)
    except cli.ScriptError as e:
        sys.exit(cli.report(e, "train.py"))
    code = distributed.launch(functools.partial(_guarded, on_step=on_step), args, device_type)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
