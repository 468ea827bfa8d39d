"""augment.py against its references: each policy, random erasing and mixup/cutmix give torchvision's pixels
(timm's for timm's policy strings) and consume the same random draws, given the same seed.

    python -m pytest tests/test_augment.py -q
"""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.transforms import InterpolationMode

from mnv2.data import augment

BILINEAR = InterpolationMode.BILINEAR


@pytest.fixture(autouse=True)
def keep_rng_state():
    """The tests seed the global generators; put them back as they were."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def noise_image(seed, width=40, height=32):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_input(pixels, kind):
    return Image.fromarray(pixels) if kind == "pil" else torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def run_seeded(transform, image, seed):
    """(output as an array, torch's generator state afterwards): equal states mean equal numbers of draws."""
    torch.manual_seed(seed)
    out = transform(image)
    out = np.asarray(out) if isinstance(out, Image.Image) else out.numpy()
    return out, torch.get_rng_state()


POLICIES = {
    "ta_wide": (lambda: augment.TrivialAugmentWide(interpolation=BILINEAR),
                lambda: v2.TrivialAugmentWide(interpolation=BILINEAR)),
    "ra": (lambda: augment.RandAugment(magnitude=9, interpolation=BILINEAR),
           lambda: v2.RandAugment(magnitude=9, interpolation=BILINEAR)),
    "imagenet": (lambda: augment.AutoAugmentImageNet(interpolation=BILINEAR),
                 lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=BILINEAR)),
    "augmix": (lambda: augment.AugMix(severity=3, interpolation=BILINEAR),
               lambda: v2.AugMix(severity=3, interpolation=BILINEAR)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pil", "tensor"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_each_policy_equals_torchvisions_given_the_same_seed(name, kind):
    ours, reference = (make() for make in POLICIES[name])
    changed = 0
    for seed in range(120):  # enough draws to reach every operation and sub-policy
        image = as_input(noise_image(seed), kind)
        (a, state_a), (b, state_b) = run_seeded(ours, image, seed), run_seeded(reference, image, seed)
        assert a.shape == b.shape and np.array_equal(a, b), (name, kind, seed)
        assert torch.equal(state_a, state_b), (name, kind, seed)  # the same draws, so the next image agrees too
        changed += not np.array_equal(a, np.asarray(image) if kind == "pil" else image.numpy())
    assert changed > 60  # the policy really ran


def test_build_policy_uses_the_recipe_interpolation_and_magnitude():
    policy = augment.build_policy("ra", interpolation="bicubic", ra_magnitude=5)
    assert isinstance(policy, augment.RandAugment) and policy.magnitude == 5
    assert policy.interpolation == InterpolationMode.BICUBIC
    assert augment.build_policy("augmix", augmix_severity=7).severity == 7
    assert augment.build_policy(None) is None
    with pytest.raises(ValueError, match="rand-m9-mstd0.5"):
        augment.build_policy("trivial")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101-p0.8",
                                    "rand-m5-n1-p1.0"])
def test_timm_policy_strings_equal_timms_rand_augment(config):
    auto_augment = pytest.importorskip("timm.data.auto_augment", reason="timm is the reference for its policy strings")
    reference = auto_augment.rand_augment_transform(config, {"translate_const": 14, "img_mean": augment.MEAN_PIXEL})
    ours = augment.TimmRandAugment(config)
    compared = 0
    for seed in range(120):
        image = Image.fromarray(noise_image(seed))
        random.seed(seed)
        np.random.seed(seed)
        a = np.asarray(ours(image))
        state_a = random.getstate(), np.random.get_state()[1].tolist()
        random.seed(seed)
        np.random.seed(seed)
        try:
            b = np.asarray(reference(image))
        except ValueError:  # timm's posterize to 0 bits, which Pillow 13 refuses; ours gives black there
            continue
        assert np.array_equal(a, b), (config, seed)
        assert state_a == (random.getstate(), np.random.get_state()[1].tolist()), (config, seed)
        compared += 1
    assert compared >= 100


@pytest.mark.parametrize("bad", ["rand", "rand-x9", "rand-m9-mstd", "augmix-m3"])
def test_a_policy_string_that_cannot_be_read_is_refused(bad):
    with pytest.raises(ValueError):
        augment.build_policy(bad)


def test_random_erasing_equals_torchvisions_filling_with_the_mean_pixel():
    ours = augment.RandomErasing(p=0.5)
    reference = v2.RandomErasing(p=0.5, value=list(augment.MEAN_PIXEL))
    erased = 0
    for seed in range(200):
        image = as_input(noise_image(seed), "tensor")
        (a, state_a), (b, state_b) = run_seeded(ours, image, seed), run_seeded(reference, image, seed)
        assert np.array_equal(a, b) and torch.equal(state_a, state_b), seed
        erased += not np.array_equal(a, image.numpy())
    assert 60 < erased < 140  # about half


def test_the_mean_pixel_normalises_to_about_zero_as_torchvisions_erasing_to_zero_does():
    from mnv2.data.transforms import normalize
    pixel = torch.tensor(augment.MEAN_PIXEL, dtype=torch.uint8).view(1, 3, 1, 1)
    assert normalize(pixel).abs().max() < 0.5 / 255 / 0.224


def test_after_crop_runs_the_policy_then_erasing_on_uint8():
    after = augment.after_crop("ta_wide", random_erase=1.0)
    image = as_input(noise_image(1), "tensor")
    torch.manual_seed(3)
    out = after(image)
    torch.manual_seed(3)
    expected = v2.RandomErasing(p=1.0, value=list(augment.MEAN_PIXEL))(
        v2.PILToTensor()(v2.TrivialAugmentWide(interpolation=BILINEAR)(Image.fromarray(noise_image(1)))))
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert augment.after_crop(None, 0.0) is None


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 1.0), (0.2, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_equals_torchvisions_random_choice(mixup, cutmix):
    ours = augment.MixupCutmix(mixup, cutmix, num_classes=10)
    parts = ([v2.MixUp(alpha=mixup, num_classes=10)] if mixup else []) + \
            ([v2.CutMix(alpha=cutmix, num_classes=10)] if cutmix else [])
    reference = v2.RandomChoice(parts) if len(parts) > 1 else parts[0]
    kinds = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        images, targets = torch.randn(6, 3, 20, 24, generator=g), torch.randint(0, 10, (6,), generator=g)
        torch.manual_seed(seed)
        a, soft_a = ours(images.clone(), targets)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        b, soft_b = reference(images.clone(), targets)
        assert torch.equal(a, b) and torch.equal(soft_a, soft_b) and torch.equal(state, torch.get_rng_state()), seed
        assert soft_a.sum(1).allclose(torch.ones(6))
        pasted = ((a - images).abs().sum(1) == 0).float().mean()  # cutmix keeps part of each image as it was
        kinds.add("cutmix" if pasted > 0 else "mixup")
    assert kinds == {kind for kind, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha}
