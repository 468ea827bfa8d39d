"""Scoring: top-k accuracy, the evaluation loop (every image counted once, also across processes; a file
that does not decode is a miss, never dropped), per-class counts, and single-image predictions.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mnv2 import cli
from mnv2.cli import UsageError
from mnv2.data.imagenet import is_image
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize


class EvaluationError(cli.ScriptError, RuntimeError):
    """Something found while running (data that does not fit the weights, an image that does not decode): exit 1."""


# --------------------------------------------------------------------------------------------------
# Accuracy and the evaluation loop


def _topk_hits(logits, targets, topk):
    """[batch, len(topk)] booleans: is the target among the k highest logits."""
    maxk = min(max(topk), logits.shape[1])
    ranked = logits.topk(maxk, dim=1).indices
    hits = ranked.eq(targets.view(-1, 1))
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1) for k in topk], dim=1)


def accuracy_counts(logits, targets, topk=(1, 5)):
    """How many rows have their target among the top-k logits, for each k (counts, not percentages,
    so they add up across batches and processes exactly)."""
    return [int(n) for n in _topk_hits(logits, targets, topk).sum(dim=0).tolist()]


def _unpack(batch):
    """(images, targets, indices, n_failed) from a loader batch; plain (images, targets) loaders work too."""
    if len(batch) == 4:
        return batch
    images, targets = batch[0], batch[1]
    return images, targets, None, torch.zeros(len(targets), dtype=torch.int64)


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress_bar(loader, enabled):
    if not enabled or not sys.stderr.isatty():  # a bar in a piped log is noise: the result line says it all
        return loader, None
    try:
        from tqdm import tqdm
    except ImportError:
        return loader, None
    bar = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
    return bar, bar


def evaluate(model, loader, device, mean=IMAGENET_MEAN, std=IMAGENET_STD, criterion=None,
             channels_last=True, amp=False, progress=True, collect_predictions=False, per_class=False,
             confusion=False):
    """Score `model` on every batch of `loader`: top-1/top-5 in %, mean loss, images, failed decodes.

    Batches are (uint8 images, targets, dataset indices, n_failed) as `read_ImageNetData.build_loader`
    makes them; normalisation happens here, on `device`. An image that did not decode counts as a miss in
    top-1/top-5 (the denominator is every image) and is left out of the mean loss, whose value for a
    blank image means nothing. Under torch.distributed the sums are all-reduced, so with an unpadded
    sampler (`EvalSampler`) each image is counted exactly once. The model's train/eval mode is restored.

    collect_predictions adds "predictions": per image {"index", "target", "failed", "top5", "prob5"},
    ordered by dataset index (gathered from all processes). per_class adds "per_class_correct" and
    "per_class_count" (top-1 hits and images per class index) and "mean_class_top1" (top-1 averaged over
    the classes that have images: the figure transfer-learning benchmarks report). confusion adds
    "confusion": an int64 [classes, classes] tensor counting (target, top-1 prediction) of the decoded images.
    """
    device = torch.device(device)
    criterion = criterion or nn.CrossEntropyLoss()
    rank, world = _world()
    was_training = model.training
    model.eval()
    tally = Tally(device, per_class, confusion, collect_predictions)
    # amp: True picks bf16 on CPU and fp16 on CUDA; a dtype (the one training used) is taken as given
    amp_dtype = amp if isinstance(amp, torch.dtype) else (torch.bfloat16 if device.type == "cpu"
                                                          else torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=bool(amp))
    batches, bar = _progress_bar(loader, progress and rank == 0)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for step, batch in enumerate(batches):
                images, targets, indices, failed = _unpack(batch)
                targets = targets.to(device, non_blocking=True)
                with autocast:
                    logits = model(_model_input(images.to(device, non_blocking=True), mean, std, channels_last))
                tally.add(logits.float(), targets, indices, failed > 0, criterion)
                if bar is not None and step % 20 == 0:  # a host sync, so not every batch
                    done = tally.sums[3].item()
                    bar.set_postfix(top1=f"{100 * tally.sums[0].item() / done:.2f}",
                                    img_s=f"{done / (time.perf_counter() - start):.0f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world > 1:
        tally.all_reduce(world)
    return tally.result(time.perf_counter() - start)


def _model_input(images, mean, std, channels_last):
    """Normalised float images for the model: uint8 batches are normalised here, on their device."""
    if images.dtype == torch.uint8:
        return normalize(images, mean, std, channels_last=channels_last)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images  # already floats


class Tally:
    """What `evaluate` counts, kept on the device (reading it every batch would stall a GPU once per
    batch): top-1 and top-5 hits, the loss sum, images, failed decodes, images in the loss; per class, the
    confusion matrix and the predictions when asked."""

    def __init__(self, device, per_class=False, confusion=False, collect_predictions=False):
        self.device, self.per_class, self.confusion, self.collect = device, per_class, confusion, collect_predictions
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.class_correct = self.class_count = self.matrix = None
        self.predictions = []

    def add(self, logits, targets, indices, failed, criterion):
        """One batch; `failed` (on the host) marks the images that did not decode: misses, out of the loss."""
        n_failed = int(failed.sum())  # known on the host: no device sync to find the failures
        hits = _topk_hits(logits, targets, (1, 5))
        if n_failed:
            hits &= ~failed.to(self.device).view(-1, 1)
            ok = torch.nonzero(~failed).flatten().to(self.device)
            loss = criterion(logits[ok], targets[ok]) * len(ok) if len(ok) else logits.new_zeros(())
        else:
            loss = criterion(logits, targets) * len(targets)
        self.sums[:3] += torch.stack([hits[:, 0].sum().double(), hits[:, 1].sum().double(), loss.double()])
        self.sums[3:] += torch.tensor([len(targets), n_failed, len(targets) - n_failed],
                                      dtype=torch.float64).to(self.device, non_blocking=True)
        k = logits.shape[1]
        if self.per_class:
            if self.class_count is None:
                self.class_correct = torch.zeros(k, dtype=torch.float64, device=self.device)
                self.class_count = torch.zeros(k, dtype=torch.float64, device=self.device)
            self.class_count += torch.bincount(targets, minlength=k)
            self.class_correct += torch.bincount(targets[hits[:, 0]], minlength=k)
        if self.confusion:
            if self.matrix is None:
                self.matrix = torch.zeros(k * k, dtype=torch.int64, device=self.device)
            decoded = ~failed.to(self.device)
            self.matrix += torch.bincount(targets[decoded] * k + logits[decoded].argmax(1), minlength=k * k)
        if self.collect:
            self.predictions += _batch_predictions(logits, targets, indices, failed)

    def all_reduce(self, world):
        """Sum every process's counts (an unpadded sampler: each image was counted by one process)."""
        sums = self.sums.cpu()
        class_correct, class_count = self.class_correct, self.class_count
        if self.per_class and class_count is not None:
            class_correct, class_count = class_correct.cpu(), class_count.cpu()
        self.sums, self.class_correct, self.class_count = _all_reduce_sums(sums, class_correct, class_count,
                                                                           self.device, self.per_class)
        if self.confusion:
            self.matrix = _all_reduce_matrix(self.matrix, self.device)
        if self.collect:
            gathered = [None] * world
            dist.all_gather_object(gathered, self.predictions)
            self.predictions = [p for part in gathered for p in part]

    def result(self, seconds):
        top1, top5, loss_sum, n, n_failed, n_loss = self.sums.cpu().tolist()
        result = {
            "top1": 100.0 * top1 / n if n else float("nan"),
            "top5": 100.0 * top5 / n if n else float("nan"),
            "loss": loss_sum / n_loss if n_loss else float("nan"),
            "images": int(n), "failed": int(n_failed),
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan"),
        }
        if self.per_class:
            seen = self.class_count is not None
            result["per_class_correct"] = [int(c) for c in self.class_correct.tolist()] if seen else []
            result["per_class_count"] = [int(c) for c in self.class_count.tolist()] if seen else []
            present = [100.0 * c / n for c, n in zip(result["per_class_correct"], result["per_class_count"]) if n]
            result["mean_class_top1"] = sum(present) / len(present) if present else float("nan")
        if self.confusion:
            matrix = self.matrix
            k = math.isqrt(matrix.numel()) if matrix is not None else 0
            result["confusion"] = matrix.cpu().view(k, k) if matrix is not None else torch.zeros(0, 0, dtype=torch.int64)
        if self.collect:
            result["predictions"] = sorted(self.predictions, key=lambda p: p["index"])
        return result


