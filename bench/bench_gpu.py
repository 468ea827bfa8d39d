"""One GPU at its own speed: synthetic-data training images/s (eager, sync-free step; torch.compile in its
modes with the compile time), real-JPEG training images/s with the CPU and GPU data backends at several
loader-process counts, peak GPU memory, and the batched crop-and-resize against the per-image CPU path.

    python bench/bench_gpu.py --device cuda [--images DIR] [--json PATH]    # what bench/gpu_check.sh runs
    python bench/bench_gpu.py --device cpu --quick                          # the same code on the CPU, tiny

Synthetic data: uint8 batches already on the device, through `loop.train_one_epoch` with the learner
train.py builds (channels_last, bf16 autocast on CUDA, the sync-free step where it applies). Real JPEGs:
the files in --images (default: 256 generated 500x375 JPEGs), cycled, through the real loaders and the
same step; the first steps (worker start-up, cudnn's search) are left out of the timing. Each compiled
mode runs in a process of its own with a time limit, so a slow compilation costs only its own row.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv2 import distributed  # noqa: E402
from mnv2.data import gpu_decode as gpu_data  # noqa: E402
from mnv2.data.loaders import ImageNetDataset, TrainSampler, build_loader  # noqa: E402
from mnv2.data.transforms import TrainTransform  # noqa: E402
from mnv2.training import optimization  # noqa: E402
from mnv2.training import datasets, learner, loop, run
from MobileNetV2 import MobileNetV2  # noqa: E402

GOAL = 10_000  # images/s on synthetic data, one H200


def make_learner(device, compile_mode=None, size=224, width=1.0):
    """The learner train.py builds for SGD on `device` (bf16 autocast and the sync-free step on CUDA)."""
    torch.manual_seed(0)
    model = MobileNetV2(width_mult=width).to(device, memory_format=torch.channels_last)
    if device.type == "cpu":
        learner.use_fused_batchnorm(model, log=lambda *a: None)
    amp = learner.amp_dtype_for(None, device)
    sync_free = learner.use_sync_free(None, device, "sgd", None)
    optimizer = optimization.build_optimizer(model, 0.045, fused=sync_free)
    guard = optimization.StepGuard(optimizer) if sync_free else None
    keeper = optimization.BufferKeeper(model)
    wrapped = model if compile_mode is None else torch.compile(
        model, mode=None if compile_mode == "default" else compile_mode)
    return learner.Learner(wrapped, model, optimization.build_criterion(), optimizer, optimization.LRSchedule(0.045, 1),
                         device, amp_dtype=amp, channels_last=True, guard=guard, read_every=10, buffers=keeper)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(learner, batches, steps, warmup, device):
    """Images/s over the steps after `warmup`, and the seconds of the first step (compilation included)."""
    marks = []

    def on_step(epoch, step, indices):
        if step in (1, warmup):
            synchronize(device)
        marks.append(time.perf_counter())

    start = time.perf_counter()
    loop.train_one_epoch(learner, batches, 0, steps, distributed.Context(device=device), on_step=on_step,
                          log=lambda *a: None)
    synchronize(device)
    end = time.perf_counter()
    images = sum(len(b[1]) for b in list(batches)[warmup:steps]) if isinstance(batches, list) else None
    return end - marks[warmup - 1], marks[0] - start, images


def synthetic(device, batch, steps, warmup, compile_mode=None, size=224):
    learner = make_learner(device, compile_mode, size)
    g = torch.Generator().manual_seed(0)
    distinct = [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
                 torch.randint(0, 1000, (batch,), generator=g).to(device), torch.arange(batch),
                 torch.zeros(batch, dtype=torch.int64)) for _ in range(4)]
    batches = [distinct[k % 4] for k in range(steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, first, images = timed_steps(learner, batches, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": images / seconds, "first_step_s": first, "peak_gib": peak}


def real(device, files, backend, workers, batch, steps, warmup, size=224):
    samples = [(str(files[k % len(files)]), k % 1000) for k in range(batch * steps)]
    dataset = ImageNetDataset(samples, TrainTransform(size), train=True)
    sampler = TrainSampler(len(dataset), seed=0)
    loader = build_loader(dataset, batch, sampler, num_workers=workers, pin_memory=device.type == "cuda",
                          persistent_workers=False, drop_last=True)
    if backend == "gpu":
        loader = datasets.on_device(dataset, loader, size, device, fallback=dataset)
    learner = make_learner(device)
    seconds, _, _ = timed_steps(learner, loader, steps, warmup, device)
    return {"images_per_s": batch * (steps - warmup) / seconds}


def crop_resize_rows(device, files, batch):
    """Decode + crop + resize of one batch: the GPU backend's decoder (batched) vs TrainTransform per image
    on one core; and the crop-and-resize alone on decoded images vs torch's per-image antialiased resize."""
    transform = TrainTransform(224)
    read = gpu_data.DeviceRead(transform)
    paths = [files[k % len(files)] for k in range(batch)]
    torch.manual_seed(0)
    raw = gpu_data.collate([(read(p), 0, k, 0) for k, p in enumerate(paths)])
    decoder = gpu_data.Decoder(224, device)

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t)
        return batch / min(times)

    torch.manual_seed(0)
    rows = {"decode+crop: gpu_data batch vs TrainTransform per image": (
        best_of(lambda: decoder(raw)), best_of(lambda: [transform(p) for p in paths], repeats=2))}
    images = decoder.decode_jpegs([raw[0][k] for k in range(batch)])
    geometry = raw[2]

    def per_image():
        for image, row in zip(images, geometry.tolist()):
            x1, y1, x2, y2 = (int(v) for v in row[:4])
            torch.nn.functional.interpolate(image[None, :, y1:y2, x1:x2].float(), size=(224, 224), mode="bilinear",
                                            antialias=True, align_corners=False)
    rows["crop+resize alone: batched vs per image"] = (
        best_of(lambda: gpu_data.crop_resize(images, geometry, 224)), best_of(per_image))
    return rows


