"""How fast is it, and where does the time go: every measurement of the repo side by side with its
reference, in one run, as one table.

    python bench/run_all.py [--quick] [--json PATH] [--images DIR] [--device cpu|cuda] [--threads N]

Rows (ratio = ours / reference for speeds, reference / ours for latencies, so above 1 is always better):
  * input pipeline, train and eval transforms: read_ImageNetData's loaders vs torchvision ImageFolder with
    the standard transforms, images/s on one core (bench_data.py);
  * input pipeline from shards: the training dataset reading tar shards (local, and over HTTP on
    127.0.0.1) vs reading the same images as files, and the shard-writing rate (bench_shards.py);
  * training step: loop.train_one_epoch on this repo's model vs torchvision's mobilenet_v2 in a plain
    eager NCHW fp32 loop, same batches (bench_train.py);
  * evaluation: evaluate() on the inference-prepared model vs the same plain loop, logits within 1e-4
    (bench_eval.py);
  * batch-1 latency: the exported ONNX model in onnxruntime vs eager PyTorch (bench_eval.py);
  * INT8: quantize.py's INT8 file vs the float model, both in onnxruntime: images/s and batch-1 latency
    (bench_int8.py);
  * one real training epoch on the demo data (train.py's own loop and loader): the share of the epoch
    spent waiting for the next batch (ratio = that share; lower is better).
On CUDA the training and evaluation rows use the GPU paths (AMP, channels_last, --compile on request),
and more rows say whether the input pipeline keeps the GPU fed: training images/s with synthetic data on
the GPU vs with the real loader at several --workers counts, and JPEG decoding on the GPU (nvjpeg).

The pairs in each row run in turn in this one run, several times (medians reported), so other load on
the machine slows both sides alike: the ratios are what to compare across machines. The CPU training
step runs its two sides in two processes, so that each keeps its own allocator settings.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import bench_data  # noqa: E402
import bench_eval  # noqa: E402
import bench_int8  # noqa: E402
import bench_shards  # noqa: E402
import bench_train  # noqa: E402

from mnv2 import checkpoint  # noqa: E402
from mnv2 import distributed  # noqa: E402
from mnv2.data import demo, loaders, transforms
from mnv2.deploy.inference import prepare_for_inference  # noqa: E402
from mnv2.scoring import evaluate  # noqa: E402
from mnv2.training import optimization  # noqa: E402
from mnv2.training import loop, recipes  # noqa: E402
from mnv2.training.learner import Learner
from MobileNetV2 import MobileNetV2  # noqa: E402

SECTIONS = ("data", "shards", "train", "eval", "onnx", "int8", "epoch", "loader", "decode")
# Settings per mode. quick: under two minutes on two busy cores, for smoke tests; default: stable medians.
SETTINGS = {
    "quick": dict(data_repeats=1, data_limit=32, train_batch=8, train_size=128, train_steps=2, train_rounds=2,
                  eval_batch=16, eval_batches=1, eval_repeats=2, eval_size=160, onnx_runs=5, onnx_size=160,
                  demo_per_class=(24, 4), gpu_batch=128, gpu_steps=10, gpu_rounds=2, loader_steps=8,
                  workers=(4,), pt2e=False),  # PT2E's compiles alone take about a minute here
    "default": dict(data_repeats=5, data_limit=0, train_batch=32, train_size=224, train_steps=2, train_rounds=5,
                    eval_batch=32, eval_batches=3, eval_repeats=5, eval_size=224, onnx_runs=30, onnx_size=224,
                    demo_per_class=(None, None), gpu_batch=256, gpu_steps=20, gpu_rounds=5, loader_steps=24,
                    workers=(2, 4, 8, 16), pt2e=True),
}


def _row(ratio, ours, reference, unit, note=""):
    return {"ratio": float(ratio), "ours": float(ours), "reference": float(reference), "unit": unit, "note": note}


# --------------------------------------------------------------------------------------------------
# CPU and shared rows: each wraps one per-area benchmark


def data_rows(images, s, threads):
    rows = bench_data.run(images, repeats=s["data_repeats"], limit=s["data_limit"])
    torch.set_num_threads(threads)  # bench_data pins one thread for its per-core figures
    notes = {"input pipeline train (per core)": "RandomResizedCrop+flip, uint8 out vs ToTensor+Normalize",
             "input pipeline eval (per core)": "Resize+CenterCrop, uint8 out vs ToTensor+Normalize",
             "input pipeline train ta_wide+erase (per core)": "torchvision-v2's 176 px crop+flip, TrivialAugmentWide, "
                                                              "erase 0.1: uint8 out vs torchvision v2 on PIL",
             "input pipeline eval identical to torchvision": "images with exactly torchvision's pixels"}
    return {name: _row(r["ratio"], r["ours"], r["reference"], r["unit"], notes.get(name, ""))
            for name, r in rows.items()}


def shard_rows(images, s, threads):
    rows = bench_shards.run(images, repeats=s["data_repeats"], limit=s["data_limit"])
    torch.set_num_threads(threads)  # bench_shards pins one thread for its per-core figures
    notes = {"input pipeline train from shards vs folders (per core)":
             "RandomResizedCrop+flip from tar shards through the member index vs the same files",
             "input pipeline train from shards over HTTP 127.0.0.1 vs folders (per core)":
             "one ranged GET per image, server in the same process, cache off",
             "shard writing vs the folder training pipeline (per core)":
             "read_ImageNetData.py --write-shards (every image decoded once) vs one pass of training reads"}
    return {name: _row(r["ratio"], r["ours"], r["reference"], r["unit"], notes.get(name, ""))
            for name, r in rows.items()}


def eval_rows_cpu(s):
    r = bench_eval.run(s["eval_batch"], s["eval_batches"], s["eval_repeats"], s["eval_size"])
    note = (f"batch {r['batch_size']} x {r['image_size']} px via {r['backend']}, "
            f"max |logit diff| {r['max_abs_diff']:.1e}")
    return {"evaluation (cpu)": _row(r["ratio"], r["ours"], r["reference"], "images/s", note)}, r["max_abs_diff"]


def onnx_rows(s, log):
    r = bench_eval.onnx_latency(bench_eval.random_model(), s["onnx_size"], s["onnx_runs"], log=log)
    if r is None:
        return {}, 0.0
    note = f"{s['onnx_size']} px, onnxruntime CPU vs eager, max |diff| {r['max_abs_diff']:.1e}"
    return {"batch-1 latency, ONNX vs eager PyTorch": _row(r["ratio"], r["ours"], r["reference"], "ms", note)}, \
        r["max_abs_diff"]


def int8_rows(s, log):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log("onnxruntime not installed: no INT8 rows")
        return {}
    r = bench_int8.speed(s["eval_batch"], s["eval_size"], s["eval_repeats"], s["onnx_runs"], log=log)
    t, lat = r["throughput"], r["latency"]
    size = f"{r['bytes']['int8'] / 1e6:.1f} MB vs {r['bytes']['float'] / 1e6:.1f} MB"
    return {"evaluation int8 (cpu)": _row(t["ratio"], t["ours"], t["reference"], "images/s",
                                          f"batch {r['batch_size']} x {r['image_size']} px, INT8 QDQ vs float, both "
                                          f"onnxruntime; file {size}"),
            "batch-1 latency int8 (cpu)": _row(lat["ratio"], lat["ours"], lat["reference"], "ms",
                                               f"{r['image_size']} px, INT8 vs float, both onnxruntime"),
            **pt2e_rows(s, log)}


def pt2e_rows(s, log):
    """torchao PT2E INT8 (X86InductorQuantizer, torch.compile) against the onnxruntime INT8 file."""
    if not s["pt2e"]:
        return {}
    try:
        r = bench_int8.pt2e_speed(s["eval_batch"], s["eval_size"], s["eval_repeats"], s["onnx_runs"], log=log)
    except Exception as e:  # no C++ compiler for inductor, no torchao: say so, keep the other rows
        log(f"PT2E INT8 rows not measured ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
        return {}
    t, lat = r["throughput"], r["latency"]
    start = f"compile {r['compile_seconds']['throughput']:.0f} s"
    return {"evaluation int8 pt2e vs onnxruntime (cpu)": _row(
                t["ratio"], t["ours"], t["reference"], "images/s",
                f"batch {r['batch_size']} x {r['image_size']} px, torchao X86InductorQuantizer + torch.compile vs "
                f"the onnxruntime INT8 file; {start}"),
            "batch-1 latency int8 pt2e vs onnxruntime (cpu)": _row(
                lat["ratio"], lat["ours"], lat["reference"], "ms",
                f"{r['image_size']} px, PT2E + inductor vs onnxruntime INT8")}


# --------------------------------------------------------------------------------------------------
# One real training epoch on the demo data: where the time goes


class _TimedLoader:
    """Wraps a loader and adds up the time spent waiting in next(): the rest of the epoch is compute."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - start
            yield batch


