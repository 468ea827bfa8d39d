"""The learner: the model with its optimizer, schedule, scaler, EMA and criterion, built from the flags, and
the device-level choices made once (mixed precision, the fused CPU BatchNorm kernel, the sync-free step).
"""
import math
import time
from dataclasses import KW_ONLY, dataclass

import torch
from torch import nn

from mnv2.cli import UsageError
from mnv2.data import augment
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mnv2.training import finetune, fused_batchnorm, optimization
from mnv2.training.state import load_state_checked


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


@dataclass
class Learner:
    """Everything one optimisation step uses."""
    model: nn.Module            # as it runs: DDP and torch.compile wrappers included
    raw: nn.Module              # the plain MobileNetV2 inside (what is saved and validated)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: optimization.LRSchedule
    device: torch.device
    _: KW_ONLY                  # the rest by keyword only: no swapped pair of them passes silently
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
    distill: object = None      # distill.Distillation: a teacher's term added to the loss


def check_batchnorm_batch(args, per_rank, world_size):
    """Refuse at start-up what BatchNorm cannot train on: one image per forward pass at a crop whose last
    feature maps are 1x1 (32 px or less) leaves it one value per channel to normalise."""
    per_pass = per_rank // args.accum_steps
    crop = args.train_crop_size if args.augment else args.val_crop_size
    if per_pass > 1 or math.ceil(crop / 32) > 1 or args.freeze_backbone or args.freeze_bn:
        return
    raise UsageError(f"--batch-size {args.batch_size} over {world_size} process(es) x --accum-steps {args.accum_steps} "
                     f"puts 1 image through BatchNorm at a time, and at a {crop} px crop its last layers then see one "
                     "value per channel: give each pass 2 images or more (--batch-size, --accum-steps), a crop over "
                     "32 px, or --freeze-bn")


def build_learner(model, args, start, context, log):
    """Put the model on its device with its wrappers; build the optimizer, schedule, scaler and EMA, and
    restore their state from the checkpoint being resumed."""
    device = context.device
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if device.type == "cpu" and args.channels_last and args.fused_bn:
        use_fused_batchnorm(model, log)
    finetune.freeze_backbone(model, args.freeze_backbone, log)
    finetune.freeze_batchnorm(model, args.freeze_bn and not args.freeze_backbone, log)
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
    return Learner(model=model, raw=raw, criterion=optimization.build_criterion(args.label_smoothing),
                   optimizer=optimizer, schedule=schedule, device=device, scaler=scaler, amp_dtype=amp_dtype,
                   channels_last=args.channels_last, ema=ema, max_nonfinite=args.max_nonfinite,
                   accum_steps=args.accum_steps, clip_grad_norm=args.clip_grad_norm, mix=mix, guard=guard,
                   read_every=args.print_freq, buffers=buffers, compiled=args.compile, mean=tuple(args.mean),
                   std=tuple(args.std))


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
