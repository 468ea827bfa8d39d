"""Scoring a weights file end to end, as evaluate.py does: what the user named resolved into a model, its
preprocessing and class order; the data; the score and its reports; the exports.
"""
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mnv2 import cli, distributed, outputs, resolve
from mnv2.cli import UsageError
from mnv2.data import folders as image_folders
from mnv2.data.imagenet import NUM_CLASSES, Classes, DataError, find_layout, list_samples, read_classes
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader
from mnv2.data.transforms import eval_transform
from mnv2.deploy import export, inference, onnx_weights
from mnv2.scoring import EvaluationError, evaluate, list_images, predict_images


def check_onnx_flags(args, device):
    """An ONNX file given as --weights runs in onnxruntime on the CPU: the flags that need PyTorch weights
    or another device are refused in one line before anything is read."""
    clashes = [flag for flag, given in (("--ema", args.ema), ("--amp", args.amp), ("--compile", args.compile),
                                        ("--backend torch", args.backend == "torch"),
                                        ("--export-onnx", args.export_onnx),
                                        ("--export-torchscript", args.export_torchscript),
                                        ("--export-pte", args.export_pte)) if given]
    if clashes:
        raise UsageError(f"{clashes[0]} needs PyTorch weights, and --weights {args.weights} is an ONNX file; "
                         "drop it")
    if device.type != "cpu":
        raise UsageError(f"--weights {args.weights}: an ONNX file runs in onnxruntime on the CPU, but --device "
                         f"is {device}; use --device cpu")


def resolve_args(args, log, allow_onnx=True):
    """resolve.weights with the flags evaluate.py and quantize.py share."""
    return resolve.weights(args.weights, flag="--weights", pretrained_dir=args.pretrained_dir,
                           num_classes=args.num_classes, width_mult=args.width_mult,
                           use_ema=getattr(args, "ema", False), class_order=args.class_order,
                           preprocessing={"resize": args.resize, "input_size": args.input_size,
                                          "interpolation": args.interpolation, "mean": args.mean, "std": args.std},
                           allow_onnx=allow_onnx, log=log)


def deployed_classes(data_dir, meta, order, num_classes):
    """The classes an exported file carries ({"order", "wnids", "names"}): a folder-trained checkpoint's
    names exactly as the folders spell them (files are matched to folders by them), else `class_names`."""
    saved = meta.get("classes") or {}
    if saved.get("order") == image_folders.FOLDER_ORDER and len(saved.get("names") or []) == num_classes:
        return {"order": saved["order"], "wnids": None, "names": list(saved["names"])}
    wnids, names = class_names(data_dir, meta, order, num_classes)
    return {"order": order, "wnids": wnids if all(wnids) else None, "names": names}


def deployed_preprocessing(pre, meta):
    """The preprocessing an exported file carries, with the images a folder run held out for validation."""
    split = (meta.get("data") or {}).get("val_split")
    return dict(pre, val_split=split) if split else dict(pre)


def class_names(data_dir, meta, order, num_classes):
    """(wnids, names) in the model's label order: the devkit's meta.mat when --data-dir has one, else the
    names saved with a checkpoint, else torchvision's list (sorted order only), else placeholders."""
    if data_dir is not None and is_imagenet_data(data_dir, order):
        try:
            classes = read_classes(find_layout(data_dir), order)
            if len(classes.wnids) == num_classes:  # a 10-class model's outputs are not the devkit's classes
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

