"""The training run's settings: the presets a command line selects (recipe, demo, QAT, fine-tuning), the
derived defaults and the checks argparse cannot do, and the plain-data copy of the flags a checkpoint keeps.
"""
import argparse
import os
import re
from pathlib import Path

from mnv2 import checkpoint
from mnv2.cli import UsageError
from mnv2.data import augment, shards
from mnv2.training import finetune, recipes, teacher_outputs

# With --recipe, the recipe's method wins over the demo's settings (recipes/demo.yaml); the rest of the demo's
# (its data, sizes, batch, epochs, device) wins over the recipe's, so any recipe runs on the demo in minutes.
DEMO_METHOD = ("lr", "lr_schedule", "warmup_epochs")


def presets(args):
    """The defaults the command line selects, lowest first: the recipe's (--recipe), those of --qat, of --demo
    (see DEMO_METHOD), of fine-tuning (--pretrained, --freeze-backbone: all of them without a named recipe,
    else the width from the file and the linear probe's), and last the --config file's. Flags typed on the command line win over all of them (cli.Parser)."""
    config = recipes.read_config(args.config) if getattr(args, "config", None) else {}
    name = args.recipe if args.recipe != "seed" else config.get("recipe", "seed")
    chosen = recipe_defaults(name)
    if args.qat or config.get("qat"):
        chosen.update(recipes.named("qat").flags)
        chosen.update(qat_sizes(args.qat or config.get("qat")))
    if args.demo or config.get("demo"):
        demo = recipes.named("demo").flags
        chosen.update({k: v for k, v in demo.items() if name == "seed" or k not in DEMO_METHOD})
        if name != "seed":  # beside the quick start's run, never over it
            chosen["save_path"] = f"{demo['save_path']}-{name}"
    chosen.update(finetune.presets(args, name))
    chosen.update(config)
    return chosen


def qat_sizes(path):
    """The crop and resize the --qat weights were trained and scored at (their checkpoint's), as defaults:
    quantization-aware training fine-tunes the same task at the same resolution. {} when the file does not say
    (or cannot be read now: the run's own checks name the file then)."""
    try:
        saved = checkpoint.meta(checkpoint.read_weights(path)).get("data") or {}
    except (checkpoint.WeightsError, OSError):
        return {}
    sizes = {"input_size": saved.get("input_size"), "val_resize_size": saved.get("resize")}
    return {key: value for key, value in sizes.items() if isinstance(value, int) and value > 0}


def recipe_defaults(name):
    """A recipe's flag defaults; its lr is left unset (None) so that check_args scales it to --batch-size."""
    recipe = recipes.named(name)
    if not recipe.scale_lr:
        return dict(recipe.flags, recipe=name)
    return {**recipe.flags, "recipe": name, "batch_size": recipe.batch_size, "lr": None}


def check_recipe_args(args):
    """The recipe's lr at this batch, the crop sizes, and the checks of the recipe flags (in place)."""
    recipe = recipes.named(args.recipe)
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
    recipe = recipes.named(args.recipe)
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
    if not (args.demo and not Path(args.data_dir).exists()) and not shards.exists(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (point it at the ImageNet root, "
                         "or try --demo)")
    if args.qat is not None:
        if not Path(args.qat).is_file():
            raise UsageError(f"--qat {args.qat}: no such file; give the float weights to fine-tune")
        for flag, given in (("--model-ema", args.model_ema), ("--fused-bn", args.fused_bn)):
            if given:
                raise UsageError(f"{flag} does not combine with --qat (its copies of the layers would not be "
                                 "fake-quantized); drop it")
    if args.distill_alpha > 1:
        raise UsageError(f"--distill-alpha {args.distill_alpha:g}: the label loss's share, between 0 and 1 "
                         "(the distillation term gets 1 - alpha)")
    if args.teacher and args.freeze_backbone:
        raise UsageError("--teacher needs the images, and --freeze-backbone trains on cached features; drop one")
    if args.teacher and args.qat is not None:
        raise UsageError("--teacher does not combine with --qat; distil first, then quantize the student")
    teacher_outputs.check_args(args)
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (or use --resume auto)")
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return finetune.resolve_args(args)


def plain_args(args):
    """vars(args) with plain types only, so `torch.load(weights_only=True)` reads it back."""
    return {k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in vars(args).items()}


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
