"""A run's state on disk: which checkpoint to resume from, restoring it (refused when it would change the run),
the output directory a run owns, and the snapshot written at each epoch's end.
"""
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mnv2 import checkpoint, distributed, hub, outputs, resolve
from mnv2.checkpoint import CheckpointError, WeightsError
from mnv2.cli import UsageError
from mnv2.data import folders as image_folders
from mnv2.training.config import plain_args
from mnv2.weights import load_strict


def load_state_checked(model, state, source):
    """weights.load_strict for a model built from the flags: a mismatch is a usage error (exit 2)."""
    try:
        load_strict(model, state, source)
    except WeightsError as e:
        raise UsageError(f"{e} (the model is built from the flags)") from None


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
        weights = resolve.build_model(data, path, "--resume", num_classes, width_mult)
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


def check_folder_classes(path, saved, data):
    """A run on class folders resumes on the same folders: say which were added or are gone, and the ways on."""
    before = (saved.get("classes") or {})
    if before.get("order") != image_folders.FOLDER_ORDER or before.get("names") is None:
        return
    names, now = list(before["names"]), list(data.classes.names)
    if names == now:
        return
    added = [image_folders.display_name(n) for n in now if n not in names]
    gone = [image_folders.display_name(n) for n in names if n not in now]
    change = "; ".join(part for part in (added and f"new: {', '.join(added)}", gone and f"gone: {', '.join(gone)}")
                       if part) or "the same names in another order"
    raise UsageError(f"{path} was trained on {len(names)} class folders and --data-dir has {len(now)} now ({change}): "
                     "to continue this run, put the folders back as they were; to train on the folders as they are, "
                     f"start a new run from it: --pretrained {path} with another --save-path")


def check_compatible(path, saved, data, num_classes, width_mult, model_ema, log):
    """Refuse a resume that would change what the checkpoint's numbers mean: another model, other classes or
    class order, other preprocessing, or its EMA dropped. Weights alone carry none of this and are not checked."""
    if not checkpoint.is_checkpoint(saved):
        return
    check_folder_classes(path, saved, data)
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


SAFETENSORS_NAME = "model.safetensors"  # beside best.pth: the best weights, shareable


def save_epoch(ckpt, save_path, epoch, is_last_epoch, save_epoch_freq, is_best, keep_last, metrics, log):
    """Write the end-of-epoch checkpoint to epoch_N.pth (every `save_epoch_freq`), last.pth and, when it
    is the best so far, best.pth and its weights as model.safetensors (for sharing: no pickle, with the
    class names and preprocessing in its metadata); then prune old epoch files and rewrite the reports."""
    paths = []
    if epoch % save_epoch_freq == 0 or is_last_epoch:
        paths.append(save_path / f"epoch_{epoch}.pth")
    paths.append(save_path / "last.pth")
    if is_best:
        paths.append(save_path / "best.pth")
    checkpoint.write(ckpt, paths)
    if is_best:
        hub.write_safetensors(save_path / SAFETENSORS_NAME, ckpt["model"],
                              {key: ckpt[key] for key in ("classes", "data", "model_config")})
    checkpoint.prune(save_path, keep_last, log)
    try:
        outputs.write_reports(metrics, save_path)
    except outputs.OutputError as e:
        raise CheckpointError(f"{e}; epoch {epoch} is saved in its checkpoint: free space, then --resume auto"
                              ) from None
