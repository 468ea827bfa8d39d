"""Evaluation speed: this repo's eval loop against torchvision's mobilenet_v2 in a plain eager loop,
and batch-1 latency of the exported ONNX model (onnxruntime) against eager PyTorch.

    python bench/bench_eval.py --batch-size 32 --batches 4 --repeats 5

Both loops get the same uint8 batches, already in memory (decoding is the input pipeline's benchmark),
normalise them and count top-1/top-5. The reference is what a plain loop does: NCHW float32, BatchNorm
as separate layers, `torch.no_grad`. Ours is `evaluate(prepare_for_inference(model), ...)`: BatchNorm
folded into the convolutions, channels_last, convolutions packed for oneDNN with ReLU6 fused,
`torch.inference_mode` (and, with --compile, a torch.compile row). Repeats alternate between the loops
so a busy machine slows all alike; medians are reported, with the largest logit difference to the
reference on the same batch (must stay within 1e-4).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402
from mnv2.deploy.inference import (InferenceError, export_onnx, inference_model, maybe_compile,  # noqa: E402
                                   prepare_for_inference)
from mnv2.scoring import evaluate  # noqa: E402
from mnv2.weights import load_model  # noqa: E402
from MobileNetV2 import MobileNetV2  # noqa: E402


def make_batches(batch_size, batches, image_size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batches):
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8,
                               generator=g)
        targets = torch.randint(0, num_classes, (batch_size,), generator=g)
        indices = torch.arange(i * batch_size, (i + 1) * batch_size)
        out.append((images, targets, indices, torch.zeros(batch_size, dtype=torch.int64)))
    return out


def plain_eval(model, batches):
    """The reference: a plain eager NCHW fp32 loop as a typical ImageNet script writes it."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    correct1 = correct5 = n = 0
    model.eval()
    with torch.no_grad():
        for images, targets, _, _ in batches:
            x = (images.float() / 255 - mean) / std
            top5 = model(x).topk(5, dim=1).indices
            hits = top5.eq(targets.view(-1, 1))
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            n += len(targets)
    return correct1, correct5, n


def reference_model(ours):
    ref = torchvision.models.mobilenet_v2(num_classes=ours.config["num_classes"],
                                          width_mult=ours.config["width_mult"])
    ref.load_state_dict(ours.state_dict())
    return ref.eval()


