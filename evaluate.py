"""Measure a MobileNetV2: ImageNet top-1/top-5, single-image predictions, and export for deployment.

    python evaluate.py --weights pretrained/mobilenet_v2-b0353104.pth --data-dir /data/imagenet

Any weight file that `MobileNetV2.load_model` reads is accepted: this repo's checkpoints (which carry
their class order and preprocessing), torchvision's, the seed's, tonylins', d-li14's, timm's. Known public
files are recognised by their sha256 and get their published preprocessing; `--weights torchvision-v1`
and `--weights torchvision-v2` fetch torchvision's files into pretrained/ (see pretrained/README.md).

    python evaluate.py --weights torchvision-v2 cat.jpg photos/          # top-5 classes per image
    python evaluate.py --weights ckpt.pth --export-onnx mobilenet_v2.onnx  # checked against PyTorch
    python evaluate.py --weights mobilenet_v2.int8.onnx --data-dir /data/imagenet  # quantize.py's file
    torchrun --nproc-per-node 8 evaluate.py --weights ckpt.pth --data-dir /data/imagenet

Every validation image is counted exactly once, also across processes; a file that does not decode is
scored as a miss and reported, never dropped.
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import checkpoint
import cli
import distributed
import image_folders
import inference
import outputs
from cli import UsageError
from read_ImageNetData import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, NUM_CLASSES, Classes, DataError,
                               EvalSampler, ImageNetDataset, build_loader, eval_transform, find_layout, is_image,
                               list_samples, normalize, read_classes)
from weights import (DOWNLOADABLE, KNOWN_WEIGHTS, PRETRAINED_DIR, WeightsError, fetch_public_weights, known_weights,
                     load_model, sha256_of)

# torchvision's evaluation preprocessing, the default for files that do not say otherwise.
DEFAULT_PREPROCESSING = {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


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
    if not enabled:
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
    # Running sums stay on the device: reading them every batch would stall a GPU once per batch.
    # top-1 hits, top-5 hits, loss sum, images, failed decodes, images in the loss
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    class_correct = class_count = matrix = None
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
                if confusion:
                    k = logits.shape[1]
                    if matrix is None:
                        matrix = torch.zeros(k * k, dtype=torch.int64, device=device)
                    decoded = ~failed.to(device)
                    matrix += torch.bincount(targets[decoded] * k + logits[decoded].argmax(1), minlength=k * k)
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
        if confusion:
            matrix = _all_reduce_matrix(matrix, device)
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
        present = [100.0 * c / n for c, n in zip(result["per_class_correct"], result["per_class_count"]) if n]
        result["mean_class_top1"] = sum(present) / len(present) if present else float("nan")
    if confusion:
        k = math.isqrt(matrix.numel()) if matrix is not None else 0
        result["confusion"] = matrix.cpu().view(k, k) if matrix is not None else torch.zeros(0, 0, dtype=torch.int64)
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


def get_args_parser(add_help=True):
    p = cli.Parser(prog="evaluate.py", add_help=add_help,
                   description="Score MobileNetV2 weights on ImageNet val, predict images, or export the model.")
    p.add_argument("images", nargs="*", help="image files or directories to predict (top-k classes each); "
                   "with images, --data-dir only supplies the class names")
    p.add_argument("--weights", required=True,
                   help="weight file or checkpoint of any public layout, or a named public file: "
                        + ", ".join(DOWNLOADABLE) + " (fetched into --pretrained-dir)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                   help="classes the weights must have (default: read from the file)")
    p.add_argument("--width-mult", type=cli.positive_float, default=None,
                   help="width the weights must have (default: read from the file)")
    p.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR,
                   help="where named public weights are stored")

    data = p.add_argument_group("data (named as in train.py)")
    data.add_argument("--data-dir", type=Path, default=None,
                      help="ImageNet root (devkit + val images), or a folder of classes (D/val/<class>/, or "
                           "D/<class>/: the images a checkpoint held out with --val-split, else all), matched to "
                           "the weights' classes by name")
    data.add_argument("--batch-size", "-b", type=cli.positive_int, default=64)
    data.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.non_negative_int, default=min(8, os.cpu_count() or 1),
                      help="loader processes per evaluation process (default: min(8, CPU count), as train.py)")
    data.add_argument("--class-order", choices=("sorted", "devkit"), default=None,
                      help="label order of weights that do not record one (default sorted WNIDs, as "
                           "torchvision; the seed repo trained with devkit order). A checkpoint's own "
                           "order wins")
    data.add_argument("--max-images", type=cli.positive_int, default=None,
                      help="score only the first N val images (in file-name order)")
    data.add_argument("--device", type=cli.device, default=None, help="default: cuda when available, else cpu")

    pre = p.add_argument_group("preprocessing (default: the checkpoint's, else the published one of a "
                               "recognised file, else torchvision's 256 / 224 / bilinear / ImageNet "
                               "statistics)")
    pre.add_argument("--resize", "--val-resize-size", dest="resize", type=cli.positive_int, default=None,
                     help="shorter side before the centre crop (as train.py's --val-resize-size)")
    pre.add_argument("--input-size", "--crop", "--val-crop-size", dest="input_size", type=cli.positive_int,
                     default=None, help="centre crop = network input size (as train.py's --val-crop-size)")
    pre.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=None)
    pre.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), default=None)
    pre.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"), default=None)

    out = p.add_argument_group("outputs")
    out.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    out.add_argument("--per-class", type=Path, nargs="?", const="-", default=None, metavar="FILE",
                     help="print top-1 of each class and the most confused pairs; with FILE also write them as "
                          "CSV (index, wnid, name, top1, count)")
    out.add_argument("--confusion", type=Path, default=None, metavar="FILE.png",
                     help="draw the confusion matrix (for more than 30 classes: the most confused pairs)")
    out.add_argument("--predictions", type=Path, default=None, help="write per-image top-5 as CSV")
    out.add_argument("--topk", type=cli.positive_int, default=5, help="classes shown per single image")
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
    exp.add_argument("--export-pte", type=Path, default=None,
                     help="write an ExecuTorch program for phones here (XNNPACK, float32, one image per call; "
                          "needs pip install executorch; INT8: quantize.py --export-pte)")
    exp.add_argument("--opset", type=cli.positive_int, default=17, help="ONNX opset")
    exp.add_argument("--export-tolerance", type=cli.positive_float, default=1e-4,
                     help="largest |logit difference| the exported model may show")
    return p


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
    return path, checkpoint.read_weights(path), digest, name, entry


def load_onnx_weights(args, device, log):
    """(path, model, metadata, sha256) for an ONNX file given as --weights: run by onnxruntime on the CPU,
    class order, names and preprocessing from the file's metadata (`inference.OnnxFileModel`)."""
    path = Path(args.weights)
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    clashes = [flag for flag, given in (("--ema", args.ema), ("--amp", args.amp), ("--compile", args.compile),
                                        ("--backend torch", args.backend == "torch"),
                                        ("--export-onnx", args.export_onnx),
                                        ("--export-torchscript", args.export_torchscript),
                                        ("--export-pte", args.export_pte)) if given]
    if clashes:
        raise UsageError(f"{clashes[0]} needs PyTorch weights, and --weights {path} is an ONNX file; drop it")
    if device.type != "cpu":
        raise UsageError(f"--weights {path}: an ONNX file runs in onnxruntime on the CPU, but --device is {device}; "
                         "use --device cpu")
    model = inference.OnnxFileModel(path)
    for flag, asked, held in (("--num-classes", args.num_classes, model.config["num_classes"]),
                              ("--width-mult", args.width_mult, model.config["width_mult"])):
        if asked is not None and held is not None and asked != held:
            raise UsageError(f"{flag} {asked:g}, but {path} holds {held:g}; drop the flag")
    log(f"{path}: {'INT8' if model.int8 else 'float'} ONNX graph, run by onnxruntime"
        + ("" if model.meta.get("data") else "; it records no preprocessing: torchvision's unless flags say otherwise"))
    return path, model, model.meta, sha256_of(path)


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
        source = "saved with the weights"
    flags = {"resize": args.resize, "input_size": args.input_size, "interpolation": args.interpolation,
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


def deployed_classes(args, meta, order, num_classes):
    """The classes an exported file carries ({"order", "wnids", "names"}): a folder-trained checkpoint's
    names exactly as the folders spell them (files are matched to folders by them), else `class_names`."""
    saved = meta.get("classes") or {}
    if saved.get("order") == image_folders.FOLDER_ORDER and len(saved.get("names") or []) == num_classes:
        return {"order": saved["order"], "wnids": None, "names": list(saved["names"])}
    wnids, names = class_names(args, meta, order, num_classes)
    return {"order": order, "wnids": wnids if all(wnids) else None, "names": names}


def deployed_preprocessing(pre, meta):
    """The preprocessing an exported file carries, with the images a folder run held out for validation."""
    split = (meta.get("data") or {}).get("val_split")
    return dict(pre, val_split=split) if split else dict(pre)


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
        return (list(saved.get("wnids") or [""] * num_classes),
                [image_folders.display_name(name) for name in saved["names"]])
    if num_classes == NUM_CLASSES and order == "sorted":
        wnids, names, _ = image_folders.imagenet_classes()  # torchvision's names, with their WNIDs
        return list(wnids), list(names)
    return [""] * num_classes, [f"class {i}" for i in range(num_classes)]


def main(args):
    """Run what the flags ask for; return the results dict. Errors end in one line and a non-zero exit."""
    try:
        return run(args)
    except cli.ScriptError as e:
        raise SystemExit(cli.report(e, "evaluate.py")) from None


def run(args):
    # an ONNX file runs in onnxruntime on the CPU, whatever GPU there is
    on_gpu = torch.cuda.is_available() and not inference.is_onnx_file(args.weights)
    device = args.device or torch.device("cuda" if on_gpu else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if not (args.images or args.data_dir or args.export_onnx or args.export_torchscript or args.export_pte):
        raise UsageError("nothing to do: give --data-dir, image files, --export-onnx, --export-torchscript or "
                         "--export-pte")
    if args.backend == "onnxruntime" and device.type != "cpu":
        raise UsageError(f"--backend onnxruntime scores on the CPU, but --device is {device}; add --device cpu")
    for flag, path in (("--json", args.json), ("--per-class", args.per_class), ("--predictions", args.predictions),
                       ("--confusion", args.confusion), ("--export-onnx", args.export_onnx),
                       ("--export-torchscript", args.export_torchscript), ("--export-pte", args.export_pte)):
        if path is not None and str(path) != "-":  # --per-class alone prints, writes nothing
            outputs.check_writable(path, flag)  # now, not after the whole scoring pass
    if device.type == "cuda" and not args.amp:
        # Scores in float32 as on the CPU: cuDNN's TF32 default rounds every convolution's inputs to
        # 10-bit mantissas (relative errors near 1e-3), enough to flip a near-tie prediction.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank, world, device, owned_group = distributed.init_from_environment(device)
    try:
        return _run(args, device, rank, world, cli.logger(rank == 0))
    finally:
        if owned_group:
            dist.destroy_process_group()


@dataclass
class Job:
    """The model made ready to score and what it needs to be read right."""
    model: nn.Module
    device: torch.device
    pre: dict               # preprocessing: resize, input_size, interpolation, mean, std
    order: str              # class order
    meta: dict              # what a repo checkpoint says of itself
    num_classes: int
    channels_last: bool
    rank: int = 0
    world: int = 1


def _run(args, device, rank, world, log):
    if inference.is_onnx_file(args.weights):
        path, model, meta, digest = load_onnx_weights(args, device, log)
        known_name = entry = None
    else:
        path, raw, digest, known_name, entry = resolve_weights(args, log)
        meta = checkpoint.meta(raw)
        model = build_model(args, raw)
        del raw
    num_classes = model.config["num_classes"]
    pre, pre_source = resolve_preprocessing(args, meta, entry)
    order = resolve_class_order(args, meta, entry, log)
    size = getattr(model, "size", None)  # an ONNX graph made for one input size
    if size and size != (pre["input_size"],) * 2:
        raise UsageError(f"--weights {path} takes {size[0]}x{size[1]} px inputs, not the {pre['input_size']} px "
                         f"crop; pass --input-size {size[0]}")
    width = model.config["width_mult"]
    log(f"weights {path} (width {'%g' % width if width else 'not recorded'}, {num_classes} classes, {order} "
        "class order); "
        f"preprocessing resize {pre['resize']}, crop {pre['input_size']}, {pre['interpolation']}, "
        f"mean {pre['mean']}, std {pre['std']} ({pre_source})")
    result = {"weights": str(path), "sha256": digest, "known_weights": known_name,
              "published": entry["published"] if entry else None, "model_config": dict(model.config),
              "class_order": order, "preprocessing": pre}

    if (args.export_onnx or args.export_torchscript or args.export_pte) and rank == 0:
        deployed = inference.deployment_metadata(deployed_classes(args, meta, order, num_classes),
                                                 deployed_preprocessing(pre, meta), dict(model.config))
        result["export"] = run_exports(model, args.export_onnx, args.export_torchscript, pre["input_size"],
                                       args.opset, args.export_tolerance, log, deployed, args.export_pte)
    fast, channels_last, backend = fast_model(model, device, pre["input_size"], args.batch_size, args.amp,
                                              args.compile, args.plain, args.backend, log)
    if backend:
        result["backend"] = backend
    job = Job(fast, device, pre, order, meta, num_classes, channels_last, rank, world)

    if args.images:
        result["image_predictions"] = run_predict(args, job)
    elif args.data_dir is not None:
        result.update(run_scoring(args, job, log))
        if entry and pre_source == "published":
            p = entry["published"]
            log(f"published for {known_name} on the 50,000 val images: top-1 {p['top1']}%"
                + (f"  top-5 {p['top5']}%" if p["top5"] is not None else ""))
    if args.json and rank == 0:
        write_output(args.json, outputs.write_json, result)
    return result


def fast_model(model, device, input_size, batch_size, amp, compile, plain, backend, log):
    """(model to score with, wants channels_last input, backend name or None) as the speed flags ask."""
    if isinstance(model, inference.OnnxFileModel):  # already a graph for onnxruntime
        return model, False, "onnxruntime, INT8" if model.int8 else "onnxruntime"
    if plain:
        return model.to(device), False, None
    if amp or compile:
        # autocast needs the plain convolutions; torch.compile packs the weights itself
        fast, channels_last, name = inference.prepare_for_inference(model, device=device, pack=False), True, None
    else:
        fast, channels_last, name = inference.inference_model(model, device, backend, input_size, batch_size, log)
    if compile:
        example = inference.parity_input(input_size, min(batch_size, 8)).to(device)
        fast = inference.maybe_compile(fast, example.contiguous(memory_format=torch.channels_last), log)
    return fast, channels_last, name


def write_output(path, writer, *contents):
    """Write one output file atomically, making its folder; a failure is one line naming the file."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise outputs.OutputError(f"could not write {path}: {e.strerror or e}") from None
    writer(path, *contents)


def run_exports(model, onnx_path, torchscript_path, input_size, opset, tolerance, log, metadata=None,
                pte_path=None):
    # Exported models carry the folded convolutions: the same function, fewer operators to run. The
    # check compares with the model as loaded, so the folding is verified along with the export.
    model = model.cpu().eval()
    deploy = copy.deepcopy(model)
    inference.fold_batchnorm(deploy)
    report = {}
    for kind, target, export in (("onnx", onnx_path, inference.export_onnx),
                                 ("torchscript", torchscript_path, inference.export_torchscript),
                                 ("pte", pte_path, inference.export_pte)):
        if target is None:
            continue
        kwargs = {"opset": opset, "metadata": metadata} if kind == "onnx" else \
            {"metadata": metadata} if kind == "pte" else {}
        with outputs.staged(target) as staging:  # only a file that passed its check replaces the target
            diff = export(deploy, staging, input_size=input_size, reference=model, **kwargs)
            if diff is not None and not diff <= tolerance:
                raise EvaluationError(f"{target}: exported {kind} model differs from PyTorch by {diff:.2e} "
                                      f"(> {tolerance:g}); not written, do not deploy it")
        report[kind] = {"path": str(target), "max_abs_diff": diff}
        if diff is None:
            log(f"wrote {target} (onnxruntime not installed: the exported graph was not run)")
        else:
            log(f"wrote {target}: max |logit difference| to PyTorch {diff:.2e} (tolerance {tolerance:g})")
    return report


def run_predict(args, job):
    files = list_images(args.images)
    wnids, names = class_names(args, job.meta, job.order, job.num_classes)
    pre = job.pre
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    rows = predict_images(job.model, files, transform, job.device, pre["mean"], pre["std"], topk=args.topk,
                          batch_size=args.batch_size, channels_last=job.channels_last)
    out, errors = [], []
    for f, top, error in rows:
        if error:
            errors.append(error)
            print(f"evaluate.py: error: {error}", file=sys.stderr, flush=True)
            out.append({"file": str(f), "error": error})
            continue
        print(f)
        for i, prob in top:
            print(f"  {100 * prob:6.2f}%  {i:4d}  {wnids[i] + '  ' if wnids[i] else ''}{names[i]}")
        out.append({"file": str(f), "top": [{"index": i, "wnid": wnids[i], "name": names[i], "prob": prob}
                                            for i, prob in top]})
    if errors:
        if args.json:
            write_output(args.json, outputs.write_json, {"images": out})
        raise SystemExit(1)  # each failure already has its own line above
    return out


def imagenet_samples(args, job):
    """[(path, label)] of an ImageNet layout's val images and its Classes, checked against the weights'."""
    layout = find_layout(args.data_dir)
    classes = read_classes(layout, job.order)
    if len(classes.wnids) != job.num_classes:
        raise EvaluationError(f"the weights have {job.num_classes} classes but {args.data_dir} lists "
                              f"{len(classes.wnids)}; use weights trained on this data")
    saved = (job.meta.get("classes") or {}).get("wnids")
    if saved and list(saved) != list(classes.wnids):
        first = next(i for i, (a, b) in enumerate(zip(saved, classes.wnids)) if a != b)
        raise EvaluationError(f"the checkpoint's class {first} is {saved[first]} but {args.data_dir} "
                              f"puts {classes.wnids[first]} there; the devkit differs from the training one")
    return list_samples(layout, "val", classes), classes


def folder_samples(args, job, log):
    """[(path, the model's class index)] of a folder dataset, matched by class name (by WNID for ImageNet
    weights), and the model's Classes with the names to report."""
    saved = job.meta.get("classes")
    recorded = (job.meta.get("data") or {}).get("val_split")
    samples, index = image_folders.scoring_samples(
        args.data_dir, lambda folders: image_folders.model_index(folders, saved, job.num_classes, job.order, log),
        recorded, log)
    wnids, names = class_names(args, job.meta, job.order, job.num_classes)
    for folder, i in index.items():
        if names[i] == f"class {i}":  # weights without names, matched by position: the folder names it
            names[i] = folder
    return samples, Classes(job.order, wnids, names, [0] * job.num_classes)


def run_scoring(args, job, log):
    if image_folders.is_imagenet_layout(args.data_dir):
        samples, classes = imagenet_samples(args, job)
    else:
        samples, classes = folder_samples(args, job, log)
    if not samples:
        raise DataError(f"{args.data_dir}: no validation images found")
    if args.max_images:
        samples = samples[:args.max_images]
    pre = job.pre
    dataset = ImageNetDataset(samples, eval_transform(pre["input_size"], pre["resize"], pre["interpolation"]),
                              train=False)
    loader = build_loader(dataset, args.batch_size, EvalSampler(len(dataset), num_replicas=job.world, rank=job.rank),
                          num_workers=args.num_workers)
    stats = evaluate(job.model, loader, job.device, mean=pre["mean"], std=pre["std"],
                     channels_last=job.channels_last, amp=args.amp, progress=not args.no_progress,
                     collect_predictions=bool(args.predictions), per_class=True,
                     confusion=bool(args.per_class or args.confusion))
    log(f"top-1 {stats['top1']:.3f}%  top-5 {stats['top5']:.3f}%  mean per-class top-1 "
        f"{stats['mean_class_top1']:.3f}%  loss {stats['loss']:.4f}  "
        f"images {stats['images']} (failed to decode: {stats['failed']})  "
        f"{stats['images_per_s']:.1f} images/s on {job.world} x {job.device.type}")
    if stats["failed"]:
        log(f"warning: {stats['failed']} images did not decode and were scored as misses")
    correct, count = stats.pop("per_class_correct", None), stats.pop("per_class_count", None)
    predictions, confusion = stats.pop("predictions", None), stats.pop("confusion", None)
    if job.rank == 0:
        if args.per_class:
            stats["per_class"] = report_per_class(correct, count, confusion, classes, log)
            if str(args.per_class) != "-":
                write_output(args.per_class, write_per_class, correct, count, classes)
        if args.confusion:
            write_output(args.confusion, lambda path: outputs.plot_confusion(confusion, classes.names, path))
            log(f"wrote {args.confusion}")
        if args.predictions:
            write_output(args.predictions, write_predictions, predictions, samples, classes)
    return stats


def report_per_class(correct, count, confusion, classes, log):
    """Print top-1 of every class that has images and the most confused pairs; return the rows."""
    rows = [{"index": i, "name": classes.names[i], "top1": 100.0 * c / n, "count": n}
            for i, (c, n) in enumerate(zip(correct, count)) if n]
    log(f"per class ({len(rows)} with images): top-1, images, name")
    for row in rows:
        log(f"  {row['index']:4d}  {row['top1']:7.2f}%  {row['count']:6d}  {row['name']}")
    pairs = outputs.confused_pairs(confusion, top=5)
    if pairs:
        log("most confused (true -> predicted): " + "; ".join(
            f"{classes.names[t]} -> {classes.names[p]} ({n})" for t, p, n in pairs))
    return rows


def write_per_class(path, correct, count, classes):
    # classes without val images (a subset) have no accuracy to report
    rows = [[i, classes.wnids[i], classes.names[i], f"{100 * c / n:.3f}", n]
            for i, (c, n) in enumerate(zip(correct, count)) if n]
    outputs.write_csv(path, ["index", "wnid", "name", "top1", "count"], rows)


def write_predictions(path, predictions, samples, classes):
    k = max((len(p["top5"]) for p in predictions), default=5)
    rows = []
    for p in predictions:
        target = p["target"]
        row = [p["index"], samples[p["index"]][0], target, classes.wnids[target], int(p["failed"])]
        for c, prob in zip(p["top5"], p["prob5"]):
            row += [c, classes.wnids[c], f"{prob:.6f}"]
        rows.append(row)
    outputs.write_csv(path, ["index", "file", "target", "target_wnid", "failed"]
                      + [f"{col}{j + 1}" for j in range(k) for col in ("pred", "wnid", "prob")], rows)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
