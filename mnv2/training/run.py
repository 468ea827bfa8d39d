"""One training run as `train.py` runs it: `train()` is its list of steps (find the resume, own the output
directory, build data, model and learner, then per epoch: train, validate, save, stop if asked).

    from mnv2.training import run; run.run(args)   # args: train.py's parsed and checked flags
"""
import ctypes
import os
import platform
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from mnv2 import checkpoint, cli, distributed, outputs, resolve
from mnv2.data.demo import DEMO_MARKER, demo_is_complete, make_demo
from mnv2.deploy import quantization
from mnv2.training import distill, finetune, teacher_outputs
from mnv2.training.config import recipe_lines
from mnv2.training.datasets import DataSpec, build_data, find_data, training_transform
from mnv2.training.learner import build_learner, check_batchnorm_batch, probe_on_cached_features
from mnv2.training.loop import (EpochMeter, Preempted, Progress, StopFlag, epoch_line, epoch_record, epoch_seed,
                                train_one_epoch, validate)
from mnv2.training.state import (check_compatible, find_resume, load_state_checked, own_output_directory, restore,
                                 save_epoch, snapshot, write_confusion)
from MobileNetV2 import MobileNetV2

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


def run(args, on_step=None, args_yaml=None):
    """One training process (a rank of the job, or the only one). Returns the process exit code.
    `args_yaml`: the text of args.yaml (the flags as resolved), written once the run owns its directory."""
    device_type = distributed.resolve_device_type(args.device)
    context = distributed.setup(device_type, args.dist_timeout)
    try:
        if args.write_teacher_outputs:  # no training: the teacher's outputs on every training image's views
            spec = DataSpec.from_args(args, None)
            log = cli.logger(context.is_main)
            return teacher_outputs.write(args, spec.data_dir, find_data(spec, log), training_transform(spec), context,
                                         log)
        with StopFlag() as stop, outputs.RunDirectory(args.save_path) as run_dir:
            return train(args, context, stop, run_dir, on_step, args_yaml)
    finally:
        distributed.cleanup()


def train(args, context, stop, run_dir, on_step=None, args_yaml=None):
    """The run as its list of steps: resume, own the directory, build data, model and learner, then per epoch
    train, validate, save and stop if asked."""
    log = cli.logger(context.is_main)
    save_path = Path(args.save_path)
    set_up_device(context.device)
    for line in recipe_lines(args):
        log(line)
    path, saved = find_resume(args.resume, save_path, context, log)
    run_id = own_output_directory(run_dir, path, saved, args.start_over or args.demo, context, log)
    data = build_data(DataSpec.from_args(args, saved), context, log)
    check_batchnorm_batch(args, data.batch_per_rank, context.world_size)

    model, start, qat = build_model(args, data, path, saved, context, log)
    del saved
    if start.epoch >= args.num_epochs:
        log(f"nothing to do: {start.epoch} epochs done, --num-epochs {args.num_epochs}")
        return 0
    learner = build_learner(model, args, start, context, log)
    learner, data = probe_on_cached_features(learner, data, args, context, log)
    learner.distill = distill_from(args, learner, data, context, log)
    tensorboard = open_tensorboard(save_path) if context.is_main and args.tensorboard else None
    log(run_summary(args, data, learner, context))
    if args_yaml is not None and context.is_main:  # the run is accepted: its resolved flags beside its checkpoints
        outputs.atomic_write(save_path / "args.yaml", args_yaml)

    best_acc1, metrics, step = start.best_acc1, start.metrics, start.step
    for epoch in range(start.epoch, args.num_epochs):
        meter = begin_epoch(epoch, step, start.ckpt, data, args.seed, context)
        if qat is not None:
            frozen = qat.start_epoch(epoch)
            if epoch in (args.qat_bn_epochs, args.qat_observer_epochs):
                log(f"QAT epoch {epoch + 1}: frozen {' and '.join(frozen)}")
        progress = Progress(context.is_main, data.steps_per_epoch, step, f"epoch {epoch + 1}/{args.num_epochs}",
                            args.print_freq, later_steps=(args.num_epochs - epoch - 1) * data.steps_per_epoch)
        try:
            meter, step, stopped = train_one_epoch(learner, data.train_loader, epoch, data.steps_per_epoch, context,
                                                   start_step=step, meter=meter, stop=stop, progress=progress,
                                                   on_step=on_step, log=log)
        finally:
            progress.close()
        if stopped:
            save_and_stop(learner, data, epoch, step, best_acc1, metrics, run_id, args, asdict(meter), stop, context)
        step = 0
        data.sampler.set_epoch(epoch)  # the epoch is whole: its checkpoint says so also after a mid-epoch resume
        best_acc1 = end_epoch(learner, data, epoch, meter, best_acc1, metrics, run_id, args, stop, tensorboard,
                              context, log)
        stop_if_asked(stop, epoch, context)

    if tensorboard is not None:
        tensorboard.close()
    if qat is not None and context.is_main:
        export_qat(qat, save_path / "model.int8.onnx", data, args, log)
    log(f"done: {args.num_epochs} epochs, best val top-1 {best_acc1:.2f}%, checkpoints in {save_path}")
    return 0


