"""Optimisation: the loss, parameter groups, optimizers, the learning-rate schedule, and the EMA (the recipes are files: recipes.py).

    optimizer = optimization.build_optimizer(model, lr=0.045, momentum=0.9, weight_decay=4e-5)
    lr = optimization.LRSchedule(0.045, epochs=400)(epoch, step, steps_per_epoch)

Each piece is a pure function of its arguments (the schedule and the EMA's update rule of the position in
training), so a run resumed at any step recomputes exactly what an uninterrupted run had.
"""
import copy
import math

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
                    norm_weight_decay=None, bias_weight_decay=None, fused=False):
    """The optimizer `opt` over `parameter_groups`: sgd (the seed's), sgd-nesterov, rmsproptf (TensorFlow's
    RMSProp, `RMSpropTF`), rmsprop (torch's, alpha 0.9 as torchvision's recipes), adamw (decoupled weight
    decay; `momentum` unused). Multi-tensor (foreach) updates, also on the CPU; `fused` asks for torch's
    fused kernels where it has them (sgd, sgd-nesterov, adamw), which can skip a step on a device flag
    (`StepGuard`)."""
    groups = parameter_groups(model, weight_decay, decay_norm_and_bias, norm_weight_decay, bias_weight_decay)
    eps = DEFAULT_EPS.get(opt) if eps is None else eps
    kind = {"fused": True} if fused and opt in FUSED_OPTIMIZERS else {"foreach": True}
    if opt in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=opt == "sgd-nesterov" and momentum > 0,
                               **kind)
    if opt == "rmsproptf":
        return RMSpropTF(groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum)
    if opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum, foreach=True)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps, **kind)
    raise ValueError(f"unknown optimizer {opt!r}; choose from {', '.join(OPTIMIZERS)}")


FUSED_OPTIMIZERS = ("sgd", "sgd-nesterov", "adamw")


def is_fused(optimizer):
    return all(group.get("fused") for group in optimizer.param_groups)


class BufferKeeper:
    """The model's buffers (BatchNorm's running statistics and batch counters) as of the last good step, so
    that a step found non-finite after its forward pass, which already moved them, changes none of them.

    `flat=True` gathers the buffers into one tensor per dtype that the modules' buffers then view: keeping
    or restoring them is one kernel per dtype, also when the device decides (`settle` with a tensor flag),
    where a clone of each of MobileNetV2's ~150 buffers per step would be ~150 kernels. Build it before
    wrapping the model (DDP and torch.compile keep references to the buffers) and move the model no more.
    `flat=False` leaves the buffers where they are (for a model already wrapped) and copies them in place.
    """

    def __init__(self, model, flat=True):
        entries = [(module, name, buffer) for module in model.modules()
                   for name, buffer in module._buffers.items() if buffer is not None]
        if not flat:
            self.live = [buffer for _, _, buffer in entries]
        else:
            groups = {}
            for entry in entries:
                groups.setdefault((entry[2].dtype, entry[2].device), []).append(entry)
            self.live = []
            for group in groups.values():
                whole = torch.cat([buffer.detach().reshape(-1) for _, _, buffer in group])
                offset = 0
                for module, name, buffer in group:
                    module._buffers[name] = whole[offset:offset + buffer.numel()].view_as(buffer)
                    offset += buffer.numel()
                self.live.append(whole)
        self.good = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def settle(self, ok):
        """After a step: keep the buffers where `ok` (a bool, or a 0-dim bool tensor that the host does not
        read), else put back those of the last good step."""
        if not self.live:
            return
        if isinstance(ok, torch.Tensor):
            for live, good in zip(self.live, self.good):
                torch.where(ok, live, good, out=live)  # a select, not arithmetic: NaN statistics go too
            torch._foreach_copy_(self.good, self.live)
        elif ok:
            torch._foreach_copy_(self.good, self.live)
        else:
            torch._foreach_copy_(self.live, self.good)


class StepGuard:
    """Applies or skips a fused optimizer's step on a flag that stays on the device, so the host never
    waits for the GPU to learn whether a step's loss was finite.

    A skipped step changes no weight and no optimizer state: the fused kernels skip their whole update
    (the step count included) on the `found_inf` flag, as they do under a GradScaler. The BatchNorm
    statistics are `BufferKeeper`'s business and the EMA's blend gets weight 0 (`ModelEma.after_step`).
    """

    def __init__(self, optimizer):
        if not is_fused(optimizer):
            raise ValueError("StepGuard needs a fused optimizer (it skips a step on a device flag)")
        self.optimizer = optimizer
        # A fused SGD whose first step is skipped would leave its momentum buffers allocated but never
        # written; starting them at zero makes the first real step the same as a plain first step.
        if isinstance(optimizer, torch.optim.SGD):
            for group in optimizer.param_groups:
                if group["momentum"]:
                    for p in group["params"]:
                        optimizer.state[p].setdefault("momentum_buffer",
                                                      torch.zeros_like(p, memory_format=torch.preserve_format))

    @torch.no_grad()
    def step(self, ok):
        """The optimizer step, applied where the 0-dim bool tensor `ok` is true, skipped where not."""
        self.optimizer.grad_scale, self.optimizer.found_inf = None, (~ok).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf


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

    def after_step(self, model, epoch, index, ok=None):
        """Called after optimizer step `index` (0-based, within `epoch`); `ok`, a 0-dim bool tensor on the
        device, makes the update a no-op where false (a skipped step) without the host reading it."""
        if index % self.every:
            return
        first_after_warmup = self.warmup_epochs > 0 and epoch == math.ceil(self.warmup_epochs) and index == 0
        copy_weights = (epoch == 0 and index == 0) or epoch < self.warmup_epochs or first_after_warmup
        self.update(model, 0.0 if copy_weights else self.decay, ok)

    @torch.no_grad()
    def update(self, model, decay=None, ok=None):
        if self._pairs is None:
            own, other = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in own.items() if v.is_floating_point()]
            self._pairs = ([own[k] for k in floats], [other[k] for k in floats],
                           [(own[k], other[k]) for k in own if not own[k].is_floating_point()])
        ema, current, rest = self._pairs
        weight = 1.0 - (self.decay if decay is None else decay)
        if ok is None:
            torch._foreach_lerp_(ema, current, weight)
            for e, c in rest:  # BatchNorm's num_batches_tracked
                e.copy_(c)
            return
        # ema + 0 x (current - ema) is ema exactly: a skipped step left `current` finite and unchanged.
        w = ok.to(ema[0].dtype) * weight
        torch._foreach_lerp_(ema, current, [w] * len(ema))
        for e, c in rest:
            e.copy_(torch.where(ok, c, e))