def _all_reduce_sums(sums, class_correct, class_count, device, per_class):
    # NCCL reduces only CUDA tensors; gloo only CPU ones. float64 keeps counts exact past 2**24 images.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    if per_class:
        # a rank that got no images does not know the number of classes; every rank must send as much
        k = torch.tensor([0 if class_count is None else class_count.numel()], device=on)
        dist.all_reduce(k, op=dist.ReduceOp.MAX)
        if class_count is None and int(k):
            class_correct = torch.zeros(int(k), dtype=torch.float64)
            class_count = torch.zeros(int(k), dtype=torch.float64)
    parts = [sums] + ([class_correct, class_count] if class_count is not None else [])
    flat = torch.cat(parts).to(on)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    sums = flat[:6]
    if class_count is not None:
        k = class_count.numel()
        class_correct, class_count = flat[6:6 + k], flat[6 + k:]
    return sums, class_correct, class_count


def _all_reduce_matrix(matrix, device):
    # a rank that got no images does not know the number of classes; every rank must send as much
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([0 if matrix is None else matrix.numel()], device=on)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    if not int(size):
        return None
    flat = (matrix if matrix is not None else torch.zeros(int(size), dtype=torch.int64)).to(on)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.cpu()


def _batch_predictions(logits, targets, indices, failed):
    k = min(5, logits.shape[1])
    probs, top = F.softmax(logits, dim=1).topk(k, dim=1)
    if indices is None:
        indices = torch.full((len(targets),), -1)
    return [{"index": int(i), "target": int(t), "failed": bool(f), "top5": c, "prob5": p}
            for i, t, f, c, p in zip(indices.tolist(), targets.tolist(), failed.tolist(),
                                     top.tolist(), probs.tolist())]


