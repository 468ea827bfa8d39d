"""Linear probe speed: `train.py --freeze-backbone` on cached backbone features against the plain loop
(`--no-cache-features`: the frozen backbone runs on every image of every epoch), side by side in one run.

    python bench/bench_linear_probe.py                      # 224 px, width 1.0, 10 classes x 40 images, 5 epochs
    python bench/bench_linear_probe.py --pretrained torchvision-v2 --data-dir my_photos --val-split 0.2

Both runs are train.py with the same flags, each in its own process, alternating over --rounds; the time is
the whole command (scanning the folders, building the model, training, validating, writing checkpoints),
as a user waits for it. Without --data-dir the demo digits are written as class folders; without
--pretrained a freshly initialised MobileNetV2 stands in for ImageNet weights (the speed does not depend
on the values). The two runs must end with the same classifier (within float rounding: the cached
features come from the BatchNorm-folded backbone) and the same validation accuracy.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnv2.data.demo import make_folder_demo  # noqa: E402
from MobileNetV2 import MobileNetV2  # noqa: E402


def _train(flags):
    """Seconds of one train.py command line (its own process, as a user runs it) and its last checkpoint."""
    save_path = Path(flags[flags.index("--save-path") + 1])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, flags)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"train.py exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return seconds, torch.load(save_path / "last.pth", map_location="cpu", weights_only=True)


def run(data_dir=None, pretrained=None, input_size=224, width_mult=1.0, per_class=40, epochs=5, rounds=1,
        val_split=0.2, batch_size=32, num_workers=0, log=print):
    """{row name: {ratio, ours, reference, unit}} and the largest classifier difference between the two."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if data_dir is None:
            data_dir = make_folder_demo(tmp / "digits", per_class=per_class, image_size=input_size)
        if pretrained is None:
            torch.manual_seed(0)
            pretrained = tmp / "start.pth"
            torch.save(MobileNetV2(width_mult=width_mult).state_dict(), pretrained)
        flags = ["--data-dir", data_dir, "--pretrained", pretrained, "--freeze-backbone", "--device", "cpu",
                 "--input-size", input_size, "--num-epochs", epochs, "--batch-size", batch_size,
                 "--num-workers", num_workers, "--print-freq", 10**6, "--save-epoch-freq", 10**6]
        if val_split:
            flags += ["--val-split", val_split]
        times = {"plain": [], "cached": []}
        last = {}
        for r in range(rounds):
            for kind in (("plain", "cached") if r % 2 == 0 else ("cached", "plain")):
                extra = ["--no-cache-features"] if kind == "plain" else []
                seconds, ckpt = _train(flags + ["--save-path", tmp / f"{kind}{r}", *extra])
                times[kind].append(seconds)
                last[kind] = ckpt
                log(f"round {r + 1}/{rounds} {kind}: {seconds:.1f} s, val top-1 {ckpt['metrics'][-1]['val_top1']:.2f}")
    diff = max((last["plain"]["model"][k] - last["cached"]["model"][k]).abs().max().item()
               for k in ("classifier.1.weight", "classifier.1.bias"))
    same_top1 = [m["val_top1"] for m in last["plain"]["metrics"]] == [m["val_top1"] for m in last["cached"]["metrics"]]
    plain, cached = statistics.median(times["plain"]), statistics.median(times["cached"])
    name = f"linear probe, {epochs} epochs (cpu)"
    return {name: {"ratio": plain / cached, "ours": cached, "reference": plain, "unit": "s"}}, diff, same_top1


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="a folder of classes (default: the demo digits)")
    p.add_argument("--pretrained", default=None, help="weights to start from (default: a fresh network)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--per-class", type=int, default=40, help="demo images per class")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="runs of each, alternating; the median counts")
    p.add_argument("--val-split", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 px, width 0.5, 10 images per class, 3 epochs")
    p.add_argument("--json", type=Path, default=None, help="write the row here")
    return p


def main(args):
    settings = dict(data_dir=args.data_dir, pretrained=args.pretrained, input_size=args.input_size,
                    width_mult=args.width_mult, per_class=args.per_class, epochs=args.epochs, rounds=args.rounds,
                    val_split=args.val_split, batch_size=args.batch_size, num_workers=args.num_workers)
    if args.quick:
        settings.update(input_size=64, width_mult=0.5, per_class=10, epochs=3, batch_size=16)
    rows, diff, same_top1 = run(**settings)
    for name, row in rows.items():
        print(f"{name}: {row['ratio']:.1f}x  cached {row['ours']:.1f} s  plain loop {row['reference']:.1f} s  "
              f"(max |classifier difference| {diff:.1e}, same val top-1 every epoch: {same_top1})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if not (diff < 1e-3 and same_top1):
        sys.exit("the cached run does not reproduce the plain loop")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
