"""Augmentations of the published recipes: image policies and random erasing after the crop (on uint8 images in
the loader processes), mixup and cutmix on the batch (on the device).

    after = augment.after_crop("ta_wide", random_erase=0.1)        # uint8 [3,H,W] -> uint8 [3,H,W]
    mix = augment.MixupCutmix(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=1000)
    images, soft_targets = mix(images, targets)

Each draws its randomness from the same generators, in the same order, as its torchvision counterpart
(torch's global generator; timm's policy strings: Python's `random` and NumPy's, as timm does), so a
seeded run is reproducible, its state is in every checkpoint, and given the same draws the pixels equal
torchvision's (or timm's): tests/test_augment.py pins it. The pixel operations are torchvision's own
(`torchvision.transforms.v2.functional`) on PIL images, as torchvision's reference script runs them.
"""
import math
import random
import re

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import InterpolationMode

POLICIES = ("ta_wide", "ra", "imagenet", "augmix")
# The ImageNet mean as a pixel: random erasing fills with it, which is what torchvision's recipe gets by
# erasing to 0 after normalisation (within half a grey level); timm's policies fill with it too.
MEAN_PIXEL = (124, 116, 104)
INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


def _flat(n, h, w):
    return None


def _range(top):
    return lambda n, h, w: torch.linspace(0.0, top, n)


