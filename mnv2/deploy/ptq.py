"""Post-training INT8 quantization as quantize.py runs it: the weights resolved, calibration and scored images
chosen, the QDQ ONNX file (and the ExecuTorch program) written, float and INT8 compared for accuracy and speed.
"""
import random
import statistics
import time

import torch

from mnv2 import cli, evaluation, outputs, resolve, scoring
from mnv2.cli import UsageError
from mnv2.data import folders as image_folders
from mnv2.data import shards
from mnv2.data.imagenet import DataError, find_layout, list_samples, read_classes
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader
from mnv2.data.transforms import eval_transform, normalize
from mnv2.deploy import export, inference, onnx_weights, quantization

# Chosen on the demo checkpoint with bench/bench_int8.py (README, "INT8 for CPUs and phones"): 512 images
# are within 0.5 dB SQNR of all 1,442 and 4-5 dB above 128; minmax leads entropy and percentile. Not yet
# measured on ImageNet weights.
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_METHOD = "minmax"
MIN_CALIBRATION_IMAGES = 32  # below it, a warning
HELD_OUT_IMAGES = 1000  # scored when the data has no val images and --max-images is not given



class QuantizeError(cli.ScriptError, RuntimeError):
    """Something found while running (data that does not fit the weights): exit code 1."""


def run(args):
    """quantize.py's steps: check the outputs, resolve the weights, choose the images, write, compare."""
    log = cli.logger(True)
    check_outputs(args)
    if args.calibration_images < MIN_CALIBRATION_IMAGES:
        log(f"warning: --calibration-images {args.calibration_images}: activation ranges set on so few images "
            f"follow those images, not the data; {DEFAULT_CALIBRATION_IMAGES} is the measured default")
    resolved = resolve.weights(args.weights, flag="--weights", pretrained_dir=args.pretrained_dir,
                               num_classes=args.num_classes, width_mult=args.width_mult, use_ema=args.ema,
                               class_order=args.class_order,
                               preprocessing={"resize": args.resize, "input_size": args.input_size,
                                              "interpolation": args.interpolation, "mean": args.mean, "std": args.std},
                               allow_onnx=False, log=log)
    model, pre, order = resolved.model, resolved.preprocessing, resolved.class_order
    log(f"weights {resolved.path} (width {model.config['width_mult']:g}, {model.config['num_classes']} classes, "
        f"{order} class order); preprocessing resize {pre['resize']}, crop {pre['input_size']}, "
        f"{pre['interpolation']}, mean {pre['mean']}, std {pre['std']} ({resolved.preprocessing_source})")
    deployed, calibration_samples, scored_samples, scored_on = choose_images(args, resolved, log)
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    calibration = quantization.CalibrationImages(calibration_samples, transform, pre, args.batch_size,
                                               args.num_workers)
    scored = ImageNetDataset(scored_samples, transform, train=False)
    recipe = {"calibration_method": args.calibration_method, "bias_correction": args.bias_correction,
              "calibration_images": len(calibration_samples), "calibration_seed": args.seed,
              "weights": "int8, symmetric, one scale per output channel", "source_sha256": resolved.sha256}

    def metadata(activations):
        return export.deployment_metadata(
            deployed, evaluation.deployed_preprocessing(pre, resolved.meta), dict(model.config),
            int8=dict(recipe, activations=activations))

    result = {"weights": str(resolved.path), "sha256": resolved.sha256, "model_config": dict(model.config),
              "class_order": order, "preprocessing": pre, "recipe": recipe}
    float_model = inference.OnnxRuntimeModel(model, pre["input_size"])
    int8_models = write_int8(model, calibration, scored, pre, args, metadata, result, log)
    result["calibration_images"] = calibration.used
    result["accuracy"] = compare_accuracy(float_model, int8_models, scored, pre, args, scored_on, log,
                                          model.config["num_classes"])
    if not args.no_speed and args.out is not None:
        result["speed"] = compare_speed(float_model, int8_models["INT8 ONNX"], args.batch_size, pre["input_size"],
                                        log)
    if args.json:
        evaluation.write_output(args.json, outputs.write_json, result)
    return result


