"""Counting MobileNetV2's parameters and multiply-adds, by three counters side by side (count_flops.py prints them).

The counters disagree because they count different things:
- exact: every multiply-add of the convolutions and the classifier, nothing else (the paper's measure);
- torchsummaryX: the same, plus one per BatchNorm weight (a BN layer's weight count, not per pixel);
- thop: also counts BatchNorm's arithmetic on every activation and the average pooling (ReLU6 and the
  residual adds count as free); older thop releases counted slightly differently (the seed's gave 328.78 M).
"""
import contextlib
import copy
import io

import torch
from torch import nn

GRID_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
GRID_SIZES = (96, 128, 160, 192, 224)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def exact_macs(model, input_size):
    """Multiply-adds of every Conv2d and Linear for one image, counted from the real output shapes."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * (module.in_channels // module.groups) * kernel
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    return total


def thop_macs(model, input_size):
    """thop's count, or None when thop is not installed. thop adds buffers to the modules it profiles,
    so it works on a copy."""
    try:
        from thop import profile
    except ImportError:
        return None
    macs, _ = profile(copy.deepcopy(model).eval(), inputs=(torch.zeros(1, 3, input_size, input_size),),
                      verbose=False)
    return int(macs)


@contextlib.contextmanager
def _numeric_sums():
    """torchsummaryX 1.3.0 sums a frame whose columns hold numbers as Python objects next to text (kernel
    shapes), which pandas >= 2 refuses. Summing each column as numbers, text counting as missing, gives
    the totals it meant; only its own call sees the change."""
    import pandas as pd
    original = pd.DataFrame.sum

    def numeric_sum(self, *args, **kwargs):
        numbers = self.apply(lambda column: pd.to_numeric(column, errors="coerce"))
        return original(numbers, *args, **kwargs)

    pd.DataFrame.sum = numeric_sum
    try:
        yield
    finally:
        pd.DataFrame.sum = original


def torchsummaryx_macs(model, input_size):
    """torchsummaryX's "Mult-Adds" total, or None when it is not installed. Its table goes unprinted."""
    try:
        from torchsummaryX import summary
    except ImportError:
        return None
    with _numeric_sums(), contextlib.redirect_stdout(io.StringIO()):
        frame = summary(model.eval(), torch.zeros(1, 3, input_size, input_size))
    return int(frame["Mult-Adds"].fillna(0).sum())


def measure(model, input_size):
    return {
        "width_mult": model.config["width_mult"],
        "input_size": input_size,
        "num_classes": model.config["num_classes"],
        "params": count_parameters(model),
        "macs_exact": exact_macs(model, input_size),
        "macs_torchsummaryx": torchsummaryx_macs(model, input_size),
        "macs_thop": thop_macs(model, input_size),
    }


def _millions(value):
    return "not installed" if value is None else f"{value / 1e6:.2f} M"


def format_report(row):
    lines = [
        f"MobileNetV2 width {row['width_mult']:g}, {row['input_size']} px, {row['num_classes']} classes",
        f"  parameters             {row['params']:>13,}  ({row['params'] / 1e6:.2f} M)",
        f"  MAdds, exact           {row['macs_exact']:>13,}  ({_millions(row['macs_exact'])})",
        f"  MAdds, torchsummaryX   {_millions(row['macs_torchsummaryx']):>13}",
        f"  MAdds, thop            {_millions(row['macs_thop']):>13}",
        "exact counts conv + linear only (the paper's measure); torchsummaryX adds one per BatchNorm "
        "weight; thop also counts BatchNorm on every activation and the pooling.",
    ]
    missing = [name for name in ("torchsummaryX", "thop") if row[f"macs_{name.lower()}"] is None]
    if missing:
        lines.append(f"note: {' and '.join(missing)} not installed (pip install -r requirements.txt)")
    return "\n".join(lines)


def format_grid(rows):
    sizes = sorted({r["input_size"] for r in rows})
    widths = sorted({r["width_mult"] for r in rows})
    by_key = {(r["width_mult"], r["input_size"]): r for r in rows}
    out = ["Exact multiply-adds (M) by width and resolution; parameters (M) in the last column",
           "width " + "".join(f"{s:>9}" for s in sizes) + "   params"]
    for w in widths:
        cells = "".join(f"{by_key[(w, s)]['macs_exact'] / 1e6:>9.1f}" for s in sizes)
        out.append(f"{w:>5g} {cells}   {by_key[(w, sizes[0])]['params'] / 1e6:.2f}")
    return "\n".join(out)
