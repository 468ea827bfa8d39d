"""Optimisation: the loss, parameter groups, optimizers, the learning-rate schedule, the EMA and the recipes.

    optimizer = optimization.build_optimizer(model, lr=0.045, momentum=0.9, weight_decay=4e-5)
    lr = optimization.LRSchedule(0.045, epochs=400)(epoch, step, steps_per_epoch)
    optimization.RECIPES["torchvision-v2"].defaults(batch_size=1024)     # a published recipe as flag defaults

Each piece is a pure function of its arguments (the schedule and the EMA's update rule of the position in
training), so a run resumed at any step recomputes exactly what an uninterrupted run had.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZERS = ("sgd", "sgd-nesterov", "rmsproptf", "rmsprop", "adamw")
# The epsilon each optimizer gets when --opt-eps is not given: torchvision's reference script uses 0.0316
# for RMSprop (and 1e-8 for AdamW); 1e-3 is what TensorFlow's MobileNet/EfficientNet training used with
# its RMSProp (and super-gradients' MobileNetV2 recipe).
DEFAULT_EPS = {"rmsprop": 0.0316, "rmsproptf": 1e-3, "adamw": 1e-8}
SCHEDULES = ("exponential", "step", "cosine")
WARMUP_METHODS = ("linear", "constant")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_criterion(label_smoothing=0.0):
    """Cross-entropy; it takes class indices or, after mixup/cutmix, class probabilities as targets, and
    smooths either (the target becomes (1 - s) * target + s / classes)."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------------
# Parameter groups and optimizers


