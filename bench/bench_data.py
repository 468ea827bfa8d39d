"""Input-pipeline speed per CPU core: read_ImageNetData's train and eval loaders vs torchvision's
ImageFolder with the standard transforms, side by side in one process, one thread, alternating repeats.

Ours hands uint8 batches to the device, where normalize() runs; the reference builds float batches
with ToTensor + Normalize on the CPU (what a standard ImageNet script does). The eval pipeline is also
checked to give exactly torchvision's pixels on every image measured. A third pair is the training
pipeline of the torchvision-v2 recipe (176 px crop, TrivialAugmentWide, random erasing 0.1): ours
(augment.py after our crop) against torchvision's v2 transforms on PIL images, as its reference script
runs them (RandomResizedCrop, flip, TrivialAugmentWide, PILToTensor, ToDtype, Normalize, RandomErasing).

Usage: python bench/bench_data.py --images ../shared/imagenet_samples [--repeats 5] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnv2.data import augment  # noqa: E402
from mnv2.data import imagenet, loaders, transforms

RECIPE_CROP, RECIPE_ERASE = 176, 0.1  # torchvision-v2's train crop and random-erasing probability


def make_jpegs(out_dir, n=64, seed=0):
    """n JPEGs the size of typical ImageNet photos (500x375 and 375x500, ~110 kB at quality 90).

    Smooth random fields plus fine noise: a noise-only image compresses (and decodes) unlike a photo.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w, h = (500, 375) if k % 3 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out_dir / f"img_{k:03d}.JPEG", quality=90)
    return sorted(out_dir.glob("*.JPEG"))


def _paths(images, limit):
    paths = sorted(p for p in Path(images).iterdir() if imagenet.is_image(p.name))
    if not paths:
        raise SystemExit(f"error: no images in {images}")
    return paths[:limit] if limit else paths


def _reference_loaders(paths, tmp, input_size, resize, batch_size):
    """torchvision's ImageFolder over symlinks to the same files, with the standard transforms."""
    folder = Path(tmp) / "imagefolder" / "class0"
    folder.mkdir(parents=True)
    for p in paths:
        os.symlink(p.resolve(), folder / p.name)
    norm = T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val = T.Compose([T.Resize(resize), T.CenterCrop(input_size), T.ToTensor(), norm])
    import torchvision.transforms.v2 as v2
    bilinear = T.InterpolationMode.BILINEAR
    recipe = v2.Compose([v2.RandomResizedCrop(RECIPE_CROP, interpolation=bilinear, antialias=True),
                         v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=bilinear), v2.PILToTensor(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
                         v2.RandomErasing(RECIPE_ERASE)])
    return {split: torch.utils.data.DataLoader(ImageFolder(folder.parent, transform=tf), batch_size=batch_size,
                                               shuffle=False, num_workers=0)
            for split, tf in (("train", train), ("eval", val), ("recipe", recipe))}


def _our_loaders(paths, input_size, resize, batch_size):
    samples = [(str(p), 0) for p in paths]
    train = loaders.ImageNetDataset(samples, transforms.train_transform(input_size), train=True)
    val = loaders.ImageNetDataset(samples, transforms.eval_transform(input_size, resize), train=False)
    recipe = loaders.ImageNetDataset(samples, augment.Chain(transforms.TrainTransform(RECIPE_CROP),
                                                         augment.after_crop("ta_wide", RECIPE_ERASE)), train=True)
    return {split: loaders.build_loader(ds, batch_size, loaders.EvalSampler(len(ds)), num_workers=0, pin_memory=False)
            for split, ds in (("train", train), ("eval", val), ("recipe", recipe))}


def _images_per_s(loader):
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch[0].shape[0]
    return n / (time.perf_counter() - start)


def check_eval_identical(paths, input_size=224, resize=256):
    """Number of images whose eval tensor equals torchvision's Resize + CenterCrop + PILToTensor exactly."""
    reference = T.Compose([T.Resize(resize), T.CenterCrop(input_size), T.PILToTensor()])
    ours = transforms.eval_transform(input_size, resize)
    same = 0
    for p in paths:
        with Image.open(p) as im:
            same += torch.equal(reference(im.convert("RGB")), ours(str(p)))
    return same


def run(images=None, repeats=5, limit=0, batch_size=32, input_size=224, resize=256, seed=0):
    """Rows {name: {"ratio", "ours", "reference", "unit"}} plus "eval identical" counts."""
    torch.set_num_threads(1)  # per core: one process, one thread, no loader workers
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _paths(images, limit) if images else make_jpegs(Path(tmp) / "generated")
        ref, ours = _reference_loaders(paths, tmp, input_size, resize, batch_size), \
            _our_loaders(paths, input_size, resize, batch_size)
        for loader in (*ref.values(), *ours.values()):  # warm up: file cache, allocator, imports
            next(iter(loader))
        splits = ("train", "eval", "recipe")
        speeds = {(who, split): [] for who in ("ours", "reference") for split in splits}
        for _ in range(repeats):  # alternate, so load from other processes hits both sides alike
            for split in splits:
                speeds["reference", split].append(_images_per_s(ref[split]))
                speeds["ours", split].append(_images_per_s(ours[split]))
        identical = check_eval_identical(paths, input_size, resize)
    rows = {}
    for split in splits:
        o, r = statistics.median(speeds["ours", split]), statistics.median(speeds["reference", split])
        name = "train ta_wide+erase" if split == "recipe" else split
        rows[f"input pipeline {name} (per core)"] = {"ratio": o / r, "ours": o, "reference": r, "unit": "images/s"}
    rows["input pipeline eval identical to torchvision"] = {"ratio": identical / len(paths), "ours": identical,
                                                          "reference": len(paths), "unit": "images"}
    return rows


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of real JPEGs (default: generate 64 of ImageNet size)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; the median is reported")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256, help="eval resize before the center crop")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    return parser


def main(args):
    if args.images is not None and not args.images.is_dir():
        get_args_parser().error(f"argument --images: {args.images} is not a directory")
    if args.repeats < 1 or args.batch_size < 1 or args.limit < 0:
        get_args_parser().error("--repeats and --batch-size must be positive, --limit non-negative")
    rows = run(args.images, args.repeats, args.limit, args.batch_size, args.input_size, args.resize)
    print(f"{'measurement':48s} {'ratio':>7s} {'ours':>9s} {'reference':>10s}  unit")
    for name, row in rows.items():
        print(f"{name:48s} {row['ratio']:6.2f}x {row['ours']:9.1f} {row['reference']:10.1f}  {row['unit']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
