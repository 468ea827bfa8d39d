"""The training step with an online teacher, as a ratio to the plain step, timed alternately in one run.

    python bench/bench_distill.py                       # CPU: student width 1.0, teacher ResNet-50, 224 px
    python bench/bench_distill.py --device cuda --batch-size 256 --amp

One step is what train.py does per batch: normalise, forward, cross-entropy (+ the teacher's forward in
eval mode without gradients and the distillation loss), backward, SGD step. The teacher's weights do not
change its cost, so random ones stand in (ResNet-50 as the issue's example teacher: 4.1 G MAdds against
MobileNetV2's 0.3 G). The ratio is step time with the teacher over step time without.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnv2.training import distill  # noqa: E402
from MobileNetV2 import MobileNetV2  # noqa: E402


def step_seconds(device, batch_size, size, teacher_name, loss, amp, repeats, log=print):
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

    def step(with_teacher):
        with autocast:
            logits = student(x)
            out = F.cross_entropy(logits, y)
            if with_teacher:
                out = kd(out, logits, x)
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        optimizer.step()

    def timed(with_teacher):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(with_teacher)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step(False), step(True)  # first-call allocations and kernel choices
    plain, taught = [], []
    for _ in range(repeats):
        plain.append(timed(False))
        taught.append(timed(True))
    p, t = statistics.median(plain), statistics.median(taught)
    log(f"{device.type}, batch {batch_size} x {size} px, teacher {teacher_name} ({loss}): plain step {1000 * p:.0f} ms, "
        f"with the teacher {1000 * t:.0f} ms, ratio {t / p:.2f}x")
    return {"plain_ms": 1000 * p, "teacher_ms": 1000 * t, "ratio": t / p, "batch_size": batch_size, "size": size,
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
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = step_seconds(torch.device(args.device), args.batch_size, args.size, args.teacher, args.loss, args.amp,
                          args.repeats)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
