"""Measure a MobileNetV2: ImageNet top-1/top-5, single-image predictions, and export for deployment.

    python evaluate.py --weights pretrained/mobilenet_v2-b0353104.pth --data-dir /data/imagenet

Any weight file that `MobileNetV2.load_model` reads is accepted: this repo's checkpoints (which carry
their class order and preprocessing), torchvision's, the seed's, tonylins', d-li14's, timm's. Known public
files are recognised by their sha256 and get their published preprocessing; `--weights torchvision-v1`
and `--weights torchvision-v2` fetch torchvision's files into pretrained/ (see pretrained/README.md).

    python evaluate.py --weights torchvision-v2 cat.jpg photos/          # top-5 classes per image
    python evaluate.py --weights ckpt.pth --export-onnx mobilenet_v2.onnx  # checked against PyTorch
    torchrun --nproc-per-node 8 evaluate.py --weights ckpt.pth --data-dir /data/imagenet

Every validation image is counted exactly once, also across processes; a file that does not decode is
scored as a miss and reported, never dropped.
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from MobileNetV2 import WeightsError, checkpoint_meta, load_model, read_weights
from read_ImageNetData import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, DataError, EvalSampler,
                               ImageNetDataset, build_loader, eval_transform, find_layout, list_samples,
                               normalize, read_classes)

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

# torchvision's evaluation preprocessing, the default for files that do not say otherwise.
DEFAULT_PREPROCESSING = {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

# Public weight files, recognised by sha256. Sources, published figures and how each was measured are in
# pretrained/README.md; tests check the torchvision entries against torchvision's own weights API.
KNOWN_WEIGHTS = {
    "torchvision-v1": {
        "file": "mobilenet_v2-b0353104.pth",
        "url": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        "sha256": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "torchvision": "IMAGENET1K_V1",
        "published": {"top1": 71.878, "top5": 90.286},
        "preprocessing": {"resize": 256, "input_size": 224, "interpolation": "bilinear"},
        "class_order": "sorted",
    },
    "torchvision-v2": {
        "file": "mobilenet_v2-7ebf99e0.pth",
        "url": "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        "sha256": "7ebf99e03e254b273379b23edca7ec0da9f48273b23a332b93c1c99d49e86e8f",
        "torchvision": "IMAGENET1K_V2",
        "published": {"top1": 72.154, "top5": 90.822},
        # The V2 recipe was tuned with a 232 px resize before the 224 px crop.
        "preprocessing": {"resize": 232, "input_size": 224, "interpolation": "bilinear"},
        "class_order": "sorted",
    },
    "tonylins": {
        "file": "mobilenetv2.pth.tar",
        "url": "https://drive.google.com/open?id=1jlto6HRVD3ipNkAl1lNhDbkBp7HylaqR",
        "sha256": "ecbe2b568c8602549fa9e1d5833c63848f490a48d92e5d224d1eb2063e152cf8",
        "torchvision": None,
        "published": {"top1": 71.8, "top5": None},
        "preprocessing": {"resize": 256, "input_size": 224, "interpolation": "bilinear"},
        "class_order": "sorted",
    },
}
DOWNLOADABLE = ("torchvision-v1", "torchvision-v2")


class UsageError(ValueError):
    """A flag with a value that cannot work (a missing path, a device that is not there): exit code 2."""


class EvaluationError(RuntimeError):
    """Something found while running (an image that does not decode, an export that disagrees): exit 1."""


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
    if not enabled:
        return loader, None
    try:
        from tqdm import tqdm
    except ImportError:
        return loader, None
    bar = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
    return bar, bar


def evaluate(model, loader, device, mean=IMAGENET_MEAN, std=IMAGENET_STD, criterion=None,
             channels_last=True, amp=False, progress=True, collect_predictions=False, per_class=False):
    """Score `model` on every batch of `loader`: top-1/top-5 in %, mean loss, images, failed decodes.

    Batches are (uint8 images, targets, dataset indices, n_failed) as `read_ImageNetData.build_loader`
    makes them; normalisation happens here, on `device`. An image that did not decode counts as a miss in
    top-1/top-5 (the denominator is every image) and is left out of the mean loss, whose value for a
    blank image means nothing. Under torch.distributed the sums are all-reduced, so with an unpadded
    sampler (`EvalSampler`) each image is counted exactly once. The model's train/eval mode is restored.

    collect_predictions adds "predictions": per image {"index", "target", "failed", "top5", "prob5"},
    ordered by dataset index (gathered from all processes). per_class adds "per_class_correct" and
    "per_class_count" (top-1 hits and images per class index).
    """
    device = torch.device(device)
    criterion = criterion or nn.CrossEntropyLoss()
    rank, world = _world()
    was_training = model.training
    model.eval()
    # Running sums stay on the device: reading them every batch would stall a GPU once per batch.
    # top-1 hits, top-5 hits, loss sum, images, failed decodes, images in the loss
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    class_correct = class_count = None
    predictions = []
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
                failed = failed > 0  # known on the host: no device sync to find the failures
                n_failed = int(failed.sum())
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if images.dtype == torch.uint8:
                    x = normalize(images, mean, std, channels_last=channels_last)
                else:  # already normalised floats
                    x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
                with autocast:
                    logits = model(x)
                logits = logits.float()

                hits = _topk_hits(logits, targets, (1, 5))
                if n_failed:
                    hits &= ~failed.to(device).view(-1, 1)
                    ok = torch.nonzero(~failed).flatten().to(device)
                    loss = criterion(logits[ok], targets[ok]) * len(ok) if len(ok) else logits.new_zeros(())
                else:
                    loss = criterion(logits, targets) * len(targets)
                sums[:3] += torch.stack([hits[:, 0].sum().double(), hits[:, 1].sum().double(), loss.double()])
                sums[3:] += torch.tensor([len(targets), n_failed, len(targets) - n_failed],
                                         dtype=torch.float64).to(device, non_blocking=True)
                if per_class:
                    if class_count is None:
                        class_correct = torch.zeros(logits.shape[1], dtype=torch.float64, device=device)
                        class_count = torch.zeros(logits.shape[1], dtype=torch.float64, device=device)
                    class_count += torch.bincount(targets, minlength=logits.shape[1])
                    class_correct += torch.bincount(targets[hits[:, 0]], minlength=logits.shape[1])
                if collect_predictions:
                    predictions += _batch_predictions(logits, targets, indices, failed)
                if bar is not None and step % 20 == 0:  # a host sync, so not every batch
                    done = sums[3].item()
                    bar.set_postfix(top1=f"{100 * sums[0].item() / done:.2f}",
                                    img_s=f"{done / (time.perf_counter() - start):.0f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    sums = sums.cpu()
    if per_class and class_count is not None:
        class_correct, class_count = class_correct.cpu(), class_count.cpu()

    if world > 1:
        sums, class_correct, class_count = _all_reduce_sums(sums, class_correct, class_count, device,
                                                            per_class)
        if collect_predictions:
            gathered = [None] * world
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
    seconds = time.perf_counter() - start

    top1, top5, loss_sum, n, n_failed, n_loss = sums.tolist()
    result = {
        "top1": 100.0 * top1 / n if n else float("nan"),
        "top5": 100.0 * top5 / n if n else float("nan"),
        "loss": loss_sum / n_loss if n_loss else float("nan"),
        "images": int(n), "failed": int(n_failed),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan"),
    }
    if per_class:
        seen = class_count is not None
        result["per_class_correct"] = [int(c) for c in class_correct.tolist()] if seen else []
        result["per_class_count"] = [int(c) for c in class_count.tolist()] if seen else []
    if collect_predictions:
        result["predictions"] = sorted(predictions, key=lambda p: p["index"])
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


def _batch_predictions(logits, targets, indices, failed):
    k = min(5, logits.shape[1])
    probs, top = F.softmax(logits, dim=1).topk(k, dim=1)
    if indices is None:
        indices = torch.full((len(targets),), -1)
    return [{"index": int(i), "target": int(t), "failed": bool(f), "top5": c, "prob5": p}
            for i, t, f, c, p in zip(indices.tolist(), targets.tolist(), failed.tolist(),
                                     top.tolist(), probs.tolist())]


# --------------------------------------------------------------------------------------------------
# Inference speed


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    At inference a BatchNorm is a fixed per-channel affine map, so conv+BN is one conv with scaled
    weights and a bias: one pass over the activations instead of two, identical outputs up to rounding.
    Works on the Sequential units MobileNetV2 (and torchvision's) are built from. Returns the count.
    """
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
                    and bn.track_running_stats and bn.running_mean is not None):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def _unwrap(model):
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class PackedConv2d(nn.Module):
    """A CPU convolution whose weights are reordered once into oneDNN's blocked layout, with the
    following ReLU6 (if any) applied inside the convolution.

    Eager PyTorch hands oneDNN plain-layout weights on every call, to be reordered each time, and runs
    ReLU6 as a separate pass over the widest activations of each block (the 6x expansions); both costs
    go. Inference only: the packed weights are
    constants. CPU only.
    """

    def __init__(self, conv, relu6, input_shape):
        super().__init__()
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        padding, stride, dilation, groups = self.geometry
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), padding, stride, dilation, groups, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.attr, self.scalars = ("hardtanh", [0.0, 6.0]) if relu6 else ("none", [])

    def forward(self, x):
        padding, stride, dilation, groups = self.geometry
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight, self.bias, padding, stride,
                                                       dilation, groups, self.attr, self.scalars, "")


