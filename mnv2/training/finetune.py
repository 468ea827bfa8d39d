"""Transfer learning: start from ImageNet weights, train only the classifier on top, and its recipe.

    python train.py --data-dir my_photos --val-split 0.1 --pretrained torchvision-v2
    python train.py --data-dir my_photos --val-split 0.1 --pretrained torchvision-v2 --freeze-backbone

`--pretrained` loads every tensor of a weight file (any layout `weights.load_model` reads, or a public
file by name) whose name and shape fit; the classifier starts afresh when the class count differs. Its
preprocessing comes along: a checkpoint's mean/std, or the published ones of a file recognised by sha256.
`--freeze-backbone` trains the classifier alone, with the backbone's BatchNorm kept in eval mode; without
augmentation its pooled features are computed once and the classifier trains on them (`use_cached_features`).
"""
import copy
import math
import time
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from mnv2 import checkpoint, resolve
from mnv2.data.loaders import EvalSampler, ImageNetDataset, build_loader
from mnv2.data.transforms import eval_transform, normalize
from mnv2.deploy import inference
from mnv2.training import recipes
from mnv2.weights import batchnorm_folded, load_matching


def presets(args, recipe="seed"):
    """The defaults --pretrained and --freeze-backbone select: recipes/finetune.yaml, and recipes/linear-probe.yaml
    over it (cli.Parser's presets hook). Under a named recipe, whose method wins, --pretrained still takes the
    width from its file, and a linear probe stays one (its lr, no augmentation, cached features)."""
    chosen = {}
    if getattr(args, "pretrained", None):
        chosen.update(recipes.named("finetune").flags if recipe == "seed" else {"width_mult": None})
    if getattr(args, "freeze_backbone", False):
        chosen.update(recipes.named("linear-probe").flags)
    return chosen


# --------------------------------------------------------------------------------------------------
# The file to start from


def resolve_args(args, log=print):
    """A copy of `args` with --pretrained made a verified path (a public file's name is fetched) and what that
    file (or --qat's) brings filled in where no flag said: its width, and its mean/std (a checkpoint's own,
    else those of a public file recognised by sha256, else ImageNet's), as resolve.weights resolves them."""
    args = copy.copy(args)
    qat = getattr(args, "qat", None)  # train.py --qat WEIGHTS: the float weights it starts from bring the same
    overrides = {"mean": args.mean, "std": args.std}
    if args.pretrained or qat:
        flag = "--pretrained" if args.pretrained else "--qat"
        found = resolve.weights(args.pretrained or qat, flag=flag, pretrained_dir=args.pretrained_dir,
                                        allow_onnx=False, strict=False, preprocessing=overrides, log=log)
        if args.pretrained:
            args.pretrained = str(found.path)
        if args.width_mult is None:
            args.width_mult = found.config[1]
        pre = found.preprocessing
        if args.pretrained and batchnorm_folded(found.data):
            if getattr(args, "freeze_bn", None) is False:
                log(f"warning: --pretrained {found.path}: its BatchNorm is folded into the convolutions (every "
                    "running mean 0, variance 1); with --no-freeze-bn the first steps normalise by batch "
                    "statistics these weights never saw, which changes what the network computes")
            else:
                args.freeze_bn = True
                log(f"--pretrained {found.path}: its BatchNorm is folded into the convolutions (every running mean "
                    "0, variance 1), so BatchNorm statistics stay frozen while fine-tuning (--no-freeze-bn "
                    "re-estimates them from your batches)")
    else:
        pre, _ = resolve.resolve_preprocessing({}, None, overrides)
    if args.width_mult is None:
        args.width_mult = 1.0
    args.mean, args.std = list(pre["mean"]), list(pre["std"])
    return args


