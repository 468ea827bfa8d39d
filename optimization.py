"""Optimisation: the loss, parameter groups, the optimizer, the learning-rate schedule and the EMA.

    optimizer = optimization.build_optimizer(model, lr=0.045, momentum=0.9, weight_decay=4e-5)
    lr = optimization.LRSchedule(0.045, epochs=400)(epoch, step, steps_per_epoch)

Each piece is a pure function of its arguments (the schedule of the position in training), so a run
resumed at any step recomputes exactly what an uninterrupted run had. New optimizers, schedules and
recipe presets belong here.
"""
import copy
import math

import torch
from torch import nn


def build_criterion(label_smoothing=0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def parameter_groups(model, weight_decay, decay_norm_and_bias=True):
    """SGD groups; BatchNorm scales/shifts and biases (1-D tensors) can be left undecayed: shrinking
    them only fights the normalisation and does not regularise (as in later MobileNet recipes)."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr, momentum=0.9, weight_decay=4e-5, decay_norm_and_bias=True):
    """SGD with momentum, the seed's optimizer (the paper used RMSProp in TensorFlow); the update of all
    parameters runs as one multi-tensor kernel (foreach), also on the CPU."""
    return torch.optim.SGD(parameter_groups(model, weight_decay, decay_norm_and_bias), lr=lr, momentum=momentum,
                           foreach=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class LRSchedule:
    """The learning rate as a pure function of the position in training (epoch, step), so a run resumed at
    any step, or from weights alone at --start-epoch, gets exactly the lr an uninterrupted run had.

    exponential: lr x gamma^epoch, constant within an epoch (the seed's StepLR(step_size=1, gamma=0.98)).
    cosine: per-step half cosine from lr to min_lr over the epochs after warm-up.
    """

    def __init__(self, base_lr, epochs, kind="exponential", gamma=0.98, warmup_epochs=0.0, min_lr=0.0):
        self.base_lr, self.epochs, self.kind = float(base_lr), int(epochs), kind
        self.gamma, self.warmup_epochs, self.min_lr = float(gamma), float(warmup_epochs), float(min_lr)

    def __call__(self, epoch, step=0, steps_per_epoch=1):
        t = epoch + step / max(steps_per_epoch, 1)
        if t < self.warmup_epochs:
            # (step + 1): the very first step already moves, instead of a wasted lr-0 step.
            done = epoch * steps_per_epoch + step + 1
            return self.base_lr * min(1.0, done / (self.warmup_epochs * steps_per_epoch))
        if self.kind == "exponential":
            return self.base_lr * self.gamma ** epoch
        span = max(self.epochs - self.warmup_epochs, 1e-8)
        progress = min(1.0, (t - self.warmup_epochs) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


class ModelEma:
    """Exponential moving average of every floating-point entry of the model's state (weights and
    BatchNorm statistics), updated after each optimizer step and validated beside the model."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._pairs = None

    @torch.no_grad()
    def update(self, model):
        if self._pairs is None:
            own, other = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in own.items() if v.is_floating_point()]
            self._pairs = ([own[k] for k in floats], [other[k] for k in floats],
                           [(own[k], other[k]) for k in own if not own[k].is_floating_point()])
        ema, current, rest = self._pairs
        torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        for e, c in rest:  # BatchNorm's num_batches_tracked
            e.copy_(c)
