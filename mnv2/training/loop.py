"""One training epoch and one validation pass: the step (gradient accumulation, mixup, the sync-free guard),
what is counted, the progress bar, and the stop flag that SIGINT/SIGTERM raise.
"""
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from mnv2 import cli, distributed
from mnv2.data.transforms import normalize
from mnv2.scoring import evaluate
from mnv2.training import optimization


class TrainingError(cli.ScriptError, RuntimeError):
    """Training cannot go on (non-finite loss, a loader process that died); one line, exit code 1."""


class Preempted(cli.ScriptError):
    """SIGTERM/SIGUSR1 arrived; a resumable checkpoint was saved. Exits with 128 + the signal number."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def epoch_seed(seed, epoch, rank):
    # A fresh, reproducible stream per epoch makes an epoch's shuffling, augmentation and dropout depend
    # on nothing but (seed, epoch, rank): a resumed run sees exactly what an uninterrupted one saw.
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**32


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
    """A tqdm bar per epoch on a terminal; plain lines every `print_freq` steps otherwise; silent off rank 0.
    Images/s is the mean since the epoch started (not one step's), and the ETA is the whole run's:
    `later_steps` are the steps of the epochs after this one."""

    def __init__(self, enabled, total, initial, desc, print_freq, later_steps=0):
        self.enabled, self.total, self.desc, self.print_freq = enabled, total, desc, print_freq
        self.start, self.initial, self.later_steps = time.perf_counter(), initial, later_steps
        self.images = self.seconds = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step, loss, top1, lr, images, seconds):
        if not self.enabled:
            return
        self.images, self.seconds = self.images + images, self.seconds + seconds
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        done = step - self.initial
        eta = self.seconds / done * (self.total - step + self.later_steps) if done else float("nan")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} top1 {top1:.2f} lr {lr:.5f} img/s {rate:.0f} "
                                     f"run eta {_hms(eta)}", refresh=False)
            self.bar.update(1)
        elif step % self.print_freq == 0 or step == self.total:
            print(f"{self.desc} step {step}/{self.total} loss {loss:.4f} top1 {top1:.2f} lr {lr:.5f} "
                  f"img/s {rate:.0f} eta {_hms(eta)}", flush=True)

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
    learner.model.train()
    run = _EpochRun(meter or EpochMeter(), start_step,
                    # BatchNorm statistics were already updated by the forward pass of a step that turns out bad.
                    learner.buffers or optimization.BufferKeeper(learner.model, flat=False))
    last = time.perf_counter()  # step times include waiting for data: images/s is the real throughput
    batches = iter(loader)
    try:
        for group in _step_batches(batches, learner.accum_steps):
            lr = learner.schedule(epoch, run.step, steps_per_epoch)
            optimization.set_lr(learner.optimizer, lr)
            local, n_failed, indices, n_images = _passes(learner, group, context)
            totals = _step_totals(local, n_failed, stop, learner.device, context)
            stop_votes, count = _finish_step(learner, run, totals, n_images, epoch, steps_per_epoch, context, log)
            now = time.perf_counter()
            seconds, last = now - last, now
            run.meter.seconds += seconds
            if learner.compiled:
                # Compilation happens on the host while the first step is queued, so this is its time.
                log(f"torch.compile: the first step took {seconds:.1f} s, compilation included")
                learner.compiled = False
            if progress is not None:
                progress.update(run.step, run.meter.loss, run.meter.top1, lr, count, seconds)
            if on_step is not None:
                on_step(epoch, run.step, indices)
            if stop_votes:
                return run.meter, run.step, True
        if run.unread and _read_steps(run.unread, run.meter, run.streak, learner, epoch, log):
            return run.meter, run.step, True
    except RuntimeError as e:
        if isinstance(e, cli.ScriptError) or not _loader_died(batches):
            raise
        raise TrainingError(f"a data loader process died ({str(e).splitlines()[0]}); check memory and the data, "
                            "then --resume auto") from None
    finally:
        # Releasing a DataLoader iterator stops its workers, also when an error ends the epoch early.
        del batches
    return run.meter, run.step, False


@dataclass
class _EpochRun:
    """Where an epoch stands: its meter, the next step, the BatchNorm buffers a bad step restores, the
    non-finite steps in a row, and (with a guard) the steps whose statistics the host has not read yet."""
    meter: EpochMeter
    step: int
    buffers: object
    streak: list = field(default_factory=lambda: [0])
    unread: list = field(default_factory=list)


def _passes(learner, group, context):
    """Forward and backward over the loader batches of one optimizer step (gradients summed, each pass's
    loss divided by their number, DDP synchronising on the last). Returns (loss x n, correct, n, non-finite
    as a device tensor; failed decodes; the samples' indices; images)."""
    model, device = learner.model, learner.device
    # Inputs follow the weights' precision (float64 runs serve numerical checks); autocast handles AMP.
    input_dtype = next(model.parameters()).dtype
    amp_dtype = learner.amp_dtype
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
                if learner.distill is not None:  # the teacher sees x: the pixels the student saw, mixed
                    loss = learner.distill(loss, logits, x, batch_indices)
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
    return local, n_failed, torch.cat(indices) if len(indices) > 1 else indices[0], n_images


def _step_totals(local, n_failed, stop, device, context):
    """One small all-reduce per step carries the statistics, the non-finite check and the stop vote, so
    every rank takes the same decision at the same step. (Host numbers enter as fills, not copies: a copy
    from the host would wait for the GPU.)"""
    stats = torch.empty(6, dtype=torch.float64, device=device)
    stats[:4] = local
    stats[4] = float(stop is not None and stop.signum is not None)
    stats[5] = float(n_failed)
    return distributed.all_reduce_sum(stats, context)


def _finish_step(learner, run, totals, n_images, epoch, steps_per_epoch, context, log):
    """Step the optimizer, or skip a non-finite step, and count it. Returns (stop votes, images this step)."""
    if learner.guard is not None:
        # Decided on the device: the host queues the next step without waiting for this one.
        _guarded_step(learner, run.buffers, totals[3] == 0, epoch, run.step)
        run.unread.append((run.step, totals))
        run.step += 1
        stop_votes = 0.0
        if run.step % learner.read_every == 0 or run.step == steps_per_epoch:
            stop_votes = _read_steps(run.unread, run.meter, run.streak, learner, epoch, log)
            run.unread = []
        return stop_votes, float(n_images * context.world_size)
    row = totals.tolist()
    run.buffers.settle(not row[3])
    if row[3]:
        learner.optimizer.zero_grad(set_to_none=True)
    else:
        _apply_step(learner, epoch, run.step)
    stop_votes = _tally(run.meter, row, run.streak, learner.max_nonfinite, epoch, run.step, log)
    run.step += 1
    return stop_votes, row[2]


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


def epoch_record(epoch, lr, meter, val):
    return {"epoch": epoch, "lr": lr, "train_loss": meter.loss, "train_top1": meter.top1, **val,
            "images_per_s": meter.count / meter.seconds if meter.seconds else 0.0,
            "seconds": meter.seconds, "skipped_steps": meter.skipped, "failed_images": meter.failed}


def epoch_line(record, num_epochs):
    return (f"epoch {record['epoch']}/{num_epochs} lr {record['lr']:.6f} train loss {record['train_loss']:.4f} "
            f"top1 {record['train_top1']:.2f} | val loss {record['val_loss']:.4f} top1 {record['val_top1']:.2f} "
            + (f"top5 {record['val_top5']:.2f} " if record["val_top5"] is not None else "")
            + f"mean/class {record['val_mean_class_top1']:.2f}"
            + (f" | ema top1 {record['ema_val_top1']:.2f}" if record["ema_val_top1"] is not None else "")
            + f" | {record['images_per_s']:.0f} img/s, {record['seconds']:.0f} s")