def pack_for_cpu(model, input_size=224, batch_size=32):
    """Replace the convolutions of a BatchNorm-folded, channels_last `model` by `PackedConv2d`, in place.

    Returns the number replaced: 0 (model untouched) where this PyTorch build lacks the oneDNN ops or
    the packed model does not reproduce the logits within 1e-5 (relative to their largest magnitude).
    """
    if not (hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()):
        return 0
    shapes = {}

    def record(conv, inputs, output):
        shapes[conv] = tuple(inputs[0].shape)  # returns None: a hook's return value replaces the output

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    example = _parity_input(input_size, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(example)
    for h in hooks:
        h.remove()
    replaced = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Sequential):
                continue
            names = list(module._modules)
            for i, name in enumerate(names):
                conv = module._modules[name]
                if type(conv) is not nn.Conv2d or conv not in shapes or conv.padding_mode != "zeros":
                    continue
                # the next layer that computes something (a folded BatchNorm left an Identity)
                after = [n for n in names[i + 1:] if type(module._modules[n]) is not nn.Identity]
                relu6 = bool(after) and isinstance(module._modules[after[0]], nn.ReLU6)
                act_name = after[0] if relu6 else None
                replaced.append((module, name, conv, act_name, module._modules[act_name] if relu6 else None))
                module._modules[name] = PackedConv2d(conv, relu6, (batch_size,) + shapes[conv][1:])
                if relu6:
                    module._modules[act_name] = nn.Identity()
        with torch.inference_mode():
            diff = (model(example) - want).abs().max().item()
        # float32 rounding grows with the logits' magnitude; ImageNet logits are tens at most
        if not diff <= 1e-5 * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"packed convolutions change the logits by {diff:.2e}")
    except RuntimeError as e:  # an op missing or behaving differently in this build: stay unpacked
        for module, name, conv, act_name, act in reversed(replaced):
            module._modules[name] = conv
            if act_name is not None:
                module._modules[act_name] = act
        warnings.warn(f"oneDNN packed convolutions not used ({e})")
        return 0
    return len(replaced)


