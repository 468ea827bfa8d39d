"""Knowledge distillation from a teacher run alongside the student (`train.py --teacher`).

    distill = distill.build(args, student_mean, student_std, num_classes, class_names, device, log)
    loss = distill(label_loss, student_logits, x)       # x: the student's normalised (mixed) input

The teacher sees exactly the pixels the student sees, after augmentation and mixup/cutmix (Beyer et al.
2022, "Knowledge distillation: A good teacher is patient and consistent"), renormalised with its own mean and
std, in eval mode, without gradients, on the student's device and in its precision (autocast).

The loss is `alpha * label_loss + (1 - alpha) * distillation term`, so the gradient keeps the scale of the
label loss alone (weights that add up to more than 1 act as a higher learning rate: a width-0.35 student
from scratch at lr 0.1 diverged with the label loss and KD at weight 1 each, and trained with 0.5 each):
  * kd (Hinton et al. 2015): T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch;
  * dist (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"): with y = softmax(z / T),
    T^2 * (beta * (1 - mean over images of pearson(y_s[i], y_t[i]))
           + gamma * (1 - mean over classes of pearson(y_s[:, c], y_t[:, c]))),
    the inter-class and intra-class relations; the paper's ImageNet setting is beta = gamma = T = 1 with the
    label loss and DIST at weight 1 each: alpha 0.5 here, at twice the paper's learning rate.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnv2 import resolve
from mnv2.cli import UsageError
from mnv2.deploy import onnx_weights
from mnv2.weights import sha256_of

LOSSES = ("kd", "dist")


def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """Hinton's soft-target loss: T^2 * KL(teacher || student) of the tempered softmaxes, batch mean."""
    t = temperature
    log_student = F.log_softmax(student_logits / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return t * t * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def _pearson_rows(a, b, eps=1e-8):
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits, teacher_logits, temperature=1.0, beta=1.0, gamma=1.0):
    """DIST: beta * inter-class relation + gamma * intra-class relation of the tempered softmaxes, times T^2."""
    t = temperature
    y_s, y_t = F.softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()          # each image: its class distribution
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()  # each class: its distribution over the batch
    return t * t * (beta * inter + gamma * intra)


def combine(label_loss, student_logits, teacher_logits, loss, temperature, alpha, beta, gamma):
    """alpha * the label loss + (1 - alpha) * the distillation term `loss` names."""
    if loss == "kd":
        term = kd_loss(student_logits, teacher_logits, temperature)
    else:
        term = dist_loss(student_logits, teacher_logits, temperature, beta, gamma)
    return alpha * label_loss + (1 - alpha) * term


@dataclass
class Teacher:
    """A teacher model ready to run: the module, its input normalisation and what identifies it."""
    model: nn.Module
    mean: tuple
    std: tuple
    name: str
    sha256: str | None
    num_classes: int
    class_names: list | None = None


def _torchvision_teacher(spec, flag):
    import torchvision
    name, _, weights_name = spec.partition(".")
    try:
        enum = torchvision.models.get_model_weights(name)
        weights = enum[weights_name] if weights_name else enum.DEFAULT
    except (ValueError, KeyError):
        raise UsageError(f"{flag} torchvision:{spec}: not a torchvision classification model with those weights "
                         "(for example torchvision:resnet50.IMAGENET1K_V2)") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        try:
            state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                                       weights_only=True)
        except Exception as e:
            raise UsageError(f"{flag} torchvision:{spec}: its weights are not on this machine and could not be "
                             f"fetched ({type(e).__name__}); download {weights.url} into {cached.parent}/") from None
    else:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
    model.load_state_dict(state)
    transform = weights.transforms()
    return Teacher(model, tuple(transform.mean), tuple(transform.std), f"torchvision:{name}.{weights.name}",
                   sha256_of(cached) if cached.is_file() else None, len(weights.meta["categories"]),
                   list(weights.meta["categories"]))


def _timm_teacher(spec, flag):
    try:
        import timm
    except ImportError:
        raise UsageError(f"{flag} timm:{spec}: needs timm (pip install timm)") from None
    try:
        model = timm.create_model(spec, pretrained=True)
    except Exception as e:
        raise UsageError(f"{flag} timm:{spec}: could not build it with its weights ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]}); check the name, or fetch its weights into the "
                         "Hugging Face cache where the machine is online") from None
    cfg = timm.data.resolve_data_config({}, model=model)
    return Teacher(model, tuple(cfg["mean"]), tuple(cfg["std"]), f"timm:{spec}", None, model.num_classes,
                   (model.pretrained_cfg or {}).get("label_names"))


