"""INT8 in onnxruntime: its speed against the float model in onnxruntime, which quantization recipe keeps
the accuracy, and the other CPU INT8 path (torchao's PT2E with X86InductorQuantizer, torch.compile'd)
against the onnxruntime INT8 file.

    python bench/bench_int8.py                                   # speed: width 1.0, 224 px, random weights
    python bench/bench_int8.py --pt2e                            # PT2E + inductor INT8 vs onnxruntime INT8
    python bench/bench_int8.py --weights best.pth --data-dir D   # recipes: calibration methods, bias
                                                                 # correction, calibration image counts

Speed: the float model exported as evaluate.py exports it (BatchNorm folded) and its INT8 version
written by quantization.quantize_onnx, each in its own onnxruntime session with the same threads, run in
turn on the same batch (batch 32 for images/s, batch 1 for latency), each timed run after 0.1 s of
untimed runs of the same model; medians of the alternating repeats.
Weights do not change the speed, so random ones calibrated on random inputs stand in for real ones.

PT2E: the same folded model quantized by torchao's prepare_pt2e / convert_pt2e with X86InductorQuantizer's
default recipe (int8 weights per output channel, uint8 activations per tensor), calibrated on the same
images as the onnxruntime file, then compiled by torch.compile with inductor's freezing (one compile per
batch size, timed separately); both INT8 models timed alternately on the same batches.

Recipes: each is quantized from the same weights and calibration draw (train images, seeded) and scored
on the val images against the float model: top-1, top-1 agreement with the float model and the
signal-to-quantization-noise ratio of the logits (10 log10 |float|^2 / |int8 - float|^2, in dB), which
tells recipes apart where a few hundred images cannot.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import _time_alternating, random_model  # noqa: E402

from mnv2 import checkpoint  # noqa: E402
from mnv2.data.imagenet import find_layout, list_samples, read_classes  # noqa: E402
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader  # noqa: E402
from mnv2.data.transforms import eval_transform, normalize  # noqa: E402
from mnv2.deploy import export, inference  # noqa: E402
from mnv2.deploy import quantization  # noqa: E402
from mnv2.deploy import onnx_weights
from mnv2.weights import load_model  # noqa: E402


def speed(batch_size=32, image_size=224, repeats=5, latency_runs=20, width_mult=1.0, log=print):
    """{"throughput": {ours: INT8 images/s, reference: float images/s, ratio}, "latency": {ours: INT8 ms,
    reference: float ms, ratio: float / INT8}, "bytes": {...}, "top1_agreement" on the random batch}."""
    model = random_model(width_mult)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, image_size, image_size, generator=generator) for _ in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.int8.onnx"
        report = quantization.quantize_onnx(model, calibration, path, image_size, bias_correction=False)
        int8 = onnx_weights.OnnxFileModel(path)
    fp32 = inference.OnnxRuntimeModel(model, image_size)
    result = {"threads": torch.get_num_threads(), "batch_size": batch_size, "image_size": image_size,
              "bytes": {"int8": report["bytes"], "float": report["float_bytes"]}}
    for key, batch, runs in (("throughput", batch_size, repeats), ("latency", 1, latency_runs)):
        x = torch.randn(batch, 3, image_size, image_size, generator=generator)
        seconds = _time_alternating({"ours": lambda: int8(x), "reference": lambda: fp32(x)}, runs)
        if key == "throughput":
            ours, reference = batch / seconds["ours"], batch / seconds["reference"]
            result[key] = {"ours": ours, "reference": reference, "ratio": ours / reference, "unit": "images/s"}
            result["top1_agreement"] = 100.0 * (int8(x).argmax(1) == fp32(x).argmax(1)).float().mean().item()
        else:
            ours, reference = 1000 * seconds["ours"], 1000 * seconds["reference"]
            result[key] = {"ours": ours, "reference": reference, "ratio": reference / ours, "unit": "ms"}
    return result


def pt2e_speed(batch_size=32, image_size=224, repeats=5, latency_runs=20, width_mult=1.0, log=print):
    """PT2E + X86InductorQuantizer + torch.compile ("ours") against the onnxruntime INT8 file ("reference"),
    at `batch_size` and batch 1: {"throughput", "latency", "compile_seconds", "max_logit_diff"}."""
    import logging

    import torch._inductor.config as inductor_config
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time note
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = random_model(width_mult)
    deploy = random_model(width_mult)
    inference.fold_batchnorm(deploy)
    calibration = [export.parity_input(image_size, 16, seed=s) for s in (2, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.int8.onnx"
        quantization.quantize_onnx(model, calibration, path, image_size, bias_correction=False)
        onnx_int8 = onnx_weights.OnnxFileModel(path)
    images = torch.cat(calibration)

    def quantized(batch):
        """The PT2E INT8 graph for batches of `batch` images (exported with that static shape, which is
        what inductor's INT8 kernels need), calibrated on the same images in chunks of `batch`."""
        with torch.no_grad():
            graph = torch.export.export(deploy, (images[:batch],)).module()
            quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(graph, quantizer)
            for k in range(0, len(images) - batch + 1, batch):
                prepared(images[k:k + batch])
            return convert_pt2e(prepared)

    freezing, inductor_config.freezing = inductor_config.freezing, True
    try:
        result = {"threads": torch.get_num_threads(), "batch_size": batch_size, "image_size": image_size,
                  "quantize_seconds": {}, "compile_seconds": {}}
        for key, batch, runs in (("throughput", batch_size, repeats), ("latency", 1, latency_runs)):
            start = time.perf_counter()
            converted = quantized(min(batch, len(images)) if key == "latency" else batch)
            result["quantize_seconds"][key] = time.perf_counter() - start
            compiled = torch.compile(converted, dynamic=False)
            x = export.parity_input(image_size, batch, seed=4)
            start = time.perf_counter()
            with torch.no_grad():
                got = compiled(x)
            result["compile_seconds"][key] = time.perf_counter() - start

            def ours():
                with torch.no_grad():
                    compiled(x)
            seconds = _time_alternating({"ours": ours, "reference": lambda: onnx_int8(x)}, runs)
            if key == "throughput":
                ours_, reference = batch / seconds["ours"], batch / seconds["reference"]
                result[key] = {"ours": ours_, "reference": reference, "ratio": ours_ / reference, "unit": "images/s"}
                with torch.no_grad():
                    want = deploy(x)
                result["max_logit_diff"] = {"pt2e": (got - want).abs().max().item(),
                                            "onnxruntime": (onnx_int8(x) - want).abs().max().item()}
            else:
                ours_, reference = 1000 * seconds["ours"], 1000 * seconds["reference"]
                result[key] = {"ours": ours_, "reference": reference, "ratio": reference / ours_, "unit": "ms"}
    finally:
        inductor_config.freezing = freezing
    return result


# --------------------------------------------------------------------------------------------------
# Recipes on real weights and data


def _batches(samples, pre, batch_size=64):
    dataset = ImageNetDataset(samples, eval_transform(pre["input_size"], pre["resize"], pre["interpolation"]),
                              train=False)
    out = []
    for images, targets, _, _ in build_loader(dataset, batch_size, EvalSampler(len(dataset)), num_workers=0):
        out.append((normalize(images, pre["mean"], pre["std"]), targets))
    return out


def recipes(weights, data_dir, counts=(512,), methods=tuple(quantization.CALIBRATION_METHODS),
            bias_corrections=(False, True), seed=0, log=print):
    """Score every (calibration images, method, bias correction) on val: a list of dicts."""
    raw = checkpoint.read_weights(weights)
    meta = checkpoint.meta(raw)
    model = load_model(raw).eval()
    pre = meta.get("data") or {"resize": 256, "input_size": 224, "interpolation": "bilinear",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    layout = find_layout(data_dir)
    classes = read_classes(layout, (meta.get("classes") or {}).get("order", "sorted"))
    train, val = list_samples(layout, "train", classes), list_samples(layout, "val", classes)
    scored = _batches(val, pre)
    targets = torch.cat([t for _, t in scored])
    with torch.no_grad():
        reference = torch.cat([model(x) for x, _ in scored])
    float_top1 = 100.0 * (reference.argmax(1) == targets).float().mean().item()
    log(f"float top-1 {float_top1:.2f}% on {len(targets)} val images")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            calibration = [x for x, _ in _batches(random.Random(seed).sample(train, min(count, len(train))), pre)]
            for method in methods:
                for bias_correction in bias_corrections:
                    start = time.perf_counter()
                    path = Path(tmp) / "model.int8.onnx"
                    quantization.quantize_onnx(model, calibration, path, pre["input_size"], method, bias_correction)
                    int8 = onnx_weights.OnnxFileModel(path)
                    logits = torch.cat([int8(x) for x, _ in scored])
                    noise = ((logits - reference) ** 2).sum().item()
                    row = {"calibration_images": count, "method": method, "bias_correction": bias_correction,
                           "float_top1": float_top1,
                           "int8_top1": 100.0 * (logits.argmax(1) == targets).float().mean().item(),
                           "top1_agreement": 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
                           "sqnr_db": 10 * torch.log10((reference ** 2).sum() / max(noise, 1e-30)).item(),
                           "seconds": time.perf_counter() - start}
                    rows.append(row)
                    log(f"{count:6d} images  {method:12s}  bias correction {'on ' if bias_correction else 'off'}  "
                        f"top-1 {row['int8_top1']:6.2f}%  agreement {row['top1_agreement']:6.2f}%  "
                        f"SQNR {row['sqnr_db']:5.1f} dB  ({row['seconds']:.0f} s)")
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats at --batch-size")
    p.add_argument("--latency-runs", type=int, default=20, help="alternating batch-1 runs")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's choice)")
    p.add_argument("--weights", type=Path, default=None, help="a checkpoint: compare recipes on --data-dir")
    p.add_argument("--data-dir", type=Path, default=None, help="calibration from train/, scores on val/")
    p.add_argument("--calibration-images", type=int, nargs="+", default=[512])
    p.add_argument("--methods", nargs="+", default=list(quantization.CALIBRATION_METHODS),
                   choices=list(quantization.CALIBRATION_METHODS))
    p.add_argument("--pt2e", action="store_true",
                   help="time torchao PT2E INT8 (X86InductorQuantizer, torch.compile) against onnxruntime INT8")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    if args.weights:
        out["recipes"] = recipes(args.weights, args.data_dir, args.calibration_images, args.methods)
    elif args.pt2e:
        r = pt2e_speed(args.batch_size, args.image_size, args.repeats, args.latency_runs)
        t, lat = r["throughput"], r["latency"]
        print(f"CPU INT8, {r['threads']} threads, {r['image_size']} px, width 1.0, medians of alternating runs")
        print(f"batch {r['batch_size']}: PT2E+inductor {t['ours']:.1f} images/s, onnxruntime {t['reference']:.1f} "
              f"images/s, ratio {t['ratio']:.2f}")
        print(f"batch 1: PT2E+inductor {lat['ours']:.2f} ms, onnxruntime {lat['reference']:.2f} ms, "
              f"ratio {lat['ratio']:.2f}")
        print(f"start-up: quantize {r['quantize_seconds']['throughput']:.1f} s, compile "
              f"{r['compile_seconds']['throughput']:.1f} s "
              f"(batch {r['batch_size']}) + {r['compile_seconds']['latency']:.1f} s (batch 1)")
        out["pt2e"] = r
    else:
        r = speed(args.batch_size, args.image_size, args.repeats, args.latency_runs)
        t, lat = r["throughput"], r["latency"]
        print(f"onnxruntime, CPU, {r['threads']} threads, {r['image_size']} px, width 1.0, medians of alternating runs")
        print(f"batch {r['batch_size']}: float {t['reference']:.1f} images/s, INT8 {t['ours']:.1f} images/s, "
              f"ratio {t['ratio']:.2f}")
        print(f"batch 1: float {lat['reference']:.2f} ms, INT8 {lat['ours']:.2f} ms, ratio {lat['ratio']:.2f}")
        print(f"file: float {r['bytes']['float'] / 1e6:.2f} MB, INT8 {r['bytes']['int8'] / 1e6:.2f} MB")
        out["speed"] = r
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