def prepare_for_inference(model, channels_last=True, device="cpu", pack=True, input_size=224, batch_size=32):
    """A copy of `model` made fast for inference on `device`; the original is untouched.

    BatchNorm folded into the convolutions, parameters frozen, channels_last memory layout (on CPU the
    depthwise and pointwise convolutions run much faster on NHWC data), and on CPU the convolutions
    packed for oneDNN with ReLU6 fused in (`pack_for_cpu`, unless pack=False: for autocast or
    torch.compile, which packs by itself; a packed copy stays on the CPU). Logits stay
    within 1e-4 of the plain model. Run it under `torch.inference_mode()`, as `evaluate` does.
    `input_size`/`batch_size` only tune the packed layout; any batch and size still work.
    """
    model = copy.deepcopy(_unwrap(model)).cpu().eval()
    fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if pack and torch.device(device).type == "cpu":
            pack_for_cpu(model, input_size, batch_size)
    return model.to(device)


class OnnxRuntimeModel(nn.Module):
    """The model exported to ONNX and run by onnxruntime on the CPU: the fastest CPU path here.

    onnxruntime fuses each convolution with its folded BatchNorm and ReLU6 and runs them in its blocked
    layout, about twice the speed of the best eager PyTorch path on MobileNetV2 (bench/run_all.py).
    Takes and returns torch tensors, so `evaluate` runs it like any model.
    """

    def __init__(self, model, input_size=224, threads=None):
        super().__init__()
        import onnxruntime  # ImportError: the caller falls back to PyTorch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            self.max_abs_diff = export_onnx(model, path, input_size=input_size)
            if not self.max_abs_diff <= 1e-4:
                raise EvaluationError(f"onnxruntime's logits differ by {self.max_abs_diff:.1e} from PyTorch's")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()  # the cores PyTorch would use
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, images):
        logits = self.session.run(None, {"images": images.float().contiguous().numpy()})[0]
        return torch.from_numpy(logits)


