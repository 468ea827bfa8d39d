"""Training-step speed: this repo's step against torchvision's mobilenet_v2 in a plain eager NCHW fp32
loop, measured side by side in one run (rounds alternate, so a busy machine slows both alike).

    python bench/bench_train.py --batch-size 32 --input-size 224

"ours" is `loop.train_one_epoch` itself (channels_last, the per-step checks and statistics included) on
this repo's MobileNetV2, on the CPU with the fused BatchNorm kernel as train.py runs it; "reference" is
`torchvision.models.mobilenet_v2()` with the textbook loop (forward, loss, zero_grad, backward, SGD step)
on NCHW float32 input. Both use SGD momentum 0.9, weight decay 4e-5, the same batches and the same
thread count.

On the CPU each variant runs in a process of its own, set up as its script sets itself up: ours calls
`mnv2.training.run.keep_freed_memory()` as train.py does, the reference keeps the C library's defaults, as
torchvision's scripts do. Neither one's process settings can then reach the other.
"""
import argparse
import functools
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv2 import distributed  # noqa: E402
from mnv2.data.transforms import normalize  # noqa: E402
from mnv2.training import optimization  # noqa: E402
from mnv2.training import loop
from mnv2.training.learner import Learner, use_fused_batchnorm
from mnv2.training.run import keep_freed_memory
from MobileNetV2 import MobileNetV2  # noqa: E402


def batches(n, batch_size, input_size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, batch_size, 3, input_size, input_size), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, num_classes, (n, batch_size), generator=g)
    return [(images[i], targets[i], torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.int64))
            for i in range(n)]


