"""BatchNorm and BatchNorm + ReLU6 for training on the CPU as one compiled kernel each way.

    count = fused_batchnorm.use_for_cpu_training(model)   # train.py does this for a CPU run

A training step on the CPU is bound by memory traffic, and most of it is BatchNorm and ReLU6. Eager
PyTorch makes separate passes over a layer's activations: forward, statistics, normalise and clamp (at
least three reads and two writes); backward, ReLU6's mask, then BatchNorm's sums and its gradient (six
reads, two writes). The kernel in fused_batchnorm.cpp reads twice and writes once going forward, reads
four times and writes once going back, recomputing the ReLU6 mask from the BatchNorm input: about 20%
off a whole step at batch 32 x 224 px (bench/bench_train.py). Statistics are summed in double, so
results agree with nn.BatchNorm2d to float32 rounding (closer to exact arithmetic, not bit for bit).

The kernel is compiled on first use with the C++ compiler PyTorch extensions use (about 30 s, cached
under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions). Without one, or for any input it does not
cover (not channels_last float32 on the CPU, evaluation, torch.compile, tracing), the layers run as
nn.BatchNorm2d and ReLU6, with the same parameter names.
"""
import functools
import hashlib
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from MobileNetV2 import ReLU6

SOURCE = Path(__file__).with_name("fused_batchnorm.cpp")


# Portable code (no -march=native): the build cache may be shared by machines of several kinds.
# No contraction into fused multiply-adds, so both passes compute the same ReLU6 mask.
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


def kernel_name():
    """The extension's name, and so its build folder: keyed by the source, the flags, torch's version and
    this Python environment, so that two checkouts or venvs on one machine never take turns rebuilding
    one folder (torch keys the folder by name alone and rebuilds whenever its sources change)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()
                         + sys.prefix.encode()).hexdigest()[:12]
    return f"mobilenetv2_fused_batchnorm_{key}"


@functools.lru_cache(maxsize=None)
def load_kernel():
    """The compiled kernel module, built on first use. Raises RuntimeError saying why it is unavailable."""
    try:
        # its import warns about CUDA on CPU-only machines, which says nothing about this CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils import cpp_extension

        return cpp_extension.load(kernel_name(), [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except Exception as e:  # no compiler, no ninja, unwritable cache, unsupported platform ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower() and "Error building" not in line),
                      lines[0] if lines else type(e).__name__)[:300]
        raise RuntimeError(f"the fused CPU BatchNorm kernel could not be built ({reason})") from None


class _FusedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu6):
        out, mean, invstd = load_kernel().forward(x, weight, bias, running_mean, running_var, momentum, eps, relu6)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu6 = relu6
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx, dweight, dbias = load_kernel().backward(grad, x, weight, bias, mean, invstd, ctx.relu6)
        return dx, dweight, dbias, None, None, None, None, None


class FusedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d, followed by ReLU6 when `relu6`, with the fused kernel for CPU training.

    Built from an existing BatchNorm2d with `from_batchnorm`, sharing its parameters and buffers, so
    optimizers, checkpoints and weight files see the same tensors under the same names.
    """

    def __init__(self, num_features, relu6=False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.relu6 = relu6
        self.activation = ReLU6() if relu6 else nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn, relu6):
        fused = cls(bn.num_features, relu6, eps=bn.eps, momentum=bn.momentum)
        fused.weight, fused.bias = bn.weight, bn.bias
        fused.running_mean, fused.running_var = bn.running_mean, bn.running_var
        fused.num_batches_tracked = bn.num_batches_tracked
        fused.train(bn.training)
        return fused

    def _fused(self, x):
        # compiling and tracing first: they take PyTorch's layers without looking further
        return (not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and self.training
                and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > x.shape[1]
                and self.momentum is not None and self.running_mean is not None and self.weight is not None)

    def forward(self, x):
        if not self._fused(x):
            return self.activation(super().forward(x))
        self.num_batches_tracked.add_(1)
        return _FusedBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                     self.momentum, self.eps, self.relu6)

    def extra_repr(self):
        return super().extra_repr() + (", relu6=True" if self.relu6 else "")


def use_for_cpu_training(model):
    """Swap every BatchNorm2d of `model` for a FusedBatchNorm2d, taking in a ReLU6 that follows it
    directly in a Sequential (its place becomes an Identity). Returns the number of layers swapped.
    State-dict keys and tensors stay the same. Raises RuntimeError when the kernel cannot be built."""
    load_kernel()
    swapped = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            bn = parent._modules[name]
            if type(bn) is not nn.BatchNorm2d:
                continue
            after = parent._modules[names[i + 1]] if isinstance(parent, nn.Sequential) and i + 1 < len(names) else None
            relu6 = isinstance(after, nn.ReLU6)
            parent._modules[name] = FusedBatchNorm2d.from_batchnorm(bn, relu6)
            if relu6:
                parent._modules[names[i + 1]] = nn.Identity()
            swapped += 1
    return swapped