def load_teacher(spec, flag="--teacher", log=print):
    """The teacher `spec` names: torchvision:NAME[.WEIGHTS], timm:NAME, or any MobileNetV2 weights / ONNX file
    that evaluate.py reads."""
    if spec.startswith("torchvision:"):
        teacher = _torchvision_teacher(spec[len("torchvision:"):], flag)
    elif spec.startswith("timm:"):
        teacher = _timm_teacher(spec[len("timm:"):], flag)
    else:
        found = resolve.weights(spec, flag=flag, log=lambda *a: None)
        pre = found.preprocessing
        names = (found.meta.get("classes") or {}).get("names")
        teacher = Teacher(found.model, tuple(pre["mean"]), tuple(pre["std"]), str(found.path), found.sha256,
                          found.config[0], list(names) if names else None)
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    log(f"teacher {teacher.name}: {teacher.num_classes} classes, mean {list(teacher.mean)}, std {list(teacher.std)}"
        + (f", sha256 {teacher.sha256[:12]}" if teacher.sha256 else ""))
    return teacher


class Distillation:
    """The distillation loss with its teacher (see the module docstring); called in the training step."""

    def __init__(self, teacher, student_mean, student_std, loss="kd", temperature=1.0, alpha=0.5, beta=1.0,
                 gamma=1.0, device="cpu"):
        if loss not in LOSSES:
            raise ValueError(f"distillation loss must be one of {LOSSES}, got {loss!r}")
        self.teacher, self.loss, self.temperature = teacher, loss, temperature
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        onnx = isinstance(teacher.model, onnx_weights.OnnxFileModel)
        self.device = torch.device("cpu") if onnx else torch.device(device)
        if not onnx:
            teacher.model.to(self.device)
        view = (1, 3, 1, 1)
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std = x_student * scale + shift
        s_mean, s_std = torch.tensor(student_mean).view(view), torch.tensor(student_std).view(view)
        t_mean, t_std = torch.tensor(teacher.mean).view(view), torch.tensor(teacher.std).view(view)
        # kept on the student's device, so the per-step renormalisation copies nothing
        self.scale, self.shift = (s_std / t_std).to(device), ((s_mean - t_mean) / t_std).to(device)

    def teacher_input(self, x):
        """The student's normalised input as the teacher expects its pixels normalised."""
        scale, shift = self.scale, self.shift
        if scale.device != x.device or scale.dtype != x.dtype:  # an input elsewhere than the student's device
            scale, shift = scale.to(x.device, x.dtype), shift.to(x.device, x.dtype)
        return x * scale + shift

    def teacher_logits(self, x):
        with torch.no_grad():
            inputs = self.teacher_input(x)
            logits = self.teacher.model(inputs.to(self.device))
        return logits.to(x.device).float()

    def __call__(self, label_loss, student_logits, x, indices=None):
        return combine(label_loss, student_logits.float(), self.teacher_logits(x), self.loss, self.temperature,
                       self.alpha, self.beta, self.gamma)

    def record(self):
        """What a checkpoint keeps about the teacher (never the teacher itself)."""
        return {"teacher": self.teacher.name, "teacher_sha256": self.teacher.sha256, "loss": self.loss,
                "temperature": self.temperature, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}


def check_classes(teacher, spec, num_classes, class_names):
    """A teacher for another class count, or for the same classes in another order, is one line."""
    if teacher.num_classes != num_classes:
        raise UsageError(f"--teacher {spec}: it predicts {teacher.num_classes} classes, the student "
                         f"{num_classes}; use a teacher trained on the same classes")
    if teacher.class_names and class_names and len(class_names) == len(teacher.class_names):
        ours = [str(n).lower() for n in class_names]
        theirs = [str(n).lower() for n in teacher.class_names]
        if ours != theirs and set(ours) == set(theirs):
            raise UsageError(f"--teacher {spec}: its classes are the student's in another order; use a "
                             "teacher trained with the same class order")


def build(args, num_classes, class_names, device, log):
    """The Distillation of `--teacher` (None without one); a teacher whose classes are not the student's
    is one line."""
    if not args.teacher:
        return None
    teacher = load_teacher(args.teacher, log=log)
    check_classes(teacher, args.teacher, num_classes, class_names)
    log(f"distillation: {args.distill_loss}, temperature {args.distill_temperature:g}, label loss weight "
        f"{args.distill_alpha:g}" + (f", beta {args.distill_beta:g}, gamma {args.distill_gamma:g}"
                                     if args.distill_loss == "dist" else ""))
    return Distillation(teacher, tuple(args.mean), tuple(args.std), args.distill_loss, args.distill_temperature,
                        args.distill_alpha, args.distill_beta, args.distill_gamma, device)