def inference_model(model, device, backend="auto", input_size=224, batch_size=32, log=print):
    """The fastest faithful way to run `model` for scoring: (model, wants channels_last input, backend).

    On the CPU, onnxruntime when it is installed and reproduces the logits within 1e-4 ("auto"), else
    PyTorch with `prepare_for_inference`; on CUDA always PyTorch.
    """
    if backend != "torch" and torch.device(device).type == "cpu":
        try:
            return OnnxRuntimeModel(model, input_size), False, "onnxruntime"
        except (ImportError, EvaluationError) as e:
            if backend == "onnxruntime":
                raise EvaluationError(f"--backend onnxruntime: {e}") from None
            log(f"note: scoring in PyTorch, onnxruntime not used ({e})")
    fast = prepare_for_inference(model, device=device, input_size=input_size, batch_size=batch_size)
    return fast, True, "torch"


def maybe_compile(model, example, log=print):
    """`model` compiled by torch.compile, or `model` itself when compiling fails here (on CPU inductor
    needs a C++ toolchain). `example` is a batch to compile with, so failures show up now, not mid-loop.

    Freezing turns the weights into constants, which lets inductor pre-pack them for oneDNN and fuse
    each ReLU6 into its convolution: the model must not be trained afterwards (use a copy from
    `prepare_for_inference`). The result is checked against the eager model on `example`.
    """
    try:
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
        with torch.inference_mode():
            got, want = compiled(example), model(example)
        diff = (got.float() - want.float()).abs().max().item()
        if not diff <= 1e-4:
            raise EvaluationError(f"compiled model differs from eager by {diff:.2e}")
    except Exception as e:  # whatever the compiler raises, the evaluation goes on in eager mode
        log(f"torch.compile not used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "running eager")
        return model
    return compiled


# --------------------------------------------------------------------------------------------------
# Weight files: named public weights, checksums


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def known_weights(sha256):
    """(name, entry) of the public file with this sha256, or (None, None)."""
    for name, entry in KNOWN_WEIGHTS.items():
        if entry["sha256"] == sha256:
            return name, entry
    return None, None


def fetch_public_weights(name, directory=PRETRAINED_DIR, log=print):
    """Path of torchvision's `name` weights in `directory`, downloaded (and checksum-verified) if missing.

    The URL comes from torchvision's weights API; the download goes through torch.hub and is checked
    against the full sha256, so a corrupt or substituted file is never used. Offline, the error says
    where to get the file and where to put it.
    """
    entry = KNOWN_WEIGHTS[name]
    directory = Path(directory)
    path = directory / entry["file"]
    url = _torchvision_url(entry) or entry["url"]
    if path.is_file():
        if sha256_of(path) != entry["sha256"]:
            raise WeightsError(f"{path}: not the published {name} file (sha256 differs); delete it to "
                               f"download again from {url}")
        return path
    log(f"downloading {name} weights from {url} to {path}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=entry["sha256"], progress=False)
    except RuntimeError as e:  # torch.hub's checksum mismatch; it already removed the partial file
        raise WeightsError(f"{url}: downloaded file failed its sha256 check ({str(e).splitlines()[0]}); "
                           f"download it by hand and put it at {path}") from None
    except Exception as e:  # offline: URLError, socket errors, proxies; all end the same way
        reason = (str(getattr(e, "reason", e)).splitlines() or [""])[0][:120]
        raise WeightsError(f"cannot download {name} weights from {url} ({type(e).__name__}: {reason}); "
                           f"download the file by hand and put it at {path}") from None
    return path


def _torchvision_url(entry):
    if not entry.get("torchvision"):
        return None
    try:
        from torchvision.models import MobileNet_V2_Weights
        return getattr(MobileNet_V2_Weights, entry["torchvision"]).url
    except (ImportError, AttributeError):
        return None


def torchvision_categories():
    """torchvision's 1000 ImageNet class names, in sorted-WNID order; None when torchvision is absent."""
    try:
        from torchvision.models import MobileNet_V2_Weights
        return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    except (ImportError, AttributeError, KeyError):
        return None


# --------------------------------------------------------------------------------------------------
# Export


def _parity_input(input_size, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, input_size, input_size, generator=generator)


def export_onnx(model, path, input_size=224, opset=17, reference=None, check_batch=3):
    """Write `model` as ONNX with a dynamic batch axis. Return the max |logit difference| between the
    file run by onnxruntime and `reference` (default: `model`) in PyTorch, on a batch of another size than
    the traced one so the dynamic axis is exercised; None when onnxruntime is not installed."""
    model = copy.deepcopy(_unwrap(model)).cpu().eval()
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _parity_input(input_size, 2)
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; say so in one line)
    except ImportError:
        raise EvaluationError(f"{path}: ONNX export needs the onnx package: pip install onnx") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _parity_input(input_size, check_batch, seed=1)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = reference(x)
    return (got - want).abs().max().item()


def export_torchscript(model, path, input_size=224, reference=None, check_batch=3):
    """Write `model` as TorchScript (traced; batch size free). Return the max |logit difference| between
    the reloaded file and `reference` (default: `model`), on a batch of another size than the traced one."""
    model = copy.deepcopy(_unwrap(model)).cpu().eval()
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit announces its deprecation; it is what deployments load
        with torch.no_grad():
            traced = torch.jit.trace(model, _parity_input(input_size, 2))
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = _parity_input(input_size, check_batch, seed=1)
    with torch.no_grad():
        return (loaded(x) - reference(x)).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Single images


def list_images(paths):
    """Image files named on the command line; a directory stands for the images directly inside it."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
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


def positive_int(text):
    """argparse types shared with train.py: a bad value becomes a one-line usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _device(text):
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text} (cpu, cuda, cuda:1, ...)") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit code 2, as argparse, without the many-line usage block in front of it.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser(add_help=True):
    p = _Parser(
        description="Score MobileNetV2 weights on ImageNet val, predict images, or export the model.",
        add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="*", help="image files or directories to predict (top-k classes each); "
                   "with images, --data-dir only supplies the class names")
    p.add_argument("--weights", required=True,
                   help="weight file or checkpoint of any public layout, or a named public file: "
                        + ", ".join(DOWNLOADABLE) + " (fetched into --pretrained-dir)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classes the weights must have (default: read from the file)")
    p.add_argument("--width-mult", type=positive_float, default=None,
                   help="width the weights must have (default: read from the file)")
    p.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR,
                   help="where named public weights are stored")

    data = p.add_argument_group("data (named as in train.py)")
    data.add_argument("--data-dir", type=Path, default=None, help="ImageNet root (devkit + val images)")
    data.add_argument("--batch-size", type=positive_int, default=64)
    data.add_argument("--num-workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                      help="loader processes per evaluation process (default: min(8, CPU count), as train.py)")
    data.add_argument("--class-order", choices=("sorted", "devkit"), default=None,
                      help="label order of weights that do not record one (default sorted WNIDs, as "
                           "torchvision; the seed repo trained with devkit order). A checkpoint's own "
                           "order wins")
    data.add_argument("--max-images", type=positive_int, default=None,
                      help="score only the first N val images (in file-name order)")
    data.add_argument("--device", type=_device, default=None, help="default: cuda when available, else cpu")

    pre = p.add_argument_group("preprocessing (default: the checkpoint's, else the published one of a "
                               "recognised file, else torchvision's 256 / 224 / bilinear / ImageNet "
                               "statistics)")
    pre.add_argument("--resize", type=positive_int, default=None, help="shorter side before the centre crop")
    pre.add_argument("--crop", type=positive_int, default=None, help="centre crop = network input size")
    pre.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=None)
    pre.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), default=None)
    pre.add_argument("--std", type=positive_float, nargs=3, metavar=("R", "G", "B"), default=None)

    out = p.add_argument_group("outputs")
    out.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    out.add_argument("--per-class", type=Path, default=None,
                     help="write per-class top-1 as CSV (index, wnid, name, top1, count)")
    out.add_argument("--predictions", type=Path, default=None, help="write per-image top-5 as CSV")
    out.add_argument("--topk", type=positive_int, default=5, help="classes shown per single image")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")

    speed = p.add_argument_group("speed")
    speed.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start)")
    speed.add_argument("--plain", action="store_true",
                       help="run the model as loaded: no BatchNorm folding, NCHW (to check the fast path)")
    speed.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                       help="CPU scoring engine; auto: onnxruntime when installed and within 1e-4 of "
                            "PyTorch's logits, else PyTorch with BatchNorm folded and channels_last")

    exp = p.add_argument_group("export (dynamic batch size, checked against PyTorch)")
    exp.add_argument("--export-onnx", type=Path, default=None, help="write an ONNX model here")
    exp.add_argument("--export-torchscript", type=Path, default=None, help="write a TorchScript model here")
    exp.add_argument("--opset", type=positive_int, default=17, help="ONNX opset")
    exp.add_argument("--export-tolerance", type=positive_float, default=1e-4,
                     help="largest |logit difference| the exported model may show")
    return p


