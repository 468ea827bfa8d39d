"""MobileNetV2 as in "Inverted Residuals and Linear Bottlenecks" (Sandler et al., arXiv 1801.04381).

    model = MobileNetV2(num_classes=1000, width_mult=1.0)

Parameter names and shapes equal torchvision's ``mobilenet_v2`` for every width, so its weight files load
with ``strict=True``. Reading weight files of every public layout is `weights.py`'s job.
"""
import torch
from torch import nn

# Paper, Table 2: each row is one stage of `n` inverted-residual blocks.
STAGES = [
    # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(value, divisor=8):
    """Round a channel count to the nearest multiple of `divisor`, never dropping more than 10%.

    The same rule as the reference TensorFlow implementation and torchvision, so widths like 0.35 give
    the published channel counts (and so the published weight files fit).
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class _ClampInPlace(torch.autograd.Function):
    """min(max(x, 0), 6) written over x; the backward pass reads the kept result."""

    @staticmethod
    def forward(ctx, x):
        x.clamp_(0, 6)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (result,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, result, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``nn.ReLU6(inplace=True)`` that is truly in place while training.

    Under autograd, PyTorch's in-place ``hardtanh_`` copies its input, clamps into a new tensor and copies
    the result back: three passes over a layer's activations where one does. Same numbers, same gradient;
    tracing, compiling and inference take the plain path.
    """

    def __init__(self):
        super().__init__(inplace=True)

    def forward(self, x):
        # is_compiling() first: torch.compile must not look at grad_fn (it would break the graph there)
        if (not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.is_grad_enabled()
                and x.grad_fn is not None):
            return _ClampInPlace.apply(x)
        return super().forward(x)


def global_average_pool(x):
    """Mean over height and width: (N, C, H, W) -> (N, C).

    For a channels_last x the mean runs over the (N, H*W, C) view of its memory, so the gradient flowing
    back is channels_last too (average pooling hands back a (N, C, H, W)-ordered one, which puts the last
    BatchNorm's backward on a slow mixed-layout path). Bit-identical to adaptive_avg_pool2d(x, 1).
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).flatten(1, 2).mean(1)
    return nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


class ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm, ReLU6: the non-linear unit of the paper (ReLU6 for low-precision robustness)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            ReLU6(),
        )


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): in training, each sample's branch is dropped with probability p
    and kept ones are scaled by 1/(1 - p), so the expected output is unchanged; identity in evaluation."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


class InvertedResidual(nn.Module):
    """Bottleneck residual block (paper, Table 1): expand (1x1), depthwise (3x3), project (1x1, linear)."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio, drop_path=0.0):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        # The shortcut joins the thin bottlenecks, not the wide expansions (paper, Sec. 3.3).
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = drop_path if self.use_residual else 0.0  # a block without a shortcut is never dropped
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))  # expand
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            # project: a linear bottleneck. A ReLU here would destroy information in the
            # low-dimensional space (paper, Sec. 3.2), so there is none, and none after the add.
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)  # the name torchvision's weight files use

    def forward(self, x):
        if self.use_residual:
            return x + drop_path(self.conv(x), self.drop_path, self.training)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width_mult=1.0, dropout=0.0, round_nearest=8, drop_path=0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        # Constructor arguments as plain data: saved with every checkpoint to rebuild the model without flags.
        self.config = {"num_classes": int(num_classes), "width_mult": float(width_mult),
                       "dropout": float(dropout), "round_nearest": int(round_nearest), "drop_path": float(drop_path)}
        channels = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
        # The head is only widened, never thinned: thinning it hurts small models (paper, Sec. 6.1).
        self.last_channel = make_divisible(HEAD_CHANNELS * max(1.0, width_mult), round_nearest)

        features = [ConvBNReLU6(3, channels, stride=2)]
        blocks = sum(n for _, _, n, _ in STAGES)
        for t, c, n, s in STAGES:
            out_channels = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                # Only the first block of a stage downsamples. Stochastic depth grows linearly with depth,
                # from 0 at the first block by drop_path/17 a block (as timm's EfficientNet family).
                rate = drop_path * (len(features) - 1) / blocks
                features.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t, rate))
                channels = out_channels
        features.append(ConvBNReLU6(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self):
        # torchvision's scheme, so a run started from scratch here matches one started there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        # Adaptive pooling lets any input of 32 px or more through (the paper's 96..224 px trade-off).
        x = global_average_pool(x)
        return self.classifier(x)
