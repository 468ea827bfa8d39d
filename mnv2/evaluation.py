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

from mnv2 import checkpoint, cli, distributed, hub, outputs, resolve
from mnv2.cli import UsageError
from mnv2.data import folders as image_folders
from mnv2.data import robust, shards
from mnv2.data.imagenet import NUM_CLASSES, Classes, DataError, find_layout, list_samples, read_classes
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader
from mnv2.data.transforms import eval_transform
from mnv2.deploy import export, inference, onnx_weights
from mnv2.scoring import EvaluationError, evaluate, list_images, predict_images

REAL_FROM_TIMM = Path("<timm's copy>")  # --real-labels without a file


def check_onnx_flags(args, device):
    """An ONNX file given as --weights runs in onnxruntime on the CPU: the flags that need PyTorch weights
    or another device are refused in one line before anything is read."""
    clashes = [flag for flag, given in (("--ema", args.ema), ("--amp", args.amp), ("--compile", args.compile),
                                        ("--backend torch", args.backend == "torch"),
                                        ("--export-onnx", args.export_onnx),
                                        ("--export-pt2", args.export_pt2),
                                        ("--export-pte", args.export_pte), ("--export-hub", args.export_hub)) if given]
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
    if args.data_dir is not None and not shards.exists(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if args.sets is not None and (args.data_dir is not None or args.images):
        raise UsageError("--sets ROOT scores every set it finds there; drop --data-dir and image files")
    if args.sets is not None and not args.sets.is_dir():
        raise UsageError(f"--sets {args.sets}: no such directory")
    if args.table is not None and args.sets is None:
        raise UsageError("--table writes the table of --sets ROOT; add --sets")
    if args.export_torchscript is not None:
        raise UsageError(f"--export-torchscript {args.export_torchscript}: PyTorch has deprecated TorchScript "
                         "(torch.jit); write --export-pt2 FILE (torch.export, for Python and AOTInductor) or "
                         "--export-onnx FILE instead")
    if args.opset is not None and args.export_onnx and args.onnx_exporter == "dynamo" \
            and args.opset < export.DYNAMO_MIN_OPSET:
        raise UsageError(f"--opset {args.opset}: the dynamo ONNX exporter writes opset {export.DYNAMO_MIN_OPSET} "
                         "or later; raise --opset or add --onnx-exporter torchscript")
    if not (args.images or args.data_dir or args.sets or args.export_onnx or args.export_pt2 or args.export_pte
            or args.export_hub):
        raise UsageError("nothing to do: give --data-dir, image files, --export-onnx, --export-pt2, --export-pte or "
                         "--export-hub")
    if args.export_hub is not None and args.export_hub.exists() and (not args.export_hub.is_dir()
                                                                     or any(args.export_hub.iterdir())):
        raise UsageError(f"--export-hub {args.export_hub}: already exists and is not an empty folder; name a new "
                         "folder (nothing there is replaced)")
    if args.backend == "onnxruntime" and device.type != "cpu":
        raise UsageError(f"--backend onnxruntime scores on the CPU, but --device is {device}; add --device cpu")
    for flag, path in (("--json", args.json), ("--per-class", args.per_class), ("--predictions", args.predictions),
                       ("--confusion", args.confusion), ("--export-onnx", args.export_onnx), ("--table", args.table),
                       ("--export-pt2", args.export_pt2), ("--export-pte", args.export_pte)):
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
    onnx_candidate: nn.Module = None  # --backend auto on the CPU: the model to export once the data is large


# --backend auto moves CPU scoring to onnxruntime from this many images: its graph is about twice as fast as
# PyTorch's eager one here, and exporting it (PyTorch's dynamo exporter) costs about 5-8 s once
ONNX_MIN_IMAGES = 1000


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

    if (args.export_onnx or args.export_pt2 or args.export_pte) and rank == 0:
        deployed = export.deployment_metadata(deployed_classes(args.data_dir, meta, order, num_classes),
                                                 deployed_preprocessing(pre, meta), dict(model.config))
        result["export"] = run_exports(model, args.export_onnx, args.export_pt2, pre["input_size"],
                                       args.opset, args.export_tolerance, log, deployed, args.export_pte,
                                       onnx_exporter=args.onnx_exporter)
    if args.export_hub is not None and rank == 0:
        result.setdefault("export", {})["hub"] = export_hub(model, args.export_hub, path, digest, meta, order,
                                                            num_classes, pre, args, log)
    deferred = args.backend == "auto" and device.type == "cpu" and not (args.amp or args.compile or args.plain) \
        and not isinstance(model, onnx_weights.OnnxFileModel)
    fast, channels_last, backend = fast_model(model, device, pre["input_size"], args.batch_size, args.amp,
                                              args.compile, args.plain, "torch" if deferred else args.backend, log)
    if backend:
        result["backend"] = backend
    job = Job(fast, device, pre, order, meta, num_classes, channels_last, rank, world,
              onnx_candidate=model if deferred else None)

    if args.images:
        result["image_predictions"] = run_predict(args, job)
    elif args.sets is not None:
        result["sets"] = run_sets(args, job, log)
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


def run_exports(model, onnx_path, pt2_path, input_size, opset, tolerance, log, metadata=None,
                pte_path=None, onnx_exporter="dynamo"):
    # Exported models carry the folded convolutions: the same function, fewer operators to run. The
    # check compares with the model as loaded, so the folding is verified along with the export.
    model = model.cpu().eval()
    deploy = copy.deepcopy(model)
    inference.fold_batchnorm(deploy)
    report = {}
    for kind, target, write in (("onnx", onnx_path, export.export_onnx),
                                 ("pt2", pt2_path, export.export_pt2),
                                 ("pte", pte_path, export.export_pte)):
        if target is None:
            continue
        kwargs = {"opset": opset, "metadata": metadata, "exporter": onnx_exporter} if kind == "onnx" else \
            {"metadata": metadata} if kind == "pte" else {}
        with outputs.staged(target) as staging:  # only a file that passed its check replaces the target
            try:
                diff = write(deploy, staging, input_size=input_size, reference=model, **kwargs)
            except cli.ScriptError:
                raise
            except Exception as e:  # the exporter's own failure: a torch.onnx, torch.export or ExecuTorch error
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                raise EvaluationError(f"{target}: the {kind} export failed ({type(e).__name__}: {reason}); "
                                      "nothing was written") from None
            if diff is not None and not diff <= tolerance:
                raise EvaluationError(f"{target}: exported {kind} model differs from PyTorch by {diff:.2e} "
                                      f"(> {tolerance:g}); not written, do not deploy it")
        report[kind] = {"path": str(target), "max_abs_diff": diff}
        if kind == "onnx":
            report[kind]["exporter"] = onnx_exporter
        if diff is None:
            log(f"wrote {target} (onnxruntime not installed: the exported graph was not run)")
        else:
            how = f" ({onnx_exporter} exporter)" if kind == "onnx" else ""
            log(f"wrote {target}{how}: max |logit difference| to PyTorch {diff:.2e} (tolerance {tolerance:g})")
    return report


def export_hub(model, folder, path, digest, meta, order, num_classes, pre, args, log):
    """Write the timm / Hugging Face Hub folder of `model` (mnv2.hub.write_folder), with what the weights
    file knows about its training on the model card."""
    classes = deployed_classes(args.data_dir, meta, order, num_classes)
    facts = hub.card_facts(checkpoint.read_weights(path), path, digest)
    try:
        # the preprocessing with the images a --val-split run held out, so the folder is scored on them alone
        arch, diff = hub.write_folder(model, folder, classes, deployed_preprocessing(pre, meta), facts,
                                      tolerance=args.export_tolerance)
    except hub.HubError as e:
        raise EvaluationError(f"--export-hub {folder}: {e}") from None
    log(f"wrote {folder}: timm {arch}, {num_classes} classes (model.safetensors, config.json, README.md); timm's "
        f"logits from it are within {diff:.1e} of these; publish with: hf upload ORG/NAME {folder}")
    return {"path": str(folder), "architecture": arch, "max_abs_diff": diff}


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


def open_packed(data_dir, order, log):
    """The shard set or the official archives at `data_dir` (archives.Packed), or None; the archives are
    read in the weights' class order, a shard set in its own (labels are mapped by `packed_labels`)."""
    return shards.open_data(data_dir, order, note=log, strict_order=False)


def packed_labels(packed, meta, order, num_classes, log):
    """([the model's index for each class of the packed data], the model's Classes): by the class names or
    WNIDs the weights saved, by WNID for ImageNet weights, by position when both share one class order."""
    ids = image_folders.identities(packed.classes)
    saved = meta.get("classes") or {}
    if packed.classes.order == order and len(ids) == num_classes and not saved.get("names"):
        to_model = list(range(num_classes))
    else:
        index = image_folders.model_index(ids, saved, num_classes, order, log)
        to_model = [index[i] for i in ids]
    wnids, names = class_names(None, meta, order, num_classes)
    for label, i in enumerate(to_model):
        if names[i] == f"class {i}":  # weights without names: the data names the class
            wnids[i], names[i] = packed.classes.wnids[label], packed.classes.names[label]
    return to_model, Classes(order, wnids, names, [0] * num_classes)


def packed_samples(packed, job, log):
    """[(member, the model's class index)] of the packed data's val split, and the model's Classes."""
    if not packed.splits.get("val"):
        raise DataError(f"{packed.where}: no validation split to score")
    to_model, classes = packed_labels(packed, job.meta, job.order, job.num_classes, log)
    return [(m, to_model[label]) for m, label in packed.splits["val"]], classes


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


def onnx_for_large_data(job, count, log):
    """--backend auto: score `count` images in onnxruntime when they are many enough to repay its export
    (`ONNX_MIN_IMAGES`); the job's model changes in place. Returns the backend's name when it changed."""
    if job.onnx_candidate is None or count < ONNX_MIN_IMAGES:
        return None
    try:
        job.model = inference.OnnxRuntimeModel(job.onnx_candidate, job.pre["input_size"])
    except (ImportError, export.InferenceError) as e:
        log(f"note: scoring in PyTorch, onnxruntime not used ({e})")
        return None
    job.channels_last = False
    return "onnxruntime"


def sorted_to_model_index(job):
    """[model output index] for each of the 1000 classes in sorted-WNID order, or an error naming what
    is missing: weights in devkit order must say which WNID each output is."""
    wnids = image_folders.imagenet_classes()[0]
    if job.num_classes != NUM_CLASSES:
        raise EvaluationError(f"the weights have {job.num_classes} classes; the ImageNet evaluation sets need "
                              f"ImageNet-1k weights ({NUM_CLASSES} classes)")
    if job.order == "sorted":
        return list(range(NUM_CLASSES))
    saved = (job.meta.get("classes") or {}).get("wnids") or []
    if sorted(saved) != list(wnids):
        raise EvaluationError(f"the weights are in {job.order} class order without their WNIDs; pass "
                              "--class-order sorted if they follow torchvision's order")
    position = {w: i for i, w in enumerate(saved)}
    return [position[w] for w in wnids]


def recognised_set(args, job):
    """The evaluation set at --data-dir (robust.Found) or None for ImageNet val and folders of classes.
    Recognised from the layout only for ImageNet-1k weights; ImageNet-A/-R/-Sketch only when complete or
    named so (a few WNID folders of someone's own are scored as folders of classes)."""
    if job.order == image_folders.FOLDER_ORDER or job.num_classes != NUM_CLASSES and not args.dataset:
        return None
    if not args.dataset and is_imagenet_data(args.data_dir, job.order):
        return None
    if args.dataset in robust.CLEAN:
        if not is_imagenet_data(args.data_dir, job.order):
            raise UsageError(f"--dataset {args.dataset} scores ImageNet val on those 200 classes, but "
                             f"{args.data_dir} is not an ImageNet layout")
        return robust.Found(args.dataset, args.data_dir, expected=200)
    found = robust.recognise(args.data_dir, args.dataset, image_folders.imagenet_classes()[0])
    if found is None or args.dataset or found.name.startswith("imagenet-v2"):
        return found
    complete = len(found.folders) == found.expected
    return found if complete or robust.named_as(found.name, args.data_dir) else None


def robust_samples(args, job, found, log):
    """Samples, Classes, the report and the model outputs to restrict the logits to (A/R: their 200; else
    None) for a recognised set."""
    model_index = sorted_to_model_index(job)
    samples, report = robust.samples(found, model_index)
    wnids, names = class_names(None, job.meta, job.order, job.num_classes)
    restrict = None
    if found.subset is not None:
        restrict = [model_index[i] for i in found.subset]
        wnids, names = [wnids[i] for i in restrict], [names[i] for i in restrict]
    missing = f", {report['classes_missing']} of its {report['classes_expected']} classes missing" \
        if report["classes_missing"] else ""
    log(f"recognised {found.name}: {report['images']} images in {report['classes']} classes{missing}"
        + ("; logits restricted to its 200 classes" if found.subset is not None else ""))
    return samples, Classes(job.order, wnids, names, [0] * len(names)), report, restrict


def run_scoring(args, job, log):
    packed = open_packed(args.data_dir, job.order, log)
    found = recognised_set(args, job) if packed is None else None
    imagenet = packed.imagenet if packed is not None else found is None and is_imagenet_data(args.data_dir, job.order)
    report = restrict = None
    if packed is not None:
        samples, classes = packed_samples(packed, job, log)
    elif found is not None and found.name in robust.CLEAN:
        samples, classes = imagenet_samples(args, job)
        samples, restrict = robust.clean_val(samples, found.name, sorted_to_model_index(job))
        classes = Classes(job.order, [classes.wnids[i] for i in restrict], [classes.names[i] for i in restrict],
                          [0] * len(restrict))
        present = len({label for _, label in samples})
        report = {"set": found.name, "images": len(samples), "classes": present, "classes_expected": 200,
                  "classes_missing": 200 - present}
        log(f"{found.name}: ImageNet val restricted to {found.name[:-6]}'s 200 classes: {len(samples)} images in "
            f"{present} classes; logits restricted to those classes")
        imagenet = True
    elif found is not None:
        samples, classes, report, restrict = robust_samples(args, job, found, log)
    else:
        samples, classes = imagenet_samples(args, job) if imagenet else folder_samples(args, job, log)
    if not samples:
        raise DataError(f"{args.data_dir}: no validation images found")
    backend = onnx_for_large_data(job, len(samples), log)
    if restrict is not None:
        job.model = robust.Restricted(job.model, restrict)
    real = None
    if args.real_labels is not None:
        if not imagenet or found is not None:
            raise UsageError(f"--real-labels scores ImageNet val, but {args.data_dir} is not an ImageNet layout")
        labels = robust.real_labels(None if args.real_labels == REAL_FROM_TIMM else args.real_labels)
        real = robust.real_targets(samples, labels)
    if args.max_images:  # ImageNet's val files come in no class order; class folders do
        samples = samples[:args.max_images] if imagenet else spread(samples, args.max_images)
        real = real[:len(samples)] if real is not None else None
    pre = job.pre
    dataset = ImageNetDataset(samples, eval_transform(pre["input_size"], pre["resize"], pre["interpolation"]),
                              train=False)
    loader = build_loader(dataset, args.batch_size, EvalSampler(len(dataset), num_replicas=job.world, rank=job.rank),
                          num_workers=args.num_workers)
    stats = evaluate(job.model, loader, job.device, mean=pre["mean"], std=pre["std"],
                     channels_last=job.channels_last, amp=args.amp, progress=not args.no_progress,
                     collect_predictions=bool(args.predictions) or real is not None, per_class=True,
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
    if backend is not None:
        stats["backend"] = backend
    if found is not None:
        stats["set"] = report
    if real is not None:
        stats["real"] = robust.real_scores(stats["predictions"], real, sorted_to_model_index(job))
        log(f"ReaL top-1 {stats['real']['top1']:.3f}%  top-5 {stats['real']['top5']:.3f}%  images "
            f"{stats['real']['images']} (skipped, no ReaL label: {stats['real']['skipped']})")
        if not args.predictions:
            stats.pop("predictions")
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


def find_sets(root):
    """[(name, folder)] of the evaluation sets in `root` and its subfolders: ImageNet val (scored with ReaL too
    where timm's labels are there) and its clean A/R rows, ImageNet-V2, -A, -R, -Sketch, as their layouts say."""
    wnids = image_folders.imagenet_classes()[0]
    found = []
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if image_folders.is_imagenet_layout(folder):
            try:
                if find_layout(folder).val_dir is not None:
                    found += [(name, folder) for name in ("imagenet", *robust.CLEAN)]
            except DataError:
                pass
            continue
        try:
            match = robust.recognise(folder, None, wnids)
        except DataError:
            continue
        if match is not None and (match.name.startswith("imagenet-v2") or robust.named_as(match.name, folder)
                                  or len(match.folders) == match.expected):
            found.append((match.name, folder))
    return found


def run_sets(args, job, log):
    """Score the weights on every set `find_sets` finds under --sets; print and write the table (markdown,
    and CSV beside it) with timm's published mobilenetv2_100 row for comparison."""
    sets = find_sets(args.sets)
    if not sets:
        raise DataError(f"--sets {args.sets}: no evaluation set found there or in its subfolders (ImageNet val, "
                        "-V2 folders 0..999, -A/-R 200 WNID folders, -Sketch 1000 WNID folders)")
    rows = []
    for name, folder in sets:
        log(f"--- {name}: {folder}")
        one = copy.copy(args)
        one.data_dir, one.predictions, one.per_class, one.confusion = folder, None, None, None
        one.dataset = name if name in robust.CLEAN else None
        one.real_labels = REAL_FROM_TIMM if name == "imagenet" else None  # ReaL in the same pass as val
        try:
            stats = run_scoring(one, copy.copy(job), log)
        except (DataError, EvaluationError) as e:
            if name != "imagenet" or one.real_labels is None:
                raise
            log(f"ReaL not scored ({e})")
            one.real_labels = None
            stats = run_scoring(one, copy.copy(job), log)
        set_report = stats.get("set") or {}
        rows.append({"set": name, "top1": stats["top1"], "top5": stats["top5"], "images": stats["images"],
                     "failed": stats["failed"], "classes_missing": set_report.get("classes_missing", 0),
                     "timm_mobilenetv2_100_top1": robust.TIMM_MOBILENETV2_100.get(name), "folder": str(folder)})
        if "real" in stats:
            r = stats["real"]
            rows.append({"set": "imagenet-real", "top1": r["top1"], "top5": r["top5"], "images": r["images"],
                         "failed": stats["failed"], "classes_missing": 0,
                         "timm_mobilenetv2_100_top1": robust.TIMM_MOBILENETV2_100["imagenet-real"],
                         "folder": str(folder)})
    table = robust.markdown_table(rows, args.weights)
    log(table)
    if args.table is not None and job.rank == 0:
        write_output(args.table, lambda path: outputs.atomic_write(path, table + "\n"))
        csv_path = args.table.with_suffix(".csv")
        write_output(csv_path, outputs.write_csv, list(rows[0]), [list(r.values()) for r in rows])
        log(f"wrote {args.table} and {csv_path}")
    return rows


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
