"""ImageNet (ILSVRC2012) input pipeline: from files on disk to uint8 batches with exact labels.

Reads the ImageNet layouts in use (the ILSVRC2012 archive layout with a flat val folder and the devkit,
val sorted into <wnid>/ folders, torchvision's train/ + val/), takes the 1000 classes from the devkit's
meta.mat, builds fast train/eval transforms that hand the device uint8 images, and writes a small demo
dataset in the exact archive layout from scikit-learn's bundled digits.

The library behind it is `mnv2.data`; this script is its command line, and its names stay importable
from here (`from read_ImageNetData import make_demo`) for code written against the flat layout.

Usage: python read_ImageNetData.py --data-dir /data/imagenet [--check] [--list val] [--class-order devkit]
       python read_ImageNetData.py --data-dir /data/imagenet --write-shards /data/imagenet-wds [-j 8]
"""

import logging
import os
import re
import sys
import time
from pathlib import Path

from mnv2 import cli
# The public data API, importable from here as before the package existed.
from mnv2.data import folders, shards
from mnv2.data.demo import (DEMO_DIGITS, DEMO_MARKER, demo_is_complete, demo_synsets, make_demo,  # noqa: F401
                            make_folder_demo, write_meta_mat)
from mnv2.data.imagenet import (CLASS_ORDERS, DEVKIT_DIRS, GROUND_TRUTH_NAME, IMAGE_EXTENSIONS,  # noqa: F401
                                NUM_CLASSES, NUM_VAL_IMAGES, SPLIT_DIRS, VAL_NAME, WNID, Classes, DataError,
                                ImageNetLayout, find_layout, is_image, list_samples, read_classes, read_ground_truth,
                                read_meta_mat, summarize)
from mnv2.data.loaders import (EvalSampler, ImageNetDataset, RASampler, TrainSampler, build_datasets,  # noqa: F401
                               build_loader)
from mnv2.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, EvalTransform,  # noqa: F401
                                  TrainTransform, check_images, decode_rgb, eval_transform, normalize, train_transform)


def get_args_parser():
    parser = cli.Parser(prog="read_ImageNetData.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=cli.data_location,
                        help="ImageNet root (ILSVRC2012_img_train/, ILSVRC2012_img_val/, ILSVRC2012_devkit_t12/, or "
                             "train/ + val/), a folder of classes, a shard set (folder or URL), or the folder of the "
                             "official archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, devkit .tar.gz)")
    parser.add_argument("--class-order", default="sorted", choices=CLASS_ORDERS,
                        help="sorted: WNID order of torchvision/timm and public weights; devkit: ILSVRC2012_ID - 1")
    parser.add_argument("--check", action="store_true", help="also decode every image and list the bad ones "
                        "(a shard set: check every shard against SHA256SUMS)")
    parser.add_argument("--list", choices=("train", "val"), help="print relative/path<TAB>class_index<TAB>wnid per image")
    parser.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.positive_int,
                        default=min(8, os.cpu_count() or 1), help="processes for --check and --write-shards")
    parser.add_argument("--val-split", type=cli.fraction, default=None,
                        help="a folder of classes without val/: the fraction of each class held out for validation")
    parser.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                        help="a folder of classes: must agree with the folders (1000: ImageNet's, for WNID folders)")
    parser.add_argument("--make-demo", type=Path, metavar="DIR",
                        help="write the demo dataset (digits) to DIR and exit")
    parser.add_argument("--demo-layout", choices=("imagenet", "folders"), default="imagenet",
                        help="--make-demo's layout: the ILSVRC2012 archive layout with its devkit, or "
                             "DIR/<zero..nine>/ class folders of .jpg and .png files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo dataset and of --val-split")
    shard = parser.add_argument_group("shards (docs/shards.md)")
    shard.add_argument("--write-shards", type=Path, metavar="OUT",
                       help="write --data-dir (any layout above) as tar shards in timm's imagenet-1k-wds format to "
                            "OUT, with _info.json, the member index and SHA256SUMS; run again to finish an "
                            "interrupted write")
    shard.add_argument("--shard-size", type=cli.positive_float, default=shards.DEFAULT_SHARD_MB, metavar="MB",
                       help="target size of one shard")
    shard.add_argument("--shard-prefix", default=None,
                       help="shard names' prefix (default: imagenet1k for ImageNet, else the data folder's name)")
    return parser