def demo_epoch_rows(s, device, num_workers=0, seed=0):
    """One epoch of train.py's loop with train.py's --demo settings on freshly made demo data.

    Each step ends with a host sync in train_one_epoch (its per-step statistics), so on CUDA the time in
    next() is time the GPU had nothing queued, not time hidden behind running kernels.
    """
    d = recipes.named("demo").flags
    train_per_class, val_per_class = s["demo_per_class"]
    with tempfile.TemporaryDirectory() as tmp:
        root = demo.make_demo(Path(tmp) / "demo", seed=seed, train_per_class=train_per_class,
                              val_per_class=val_per_class)
        train_set, _, classes, _ = loaders.build_datasets(root, "sorted", d["input_size"])
        train_set.transform = transforms.TrainTransform(d["input_size"], scale=(d["crop_scale_min"], 1.0), hflip=d["hflip"])
        sampler = loaders.TrainSampler(len(train_set), seed=seed)
        sampler.set_epoch(0)
        loader = _TimedLoader(loaders.build_loader(train_set, d["batch_size"], sampler, num_workers=num_workers,
                                                pin_memory=device.type == "cuda", persistent_workers=False,
                                                drop_last=True))
        steps = len(train_set) // d["batch_size"]
        checkpoint.seed_everything(seed)
        model = MobileNetV2(num_classes=len(classes.wnids), width_mult=d["width_mult"])
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = optimization.build_optimizer(model, lr=d["lr"])
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if device.type == "cuda" else None
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        schedule = optimization.LRSchedule(d["lr"], d["num_epochs"], d["lr_schedule"],
                                           warmup_epochs=d["warmup_epochs"])
        learner = Learner(model, model, optimization.build_criterion(), optimizer, schedule, device,
                                scaler=scaler, amp_dtype=amp_dtype)
        start = time.perf_counter()
        meter, done, _ = loop.train_one_epoch(learner, loader, 0, steps, distributed.Context(device=device),
                                               log=lambda *a: None)
        seconds = time.perf_counter() - start
    note = (f"{done} steps of {d['batch_size']} x {d['input_size']} px, width {d['width_mult']}, "
            f"{num_workers} workers, {meter.count / seconds:.0f} img/s, {seconds - loader.wait:.1f} s computing")
    return {f"demo epoch ({device.type}): share waiting for data": _row(loader.wait / seconds, loader.wait, seconds,
                                                                        "s", note)}