def _log(rank):
    def log(*parts):
        if rank == 0:
            print(*parts, flush=True)
    return log


def _init_distributed(device):
    """Join the process group torchrun describes (WORLD_SIZE > 1). Returns (rank, world, device, owned)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, True


def resolve_weights(args, log):
    """(path, raw dict, sha256, known name, known entry) for --weights."""
    if args.weights in KNOWN_WEIGHTS and args.weights in DOWNLOADABLE:
        path = fetch_public_weights(args.weights, args.pretrained_dir, log)
    else:
        path = Path(args.weights)
        if not path.is_file():
            hint = f" (named public weights: {', '.join(DOWNLOADABLE)})" if not path.suffix else ""
            raise UsageError(f"--weights {path}: no such file{hint}")
    digest = sha256_of(path)
    name, entry = known_weights(digest)
    if name:
        published = entry["published"]
        figures = " / ".join(f"{v}" for v in (published["top1"], published["top5"]) if v is not None)
        pre = entry["preprocessing"]
        log(f"recognised {name} weights by sha256 (published top-1/top-5 {figures}); using its published "
            f"preprocessing: resize {pre['resize']}, crop {pre['input_size']}, {pre['interpolation']}")
    return path, read_weights(path), digest, name, entry


def build_model(args, raw):
    try:
        return load_model(raw, num_classes=args.num_classes, width_mult=args.width_mult, use_ema=args.ema)
    except WeightsError as e:
        # A flag contradicting a good file is a usage error (exit 2); a bad file is not.
        if args.num_classes is not None or args.width_mult is not None:
            try:
                load_model(raw, use_ema=args.ema)
            except WeightsError:
                raise e from None
            raise UsageError(f"--weights {args.weights}: {e}") from None
        raise WeightsError(f"{args.weights}: {e}" if str(args.weights) not in str(e) else str(e)) from None


def resolve_preprocessing(args, meta, entry):
    """Preprocessing and where it came from: flags > checkpoint > recognised public file > defaults."""
    pre, source = dict(DEFAULT_PREPROCESSING), "torchvision defaults"
    if entry:
        pre.update(entry["preprocessing"])
        source = "published"
    if meta.get("data"):
        pre.update({k: v for k, v in meta["data"].items() if k in pre})
        source = "checkpoint"
    flags = {"resize": args.resize, "input_size": args.crop, "interpolation": args.interpolation,
             "mean": args.mean, "std": args.std}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        pre.update(given)
        source += " + flags"
    pre["mean"], pre["std"] = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
    if pre["resize"] < pre["input_size"]:
        raise UsageError(f"--resize {pre['resize']} is smaller than the {pre['input_size']} px crop; "
                         "the centre crop must fit inside the resized image")
    if pre["interpolation"] not in INTERPOLATIONS:
        raise UsageError(f"interpolation {pre['interpolation']!r} saved with the weights is not one of "
                         f"{', '.join(sorted(INTERPOLATIONS))}; pass --interpolation")
    return pre, source


def resolve_class_order(args, meta, entry, log):
    saved = (meta.get("classes") or {}).get("order")
    if saved:
        if args.class_order and args.class_order != saved:
            log(f"ignoring --class-order {args.class_order}: the checkpoint was trained with {saved} order")
        return saved
    if args.class_order:
        return args.class_order
    return entry["class_order"] if entry else "sorted"


def class_names(args, meta, order, num_classes):
    """(wnids, names) in the model's label order: the devkit's meta.mat when --data-dir has one, else the
    names saved with a checkpoint, else torchvision's list (sorted order only), else placeholders."""
    if args.data_dir is not None:
        try:
            classes = read_classes(find_layout(args.data_dir), order)
            return list(classes.wnids), list(classes.names)
        except DataError:
            pass  # no devkit there: the next source of names will do
    saved = meta.get("classes") or {}
    if saved.get("names") and len(saved["names"]) == num_classes:
        return list(saved.get("wnids") or [""] * num_classes), list(saved["names"])
    categories = torchvision_categories()
    if categories and num_classes == len(categories) and order == "sorted":
        return [""] * num_classes, categories
    return [""] * num_classes, [f"class {i}" for i in range(num_classes)]