# --------------------------------------------------------------------------------------------------
# Single images


def list_images(paths):
    """Image files named on the command line; a directory stands for the images directly inside it."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and is_image(f.name))
            if not inside:
                raise UsageError(f"{p}: no image files in this directory")
            files += inside
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such image file or directory")
    return files


def predict_images(model, files, transform, device, mean, std, topk=5, batch_size=32, channels_last=True):
    """[(file, [(class index, probability)] * topk or None, error or None)] in the order of `files`.

    A file that does not decode gets its error and no prediction; the others are still predicted.
    """
    decoded, results = [], {}
    for f in files:
        try:
            decoded.append((f, transform(str(f))))
        except Exception as e:  # PIL raises several unrelated types (OSError, DecompressionBombError, ...)
            results[f] = (f, None, f"{f}: cannot decode image ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})")
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start:start + batch_size]
            images = torch.stack([img for _, img in chunk]).to(device)
            x = normalize(images, mean, std, channels_last=channels_last)
            probs = F.softmax(model(x).float(), dim=1)
            p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
            for (f, _), row_p, row_i in zip(chunk, p.tolist(), idx.tolist()):
                results[f] = (f, list(zip(row_i, row_p)), None)
    return [results[f] for f in files]


# --------------------------------------------------------------------------------------------------
# Command line