def distill_from(args, learner, data, context, log):
    """The distillation term: an online --teacher, or the stored --teacher-outputs (None without either). The
    checkpoints say which teacher or which stored outputs taught them (never the teacher itself)."""
    if data.stored is not None:
        args.__dict__.update(data.stored.record())
        log(f"distillation: {args.distill_loss} from stored outputs, temperature {args.distill_temperature:g}, "
            f"label loss weight {args.distill_alpha:g}")
        return teacher_outputs.StoredDistillation(data.stored, args.distill_loss, args.distill_temperature,
                                                  args.distill_alpha, args.distill_beta, args.distill_gamma)
    distillation = distill.build(args, learner.raw.config["num_classes"], list(data.classes.names), context.device,
                                 log)
    if distillation is not None:
        args.teacher_sha256 = distillation.teacher.sha256
    return distillation


def save_and_stop(learner, data, epoch, step, best_acc1, metrics, run_id, args, meter, stop, context):
    """A preemption signal arrived mid-epoch: save last.pth where the epoch stands, then stop the job."""
    save_path = Path(args.save_path)
    if context.is_main:
        with stop.saving(save_path / "last.pth"):
            checkpoint.write(snapshot(learner, data, epoch, step, best_acc1, metrics, run_id, context.world_size,
                                      args, meter), [save_path / "last.pth"])
    distributed.barrier(context)
    raise Preempted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} at epoch {epoch + 1} "
                                 f"step {step}/{data.steps_per_epoch}; saved {save_path / 'last.pth'}, "
                                 "continue with --resume auto")


def end_epoch(learner, data, epoch, meter, best_acc1, metrics, run_id, args, stop, tensorboard, context, log):
    """Validate, record the epoch in `metrics`, save its checkpoints and reports. Returns the best top-1."""
    lr = learner.schedule(epoch, data.steps_per_epoch - 1, data.steps_per_epoch)
    val, confusion = validate(learner, data.val_loader, context.is_main and sys.stderr.isatty())
    record = epoch_record(epoch + 1, lr, meter, val)
    if data.num_classes <= 5:  # top-5 of 5 classes or fewer is 100% by definition: not reported
        record["val_top5"] = record["ema_val_top5"] = None
    metrics.append(record)
    is_best = data.val_loader is not None and record["val_top1"] > best_acc1
    if is_best:
        best_acc1 = record["val_top1"]
    log(epoch_line(record, args.num_epochs))
    if context.is_main:
        save_path = Path(args.save_path)
        with stop.saving(f"the epoch {epoch + 1} checkpoint"):
            save_epoch(snapshot(learner, data, epoch + 1, 0, best_acc1, metrics, run_id, context.world_size, args),
                       save_path, epoch + 1, epoch + 1 == args.num_epochs, args.save_epoch_freq, is_best,
                       args.keep_last, metrics, log)
            write_confusion(confusion, data.classes, save_path)
        log_tensorboard(tensorboard, record)
    return best_acc1


def build_model(args, data, path, saved, context, log):
    """The network to train: seeded and fresh, or from --pretrained, or the checkpoint being resumed
    (`path`, `saved`), fake-quantized for --qat. Returns (model, Start, the QAT state or None)."""
    checkpoint.seed_everything(args.seed)
    model = MobileNetV2(num_classes=data.num_classes, width_mult=args.width_mult, dropout=args.dropout,
                        drop_path=args.drop_path)
    finetune.start_from(model, args.pretrained if path is None else None, data.classes, log)
    if path is None and args.pretrained and args.lp_epochs and not args.freeze_backbone:
        finetune.probe_first(model, data, args.lp_epochs, args.lp_lr, args.seed, context.device, args.num_workers,
                             log)
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
        float_model = resolve.weights(weights_path, flag="--qat", num_classes=args.num_classes,
                                      width_mult=args.width_mult, allow_onnx=False, log=log).model
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
    if data.stored is not None:
        data.stored.set_epoch(epoch)
    return meter


def log_tensorboard(tensorboard, record):
    if tensorboard is None:
        return
    for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s"):
        if record[key] is not None:
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


def ensure_demo_data(data_dir, seed, log=print):
    root = Path(data_dir)
    if demo_is_complete(root) or ((root / "ILSVRC2012_img_train").is_dir() and not (root / DEMO_MARKER).exists()):
        return root  # built before, or the user's own data given with --data-dir
    log(f"building the demo dataset in {root} ...")
    return make_demo(root, seed=seed)


def guarded_run(args, on_step=None, args_yaml=None):
    """run() with the job's errors turned into one line and an exit code (also inside spawned ranks)."""
    prefix = None
    if distributed.launched_by_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prefix = f"train.py: error (rank {os.environ.get('RANK')}): "
    try:
        return run(args, on_step, args_yaml)
    except Preempted as e:
        return cli.report(e, "train.py", prefix="train.py: ")
    except cli.ScriptError as e:
        return cli.report(e, "train.py", prefix)