def check_outputs(args):
    """What quantize.py is asked to write and read, checked before anything is computed."""
    if args.out is None and args.export_pte is None:
        raise UsageError("nothing to write: give --out model.int8.onnx and/or --export-pte model.int8.pte")
    if args.out is not None and args.out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {args.out}: name the file *.onnx, so evaluate.py reads it as ONNX")
    if not shards.exists(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory")
    if onnx_weights.is_onnx_file(args.weights):
        raise UsageError(f"--weights {args.weights}: quantize.py takes PyTorch weights (it folds and corrects them "
                         "before quantizing); pass the checkpoint the ONNX file was exported from")
    for flag, path in (("--out", args.out), ("--export-pte", args.export_pte), ("--json", args.json)):
        if path is not None:
            outputs.check_writable(path, flag)  # now, not after minutes of calibration and scoring


def choose_images(args, resolved, log):
    """(the classes the INT8 file carries, calibration samples, scored samples, what was scored) for the
    data in --data-dir: ImageNet's layouts, or a folder of classes (calibrated on the images a --val-split
    run did not hold out, scored on those it did)."""
    num_classes, meta, order = resolved.model.config["num_classes"], resolved.meta, resolved.class_order
    packed = evaluation.open_packed(args.data_dir, order, log)
    if packed is not None:  # a shard set or the official archives: labels mapped to the weights' classes
        to_model, classes = evaluation.packed_labels(packed, meta, order, num_classes, log)
        train, val = ([(m, to_model[label]) for m, label in packed.splits.get(split) or []]
                      for split in ("train", "val"))
        deployed = {"order": order, "wnids": list(classes.wnids) if all(classes.wnids) else None,
                    "names": list(classes.names)}
        return (deployed, *pick_images(train, val, args.data_dir, args.calibration_images, args.max_images,
                                       args.seed, log))
    if not evaluation.is_imagenet_data(args.data_dir, order):
        deployed = evaluation.deployed_classes(args.data_dir, meta, order, num_classes)
        return (deployed, *folder_images(args.data_dir, meta, num_classes, order, args.calibration_images,
                                         args.max_images, args.seed, log))
    classes = read_data_classes(args.data_dir, order, num_classes, meta)
    deployed = {"order": order, "wnids": list(classes.wnids), "names": list(classes.names)}
    return (deployed, *split_images(args.data_dir, classes, args.calibration_images, args.max_images, args.seed,
                                    log))


def write_int8(model, calibration, scored, pre, args, metadata, result, log):
    """Write the INT8 ONNX file (--out) and ExecuTorch program (--export-pte); their reports go into
    `result`. Returns {name: the written model, run as it will be deployed}."""
    int8_models = {}
    if args.out is not None:
        start = time.perf_counter()
        report = quantization.quantize_onnx(model, calibration, args.out, pre["input_size"], args.calibration_method,
                                            args.bias_correction, metadata("uint8, one scale per tensor"))
        log(f"wrote {args.out}: INT8 {report['bytes'] / 1e6:.2f} MB (float {report['float_bytes'] / 1e6:.2f} MB), "
            f"calibrated on {calibration.used} images ({args.calibration_method}"
            f"{', bias correction on %d layers' % report['corrected_layers'] if args.bias_correction else ''}) "
            f"in {time.perf_counter() - start:.0f} s")
        result["onnx"] = report
        int8_models["INT8 ONNX"] = onnx_weights.OnnxFileModel(args.out)
    if args.export_pte is not None:
        result["pte"] = write_pte(model, calibration, scored, pre, args, metadata("int8, one scale per tensor"), log)
        int8_models["INT8 ExecuTorch"] = export.ExecuTorchModel(args.export_pte.read_bytes())
    if calibration.failed:
        log(f"warning: {calibration.failed} calibration images did not decode and were left out")
    return int8_models


def write_pte(model, calibration, scored, pre, args, metadata, log):
    """The INT8 ExecuTorch program, run by ExecuTorch's runtime on a few of the scored images beside the
    quantized model in PyTorch. XNNPACK rounds differently from PyTorch's reference arithmetic, so the two
    are not equal (on the test digits ExecuTorch's largest error was 7% of the largest logit, PyTorch's 3%);
    the program is refused when its error against the float model is both over twice PyTorch's and over
    10% of the largest logit (a broken lowering is off by the logits' size)."""
    start = time.perf_counter()
    quantized = quantization.quantize_pt2e(model, calibration, pre["input_size"], args.bias_correction)
    images = torch.stack([scored[i][0] for i in range(min(8, len(scored)))])
    x = normalize(images, pre["mean"], pre["std"])
    diff = export.export_pte(quantized, args.export_pte, pre["input_size"], metadata=metadata, check_inputs=x)
    program = export.ExecuTorchModel(args.export_pte.read_bytes())
    with torch.no_grad():
        want = model.eval()(x)
        error = {"pytorch": (quantized(x) - want).abs().max().item(), "executorch": (program(x) - want).abs().max().item()}
    size = args.export_pte.stat().st_size
    log(f"wrote {args.export_pte}: INT8 ExecuTorch program (XNNPACK) {size / 1e6:.2f} MB in "
        f"{time.perf_counter() - start:.0f} s; largest logit error against the float model: {error['executorch']:.3f} "
        f"run by ExecuTorch, {error['pytorch']:.3f} in PyTorch (largest logit {want.abs().max().item():.1f})")
    if not error["executorch"] <= max(2 * error["pytorch"], 0.1 * want.abs().max().item()):
        raise quantization.QuantizationError(
            f"{args.export_pte}: run by ExecuTorch its logits are off by {error['executorch']:.3f}, against "
            f"{error['pytorch']:.3f} for the same INT8 model in PyTorch; do not deploy it")
    return {"path": str(args.export_pte), "bytes": size, "max_abs_diff_to_pytorch_int8": diff,
            "max_abs_error": error["executorch"], "max_abs_error_pytorch_int8": error["pytorch"]}


def read_data_classes(data_dir, order, num_classes, meta):
    """The data's classes in the weights' order, checked against the weights as evaluate.py checks them."""
    classes = read_classes(find_layout(data_dir), order)
    if len(classes.wnids) != num_classes:
        raise QuantizeError(f"the weights have {num_classes} classes but {data_dir} lists {len(classes.wnids)}; "
                            "use weights trained on this data")
    saved = (meta.get("classes") or {}).get("wnids")
    if saved and list(saved) != list(classes.wnids):
        first = next(i for i, (a, b) in enumerate(zip(saved, classes.wnids)) if a != b)
        raise QuantizeError(f"the checkpoint's class {first} is {saved[first]} but {data_dir} puts "
                            f"{classes.wnids[first]} there; the devkit differs from the training one")
    return classes


def folder_images(data_dir, meta, num_classes, order, calibration_images, max_images, seed, log):
    """split_images for a folder of classes (image_folders.py): scored on val/, or on the images the
    checkpoint held out (--val-split), labelled by class name as evaluate.py labels them; calibrated on a
    seeded draw of the other images. When every image is to be scored, they are split in two."""
    scored, _ = image_folders.scoring_samples(
        data_dir, lambda names: image_folders.model_index(names, meta.get("classes"), num_classes, order, log),
        (meta.get("data") or {}).get("val_split"), log)
    layout = image_folders.find_folder_layout(data_dir)
    held = {path for path, _ in scored}
    pool = []
    if layout.train_dir is not None and layout.train_dir != layout.val_dir:
        found, _ = image_folders.scan_classes(layout.train_dir)
        pool = [str(layout.train_dir / f) for c in sorted(found) for f in sorted(found[c])]
        pool = [p for p in pool if p not in held]
    rng = random.Random(seed)
    scored_on = "val" if layout.val_dir is not None else "held-out"
    if not pool:  # nothing but the images to score: calibrate on half of them, score the other half
        shuffled = scored[:]
        rng.shuffle(shuffled)
        take = min(calibration_images, len(shuffled) // 2)
        pool, chosen = [p for p, _ in shuffled[:take]], {p for p, _ in shuffled[:take]}
        scored = [(p, label) for p, label in scored if p not in chosen]
        scored_on += " (not the calibration part)"
        log(f"note: no other images in {data_dir}: calibrating on {take} of the images to score, scoring the rest")
    else:
        rng.shuffle(pool)
    calibration = [(p, 0) for p in pool[:calibration_images]]  # calibration reads no label
    if len(calibration) < calibration_images:
        log(f"note: --calibration-images {calibration_images}, but only {len(calibration)} images are available; "
            "calibrating on those")
    return calibration, scored[:max_images] if max_images else scored, scored_on


def split_images(data_dir, classes, calibration_images, max_images, seed, log):
    """(calibration samples, scored samples, what the scored ones are). Calibration images are a seeded
    random draw from train; the scores come from val, or, when there is none, from other training
    images; with no train images, val is split in two. The two sets never share an image."""
    layout = find_layout(data_dir)
    train = list_samples(layout, "train", classes) if layout.train_dir else []
    labelled_val = layout.val_dir and (layout.ground_truth or not layout.val_flat)
    val = list_samples(layout, "val", classes) if labelled_val else []
    return pick_images(train, val, data_dir, calibration_images, max_images, seed, log)


def pick_images(train, val, data_dir, calibration_images, max_images, seed, log):
    """split_images' choice among labelled train and val samples [(path or member, label)]."""
    rng = random.Random(seed)
    if train:
        pool = train[:]
        rng.shuffle(pool)
        calibration = pool[:calibration_images]
        if val:
            scored, scored_on = val[:max_images] if max_images else val, "val"
        else:
            scored = pool[len(calibration):][:max_images or HELD_OUT_IMAGES]
            scored_on = "held-out train"
    elif val:
        pool = val[:]
        rng.shuffle(pool)
        calibration = pool[:min(calibration_images, len(pool) // 2)]
        rest = sorted(pool[len(calibration):])
        scored, scored_on = rest[:max_images] if max_images else rest, "val (not the calibration part)"
        log(f"note: no training images in {data_dir}: calibrating on {len(calibration)} val images, scoring the "
            "others")
    else:
        raise DataError(f"--data-dir {data_dir}: no training or validation images found")
    if len(calibration) < calibration_images:
        log(f"note: --calibration-images {calibration_images}, but only {len(calibration)} images are available; "
            "calibrating on those")
    return calibration, scored, scored_on


def compare_accuracy(float_model, int8_models, dataset, pre, args, scored_on, log, num_classes=1000):
    """Top-1/top-5 of the float model and each INT8 one on the same images, and how often each INT8
    model's top-1 class is the float model's."""
    loader = build_loader(dataset, args.batch_size, EvalSampler(len(dataset)), num_workers=args.num_workers)
    scores, first = {}, {}
    for name, model in {"float": float_model, **int8_models}.items():
        stats = scoring.evaluate(model, loader, "cpu", mean=pre["mean"], std=pre["std"], channels_last=False,
                                  progress=not args.no_progress, collect_predictions=True)
        first[name] = [p["top5"][0] for p in stats.pop("predictions")]
        scores[name] = stats
    f = scores["float"]

    def top5(stats):  # top-5 of 5 classes or fewer is 100% by definition: not reported
        return f" top-5 {stats['top5']:.3f}%" if num_classes > 5 else ""

    log(f"on {f['images']} {scored_on} images: float top-1 {f['top1']:.3f}%{top5(f)}")
    for name in int8_models:
        q = scores[name]
        q["top1_agreement"] = 100.0 * sum(a == b for a, b in zip(first["float"], first[name])) / max(1, f["images"])
        log(f"  {name}: top-1 {q['top1']:.3f}% ({q['top1'] - f['top1']:+.3f} points){top5(q)}; "
            f"same top-1 class as float on {q['top1_agreement']:.2f}% of the images")
    if f["failed"]:
        log(f"warning: {f['failed']} images did not decode and were scored as misses by all")
    return {"scored_on": scored_on, "images": f["images"], **scores}


def compare_speed(float_model, int8_model, batch_size, input_size, log, repeats=5, latency_runs=20):
    """images/s at `batch_size` and batch-1 latency of both models in onnxruntime, on the same random input,
    timed in turn (medians) so that other load on the machine slows both alike, each timed run after 0.1 s of
    untimed runs of the same model (onnxruntime's idle threads spin for a while after a run and would
    otherwise share the cores with the other model's timed run)."""
    generator = torch.Generator().manual_seed(0)
    result = {"threads": torch.get_num_threads(), "batch_size": batch_size, "input_size": input_size}
    for batch, runs, key in ((batch_size, repeats, "batch"), (1, latency_runs, "latency")):
        x = torch.randn(batch, 3, input_size, input_size, generator=generator)
        times = {"float": [], "int8": []}
        for model in (float_model, int8_model):
            model(x)  # first-run allocations
        for _ in range(runs):
            for name, model in (("float", float_model), ("int8", int8_model)):
                until = time.perf_counter() + 0.1
                model(x)  # untimed until the other session's threads, which spin after its run, are idle
                while time.perf_counter() < until:
                    model(x)
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        if key == "batch":
            result["float_images_per_s"] = batch / seconds["float"]
            result["int8_images_per_s"] = batch / seconds["int8"]
        else:
            result["float_latency_ms"] = 1000 * seconds["float"]
            result["int8_latency_ms"] = 1000 * seconds["int8"]
    result["throughput_ratio"] = result["int8_images_per_s"] / result["float_images_per_s"]
    result["latency_ratio"] = result["float_latency_ms"] / result["int8_latency_ms"]
    log(f"speed in onnxruntime, {result['threads']} threads, {input_size} px: batch {batch_size} float "
        f"{result['float_images_per_s']:.1f} images/s, INT8 {result['int8_images_per_s']:.1f} images/s "
        f"({result['throughput_ratio']:.2f}x); batch 1 float {result['float_latency_ms']:.2f} ms, INT8 "
        f"{result['int8_latency_ms']:.2f} ms ({result['latency_ratio']:.2f}x)")
    return result