def torchvision_steps(model, optimizer, data):
    """The plain loop: NCHW float32, eager."""
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for images, targets, _, _ in data:
        x = normalize(images)
        loss = criterion(model(x), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def build_loop(kind, device, batch_size, input_size, steps, num_classes, amp_dtype=None):
    """A function that runs `steps` training steps of `kind` ("reference", "ours" or "ours compiled")."""
    import torchvision

    torch.manual_seed(0)
    # A few distinct batches, cycled: as many as `steps` would cost memory and time to make, not realism.
    distinct = [(i.to(device), t.to(device), k, f)
                for i, t, k, f in batches(min(steps, 4), batch_size, input_size, num_classes)]
    data = [distinct[k % len(distinct)] for k in range(steps)]
    if kind == "reference":
        tv = torchvision.models.mobilenet_v2(num_classes=num_classes).to(device)
        optimizer = torch.optim.SGD(tv.parameters(), lr=0.045, momentum=0.9, weight_decay=4e-5)
        return lambda: torchvision_steps(tv, optimizer, data)
    model = MobileNetV2(num_classes=num_classes).to(device, memory_format=torch.channels_last)
    if device.type == "cpu":  # as train.py sets up a CPU run
        use_fused_batchnorm(model, log=lambda *a: None)
    optimizer = optimization.build_optimizer(model, lr=0.045)
    raw = model
    if kind == "ours compiled":
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    learner = Learner(model, raw, torch.nn.CrossEntropyLoss(), optimizer, optimization.LRSchedule(0.045, 1),
                            device, scaler=scaler, amp_dtype=amp_dtype, channels_last=True)
    return lambda: loop.train_one_epoch(learner, data, 0, len(data), distributed.Context(device=device),
                                         log=lambda *a: None)


def _seconds(fn, device):
    """Wall time of fn(); on CUDA the queue is drained first and last, so no launch-only time is counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _cpu_worker(conn, kind, settings, threads):
    """One CPU variant in its own process: answers each "run" with the seconds of one round."""
    try:
        torch.set_num_threads(threads)
        if kind != "reference":
            keep_freed_memory()  # as train.py sets up a CPU run
        loop = build_loop(kind, torch.device("cpu"), **settings)
        conn.send(_seconds(loop, torch.device("cpu")))  # the first round: warm-up (and compilation)
        while conn.recv() == "run":
            conn.send(_seconds(loop, torch.device("cpu")))
    except Exception as e:  # reported by the parent, which names the variant
        conn.send(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")


class _CpuVariant:
    """The parent's handle on a `_cpu_worker`: call it to time one round."""

    def __init__(self, kind, settings, threads):
        context = multiprocessing.get_context("spawn")
        self.kind = kind
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_cpu_worker, args=(child, kind, settings, threads), daemon=True)
        self.process.start()
        child.close()

    def result(self):
        try:
            answer = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.kind} process ended (exit code {self.process.exitcode})") from None
        if isinstance(answer, str):
            raise RuntimeError(f"{self.kind}: {answer}")
        return answer

    def __call__(self):
        self.conn.send("run")
        return self.result()

    def close(self):
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run(batch_size=32, input_size=224, steps=3, rounds=5, num_classes=1000, device="cpu", amp=None,
        compile=False, log=print):
    """Training images/s of the repo's step vs torchvision's plain eager NCHW fp32 step, median of
    `rounds` alternating rounds of `steps` steps. Returns {name: {"ratio", "ours", "reference", "unit"}}.

    On CUDA the batches live on the GPU (synthetic data: the loader is measured elsewhere) and the repo
    step runs as train.py runs it there: channels_last, AMP (bf16 where supported, amp=None: on for CUDA,
    off on the CPU), cudnn.benchmark; compile=True adds a torch.compile row.
    """
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    amp_dtype = None
    if amp:
        amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size, as train.py sets it
    settings = dict(batch_size=batch_size, input_size=input_size, steps=steps, num_classes=num_classes,
                    amp_dtype=amp_dtype)
    kinds = ["reference", "ours"] + (["ours compiled"] if compile else [])
    first, loops = {}, {}
    if device.type == "cpu":
        loops = {kind: _CpuVariant(kind, settings, torch.get_num_threads()) for kind in kinds}
    try:
        for kind in kinds:  # warm-up: allocator, oneDNN primitives / cuDNN autotuning, compilation
            try:
                if device.type == "cpu":
                    first[kind] = loops[kind].result()
                else:
                    loops[kind] = functools.partial(_seconds, build_loop(kind, device, **settings), device)
                    first[kind] = loops[kind]()
            except Exception as e:
                if kind != "ours compiled":
                    raise
                log(f"torch.compile not used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
                if device.type == "cpu":
                    loops[kind].close()
                del loops[kind]
        if device.type == "cpu":
            for step in loops.values():  # one more untimed round: glibc's heap settles after a few steps
                step()
        times = {kind: [] for kind in loops}
        for _ in range(rounds):  # alternate, so load from other processes slows every variant alike
            for kind, step in loops.items():
                times[kind].append(step())
    finally:
        if device.type == "cpu":
            for step in loops.values():
                step.close()
    speed = {kind: steps * batch_size / statistics.median(t) for kind, t in times.items()}
    where = device.type + (f", {str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype else "")
    rows = {f"training step ({where})": {"ratio": speed["ours"] / speed["reference"], "ours": speed["ours"],
                                         "reference": speed["reference"], "unit": "images/s"}}
    if "ours compiled" in speed:
        rows[f"training step ({where}, torch.compile)"] = {
            "ratio": speed["ours compiled"] / speed["reference"], "ours": speed["ours compiled"],
            "reference": speed["reference"], "unit": "images/s"}
        log(f"torch.compile: first {steps} steps took {first['ours compiled']:.0f} s")
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="also time the step with torch.compile (minutes to compile)")
    return p


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.batch_size, args.input_size, args.steps, args.rounds, args.num_classes, args.device,
               compile=args.compile)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | batch {args.batch_size} x "
          f"{args.input_size} px, {args.steps} steps x {args.rounds} rounds, medians")
    for name, r in rows.items():
        print(f"{name}: ours {r['ours']:.1f} img/s, torchvision eager NCHW fp32 {r['reference']:.1f} img/s, "
              f"{r['ratio']:.2f}x")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
