"""The training step with an online teacher and with stored teacher outputs, each as a ratio to the plain step,
timed in turn in one run; and the stored outputs' size per image.

    python bench/bench_distill.py                       # CPU: student width 1.0, teacher ResNet-50, 224 px
    python bench/bench_distill.py --device cuda --batch-size 256 --amp

One step is what train.py does per batch: normalise, forward, cross-entropy (+ the distillation loss with
the teacher's forward in eval mode without gradients, or with the teacher's top-k logits read from stored
outputs), backward, SGD step. The teacher's weights do not change its cost, so random ones stand in
(ResNet-50: 4.1 G MAdds against MobileNetV2's 0.3 G); the stored outputs are random logits for ImageNet's
1000 classes in the files `--write-teacher-outputs` writes, memory-mapped, at --views and --top-k. The
ratios are step time with the teacher (or the stored outputs) over step time without.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv2.training import distill, teacher_outputs  # noqa: E402
from MobileNetV2 import MobileNetV2  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def stored_outputs(folder, images, views, top_k, num_classes=1000):
    """A teacher-outputs folder's arrays filled with random logits (their reading is what a step pays)."""
    generator = torch.Generator().manual_seed(0)
    arrays = {}
    for name, (dtype, shape) in teacher_outputs.files(views, top_k, num_classes).items():
        array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(images, *shape))
        if name == "logits":
            array[:] = torch.randn(images, views, top_k, generator=generator).numpy()
        elif name == "classes":
            array[:] = torch.rand(images, views, num_classes, generator=generator).argsort(-1)[..., :top_k].numpy()
        array.flush()
        arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
    meta = {"images": images, "views": views, "classes": {"wnids": [str(c) for c in range(num_classes)]}}
    return teacher_outputs.StoredOutputs(folder, meta, arrays, seed=0)


def step_seconds(device, batch_size, size, teacher_name, loss, amp, repeats, views=10, top_k=10, log=print):
    torch.manual_seed(0)
    student = MobileNetV2().to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    model = torchvision.models.get_model(teacher_name, weights=None).to(device, memory_format=torch.channels_last)
    teacher = distill.Teacher(model.eval(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), teacher_name, None, 1000)
    kd = distill.Distillation(teacher, teacher.mean, teacher.std, loss, device=device)
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16,
                              enabled=amp)

    folder = Path(tempfile.mkdtemp(prefix="bench-teacher-outputs-"))
    try:
        images = 50 * batch_size
        stored = teacher_outputs.StoredDistillation(stored_outputs(folder, images, views, top_k), loss)
        draws = torch.Generator().manual_seed(1)

        def step(mode):
            with autocast:
                logits = student(x)
                out = F.cross_entropy(logits, y)
                if mode == "teacher":
                    out = kd(out, logits, x)
                elif mode == "stored":
                    out = stored(out, logits, x, torch.randint(0, images, (batch_size,), generator=draws))
            optimizer.zero_grad(set_to_none=True)
            out.backward()
            optimizer.step()

        def timed(mode):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(mode)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        modes = ("plain", "teacher", "stored")
        for mode in modes:  # first-call allocations and kernel choices
            step(mode)
        times = {mode: [] for mode in modes}
        for _ in range(repeats):
            for mode in modes:
                times[mode].append(timed(mode))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    p, t, st = (statistics.median(times[mode]) for mode in modes)
    per_image = teacher_outputs.bytes_per_image(views, top_k, 1000)
    log(f"{device.type}, batch {batch_size} x {size} px, teacher {teacher_name} ({loss}): plain step {1000 * p:.0f} ms, "
        f"with the teacher {1000 * t:.0f} ms ({t / p:.2f}x), with stored outputs {1000 * st:.0f} ms ({st / p:.2f}x); "
        f"stored outputs at {views} views, top {top_k}: {per_image} bytes per image, "
        f"{per_image * IMAGENET_TRAIN / 1e9:.2f} GB for ImageNet's {IMAGENET_TRAIN:,} training images")
    return {"plain_ms": 1000 * p, "teacher_ms": 1000 * t, "ratio": t / p, "stored_ms": 1000 * st,
            "stored_ratio": st / p, "stored_bytes_per_image": per_image, "views": views, "top_k": top_k,
            "imagenet_stored_gb": per_image * IMAGENET_TRAIN / 1e9, "batch_size": batch_size, "size": size,
            "teacher": teacher_name, "loss": loss, "device": device.type, "amp": amp}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--teacher", default="resnet50", help="a torchvision classification model name")
    p.add_argument("--loss", choices=distill.LOSSES, default="kd")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--views", type=int, default=10, help="stored views per image")
    p.add_argument("--top-k", type=int, default=10, help="stored teacher logits per view")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = step_seconds(torch.device(args.device), args.batch_size, args.size, args.teacher, args.loss, args.amp,
                          args.repeats, args.views, args.top_k)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