def parameter_groups(model, weight_decay, decay_norm_and_bias=True, norm_weight_decay=None, bias_weight_decay=None):
    """Parameters grouped by their weight decay, in model order: normalisation layers' scales and shifts get
    `norm_weight_decay`, biases `bias_weight_decay` (None: `weight_decay`, as torchvision's
    --norm-weight-decay / --bias-weight-decay). Shrinking BatchNorm's parameters only fights the
    normalisation and does not regularise, so later recipes leave them undecayed. `decay_norm_and_bias=False`
    (the older switch) sets both to 0 where they are not given. Groups with the same decay are one group, so
    a checkpoint written with the older switch resumes with the new flags and back."""
    if not decay_norm_and_bias:
        norm_weight_decay = 0.0 if norm_weight_decay is None else norm_weight_decay
        bias_weight_decay = 0.0 if bias_weight_decay is None else bias_weight_decay
    decay_of = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) and norm_weight_decay is not None:
                decay_of[p] = norm_weight_decay
            elif name == "bias" and bias_weight_decay is not None:
                decay_of[p] = bias_weight_decay
            else:
                decay_of[p] = weight_decay
    groups = {}
    for p in model.parameters():  # model order, so the groups' order never depends on the flags' order
        groups.setdefault(float(decay_of[p]), []).append(p)
    return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1 computes it, the optimizer the MobileNetV2 paper trained with (Sec. 6.1:
    decay and momentum 0.9):

        ms  = alpha * ms + (1 - alpha) * g^2        ms starts at 1, not 0
        mom = momentum * mom + lr * g / sqrt(ms + eps)
        w   = w - mom

    Three differences from torch.optim.RMSprop: epsilon sits inside the square root (torch adds it to the
    root, so TF's eps=1e-3 is torch's ~0.0316, which torchvision's recipes use for that reason); the mean
    square starts at one, so the first steps are not divided by a tiny root; the learning rate is applied
    inside the momentum buffer, so a schedule changes the size of new updates only, not of the velocity
    already built up. Weight decay is L2 added to the gradient, as TF adds it to the loss.
    """

    def __init__(self, params, lr, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.0):
        if not 0.0 <= momentum < 1.0 or not 0.0 <= alpha < 1.0 or not eps > 0.0:
            raise ValueError(f"RMSpropTF: need 0 <= momentum, alpha < 1 and eps > 0, got {momentum}, {alpha}, {eps}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avg = [s["square_avg"] for s in states]
            torch._foreach_mul_(square_avg, group["alpha"])
            torch._foreach_addcmul_(square_avg, grads, grads, value=1.0 - group["alpha"])
            root = torch._foreach_add(square_avg, group["eps"])
            torch._foreach_sqrt_(root)
            if group["momentum"] > 0:
                buffers = [s["momentum_buffer"] for s in states]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_addcdiv_(buffers, grads, root, value=group["lr"])
                torch._foreach_sub_(params, buffers)
            else:
                torch._foreach_addcdiv_(params, grads, root, value=-group["lr"])
        return loss


def build_optimizer(model, lr, momentum=0.9, weight_decay=4e-5, decay_norm_and_bias=True, *, opt="sgd", eps=None,
                    norm_weight_decay=None, bias_weight_decay=None):
    """The optimizer `opt` over `parameter_groups`: sgd (the seed's), sgd-nesterov, rmsproptf (TensorFlow's
    RMSProp, `RMSpropTF`), rmsprop (torch's, alpha 0.9 as torchvision's recipes), adamw (decoupled weight
    decay; `momentum` unused). Multi-tensor (foreach) updates, also on the CPU."""
    groups = parameter_groups(model, weight_decay, decay_norm_and_bias, norm_weight_decay, bias_weight_decay)
    eps = DEFAULT_EPS.get(opt) if eps is None else eps
    if opt in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=opt == "sgd-nesterov" and momentum > 0,
                               foreach=True)
    if opt == "rmsproptf":
        return RMSpropTF(groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum)
    if opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum, foreach=True)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps, foreach=True)
    raise ValueError(f"unknown optimizer {opt!r}; choose from {', '.join(OPTIMIZERS)}")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model, max_norm):
    """Scale all gradients together so that their global L2 norm is at most `max_norm`; the norm before."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule


class LRSchedule:
    """The learning rate as a pure function of the position in training (epoch, step), so a run resumed at
    any step, or from weights alone at --start-epoch, gets exactly the lr an uninterrupted run had. It
    changes at every step (torchvision's reference changes it once per epoch).

    Warm-up over the first `warmup_epochs` (fractional allowed): linear from `warmup_decay` x lr to lr,
    or constant at `warmup_decay` x lr (torchvision's --lr-warmup-method/--lr-warmup-decay). With decay 0
    the first step already moves (it counts as step 1 of the ramp, not 0).
    After it, with u the epochs since the warm-up ended:
    exponential: lr x gamma^floor(u), constant within an epoch (the seed's StepLR(step_size=1, gamma=0.98));
    step: lr x gamma^floor(u / step_size), step_size in epochs and fractional (TensorFlow's 0.97 every 2.4);
    cosine: half a cosine from lr to min_lr at the last step.
    """

    def __init__(self, base_lr, epochs, kind="exponential", gamma=0.98, warmup_epochs=0.0, min_lr=0.0,
                 step_size=1.0, warmup_method="linear", warmup_decay=0.0):
        if kind not in SCHEDULES or warmup_method not in WARMUP_METHODS:
            raise ValueError(f"schedule {kind!r} / warm-up {warmup_method!r}: choose from {SCHEDULES} / {WARMUP_METHODS}")
        self.base_lr, self.epochs, self.kind = float(base_lr), int(epochs), kind
        self.gamma, self.warmup_epochs, self.min_lr = float(gamma), float(warmup_epochs), float(min_lr)
        self.step_size, self.warmup_method, self.warmup_decay = float(step_size), warmup_method, float(warmup_decay)

    def __call__(self, epoch, step=0, steps_per_epoch=1):
        steps_per_epoch = max(steps_per_epoch, 1)
        t = epoch + step / steps_per_epoch
        if t < self.warmup_epochs:
            if self.warmup_method == "constant":
                return self.base_lr * self.warmup_decay
            done = epoch * steps_per_epoch + step + 1
            ramp = min(1.0, done / (self.warmup_epochs * steps_per_epoch))
            return self.base_lr * (self.warmup_decay + (1.0 - self.warmup_decay) * ramp)
        u = t - self.warmup_epochs
        if self.kind == "exponential":
            return self.base_lr * self.gamma ** math.floor(u + 1e-9)
        if self.kind == "step":
            return self.base_lr * self.gamma ** math.floor(u / self.step_size + 1e-9)
        span = max(self.epochs - self.warmup_epochs, 1e-8)
        progress = min(1.0, u / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Exponential moving average of the weights


def ema_decay(decay, every, global_batch, epochs, adjust=True):
    """The decay applied at each EMA update. torchvision's adjustment (`adjust`): the published decay is
    for its reference run, so 1 - decay is scaled by global batch x steps between updates / epochs,
    which keeps the average's horizon the same share of training at another batch size, update interval
    or length: alpha = min(1, (1 - decay) x batch x every / epochs)."""
    if not adjust:
        return float(decay)
    alpha = min(1.0, (1.0 - decay) * global_batch * every / max(epochs, 1))
    return 1.0 - alpha


class ModelEma:
    """Exponential moving average of every floating-point entry of the model's state (weights and
    BatchNorm statistics), updated every `every` optimizer steps (at step 0, every, 2 x every, ... of each
    epoch, as torchvision's --model-ema-steps) and validated beside the model.

    As in torchvision's reference, the average copies the weights at its first update, at every update
    during the learning-rate warm-up (weights that change that fast are not worth averaging) and at the
    first update after it. All of it follows from the position in training, so resuming is exact.
    """

    def __init__(self, model, decay, every=1, warmup_epochs=0.0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.warmup_epochs = float(decay), int(every), float(warmup_epochs)
        self._pairs = None

    def after_step(self, model, epoch, index):
        """Called after optimizer step `index` (0-based, within `epoch`)."""
        if index % self.every:
            return
        first_after_warmup = self.warmup_epochs > 0 and epoch == math.ceil(self.warmup_epochs) and index == 0
        copy_weights = (epoch == 0 and index == 0) or epoch < self.warmup_epochs or first_after_warmup
        self.update(model, 0.0 if copy_weights else self.decay)

    @torch.no_grad()
    def update(self, model, decay=None):
        if self._pairs is None:
            own, other = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in own.items() if v.is_floating_point()]
            self._pairs = ([own[k] for k in floats], [other[k] for k in floats],
                           [(own[k], other[k]) for k in own if not own[k].is_floating_point()])
        ema, current, rest = self._pairs
        torch._foreach_lerp_(ema, current, 1.0 - (self.decay if decay is None else decay))
        for e, c in rest:  # BatchNorm's num_batches_tracked
            e.copy_(c)


# --------------------------------------------------------------------------------------------------
# Recipes: published MobileNetV2 1.0 training runs as flag defaults


@dataclass(frozen=True)
class Recipe:
    """A published training run: the flags (argparse dests) that differ from train.py's plain defaults,
    the global batch and lr it was published with, its source and its ImageNet val top-1."""
    source: str
    top1: float
    batch_size: int
    lr: float
    settings: dict = field(default_factory=dict)
    note: str = ""
    scale_lr: bool = True     # the lr follows --batch-size linearly unless --lr is given

    def lr_for(self, batch_size):
        return self.lr * batch_size / self.batch_size if self.scale_lr else self.lr

    def summary(self):
        return (f"{self.source}; {self.top1}% top-1, {self.settings.get('num_epochs', 400)} epochs, global batch "
                f"{self.batch_size}, lr {self.lr:g}")


RECIPES = {
    "seed": Recipe(
        source="the seed repository (the paper's schedule with SGD)", top1=71.62, batch_size=256, lr=0.045,
        scale_lr=False, note="train.py's plain defaults: SGD momentum 0.9, lr 0.045 x0.98 per epoch, weight decay "
                             "4e-5 on every parameter, 224 px crops, 400 epochs; lr 0.045 at any --batch-size"),
    "torchvision-v1": Recipe(
        source="torchvision IMAGENET1K_V1, references/classification README", top1=71.878, batch_size=256,
        lr=0.045, note="8 GPUs x 32; StepLR every epoch",
        settings=dict(opt="sgd", momentum=0.9, weight_decay=4e-5, lr_schedule="step", lr_step_size=1.0,
                      lr_gamma=0.98, num_epochs=300)),
    "torchvision-v2": Recipe(
        source="torchvision IMAGENET1K_V2, vision PR #5560", top1=72.154, batch_size=1024, lr=0.5,
        note="8 GPUs x 128; evaluated at resize 232, crop 224",
        settings=dict(opt="sgd", momentum=0.9, lr_schedule="cosine", warmup_epochs=5.0, lr_warmup_method="linear",
                      lr_warmup_decay=0.01, min_lr=0.0, auto_augment="ta_wide", random_erase=0.1,
                      label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, weight_decay=2e-5,
                      norm_weight_decay=0.0, train_crop_size=176, val_resize_size=232, val_crop_size=224,
                      model_ema=True, model_ema_steps=32, model_ema_decay=0.99998, model_ema_adjust=True,
                      ra_sampler=True, ra_reps=4, num_epochs=600)),
    "rmsproptf": Recipe(
        source="super-gradients' imagenet_mobilenetv2 recipe", top1=73.08, batch_size=512, lr=0.032,
        note="2 GPUs x 256, mixed precision; TensorFlow's RMSProp with 0.973 every 2.4 epochs (the paper's "
             "optimizer); EMA 0.9999 per step (without super-gradients' decay warm-up)",
        settings=dict(opt="rmsproptf", momentum=0.9, opt_eps=1e-3, weight_decay=1e-5, norm_weight_decay=0.0,
                      bias_weight_decay=0.0, lr_schedule="step", lr_step_size=2.4, lr_gamma=0.973,
                      warmup_epochs=5.0, lr_warmup_method="linear", lr_warmup_decay=1 / 6, label_smoothing=0.1,
                      auto_augment="rand-m9-mstd0.5", random_erase=0.2, dropout=0.2, model_ema=True,
                      model_ema_steps=1, model_ema_decay=0.9999, model_ema_adjust=False, num_epochs=450)),
    "d-li14": Recipe(
        source="d-li14/mobilenetv2.pytorch README (mobilenetv2-c5e733a8.pth)", top1=72.834, batch_size=1024,
        lr=0.4, note="8 GPUs; lr ramps 0.1 -> 0.4 over 5 epochs, then a per-step cosine",
        settings=dict(opt="sgd", momentum=0.9, weight_decay=4e-5, norm_weight_decay=0.0, bias_weight_decay=0.0,
                      lr_schedule="cosine", warmup_epochs=5.0, lr_warmup_method="linear", lr_warmup_decay=0.25,
                      min_lr=0.0, dropout=0.2, num_epochs=250)),
}