# --------------------------------------------------------------------------------------------------
# CUDA only: evaluation on the GPU, the real loader feeding the GPU, nvjpeg decoding


def _sync_seconds(fn, device):
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def eval_rows_cuda(s, device):
    model = bench_eval.random_model()
    ref = bench_eval.reference_model(model).to(device)
    batch, size = s["gpu_batch"], 224
    batches = [(i.to(device), t.to(device), k, f)
               for i, t, k, f in bench_eval.make_batches(batch, 4, size, model.config["num_classes"])]
    mean = torch.tensor(transforms.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(transforms.IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def plain():
        with torch.no_grad():
            for images, _, _, _ in batches:
                ref((images.float() / 255 - mean) / std).topk(5, dim=1)

    fast = prepare_for_inference(model, device=device)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    loops = {"reference": plain, "ours": lambda: evaluate(fast, batches, device, amp=dtype, progress=False)}
    # The 1e-4 parity is a property of the fp32 model (bf16 rounds at 1e-2): checked without TF32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        x = transforms.normalize(batches[0][0][:16], channels_last=True)
        diff = (fast(x).float() - ref(x.contiguous())).abs().max().item()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for step in loops.values():
        step()  # cuDNN autotuning, allocator
    times = {name: [] for name in loops}
    for _ in range(s["gpu_rounds"]):
        for name, step in loops.items():
            times[name].append(_sync_seconds(step, device))
    speed = {name: len(batches) * batch / statistics.median(t) for name, t in times.items()}
    note = f"batch {batch}, {str(dtype).replace('torch.', '')} autocast vs fp32 NCHW, fp32 max |diff| {diff:.1e}"
    return {"evaluation (cuda)": _row(speed["ours"] / speed["reference"], speed["ours"], speed["reference"],
                                      "images/s", note)}, diff


def loader_rows_cuda(images, s, device, workers, synthetic):
    """Training images/s on the GPU fed by the real loader (JPEG decode + crop in worker processes),
    vs the same step on synthetic batches already on the GPU: a ratio near 1 means the loader keeps up."""
    batch = s["gpu_batch"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_data._paths(images, 0) if images else bench_data.make_jpegs(Path(tmp) / "jpegs")
        # Cycle the files to fill the steps: the OS caches them, so this measures decoding, not the disk.
        n = batch * (s["loader_steps"] + 2)
        samples = [(str(paths[k % len(paths)]), 0) for k in range(n)]
        dataset = loaders.ImageNetDataset(samples, transforms.train_transform(224), train=True)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        for w in workers:
            model = MobileNetV2().to(device, memory_format=torch.channels_last)
            optimizer = optimization.build_optimizer(model, lr=0.045)
            sampler = loaders.TrainSampler(n, seed=0)
            sampler.set_epoch(0)
            loader = loaders.build_loader(dataset, batch, sampler, num_workers=w, pin_memory=True,
                                       persistent_workers=False, drop_last=True)
            stamps = []
            learner = Learner(model, model, torch.nn.CrossEntropyLoss(), optimizer,
                                    optimization.LRSchedule(0.045, 1), device,
                                    scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
                                    amp_dtype=dtype)
            loop.train_one_epoch(learner, loader, 0, n // batch, distributed.Context(device=device),
                                  log=lambda *a: None, on_step=lambda *a: stamps.append(time.perf_counter()))
            # From the end of step 2 on: worker start-up and cuDNN autotuning are paid once per run, not per step.
            speed = batch * (len(stamps) - 2) / (stamps[-1] - stamps[1])
            rows[f"training, real loader, {w} workers (cuda)"] = _row(
                speed / synthetic, speed, synthetic, "images/s",
                f"batch {batch}, JPEG decode + RandomResizedCrop on {w} CPU processes vs synthetic data on the GPU")
    return rows


def decode_rows_cuda(images, device, count=256):
    """nvJPEG (TorchCodec's decode_jpeg on the GPU, batched) vs full-size libjpeg decoding on one CPU core."""
    from torchcodec.decoders import decode_jpeg

    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_data._paths(images, 0) if images else bench_data.make_jpegs(Path(tmp) / "jpegs")
        files = [torch.frombuffer(bytearray(Path(paths[k % len(paths)]).read_bytes()), dtype=torch.uint8)
                 for k in range(count)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def cpu():
            for f in files[:64]:
                decode_jpeg(f, mode="RGB")

        def gpu():
            decode_jpeg(files, mode="RGB", device=device)

        cpu(), gpu()  # nvjpeg handles, first-call allocations
        t_cpu, t_gpu = [], []
        for _ in range(3):
            start = time.perf_counter()
            cpu()
            t_cpu.append(time.perf_counter() - start)
            t_gpu.append(_sync_seconds(gpu, device))
        t_cpu, t_gpu = statistics.median(t_cpu), statistics.median(t_gpu)
    finally:
        torch.set_num_threads(threads)
    ours, reference = count / t_gpu, 64 / t_cpu
    return {"JPEG decode, GPU (nvjpeg) vs 1 CPU core": _row(ours / reference, ours, reference, "images/s",
                                                           f"{count} files per batch, full size, RGB")}


# --------------------------------------------------------------------------------------------------
# The suite


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def run_suite(args, log=print):
    """All rows for the sections asked for, plus a list of problems (a section that failed, a parity miss)."""
    device = torch.device(args.device)
    s = dict(SETTINGS["quick" if args.quick else "default"])
    if args.workers:
        s["workers"] = tuple(args.workers)
    threads = torch.get_num_threads()
    rows, problems = {}, []

    def section(name, fn):
        if name not in args.only:
            return None
        log(f"[{time.strftime('%H:%M:%S')}] {name} ...")
        try:
            return fn()
        except Exception as e:  # one broken measurement must not hide the others; it is reported at the end
            problems.append(f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            log(f"  failed: {problems[-1]}")
            return None

    def parity(name, result):
        if result is None:
            return
        new_rows, diff = result
        rows.update(new_rows)
        if not diff <= 1e-4:
            problems.append(f"{name}: logits differ from the reference by {diff:.2e} > 1e-4")

    rows.update(section("data", lambda: data_rows(args.images, s, threads)) or {})
    rows.update(section("shards", lambda: shard_rows(args.images, s, threads)) or {})
    if device.type == "cpu":
        train_rows = section("train", lambda: bench_train.run(s["train_batch"], s["train_size"], s["train_steps"],
                                                              s["train_rounds"], compile=args.compile, log=log)) or {}
        note = (f"batch {s['train_batch']} x {s['train_size']} px, train_one_epoch (channels_last, fused BatchNorm) "
                "vs fp32 NCHW eager")
        rows.update({name: dict(r, note=note) for name, r in train_rows.items()})
        # bf16 autocast on the CPU (train.py --amp): beside fp32, against the same fp32 reference
        bf16_rows = section("train", lambda: bench_train.run(s["train_batch"], s["train_size"], s["train_steps"],
                                                             s["train_rounds"], amp=True, log=log)) or {}
        rows.update({name: dict(r, note=f"batch {s['train_batch']} x {s['train_size']} px, --amp (bf16 autocast) "
                                          "vs fp32 NCHW eager") for name, r in bf16_rows.items()})
        parity("eval", section("eval", lambda: eval_rows_cpu(s)))
    else:
        train_rows = section("train", lambda: bench_train.run(s["gpu_batch"], 224, s["gpu_steps"], s["gpu_rounds"],
                                                              device=device, compile=args.compile, log=log)) or {}
        rows.update({name: dict(r, note=f"batch {s['gpu_batch']}, synthetic data on the GPU, channels_last vs "
                                        "fp32 NCHW eager") for name, r in train_rows.items()})
        parity("eval", section("eval", lambda: eval_rows_cuda(s, device)))
    parity("onnx", section("onnx", lambda: onnx_rows(s, log)))
    rows.update(section("int8", lambda: int8_rows(s, log)) or {})
    # On the GPU the demo epoch runs as a real one would there: decoding in a few loader processes.
    workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    rows.update(section("epoch", lambda: demo_epoch_rows(s, device, workers)) or {})
    if device.type == "cuda":
        def loader():
            eager = [r for name, r in rows.items() if name.startswith("training step") and "compile" not in name]
            if eager:
                synthetic = eager[0]["ours"]
            else:  # the synthetic-data figure the loader rows compare against was not measured yet
                synthetic = next(iter(bench_train.run(s["gpu_batch"], 224, s["gpu_steps"], 2,
                                                      device=device).values()))["ours"]
            return loader_rows_cuda(args.images, s, device, s["workers"], synthetic)

        rows.update(section("loader", loader) or {})
        rows.update(section("decode", lambda: decode_rows_cuda(args.images, device)) or {})
    return rows, problems


def format_table(rows):
    lines = ["| measurement | ratio | ours | reference | unit | what |", "|---|---:|---:|---:|---|---|"]
    for name, r in rows.items():
        digits = 3 if r["unit"] == "s" and r["ratio"] < 10 else 2
        lines.append(f"| {name} | {r['ratio']:.{digits}f}x | {_num(r['ours'])} | {_num(r['reference'])} | "
                     f"{r['unit']} | {r.get('note', '')} |")
    return "\n".join(lines)


def _num(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true",
                   help="small batches, one or two repeats: under two minutes on 2 cores (a smoke test, noisy)")
    p.add_argument("--json", type=Path, default=None,
                   help='also write the rows here as {name: {"ratio", "ours", "reference", "unit"}}')
    p.add_argument("--images", type=Path, default=None,
                   help="folder of real JPEGs for the pipeline rows (default: generate 64 of ImageNet size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model rows (default: torch's choice; --quick: 1, so other work "
                        "on a small machine cannot slow it tenfold); the pipeline rows always use one")
    p.add_argument("--compile", action="store_true",
                   help="add a torch.compile training row (minutes to compile)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker counts for the CUDA real-loader rows (default: 2 4 8 16; --quick: 4)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)}; "
                        "loader and decode run on CUDA only)")
    return p


def main(args):
    parser = get_args_parser()
    if args.images is not None and not args.images.is_dir():
        parser.error(f"argument --images: {args.images} is not a directory")
    if args.threads is not None and args.threads < 1:
        parser.error("argument --threads: must be positive")
    args.only = [name.strip() for name in str(args.only).split(",") if name.strip()] \
        if isinstance(args.only, str) else list(args.only)
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"argument --only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    # Never touch CUDA unless asked or present: is_available() only asks the driver, it creates no context.
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but no CUDA GPU is visible; use --device cpu")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    rows, problems = run_suite(args, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    mode = "quick" if args.quick else "default"
    print(f"\n{machine_description(device)}\nmode {mode}, {time.perf_counter() - start:.0f} s; ratios above 1: "
          "ours is faster (demo epoch row: the share of the epoch spent waiting for data)\n")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain = {name: {k: r[k] for k in ("ratio", "ours", "reference", "unit")} for name, r in rows.items()}
        args.json.write_text(json.dumps(plain, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    for problem in problems:
        print(f"run_all.py: error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