def make_jpegs(folder, count=256, size=(500, 375)):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        w, h = size
        blobs = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        pixels = np.array(Image.fromarray(blobs).resize((w, h), Image.BICUBIC))
        pixels = np.clip(pixels.astype(np.int16) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
        path = Path(folder) / f"gen_{k:04d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def compiled_in_subprocess(args, mode, limit):
    cmd = [sys.executable, __file__, "--device", args.device, "--only-compiled", mode, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within {limit} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: error: no CUDA GPU visible to torch (CPU-only wheel, no driver, or "
                 "CUDA_VISIBLE_DEVICES empty); run with --device cpu for a dry run")
    if device.type == "cuda":
        run.set_up_device(device)
    if args.only_compiled:
        print(json.dumps(synthetic(device, args.batch, args.steps, args.warmup, args.only_compiled)))
        return
    results = {}

    def row(name, value):
        results[name] = value
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items()}
        print(f"{name}: {shown}", flush=True)

    row("synthetic eager", synthetic(device, args.batch, args.steps, args.warmup))
    for mode in args.compile_modes:
        row(f"synthetic compiled ({mode})", compiled_in_subprocess(args, mode, args.compile_limit))
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(Path(args.images).glob("**/*.JPEG")) if args.images else make_jpegs(tmp, args.files)
        if not files:
            sys.exit(f"bench_gpu.py: error: --images {args.images}: no .JPEG files there")
        for backend in ("cpu", "gpu"):
            for workers in args.workers:
                row(f"real JPEGs, {backend} backend, {workers} workers",
                    real(device, files, backend, workers, args.batch, args.real_steps, args.real_warmup))
        for name, (ours, reference) in crop_resize_rows(device, files, args.crop_batch).items():
            row(name, {"batched": ours, "per_image": reference, "ratio": ours / reference})
    eager = results["synthetic eager"]["images_per_s"]
    best = max([eager] + [r["images_per_s"] for k, r in results.items() if k.startswith("synthetic compiled")
                          and "images_per_s" in r])
    print(f"synthetic: eager {eager:,.0f}, best {best:,.0f} images/s (goal on one H200: {GOAL:,})")
    for workers in args.workers:
        for backend in ("cpu", "gpu"):
            r = results[f"real JPEGs, {backend} backend, {workers} workers"]["images_per_s"]
            print(f"real JPEGs, {backend} backend, {workers} workers: {r:,.0f} images/s = {r / best:.0%} of synthetic "
                  "(goal: 90% with 16 workers)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--images", default=None, help="folder of .JPEG files (default: generated)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check that the bench runs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--real-steps", type=int, default=40)
    p.add_argument("--real-warmup", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead"])
    p.add_argument("--compile-limit", type=int, default=150, help="seconds per compiled mode")
    p.add_argument("--files", type=int, default=256, help="JPEGs to generate without --images")
    p.add_argument("--crop-batch", type=int, default=256)
    p.add_argument("--only-compiled", default=None, help=argparse.SUPPRESS)
    return p


def quick(args):
    args.batch, args.steps, args.warmup, args.real_steps, args.real_warmup = 4, 4, 2, 4, 2
    args.workers, args.compile_modes, args.files, args.crop_batch = [1], [], 8, 8
    return args


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    main(quick(parsed) if parsed.quick else parsed)