def write_shards(args, packed):
    """--write-shards: the data of --data-dir (read as train.py reads it) written as a shard set."""
    if packed is not None:
        classes, splits, imagenet = packed.classes, packed.splits, packed.imagenet
    else:
        data = folders.build_datasets(args.data_dir, args.class_order, val_split=args.val_split, seed=args.seed,
                                      num_classes=args.num_classes)
        classes, imagenet = data.classes, data.kind == "imagenet"
        splits = {"train": data.train.samples if data.train else [], "val": data.val.samples if data.val else []}
    prefix = args.shard_prefix or ("imagenet1k" if imagenet else
                                   re.sub(r"[^A-Za-z0-9_]+", "_", Path(str(args.data_dir)).resolve().name) or "data")
    start = time.perf_counter()
    count, rejected = shards.write_shards(args.write_shards, classes, splits, root=args.data_dir, prefix=prefix,
                                          shard_mb=args.shard_size, workers=args.num_workers)
    seconds = time.perf_counter() - start
    print(f"{args.write_shards}: {count} images in shards {prefix}-*.tar ({count / seconds:.0f} images/s), "
          f"{shards.INFO}, {shards.INDEX}, {shards.SUMS}")
    for source, error in rejected:
        print(f"rejected: {source}\t{error}")
    if rejected:
        print(f"{len(rejected)} image(s) did not decode and were not written (listed in "
              f"{args.write_shards / shards.REJECTED})")
        sys.exit(1)


def main(args):
    parser = get_args_parser()
    if args.make_demo is None and args.data_dir is None:
        parser.error("one of --data-dir or --make-demo is required")
    if args.data_dir is not None and not shards.exists(args.data_dir):
        parser.error(f"argument --data-dir: {args.data_dir} is not a directory")
    if args.write_shards is not None and args.data_dir is None:
        parser.error("--write-shards OUT writes the data of --data-dir: add it")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.make_demo is not None:
            write = make_demo if args.demo_layout == "imagenet" else make_folder_demo
            print(f"demo dataset written to {write(args.make_demo, seed=args.seed)}")
            return
        packed = shards.open_data(args.data_dir, args.class_order, note=print)
        if args.write_shards is not None:
            return write_shards(args, packed)
        if packed is not None and not args.list:
            print(shards.summary(packed))
            if args.check:
                bad = shards.check(packed)
                print(f"check: {len(bad)} problem(s)" + "".join("\n" + b for b in bad))
                if bad:
                    sys.exit(1)
            return
        if packed is None and not folders.is_imagenet_layout(args.data_dir):
            data = folders.build_datasets(args.data_dir, val_split=args.val_split, seed=args.seed,
                                          num_classes=args.num_classes)
            print("\n".join(folders.summarize(args.data_dir, data)))
            return
        if packed is None:
            layout = find_layout(args.data_dir)
            classes = read_classes(layout, args.class_order)
        if args.list:
            lines = shards.listing(packed, args.list) if packed is not None else (
                f"{os.path.relpath(path, layout.root)}\t{label}\t{classes.wnids[label]}"
                for path, label in list_samples(layout, args.list, classes))
            try:
                sys.stdout.writelines(line + "\n" for line in lines)
                sys.stdout.flush()
            except BrokenPipeError:  # `--list val | head` is a normal way to look
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        samples = {split: list_samples(layout, split, classes)
                   for split, d in (("train", layout.train_dir), ("val", layout.val_dir)) if d is not None}
        print("\n".join(summarize(layout, classes, samples)))
        if args.check:
            bad = check_images([p for s in samples.values() for p, _ in s], args.num_workers)
            print(f"check: {len(bad)} unreadable image(s)" + "".join("\n" + b for b in bad))
            if bad:
                sys.exit(1)  # so a script can stop before a multi-day run
    except cli.ScriptError as e:
        sys.exit(cli.report(e, parser.prog))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