def main(args):
    """Run what the flags ask for; return the results dict. Errors end in one line and a non-zero exit."""
    try:
        return run(args)
    except UsageError as e:
        _fail(str(e), 2)
    except (WeightsError, DataError, EvaluationError) as e:
        _fail(str(e), 1)


def _fail(message, code):
    print(f"evaluate.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run(args):
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if not (args.images or args.data_dir or args.export_onnx or args.export_torchscript):
        raise UsageError("nothing to do: give --data-dir, image files, --export-onnx or --export-torchscript")
    if args.backend == "onnxruntime" and device.type != "cpu":
        raise UsageError(f"--backend onnxruntime scores on the CPU, but --device is {device}; add --device cpu")
    if device.type == "cuda" and not args.amp:
        # Scores in float32 as on the CPU: cuDNN's TF32 default rounds every convolution's inputs to
        # 10-bit mantissas (relative errors near 1e-3), enough to flip a near-tie prediction.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank, world, device, owned_group = _init_distributed(device)
    log = _log(rank)
    try:
        return _run(args, device, rank, world, log)
    finally:
        if owned_group:
            dist.destroy_process_group()


def _run(args, device, rank, world, log):
    path, raw, digest, known_name, entry = resolve_weights(args, log)
    meta = checkpoint_meta(raw)
    model = build_model(args, raw)
    del raw
    num_classes = model.config["num_classes"]
    pre, pre_source = resolve_preprocessing(args, meta, entry)
    order = resolve_class_order(args, meta, entry, log)
    log(f"weights {path} (width {model.config['width_mult']:g}, {num_classes} classes, {order} class order); "
        f"preprocessing resize {pre['resize']}, crop {pre['input_size']}, {pre['interpolation']}, "
        f"mean {pre['mean']}, std {pre['std']} ({pre_source})")
    result = {"weights": str(path), "sha256": digest, "known_weights": known_name,
              "published": entry["published"] if entry else None, "model_config": dict(model.config),
              "class_order": order, "preprocessing": pre}

    if (args.export_onnx or args.export_torchscript) and rank == 0:
        result["export"] = run_exports(args, model, pre["input_size"], log)

    fast, channels_last = model.to(device), False
    if args.amp or args.compile:
        # autocast needs the plain convolutions; torch.compile packs the weights itself
        fast = prepare_for_inference(model, device=device, pack=False)
        channels_last = True
    elif not args.plain:
        fast, channels_last, backend = inference_model(model, device, args.backend, pre["input_size"],
                                                       args.batch_size, log)
        result["backend"] = backend
    if args.compile:
        example = _parity_input(pre["input_size"], min(args.batch_size, 8)).to(device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        fast = maybe_compile(fast, example, log)

    if args.images:
        result["image_predictions"] = run_predict(args, fast, device, pre, order, meta, num_classes,
                                                  channels_last)
    elif args.data_dir is not None:
        result.update(run_scoring(args, fast, device, pre, order, meta, num_classes, channels_last,
                                  rank, world, log))
        if entry and pre_source == "published":
            p = entry["published"]
            log(f"published for {known_name} on the 50,000 val images: top-1 {p['top1']}%"
                + (f"  top-5 {p['top5']}%" if p["top5"] is not None else ""))
    if args.json and rank == 0:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_exports(args, model, input_size, log):
    # Exported models carry the folded convolutions: the same function, fewer operators to run. The
    # check compares with the model as loaded, so the folding is verified along with the export.
    model = model.cpu().eval()
    deploy = copy.deepcopy(model)
    fold_batchnorm(deploy)
    report = {}
    for kind, target, export in (("onnx", args.export_onnx, export_onnx),
                                 ("torchscript", args.export_torchscript, export_torchscript)):
        if target is None:
            continue
        kwargs = {"opset": args.opset} if kind == "onnx" else {}
        diff = export(deploy, target, input_size=input_size, reference=model, **kwargs)
        report[kind] = {"path": str(target), "max_abs_diff": diff}
        if diff is None:
            log(f"wrote {target} (onnxruntime not installed: the exported graph was not run)")
            continue
        log(f"wrote {target}: max |logit difference| to PyTorch {diff:.2e} "
            f"(tolerance {args.export_tolerance:g})")
        if not diff <= args.export_tolerance:
            raise EvaluationError(f"{target}: exported {kind} model differs from PyTorch by {diff:.2e} "
                                  f"(> {args.export_tolerance:g}); do not deploy it")
    return report


def run_predict(args, model, device, pre, order, meta, num_classes, channels_last):
    files = list_images(args.images)
    wnids, names = class_names(args, meta, order, num_classes)
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    rows = predict_images(model, files, transform, device, pre["mean"], pre["std"], topk=args.topk,
                          batch_size=args.batch_size, channels_last=channels_last)
    out, errors = [], []
    for f, top, error in rows:
        if error:
            errors.append(error)
            print(f"evaluate.py: error: {error}", file=sys.stderr, flush=True)
            out.append({"file": str(f), "error": error})
            continue
        print(f)
        for i, prob in top:
            print(f"  {100 * prob:6.2f}%  {i:4d}  {wnids[i]:9s}  {names[i]}".rstrip())
        out.append({"file": str(f), "top": [{"index": i, "wnid": wnids[i], "name": names[i], "prob": prob}
                                            for i, prob in top]})
    if errors:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"images": out}, indent=2) + "\n")
        raise SystemExit(1)  # each failure already has its own line above
    return out


