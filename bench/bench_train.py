"""Training-step speed: this repo's CPU step against torchvision's mobilenet_v2 in a plain eager NCHW fp32
loop, measured side by side in one run (rounds alternate, so a busy machine slows both alike).

    python bench/bench_train.py --batch-size 32 --input-size 224

"repo" is `train.train_one_epoch` itself (channels_last, the per-step checks and statistics included) on
this repo's MobileNetV2; "torchvision" is `torchvision.models.mobilenet_v2()` with the textbook loop
(forward, loss, zero_grad, backward, SGD step) on NCHW float32 input. Both use SGD momentum 0.9,
weight decay 4e-5, the same batches, the same thread count. Prints one line per variant and the ratio.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import train  # noqa: E402
from MobileNetV2 import MobileNetV2  # noqa: E402
from read_ImageNetData import normalize  # noqa: E402


def batches(n, batch_size, input_size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, batch_size, 3, input_size, input_size), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, num_classes, (n, batch_size), generator=g)
    return [(images[i], targets[i], torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.int64))
            for i in range(n)]


def torchvision_steps(model, optimizer, data):
    """The plain loop: NCHW float32, eager. Returns seconds per step."""
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for images, targets, _, _ in data:
        x = normalize(images)
        loss = criterion(model(x), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(data)


def repo_steps(model, optimizer, data, channels_last):
    """train.train_one_epoch over the same batches. Returns seconds per step."""
    schedule = train.LRSchedule(0.045, 1)
    start = time.perf_counter()
    train.train_one_epoch(model, data, torch.nn.CrossEntropyLoss(), optimizer, schedule, 0, len(data),
                          torch.device("cpu"), distributed.Context(), channels_last=channels_last, log=lambda *a: None)
    return (time.perf_counter() - start) / len(data)


def _seconds(fn, device):
    """Wall time of fn(); on CUDA the queue is drained first and last, so no launch-only time is counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(batch_size=32, input_size=224, steps=3, rounds=5, num_classes=1000, device="cpu", amp=None,
        compile=False, log=print):
    """Training images/s of the repo's step vs torchvision's plain eager NCHW fp32 step, median of
    `rounds` alternating rounds of `steps` steps. Returns {name: {"ratio", "ours", "reference", "unit"}}.

    On CUDA the batches live on the GPU (synthetic data: the loader is measured elsewhere) and the repo
    step runs as train.py runs it there: channels_last, AMP (bf16 where supported, amp=None: on for CUDA,
    off on the CPU), cudnn.benchmark; compile=True adds a torch.compile row.
    """
    import torchvision

    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    amp_dtype = None
    if amp:
        amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size, as train.py sets it
    torch.manual_seed(0)
    # A few distinct batches, cycled: as many as `steps` would cost memory and time to make, not realism.
    distinct = [(i.to(device), t.to(device), k, f)
                for i, t, k, f in batches(min(steps, 4), batch_size, input_size, num_classes)]
    data = [distinct[k % len(distinct)] for k in range(steps)]

    def repo_loop(model, optimizer):
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        return lambda: train.train_one_epoch(model, data, torch.nn.CrossEntropyLoss(), optimizer,
                                             train.LRSchedule(0.045, 1), 0, len(data), device,
                                             distributed.Context(device=device),
                                             scaler=scaler, amp_dtype=amp_dtype, channels_last=True,
                                             log=lambda *a: None)

    tv = torchvision.models.mobilenet_v2(num_classes=num_classes).to(device)
    tv_opt = torch.optim.SGD(tv.parameters(), lr=0.045, momentum=0.9, weight_decay=4e-5)
    loops = {"reference": lambda: torchvision_steps(tv, tv_opt, data)}
    ours = MobileNetV2(num_classes=num_classes).to(device, memory_format=torch.channels_last)
    loops["ours"] = repo_loop(ours, torch.optim.SGD(train.parameter_groups(ours, 4e-5), lr=0.045, momentum=0.9,
                                                    foreach=True))
    compile_seconds = None
    if compile:
        raw = MobileNetV2(num_classes=num_classes).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(train.parameter_groups(raw, 4e-5), lr=0.045, momentum=0.9, foreach=True)
        compiled = repo_loop(torch.compile(raw), optimizer)
        try:  # the first steps compile (minutes); a failure leaves the eager rows standing
            compile_seconds = _seconds(compiled, device)
            loops["ours compiled"] = compiled
        except Exception as e:
            log(f"torch.compile not used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    for name, loop in loops.items():
        if name != "ours compiled":  # warm-up: allocator, oneDNN primitives / cuDNN autotuning
            _seconds(loop, device)
    times = {name: [] for name in loops}
    for _ in range(rounds):  # alternate, so load from other processes slows every variant alike
        for name, loop in loops.items():
            times[name].append(_seconds(loop, device))
    speed = {name: steps * batch_size / statistics.median(t) for name, t in times.items()}
    where = device.type + (f", {str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype else "")
    rows = {f"training step ({where})": {"ratio": speed["ours"] / speed["reference"], "ours": speed["ours"],
                                         "reference": speed["reference"], "unit": "images/s"}}
    if "ours compiled" in speed:
        rows[f"training step ({where}, torch.compile)"] = {
            "ratio": speed["ours compiled"] / speed["reference"], "ours": speed["ours compiled"],
            "reference": speed["reference"], "unit": "images/s"}
        log(f"torch.compile: first {steps} steps took {compile_seconds:.0f} s")
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the step with torch.compile (minutes to compile)")
    return p


def main(args):
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(args.steps, args.batch_size, args.input_size, args.num_classes)
    variants = {}
    tv = torchvision.models.mobilenet_v2(num_classes=args.num_classes)
    variants["torchvision eager NCHW fp32"] = (
        tv, torch.optim.SGD(tv.parameters(), lr=0.045, momentum=0.9, weight_decay=4e-5),
        lambda m, o: torchvision_steps(m, o, data))
    ours = MobileNetV2(num_classes=args.num_classes).to(memory_format=torch.channels_last)
    variants["repo train step (channels_last)"] = (
        ours, torch.optim.SGD(train.parameter_groups(ours, 4e-5), lr=0.045, momentum=0.9, foreach=True),
        lambda m, o: repo_steps(m, o, data, channels_last=True))

    if args.compile:
        compiled = MobileNetV2(num_classes=args.num_classes).to(memory_format=torch.channels_last)
        variants["repo train step (+ torch.compile)"] = (
            torch.compile(compiled),
            torch.optim.SGD(train.parameter_groups(compiled, 4e-5), lr=0.045, momentum=0.9, foreach=True),
            lambda m, o: repo_steps(m, o, data, channels_last=True))

    for model, optimizer, step in variants.values():  # warm-up: allocator, oneDNN primitives, compilation
        step(model, optimizer)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, optimizer, step) in variants.items():
            times[name].append(step(model, optimizer))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs | "
          f"batch {args.batch_size} x {args.input_size} px, {args.steps} steps x {args.rounds} rounds")
    # The fastest round is the least disturbed by other work on the machine (as timeit advises);
    # the median is printed beside it.
    best = {name: min(t) for name, t in times.items()}
    for name, seconds in best.items():
        print(f"{name:34s} {seconds * 1000:8.1f} ms/step  {args.batch_size / seconds:7.1f} img/s  "
              f"(median {statistics.median(times[name]) * 1000:.1f} ms)")
    names = list(times)
    base, base_median = best[names[0]], statistics.median(times[names[0]])
    for name in names[1:]:
        print(f"speed-up of the {name} over torchvision eager NCHW: {base / best[name]:.2f}x "
              f"(medians: {base_median / statistics.median(times[name]):.2f}x)")
    return base / best[names[1]]


if __name__ == "__main__":
    main(get_args_parser().parse_args())