# op -> (magnitude bins (num_bins, height, width) -> tensor, or None for ops without one; signed)
# TrivialAugment (Mueller & Hutter 2021), its "wide" ranges; 31 bins.
TA_WIDE_SPACE = {
    "Identity": (None, False),
    "ShearX": (_range(0.99), True),
    "ShearY": (_range(0.99), True),
    "TranslateX": (_range(32.0), True),
    "TranslateY": (_range(32.0), True),
    "Rotate": (_range(135.0), True),
    "Brightness": (_range(0.99), True),
    "Color": (_range(0.99), True),
    "Contrast": (_range(0.99), True),
    "Sharpness": (_range(0.99), True),
    "Posterize": (lambda n, h, w: 8 - (torch.arange(n) / ((n - 1) / 6)).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}

# RandAugment (Cubuk et al. 2020) and AutoAugment (Cubuk et al. 2019): translations up to 150/331 of the
# image (AutoAugment searched at 331 px), shear 0.3, rotation 30 degrees, enhancements +-0.9.
_STANDARD = {
    "ShearX": (_range(0.3), True),
    "ShearY": (_range(0.3), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (_range(30.0), True),
    "Brightness": (_range(0.9), True),
    "Color": (_range(0.9), True),
    "Contrast": (_range(0.9), True),
    "Sharpness": (_range(0.9), True),
    "Posterize": (lambda n, h, w: 8 - (torch.arange(n) / ((n - 1) / 4)).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
RA_SPACE = {"Identity": (None, False), **_STANDARD}
AA_SPACE = {**_STANDARD, "Invert": (None, False)}

# AutoAugment's ImageNet policy (Cubuk et al. 2019, appendix): 25 sub-policies of two
# (op, probability, magnitude bin of 10).
AA_IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)

# AugMix (Hendrycks et al. 2020): the operations that do not overlap ImageNet-C's corruptions, plus the
# four enhancements when all operations are allowed (torchvision's default, all_ops=True).
AUGMIX_SPACE = {
    "ShearX": (_range(0.3), True),
    "ShearY": (_range(0.3), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, w / 3.0, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, h / 3.0, n), True),
    "Rotate": (_range(30.0), True),
    "Posterize": (lambda n, h, w: 4 - (torch.arange(n) / ((n - 1) / 4)).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Brightness": (_range(0.9), True),
    "Color": (_range(0.9), True),
    "Contrast": (_range(0.9), True),
    "Sharpness": (_range(0.9), True),
}


def _size(image):
    """(height, width) of a PIL image or a [..., H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return image.shape[-2], image.shape[-1]


def apply_op(image, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=None):
    """One policy operation with its signed magnitude, as torchvision's policies apply it (a shear
    magnitude is the tangent of the angle; enhancements are 1 + magnitude; solarize's is a share of 255)."""
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(magnitude))
        return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                        shear=[angle, 0.0] if op == "ShearX" else [0.0, angle], interpolation=interpolation,
                        fill=fill, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        return F.affine(image, angle=0.0, translate=[int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)],
                        scale=1.0, shear=[0.0, 0.0], interpolation=interpolation, fill=fill)
    if op == "Rotate":
        return F.rotate(image, angle=magnitude, interpolation=interpolation, fill=fill)
    if op == "Brightness":
        return F.adjust_brightness(image, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(image, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(image, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return F.adjust_sharpness(image, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return F.posterize(image, bits=int(magnitude))
    if op == "Solarize":
        return F.solarize(image, threshold=255.0 * magnitude)  # uint8 images: 255 is the top of the range
    if op == "AutoContrast":
        return F.autocontrast(image)
    if op == "Equalize":
        return F.equalize(image)
    if op == "Invert":
        return F.invert(image)
    raise ValueError(f"unknown operation {op!r}")


def _pick(space):
    """A uniformly drawn key of `space`."""
    keys = tuple(space)
    return keys[int(torch.randint(len(keys), ()))]


def _signed(value, signed):
    return -value if signed and torch.rand(()) <= 0.5 else value


class TrivialAugmentWide:
    """One operation drawn uniformly, at a magnitude drawn uniformly from 31 bins (Mueller & Hutter 2021)."""

    def __init__(self, interpolation=InterpolationMode.NEAREST, fill=None, num_magnitude_bins=31):
        self.interpolation, self.fill, self.bins = interpolation, fill, num_magnitude_bins

    def __call__(self, image):
        op = _pick(TA_WIDE_SPACE)
        magnitudes, signed = TA_WIDE_SPACE[op]
        magnitude = 0.0
        if magnitudes is not None:
            magnitude = _signed(float(magnitudes(self.bins, *_size(image))[int(torch.randint(self.bins, ()))]), signed)
        return apply_op(image, op, magnitude, self.interpolation, self.fill)


class RandAugment:
    """`num_ops` operations drawn uniformly (with repeats), each at the fixed magnitude bin `magnitude` of
    `num_magnitude_bins`, with a random sign (Cubuk et al. 2020; torchvision's --ra-magnitude)."""

    def __init__(self, num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation=InterpolationMode.NEAREST,
                 fill=None):
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in 0..{num_magnitude_bins - 1}, got {magnitude}")
        self.num_ops, self.magnitude, self.bins = num_ops, magnitude, num_magnitude_bins
        self.interpolation, self.fill = interpolation, fill

    def __call__(self, image):
        for _ in range(self.num_ops):
            op = _pick(RA_SPACE)
            magnitudes, signed = RA_SPACE[op]
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = _signed(float(magnitudes(self.bins, *_size(image))[self.magnitude]), signed)
            image = apply_op(image, op, magnitude, self.interpolation, self.fill)
        return image


class AutoAugmentImageNet:
    """AutoAugment's ImageNet policy: one sub-policy drawn uniformly; each of its two operations applied
    with its probability, at its magnitude bin (of 10), with a random sign."""

    def __init__(self, interpolation=InterpolationMode.NEAREST, fill=None):
        self.interpolation, self.fill = interpolation, fill

    def __call__(self, image):
        policy = AA_IMAGENET_POLICY[int(torch.randint(len(AA_IMAGENET_POLICY), ()))]
        for op, probability, bin_index in policy:
            if not torch.rand(()) <= probability:
                continue
            magnitudes, signed = AA_SPACE[op]
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = _signed(float(magnitudes(10, *_size(image))[bin_index]), signed)
            image = apply_op(image, op, magnitude, self.interpolation, self.fill)
        return image


class AugMix:
    """AugMix (Hendrycks et al. 2020): `mixture_width` chains of 1-3 operations (severity: the magnitude
    bins drawn from, of 10), mixed with Dirichlet(alpha) weights, then mixed with the image by a
    Beta(alpha, alpha) weight. Runs on uint8 tensors (a PIL image is converted, as torchvision does)."""

    def __init__(self, severity=3, mixture_width=3, chain_depth=-1, alpha=1.0,
                 interpolation=InterpolationMode.BILINEAR, fill=None):
        if not 1 <= severity <= 10:
            raise ValueError(f"AugMix severity must be in 1..10, got {severity}")
        self.severity, self.width, self.depth, self.alpha = severity, mixture_width, chain_depth, alpha
        self.interpolation, self.fill = interpolation, fill

    def __call__(self, image):
        pil = isinstance(image, Image.Image)
        x = F.pil_to_tensor(image) if pil else image
        height, width = x.shape[-2:]
        batch = x.reshape(1, *x.shape[-3:])
        # Beta(alpha, alpha) as a 2-way Dirichlet: [weight of the image, weight of the augmented mixture]
        m = torch._sample_dirichlet(torch.tensor([self.alpha, self.alpha]).expand(1, -1))
        weights = torch._sample_dirichlet(torch.tensor([self.alpha] * self.width).expand(1, -1)) * m[:, 1].reshape(1, -1)
        mix = m[:, 0].reshape(1, 1, 1, 1) * batch
        for i in range(self.width):
            aug = batch
            depth = self.depth if self.depth > 0 else int(torch.randint(low=1, high=4, size=(1,)).item())
            for _ in range(depth):
                op = _pick(AUGMIX_SPACE)
                magnitudes, signed = AUGMIX_SPACE[op]
                magnitude = 0.0
                if magnitudes is not None:
                    magnitude = _signed(float(magnitudes(10, height, width)[int(torch.randint(self.severity, ()))]),
                                        signed)
                aug = apply_op(aug, op, magnitude, self.interpolation, self.fill)
            mix.add_(weights[:, i].reshape(1, 1, 1, 1) * aug)
        out = mix.reshape(x.shape).to(dtype=x.dtype)
        return F.to_pil_image(out) if pil else out


# --------------------------------------------------------------------------------------------------
# timm's RandAugment policy strings ("rand-m9-mstd0.5-inc1")


def _negate_half(value):
    return -value if random.random() > 0.5 else value


def _solarize_add(image, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _affine(image, matrix, resample, fill):
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _timm_level(op, level, translate_pct=0.45):
    """The argument timm's op takes at `level` (0..10), with timm's random sign where it has one."""
    base = op.replace("Increasing", "")
    if base == "Rotate":
        return _negate_half(level / 10 * 30.0)
    if base in ("ShearX", "ShearY"):
        return _negate_half(level / 10 * 0.3)
    if base in ("TranslateXRel", "TranslateYRel"):
        return _negate_half(level / 10 * translate_pct)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        if op.endswith("Increasing"):
            return max(0.1, 1.0 + _negate_half(level / 10 * 0.9))
        return level / 10 * 1.8 + 0.1
    if base == "Posterize":
        bits = int(level / 10 * 4)
        return 4 - bits if op.endswith("Increasing") else bits
    if base == "Solarize":
        threshold = min(256, int(level / 10 * 256))
        return 256 - threshold if op.endswith("Increasing") else threshold
    if base == "SolarizeAdd":
        return min(128, int(level / 10 * 110))
    return None


def _timm_apply(image, op, arg, interpolation, fill):
    base = op.replace("Increasing", "")
    if base == "AutoContrast":
        return ImageOps.autocontrast(image)
    if base == "Equalize":
        return ImageOps.equalize(image)
    if base == "Invert":
        return ImageOps.invert(image)
    if base == "Posterize":  # 0 bits: black, as ImageOps.posterize gave before Pillow 13 refused 0
        return image if arg >= 8 else ImageOps.posterize(image, arg) if arg > 0 else image.point(lambda v: 0)
    if base == "Solarize":
        return ImageOps.solarize(image, arg)
    if base == "SolarizeAdd":
        return _solarize_add(image, arg)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, base)(image).enhance(arg)
    # geometric: the resampling filter is drawn per operation when several are allowed (timm's "random")
    resample = random.choice(interpolation) if isinstance(interpolation, tuple) else interpolation
    if base == "Rotate":
        return image.rotate(arg, resample=resample, fillcolor=fill)
    if base == "ShearX":
        return _affine(image, (1, arg, 0, 0, 1, 0), resample, fill)
    if base == "ShearY":
        return _affine(image, (1, 0, 0, arg, 1, 0), resample, fill)
    if base == "TranslateXRel":
        return _affine(image, (1, 0, arg * image.size[0], 0, 1, 0), resample, fill)
    if base == "TranslateYRel":
        return _affine(image, (1, 0, 0, 0, 1, arg * image.size[1]), resample, fill)
    raise ValueError(f"unknown operation {op!r}")


TIMM_RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                 "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TIMM_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
_TIMM_KEY = re.compile(r"^(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)$")


class TimmRandAugment:
    """timm's RandAugment as its policy strings state it: "rand" then, separated by "-", m<level 0..10>
    (default 10 bins as in timm), n<ops per image> (2), mstd<std of a Gaussian noise on the level> (0;
    above 100: uniform in [0, level]), mmax<upper clip of the level> (10), inc<1: the increasing-severity
    variants> (0), p<probability of each op> (0.5). E.g. rand-m9-mstd0.5 (the rmsproptf recipe's).

    Operations are drawn with NumPy's generator and applied on PIL images with Python's, as timm does;
    geometric ones fill with the ImageNet mean pixel and resample with `interpolation` (a tuple: one of
    them drawn each time, timm's "random").
    """

    def __init__(self, config, interpolation=(Image.BILINEAR, Image.BICUBIC), fill=MEAN_PIXEL, translate_pct=0.45):
        parts = config.split("-")
        if parts[0] != "rand" or len(parts) < 2:
            raise ValueError(f"{config!r}: a policy string starts with 'rand-', e.g. rand-m9-mstd0.5")
        self.config, self.level, self.num_ops, self.std, self.max_level = config, 10.0, 2, 0.0, 10.0
        self.prob, increasing = 0.5, False
        for part in parts[1:]:
            match = _TIMM_KEY.match(part)
            if not match:
                raise ValueError(f"{config!r}: cannot read {part!r} (keys: m, n, mstd, mmax, inc, p, each with a number)")
            key, value = match.group(1), float(match.group(2))
            if key == "m":
                self.level = value
            elif key == "n":
                self.num_ops = int(value)
            elif key == "mstd":
                self.std = math.inf if value > 100 else value
            elif key == "mmax":
                self.max_level = value
            elif key == "inc":
                increasing = bool(value)
            elif key == "p":
                self.prob = value
        self.ops = tuple(op + "Increasing" if increasing and op in TIMM_INCREASING else op for op in TIMM_RAND_OPS)
        self.interpolation, self.fill, self.translate_pct = interpolation, tuple(fill), translate_pct

    def __call__(self, image):
        for op in np.random.choice(self.ops, self.num_ops, replace=True):
            if self.prob < 1.0 and random.random() > self.prob:
                continue
            level = self.level
            if self.std == math.inf:
                level = random.uniform(0, level)
            elif self.std > 0:
                level = random.gauss(level, self.std)
            level = max(0.0, min(level, self.max_level))
            image = _timm_apply(image, op, _timm_level(op, level, self.translate_pct), self.interpolation, self.fill)
        return image


# --------------------------------------------------------------------------------------------------
# Random erasing and the pipeline after the crop


class RandomErasing:
    """Random erasing (Zhong et al. 2020) with torchvision's draws: with probability p, a rectangle of 2-33% of
    the area and aspect ratio 0.3-3.3 (10 tries, else nothing) is filled with `value` (default the mean
    pixel, what torchvision's recipe gets by erasing to 0 after normalisation)."""

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=MEAN_PIXEL):
        self.p, self.scale, self.ratio, self.value = p, scale, ratio, value
        self._log_ratio = torch.log(torch.tensor(ratio))

    def __call__(self, image):
        if torch.rand(1) >= self.p:
            return image
        channels, height, width = image.shape[-3:]
        area = height * width
        for _ in range(10):
            erase_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(self._log_ratio[0], self._log_ratio[1])).item()
            h = int(round(math.sqrt(erase_area * aspect_ratio)))
            w = int(round(math.sqrt(erase_area / aspect_ratio)))
            if not (h < height and w < width):
                continue
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            image = image.clone()
            image[..., i:i + h, j:j + w] = torch.tensor(self.value, dtype=image.dtype).view(-1, 1, 1)
            return image
        return image


class AfterCrop:
    """The work after the crop and flip, on a uint8 [3, H, W] tensor: the policy (on a PIL image, as
    torchvision's reference runs it; AugMix on the tensor), then random erasing."""

    def __init__(self, policy=None, erase=None):
        self.policy, self.erase = policy, erase

    def __call__(self, image):
        if self.policy is not None:
            if isinstance(self.policy, AugMix):
                image = self.policy(image)
            else:
                pil = Image.fromarray(image.permute(1, 2, 0).numpy())
                image = torch.from_numpy(np.array(self.policy(pil))).permute(2, 0, 1)
        if self.erase is not None:
            image = self.erase(image)
        return image


def build_policy(name, interpolation="bilinear", ra_magnitude=9, augmix_severity=3):
    """The policy named by --auto-augment (torchvision's names, or a timm "rand-..." string), or None."""
    if not name:
        return None
    mode = INTERPOLATIONS[interpolation]
    if name == "ta_wide":
        return TrivialAugmentWide(interpolation=mode)
    if name == "ra":
        return RandAugment(magnitude=ra_magnitude, interpolation=mode)
    if name == "imagenet":
        return AutoAugmentImageNet(interpolation=mode)
    if name == "augmix":
        return AugMix(severity=augmix_severity, interpolation=mode)
    if name.startswith("rand"):
        return TimmRandAugment(name)
    raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)} or a timm string like rand-m9-mstd0.5")


def after_crop(policy=None, random_erase=0.0, interpolation="bilinear", ra_magnitude=9, augmix_severity=3):
    """The AfterCrop for these flags, or None when there is nothing to do after the crop."""
    policy = build_policy(policy, interpolation, ra_magnitude, augmix_severity)
    erase = RandomErasing(p=random_erase) if random_erase > 0 else None
    return AfterCrop(policy, erase) if policy is not None or erase is not None else None


class Chain:
    """f(g(x)) for the transforms given, first to last; keeps the first one's `input_size`."""

    def __init__(self, *transforms):
        self.transforms = transforms
        self.input_size = getattr(transforms[0], "input_size", None)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


# --------------------------------------------------------------------------------------------------
# Mixup and cutmix on the batch


class MixupCutmix:
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019) on a normalised batch, on its device, as
    torchvision's v2 RandomChoice([MixUp(alpha), CutMix(alpha)]) does (one of the two per batch, each
    equally likely; only the one whose alpha is positive when the other is 0): every image is mixed with
    the one before it in the batch (the first with the last) by a Beta(alpha, alpha) weight, and so are
    the one-hot targets, which the loss takes as class probabilities."""

    def __init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=1000):
        self.kinds = [(kind, alpha) for kind, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
        if not self.kinds:
            raise ValueError("mixup_alpha or cutmix_alpha must be positive")
        self.num_classes = num_classes
        self._beta = {kind: torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha]))
                      for kind, alpha in self.kinds}

    def __call__(self, images, targets):
        """(mixed images, soft targets [B, num_classes] float32); the draws come from the CPU's generator."""
        kind = self.kinds[0][0]
        if len(self.kinds) > 1:
            kind = self.kinds[int(torch.multinomial(torch.tensor([1.0] * len(self.kinds)), 1))][0]
        lam = float(self._beta[kind].sample(()))
        if kind == "mixup":
            images = images.roll(1, 0).mul_(1.0 - lam).add_(images.mul(lam))
        else:
            height, width = images.shape[-2:]
            r_x = torch.randint(width, size=(1,))
            r_y = torch.randint(height, size=(1,))
            r = 0.5 * math.sqrt(1.0 - lam)
            r_w_half, r_h_half = int(r * width), int(r * height)
            x1, y1 = int(torch.clamp(r_x - r_w_half, min=0)), int(torch.clamp(r_y - r_h_half, min=0))
            x2, y2 = int(torch.clamp(r_x + r_w_half, max=width)), int(torch.clamp(r_y + r_h_half, max=height))
            mixed = images.clone()
            mixed[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
            images = mixed
            lam = float(1.0 - (x2 - x1) * (y2 - y1) / (width * height))  # the share of the image kept
        one_hot = torch.nn.functional.one_hot(targets, self.num_classes).to(torch.float32)
        return images, one_hot.roll(1, 0).mul_(1.0 - lam).add_(one_hot.mul(lam))