def run_scoring(args, model, device, pre, order, meta, num_classes, channels_last, rank, world, log):
    layout = find_layout(args.data_dir)
    classes = read_classes(layout, order)
    if len(classes.wnids) != num_classes:
        raise EvaluationError(f"the weights have {num_classes} classes but {args.data_dir} lists "
                              f"{len(classes.wnids)}; use weights trained on this data")
    saved = (meta.get("classes") or {}).get("wnids")
    if saved and list(saved) != list(classes.wnids):
        first = next(i for i, (a, b) in enumerate(zip(saved, classes.wnids)) if a != b)
        raise EvaluationError(f"the checkpoint's class {first} is {saved[first]} but {args.data_dir} "
                              f"puts {classes.wnids[first]} there; the devkit differs from the training one")
    samples = list_samples(layout, "val", classes)
    if not samples:
        raise DataError(f"{args.data_dir}: no validation images found")
    if args.max_images:
        samples = samples[:args.max_images]
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    dataset = ImageNetDataset(samples, transform, train=False)
    sampler = EvalSampler(len(dataset), num_replicas=world, rank=rank)
    loader = build_loader(dataset, args.batch_size, sampler, num_workers=args.num_workers)
    want_rows = bool(args.predictions)
    stats = evaluate(model, loader, device, mean=pre["mean"], std=pre["std"], channels_last=channels_last,
                     amp=args.amp, progress=not args.no_progress, collect_predictions=want_rows,
                     per_class=bool(args.per_class))
    log(f"top-1 {stats['top1']:.3f}%  top-5 {stats['top5']:.3f}%  loss {stats['loss']:.4f}  "
        f"images {stats['images']} (failed to decode: {stats['failed']})  "
        f"{stats['images_per_s']:.1f} images/s on {world} x {device.type}")
    if stats["failed"]:
        log(f"warning: {stats['failed']} images did not decode and were scored as misses")
    if rank == 0:
        if args.per_class:
            write_per_class(args.per_class, stats.pop("per_class_correct"), stats.pop("per_class_count"),
                            classes)
        if want_rows:
            write_predictions(args.predictions, stats.pop("predictions"), samples, classes)
    stats.pop("per_class_correct", None), stats.pop("per_class_count", None), stats.pop("predictions", None)
    return stats


def write_per_class(path, correct, count, classes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "wnid", "name", "top1", "count"])
        for i, (c, n) in enumerate(zip(correct, count)):
            if n:  # classes without val images (a subset) have no accuracy to report
                w.writerow([i, classes.wnids[i], classes.names[i], f"{100 * c / n:.3f}", n])


def write_predictions(path, predictions, samples, classes):
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max((len(p["top5"]) for p in predictions), default=5)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "target", "target_wnid", "failed"]
                   + [f"{col}{j + 1}" for j in range(k) for col in ("pred", "wnid", "prob")])
        for p in predictions:
            path, target = samples[p["index"]][0], p["target"]
            row = [p["index"], path, target, classes.wnids[target], int(p["failed"])]
            for c, prob in zip(p["top5"], p["prob5"]):
                row += [c, classes.wnids[c], f"{prob:.6f}"]
            w.writerow(row)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