def start_from(model, path, classes, log=print):
    """Load every tensor of `path` that fits `model` and say what was loaded and what starts afresh. The
    classifier starts afresh also when its class count fits but the file records other classes than
    `classes` (the data's): its rows would score other classes."""
    if not path:
        return
    data = checkpoint.read_weights(path)
    saved = checkpoint.meta(data).get("classes") or {}
    theirs = saved.get("names") if saved.get("order") == "folders" else saved.get("wnids")
    ours = classes.names if classes.order == "folders" else classes.wnids
    other_classes = bool(theirs) and list(theirs) != list(ours)
    loaded, initialised, unused = load_matching(model, data, skip=("classifier.",) if other_classes else ())
    own = model.state_dict()
    why = ("the file's classes are others than this data's" if other_classes else
           f"the file has another class count than this data's {len(ours)}")
    log(f"--pretrained {path}: loaded {len(loaded)} of the model's {len(own)} tensors"
        + (f"; initialised afresh: {', '.join(initialised)} ({why})" if initialised else ""))


# --------------------------------------------------------------------------------------------------
# A frozen backbone


class FrozenFeatures(nn.Sequential):
    """The backbone held fixed: no gradients and BatchNorm in eval mode (its running statistics stay those
    of the pretrained weights), whatever mode the model around it is put in."""

    def train(self, mode=True):
        return super().train(False)


class FrozenStatistics:
    """Mixed into a BatchNorm class: the layer normalises with its running statistics and never updates them,
    whatever mode the model around it is put in; its scale and shift still train."""

    def train(self, mode=True):
        return super().train(False)


_FROZEN_CLASSES = {}


def freeze_batchnorm(model, frozen, log=print):
    """--freeze-bn: every BatchNorm of `model` in eval mode for good (statistics frozen, affine trained)."""
    if not frozen:
        return 0
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, FrozenStatistics)]
    for layer in layers:
        cls = type(layer)
        if cls not in _FROZEN_CLASSES:
            _FROZEN_CLASSES[cls] = type(f"Frozen{cls.__name__}", (FrozenStatistics, cls), {})
        layer.__class__ = _FROZEN_CLASSES[cls]
        layer.eval()
    log(f"--freeze-bn: BatchNorm statistics of {len(layers)} layers frozen (their scale and shift train)")
    return len(layers)


def freeze_backbone(model, frozen, log=print):
    """Freeze `model.features` in place when `frozen`; the parameters an optimizer should train."""
    if not frozen:
        return model
    model.features.requires_grad_(False)
    model.features.__class__ = FrozenFeatures
    model.features.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"--freeze-backbone: training the classifier only ({trainable:,} parameters), backbone BatchNorm "
        "in eval mode")
    return model.classifier


# --------------------------------------------------------------------------------------------------
# Cached features: a linear probe in seconds


class ClassifierOnFeatures(nn.Module):
    """The classifier of `model` applied to pooled backbone features: the part of the model a frozen
    backbone leaves to train. Shares its parameters with `model`."""

    def __init__(self, model):
        super().__init__()
        self.classifier = model.classifier

    def forward(self, features):
        return self.classifier(features)


class FeatureDataset(Dataset):
    """(features, target, index, n_failed) rows, as the image datasets give (image, target, index, n_failed)."""

    def __init__(self, features, targets, failed):
        self.features, self.targets, self.failed = features, targets, failed

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.features[index], self.targets[index], index, self.failed[index]


@torch.no_grad()
def backbone_features(model, dataset, batch_size, num_workers, device, mean, std, input_size=224):
    """Pooled backbone features of every image of `dataset`, in index order: (features, targets, n_failed)
    on the CPU. The backbone runs as `evaluate.py` runs it (BatchNorm folded, channels_last)."""
    fast = inference.prepare_for_inference(model, device=device, input_size=input_size, batch_size=batch_size)
    fast.classifier = nn.Identity()
    loader = build_loader(dataset, batch_size, EvalSampler(len(dataset)), num_workers=num_workers,
                          persistent_workers=False)
    features, targets, failed = [], [], []
    with torch.inference_mode():
        for images, labels, _, n_failed in loader:
            x = normalize(images.to(device, non_blocking=True), mean, std, channels_last=True)
            features.append(fast(x).float().cpu())
            targets.append(labels)
            failed.append(n_failed)
    return torch.cat(features), torch.cat(targets), torch.cat(failed)