def run(args):
    # an ONNX file runs in onnxruntime on the CPU, whatever GPU there is
    on_gpu = torch.cuda.is_available() and not onnx_weights.is_onnx_file(args.weights)
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
    if onnx_weights.is_onnx_file(args.weights):
        check_onnx_flags(args, device)
    resolved = resolve_args(args, log)
    path, model, digest, meta, entry = resolved.path, resolved.model, resolved.sha256, resolved.meta, resolved.entry
    if isinstance(model, onnx_weights.OnnxFileModel):
        log(f"{path}: {'INT8' if model.int8 else 'float'} ONNX graph, run by onnxruntime"
            + ("" if meta.get("data") else "; it records no preprocessing: torchvision's unless flags say otherwise"))
    num_classes = model.config["num_classes"]
    pre, pre_source, order = resolved.preprocessing, resolved.preprocessing_source, resolved.class_order
    size = getattr(model, "size", None)  # an ONNX graph made for one input size
    if size and size != (pre["input_size"],) * 2:
        raise UsageError(f"--weights {path} takes {size[0]}x{size[1]} px inputs, not the {pre['input_size']} px "
                         f"crop; pass --input-size {size[0]}")
    width = model.config["width_mult"]
    log(f"weights {path} (width {'%g' % width if width else 'not recorded'}, {num_classes} classes, {order} "
        "class order); "
        f"preprocessing resize {pre['resize']}, crop {pre['input_size']}, {pre['interpolation']}, "
        f"mean {pre['mean']}, std {pre['std']} ({pre_source})")
    result = {"weights": str(path), "sha256": digest, "known_weights": resolved.known,
              "published": entry["published"] if entry else None, "model_config": dict(model.config),
              "class_order": order, "preprocessing": pre}

    if (args.export_onnx or args.export_torchscript or args.export_pte) and rank == 0:
        deployed = export.deployment_metadata(deployed_classes(args.data_dir, meta, order, num_classes),
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
            log(f"published for {resolved.known} on the 50,000 val images: top-1 {p['top1']}%"
                + (f"  top-5 {p['top5']}%" if p["top5"] is not None else ""))
    if args.json and rank == 0:
        write_output(args.json, outputs.write_json, result)
    return result


def fast_model(model, device, input_size, batch_size, amp, compile, plain, backend, log):
    """(model to score with, wants channels_last input, backend name or None) as the speed flags ask."""
    if isinstance(model, onnx_weights.OnnxFileModel):  # already a graph for onnxruntime
        return model, False, "onnxruntime, INT8" if model.int8 else "onnxruntime"
    if plain:
        return model.to(device), False, None
    if amp or compile:
        # autocast needs the plain convolutions; torch.compile packs the weights itself
        fast, channels_last, name = inference.prepare_for_inference(model, device=device, pack=False), True, None
    else:
        fast, channels_last, name = inference.inference_model(model, device, backend, input_size, batch_size, log)
    if compile:
        example = export.parity_input(input_size, min(batch_size, 8)).to(device)
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
    for kind, target, write in (("onnx", onnx_path, export.export_onnx),
                                 ("torchscript", torchscript_path, export.export_torchscript),
                                 ("pte", pte_path, export.export_pte)):
        if target is None:
            continue
        kwargs = {"opset": opset, "metadata": metadata} if kind == "onnx" else \
            {"metadata": metadata} if kind == "pte" else {}
        with outputs.staged(target) as staging:  # only a file that passed its check replaces the target
            try:
                diff = write(deploy, staging, input_size=input_size, reference=model, **kwargs)
            except cli.ScriptError:
                raise
            except Exception as e:  # the exporter's own failure: a torch.onnx, torch.jit or ExecuTorch error
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                raise EvaluationError(f"{target}: the {kind} export failed ({type(e).__name__}: {reason}); "
                                      "nothing was written") from None
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
    wnids, names = class_names(args.data_dir, job.meta, job.order, job.num_classes)
    pre = job.pre
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    rows = predict_images(job.model, files, transform, job.device, pre["mean"], pre["std"], topk=args.topk,
                          batch_size=args.batch_size, channels_last=job.channels_last)
    out, errors = [], []
    for f, top, error in rows:
        if error:
            errors.append(error)
            print(f"evaluate.py: error: {cli.printable(error)}", file=sys.stderr, flush=True)
            out.append({"file": str(f), "error": error})
            continue
        print(cli.printable(f))
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
    wnids, names = class_names(args.data_dir, job.meta, job.order, job.num_classes)
    for folder, i in index.items():
        if names[i] == f"class {i}":  # weights without names, matched by position: the folder names it
            names[i] = image_folders.display_name(folder)
    return samples, Classes(job.order, wnids, names, [0] * job.num_classes)


def is_imagenet_data(data_dir, order):
    """Whether to read `data_dir` as ImageNet (devkit, WNID order) rather than as a folder of classes: weights
    trained on folders are always scored on folders, whatever the layout looks like (a train/ + val/ of
    classes is also torchvision's ImageNet layout)."""
    return order != image_folders.FOLDER_ORDER and image_folders.is_imagenet_layout(data_dir)


def spread(samples, count):
    """The first `count` samples taken class by class in turn (each class's first image, then each one's
    second, ...), in their order: a --max-images subset of class folders covers every class, not the first few."""
    ranked = {}
    order = []
    for i, (_, label) in enumerate(samples):
        order.append((ranked.get(label, 0), i))
        ranked[label] = ranked.get(label, 0) + 1
    return [samples[i] for i in sorted(i for _, i in sorted(order)[:count])]


def run_scoring(args, job, log):
    imagenet = is_imagenet_data(args.data_dir, job.order)
    samples, classes = imagenet_samples(args, job) if imagenet else folder_samples(args, job, log)
    if not samples:
        raise DataError(f"{args.data_dir}: no validation images found")
    if args.max_images:  # ImageNet's val files come in no class order; class folders do
        samples = samples[:args.max_images] if imagenet else spread(samples, args.max_images)
    pre = job.pre
    dataset = ImageNetDataset(samples, eval_transform(pre["input_size"], pre["resize"], pre["interpolation"]),
                              train=False)
    loader = build_loader(dataset, args.batch_size, EvalSampler(len(dataset), num_replicas=job.world, rank=job.rank),
                          num_workers=args.num_workers)
    stats = evaluate(job.model, loader, job.device, mean=pre["mean"], std=pre["std"],
                     channels_last=job.channels_last, amp=args.amp, progress=not args.no_progress,
                     collect_predictions=bool(args.predictions), per_class=True,
                     confusion=bool(args.per_class or args.confusion))
    if job.num_classes <= 5:  # top-5 of 5 classes or fewer is 100% by definition
        stats["top5"] = None
    top5 = f"  top-5 {stats['top5']:.3f}%" if stats["top5"] is not None else ""
    log(f"top-1 {stats['top1']:.3f}%{top5}  mean per-class top-1 "
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
        row = [p["index"], samples[p["index"]][0], target, classes.wnids[target], classes.names[target],
               int(p["failed"])]
        for c, prob in zip(p["top5"], p["prob5"]):
            row += [c, classes.wnids[c], classes.names[c], f"{prob:.6f}"]
        rows.append(row)
    outputs.write_csv(path, ["index", "file", "target", "target_wnid", "target_name", "failed"]
                      + [f"{col}{j + 1}" for j in range(k) for col in ("pred", "wnid", "name", "prob")], rows)
