"""Fine-tuning on real photos, side by side in one run: the linear probe, the old default, the new default
(LP-FT) and the classic recipe of PyTorch's transfer-learning tutorial, best-epoch top-1 and time for each.

    python bench/bench_finetune.py --weights ../shared/pretrained/mobilenet_v2_real_bn.pth \
        --data ../shared/finetune_data/oxford12 --data ../shared/finetune_data/flowers5 --json out.json

Each of this repo's rows is one `train.py` command line in its own process, as a user runs it; the tutorial's
is its recipe written as a plain torchvision loop (torchvision's mobilenet_v2 with the same weights, SGD lr
0.001 momentum 0.9, batch 4, StepLR(7, 0.1), 25 epochs, RandomResizedCrop(224) + flip, the best epoch kept),
both with the backbone trained too and with the classifier alone (`--tutorial full`, `--tutorial frozen`; both
by default). Every row reads the photos at 224 px with the weights' own mean/std and a validation resize that
keeps the (square) photos whole. Each row reports its wall time and the CPU time of all its processes (which
other work on the machine disturbs less). `--skip` leaves rows out, `--tutorial none` the baseline (it takes
the longest by far).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnv2 import checkpoint, resolve  # noqa: E402
from mnv2.data.demo import make_folder_demo  # noqa: E402

# The old default: recipes/finetune.yaml as it was before LP-FT, spelled out.
OLD_DEFAULT = ["--lp-epochs", "0", "--num-epochs", "10", "--lr", "0.01", "--lr-schedule", "cosine",
               "--warmup-epochs", "1", "--batch-size", "32", "--no-freeze-bn"]
ROWS = {"linear probe": ["--freeze-backbone"], "new default (LP-FT)": [], "old default": OLD_DEFAULT}


def cpu_seconds():
    """User + system CPU seconds of this process and of every child it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(row):
    """Run `row()` (a dict of results) and add its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = row()
    result.update(seconds=time.perf_counter() - wall, cpu_seconds=cpu_seconds() - cpu)
    return result


def run_train(data, weights, out, extra, size, threads):
    """Best and per-epoch val top-1 of one train.py command line in its own process."""
    flags = ["--data-dir", data, "--pretrained", weights, "--save-path", out, "--device", "cpu", "--input-size",
             size, "--val-resize-size", size, "--num-workers", "2", "--print-freq", "1000000", *extra]
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, flags)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode:
        raise RuntimeError(f"train.py exited {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
    last = torch.load(Path(out) / "last.pth", map_location="cpu", weights_only=True)
    per_epoch = [m["val_top1"] for m in last["metrics"]]
    probe = re.search(r"LP-FT: .*val top-1 ([\d.]+)%", done.stdout)
    return {"top1": max(per_epoch), "per_epoch": per_epoch,
            "probe_top1": float(probe.group(1)) if probe else None}


def tutorial(data, weights, size, frozen, epochs=25, log=print):
    """The transfer-learning tutorial's recipe on `data` (train/ + val/ class folders): best val top-1."""
    T = torchvision.transforms
    found = resolve.weights(str(weights), flag="--weights", strict=False, log=lambda *a: None)
    mean, std = found.preprocessing["mean"], found.preprocessing["std"]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    train_set = torchvision.datasets.ImageFolder(Path(data) / "train", train_tf)
    val_set = torchvision.datasets.ImageFolder(Path(data) / "val", val_tf)
    generator = torch.Generator().manual_seed(0)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=4, shuffle=True, num_workers=2,
                                               generator=generator)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=32, num_workers=2)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    state = checkpoint.read_weights(weights)
    model.load_state_dict(state.get("model", state))
    model.classifier[1] = nn.Linear(model.last_channel, len(train_set.classes))
    if frozen:
        model.features.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    best, per_epoch = 0.0, []
    for epoch in range(epochs):
        model.train()
        if frozen:
            model.features.eval()
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        per_epoch.append(100.0 * correct / len(val_set))
        best = max(best, per_epoch[-1])
        log(f"  tutorial epoch {epoch + 1}/{epochs}: val top-1 {per_epoch[-1]:.2f}")
    return {"top1": best, "per_epoch": per_epoch}


def swings(per_epoch):
    """The largest drop of val top-1 from one epoch to the next (percentage points)."""
    return max([0.0] + [a - b for a, b in zip(per_epoch, per_epoch[1:])])


def save(path, results):
    """Write the rows so far (a long run that is stopped keeps what it measured)."""
    if path:
        path.write_text(json.dumps(results, indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="ImageNet MobileNetV2 weights to start from")
    p.add_argument("--data", type=Path, action="append", default=[],
                   help="a train/ + val/ folder of classes (repeatable); 'digits' writes the demo digits")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--tutorial", choices=["full", "frozen", "none"], action="append",
                   help="which tutorial rows to run (repeatable; default: frozen and full)")
    p.add_argument("--tutorial-epochs", type=int, default=25)
    p.add_argument("--skip", action="append", default=[], help="a row to leave out (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data or [Path("digits")]:
            size = args.input_size
            if str(data) == "digits":  # 8x8 digits: 64 px, no flips, crops that keep a digit a digit
                data = make_folder_demo(Path(tmp) / "digits", per_class=60)
                extra_split, size = ["--val-split", "0.25", "--hflip", "0", "--crop-scale-min", "0.35"], 64
            else:
                extra_split = []
            name = data.name
            results[name] = {}
            for row, extra in ROWS.items():
                if row in args.skip:
                    continue
                out = Path(tmp) / f"{name}-{len(results[name])}"
                r = timed(lambda: run_train(data, args.weights, out, extra + extra_split, size, args.threads))
                results[name][row] = r
                save(args.json, results)
                print(f"{name} | {row} | best top-1 {r['top1']:.2f} | {r['seconds']:.0f} s "
                      f"({r['cpu_seconds']:.0f} CPU s) | per epoch "
                      f"{' '.join(f'{v:.1f}' for v in r['per_epoch'])}", flush=True)
            for how in [] if extra_split else (args.tutorial or ["frozen", "full"]):
                if how == "none":
                    continue
                row = f"tutorial recipe ({how} backbone)"
                r = timed(lambda: tutorial(data, args.weights, args.input_size, how == "frozen", args.tutorial_epochs))
                results[name][row] = r
                save(args.json, results)
                print(f"{name} | {row} | best top-1 {r['top1']:.2f} | {r['seconds']:.0f} s "
                      f"({r['cpu_seconds']:.0f} CPU s)", flush=True)
    print("\n| data | how | best top-1 | largest epoch-to-epoch drop | time | CPU time |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        for row, r in rows.items():
            print(f"| {name} | {row} | {r['top1']:.2f} | {swings(r['per_epoch']):.1f} | {r['seconds']:.0f} s | "
                  f"{r['cpu_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