def random_model(width_mult=1.0, seed=0):
    """Random weights with non-trivial BatchNorm statistics, so folding has real work to do."""
    torch.manual_seed(seed)
    model = MobileNetV2(width_mult=width_mult).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def max_logit_diff(ours, ref, batches):
    images = batches[0][0]
    with torch.inference_mode():
        a = ours(normalize(images, IMAGENET_MEAN, IMAGENET_STD, channels_last=True))
    with torch.no_grad():
        b = ref(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
    return (a.float() - b).abs().max().item()


def _time_alternating(loops, repeats, settle=0.1):
    """Median seconds of each loop, in turn `repeats` times (so load hits all alike), each timed run after
    untimed ones of the same loop for `settle` seconds: onnxruntime's idle threads spin for a while after a
    run (its default), so a loop timed straight after an onnxruntime one shares the cores with them (measured at batch 32: float
    208, INT8 410 images/s back to back; 255-259 and 562-576 each alone, 245-250 and 548-562 with 0.05 s
    untimed between; batch 1: settling for 0.02 s was not enough, 0.05-0.1 s gave each alone's ms)."""
    times = {name: [] for name in loops}
    for loop in loops.values():
        loop()  # first-run allocations and kernel choices
    for _ in range(repeats):
        for name, loop in loops.items():
            until = time.perf_counter() + settle
            loop()  # as when evaluate.py runs one model: the other session's threads gone idle
            while time.perf_counter() < until:
                loop()
            start = time.perf_counter()
            loop()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(batch_size=32, batches=4, repeats=5, image_size=224, weights=None, compile=False, log=print):
    """Measure the loops side by side. Returns {"ours", "reference" (images/s), "ratio", "max_abs_diff",
    ...}; with compile also "ours_compiled", "ratio_compiled", "compile_seconds" (when compiling works)."""
    model = load_model(weights) if weights else random_model()
    ref = reference_model(model)
    # What evaluate.py scores with on the CPU: onnxruntime when installed, else the prepared PyTorch model.
    fast, channels_last, backend = inference_model(model, "cpu", "auto", image_size, batch_size, log)
    data = make_batches(batch_size, batches, image_size, model.config["num_classes"])
    loops = {"reference": lambda: plain_eval(ref, data),
             "ours": lambda: evaluate(fast, data, "cpu", channels_last=channels_last, progress=False)}
    diffs = {"ours": max_logit_diff(fast, ref, data)}
    compile_seconds = None
    if compile:
        example = normalize(data[0][0], IMAGENET_MEAN, IMAGENET_STD, channels_last=True)
        start = time.perf_counter()
        eager = prepare_for_inference(model, pack=False)  # inductor packs the weights itself
        compiled = maybe_compile(eager, example, log)
        compile_seconds = time.perf_counter() - start
        if compiled is not eager:  # maybe_compile hands back the eager model when compiling fails
            loops["ours_compiled"] = lambda: evaluate(compiled, data, "cpu", progress=False)
            diffs["ours_compiled"] = max_logit_diff(compiled, ref, data)
    # Same weights, same batches: every loop must count the same hits.
    counts = {name: _counts(loop()) for name, loop in loops.items()}
    assert len(set(counts.values())) == 1, counts
    seconds = _time_alternating(loops, repeats)
    images = batch_size * batches
    speed = {name: images / t for name, t in seconds.items()}
    result = {"ours": speed["ours"], "reference": speed["reference"],
              "ratio": speed["ours"] / speed["reference"],
              "max_abs_diff": diffs["ours"], "unit": "images/s", "threads": torch.get_num_threads(),
              "batch_size": batch_size, "image_size": image_size, "images_per_repeat": images, "backend": backend,
              "repeats": repeats}
    if "ours_compiled" in speed:
        result.update(ours_compiled=speed["ours_compiled"],
                      ratio_compiled=speed["ours_compiled"] / speed["reference"],
                      max_abs_diff_compiled=diffs["ours_compiled"], compile_seconds=compile_seconds)
    return result


def _counts(result):
    if isinstance(result, dict):  # evaluate(): percentages of a known number of images
        n = result["images"]
        return round(result["top1"] * n / 100), round(result["top5"] * n / 100), n
    return result


def onnx_latency(model=None, image_size=224, runs=30, log=print):
    """Batch-1 latency: the exported ONNX model in onnxruntime vs the plain model in eager PyTorch.

    Returns {"ours" (onnxruntime ms), "reference" (eager ms), "ratio" (eager / onnxruntime), "unit",
    "max_abs_diff"}, or None when onnx or onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        log("onnxruntime not installed: no ONNX latency row")
        return None
    model = model or random_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            diff = export_onnx(model, path, input_size=image_size)
        except InferenceError as e:
            log(f"{e}: no ONNX latency row")
            return None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as PyTorch gets
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, image_size, image_size)
    feed = {"images": x.numpy()}

    def eager():
        with torch.no_grad():
            model(x)

    loops = {"reference": eager, "ours": lambda: session.run(None, feed)}
    for loop in loops.values():
        loop()  # first-run allocations and kernel choices
    seconds = _time_alternating(loops, runs)
    ms = {name: 1000 * t for name, t in seconds.items()}
    return {"ours": ms["ours"], "reference": ms["reference"], "ratio": ms["reference"] / ms["ours"],
            "unit": "ms", "max_abs_diff": diff, "image_size": image_size, "runs": runs}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats; medians are reported")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", default=None, help="weight file (default: random weights, 1000 classes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="add a torch.compile row (10-45 s to compile on 2 busy cores)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX batch-1 latency row")
    p.add_argument("--latency-runs", type=int, default=30, help="batch-1 runs per side for the latency row")
    p.add_argument("--quick", action="store_true", help="1 batch of 16 at 160 px, 2 repeats (smoke test)")
    p.add_argument("--json", type=Path, default=None,
                   help='write {"eval_cpu": {...}, "onnx_latency": {...}}, each with ratio, ours, '
                        'reference, unit')
    return p


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_size, args.batches, args.repeats, args.image_size = 16, 1, 2, 160
        args.latency_runs = 5
    r = run(args.batch_size, args.batches, args.repeats, args.image_size, args.weights, args.compile)
    print(f"eval loop, CPU, {r['threads']} threads, batch {r['batch_size']} x {r['image_size']} px, "
          f"median of {r['repeats']} alternating repeats")
    print(f"{'':46s}{'images/s':>10s}{'ratio':>8s}{'max |diff|':>12s}")
    print(f"{'torchvision mobilenet_v2, eager NCHW fp32':46s}{r['reference']:10.1f}{1:8.2f}{0:12.1e}")
    label = f"evaluate() via {r['backend']}" + (": folded BN, NHWC, packed" if r["backend"] == "torch" else "")
    print(f"{label:46s}{r['ours']:10.1f}{r['ratio']:8.2f}"
          f"{r['max_abs_diff']:12.1e}")
    if "ours_compiled" in r:
        print(f"{'evaluate(): folded BN, NHWC, torch.compile':46s}{r['ours_compiled']:10.1f}"
              f"{r['ratio_compiled']:8.2f}{r['max_abs_diff_compiled']:12.1e}"
              f"   (compiled in {r['compile_seconds']:.0f} s)")
    rows = {"eval_cpu": {"ratio": r["ratio"], "ours": r["ours"], "reference": r["reference"],
                         "unit": "images/s", "details": r}}
    worst = max(r["max_abs_diff"], r.get("max_abs_diff_compiled", 0))
    if not args.no_onnx:
        model = load_model(args.weights) if args.weights else random_model()
        lat = onnx_latency(model, args.image_size, args.latency_runs)
        if lat:
            print(f"batch-1 latency, {args.image_size} px, median of {lat['runs']}: eager PyTorch "
                  f"{lat['reference']:.1f} ms, onnxruntime {lat['ours']:.1f} ms, ratio {lat['ratio']:.2f}, "
                  f"max |diff| {lat['max_abs_diff']:.1e}")
            rows["onnx_latency"] = {k: lat[k] for k in ("ratio", "ours", "reference", "unit")}
            worst = max(worst, lat["max_abs_diff"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if worst > 1e-4:
        raise SystemExit(f"logits differ from the reference by {worst:.2e} > 1e-4")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