def use_cached_features(learner, data, num_workers, distributed_wrap, log=print):
    """With a frozen backbone and no augmentation every epoch would compute the same backbone features
    again: compute them once, for training and validation images, and train the classifier on them.
    Returns (learner, data) for that: the learner's model is the classifier on features, the loaders give
    features; the sampler, the schedule and the checkpoints are the same as without the cache."""
    start = time.perf_counter()
    model = learner.raw
    batch = data.batch_per_rank
    loaders = {}
    for name, loader in (("train", data.train_loader), ("val", data.val_loader)):
        if loader is None:
            loaders[name] = None
            continue
        features, targets, failed = backbone_features(model, loader.dataset, max(batch, 64), num_workers,
                                                      learner.device, learner.mean, learner.std,
                                                      data.preprocessing["input_size"])
        rows = FeatureDataset(features, targets, failed if name == "val" else torch.zeros_like(failed))
        if name == "train":
            loaders[name] = build_loader(rows, batch, data.sampler, num_workers=0, pin_memory=False,
                                         persistent_workers=False, drop_last=True)
        else:
            loaders[name] = build_loader(rows, batch, loader.sampler, num_workers=0, pin_memory=False,
                                         persistent_workers=False)
    head = ClassifierOnFeatures(model)
    log(f"--freeze-backbone without augmentation: backbone features of {data.train_images} train + "
        f"{data.val_images} val images computed once in {time.perf_counter() - start:.1f} s; the classifier "
        "trains on them (--no-cache-features trains through the backbone every step)")
    learner = replace(learner, model=distributed_wrap(head), on_features=ClassifierOnFeatures)
    return learner, replace(data, train_loader=loaders["train"], val_loader=loaders["val"])


# --------------------------------------------------------------------------------------------------
# LP-FT: a linear probe first, then everything fine-tuned


def probe_first(model, data, epochs, lr, seed, device, num_workers, log=print):
    """Train `model`'s classifier alone for `epochs` epochs on cached backbone features of the training
    images' centre crops, before every layer is fine-tuned: a fresh head's large early gradients would
    otherwise distort the pretrained features (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained
    Features and Underperform Out-of-Distribution": linear probe, then fine-tune). Seeded by `seed` with a
    generator of its own, so the run's later random draws are those it would have made without it.
    Returns the probe's val top-1 (None without val images)."""
    start = time.perf_counter()
    pre = data.preprocessing
    transform = eval_transform(pre["input_size"], pre["resize"], pre["interpolation"])
    sets = {"train": data.train_loader.dataset, "val": data.val_loader.dataset if data.val_loader else None}
    cached = {}
    for name, dataset in sets.items():
        if dataset is not None:
            centre = ImageNetDataset(dataset.samples, transform, train=False)
            cached[name] = backbone_features(model, centre, 64, num_workers, device, pre["mean"], pre["std"],
                                             pre["input_size"])
    features, targets, _ = cached["train"]
    head = copy.deepcopy(model.classifier).to(device).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    generator = torch.Generator().manual_seed(seed)
    batch, steps = 32, max(1, len(targets) // 32)
    for epoch in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for step in range(steps):
            rate = lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (epochs * steps)))
            for group in optimizer.param_groups:
                group["lr"] = rate
            rows = order[step * batch:(step + 1) * batch]
            loss = nn.functional.cross_entropy(head(features[rows].to(device)), targets[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.classifier.load_state_dict(head.state_dict())
    top1 = None
    if "val" in cached:
        val_features, val_targets, val_failed = cached["val"]
        with torch.no_grad():
            hits = (head.eval()(val_features.to(device)).argmax(1).cpu() == val_targets) & (val_failed == 0)
        top1 = 100.0 * hits.sum().item() / max(1, len(val_targets))
    log(f"LP-FT: the classifier first, {epochs} epochs on cached features of {len(targets)} centre crops "
        f"(lr {lr:g}, {time.perf_counter() - start:.0f} s)" + (f": val top-1 {top1:.2f}%" if top1 is not None else "")
        + "; then every layer (--lp-epochs 0 skips this)")
    return top1
