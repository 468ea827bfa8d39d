"""Quantize MobileNetV2 weights to INT8 for CPU deployment, and say what it costs and gains.

    python quantize.py --weights output/best.pth --data-dir /data/imagenet --out mobilenet_v2.int8.onnx

Post-training static quantization (`quantization.quantize_onnx`): BatchNorm folded, biases corrected for
the weights' rounding, weights int8 per output channel, activations uint8 calibrated on
--calibration-images training images read with the weights' own preprocessing. The file is ONNX
Runtime's QDQ format and carries its class order, class names and preprocessing, so

    python evaluate.py --weights mobilenet_v2.int8.onnx --data-dir /data/imagenet   # or image files

scores and predicts with it exactly as with the weights it came from. This script prints float and INT8
top-1 on the val images (or, without val images, on training images held out from the calibration),
the file sizes and the speed of both in onnxruntime. Any weight file evaluate.py reads is accepted.
"""
import argparse
import sys
import os
from pathlib import Path

from mnv2 import cli
from mnv2.data.transforms import INTERPOLATIONS
from mnv2.deploy import quantization
from mnv2.deploy.ptq import DEFAULT_CALIBRATION_IMAGES, DEFAULT_METHOD, HELD_OUT_IMAGES, run
from mnv2.weights import DOWNLOADABLE, PRETRAINED_DIR


def get_args_parser(add_help=True):
    p = cli.Parser(prog="quantize.py", add_help=add_help,
                   description="Post-training INT8 quantization of MobileNetV2 weights into an ONNX (QDQ) file "
                               "that evaluate.py scores without flags; prints float and INT8 accuracy, size and "
                               "speed.")
    p.add_argument("--weights", required=True,
                   help="weight file or checkpoint of any public layout (as evaluate.py), or a named public "
                        "file: " + ", ".join(DOWNLOADABLE))
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                   help="classes the weights must have (default: read from the file)")
    p.add_argument("--width-mult", type=cli.positive_float, default=None,
                   help="width the weights must have (default: read from the file)")
    p.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR,
                   help="where named public weights are stored")
    p.add_argument("--out", type=Path, default=None, help="the INT8 ONNX file to write (*.onnx)")

    data = p.add_argument_group("data (named as in evaluate.py)")
    data.add_argument("--data-dir", type=cli.data_location, required=True,
                      help="ImageNet root: calibration images come from train/, scores from val/ (without "
                           "train images, a part of val calibrates and the rest is scored); or a shard set (folder or URL) "
                           "or the folder of the official archives (docs/shards.md)")
    data.add_argument("--calibration-images", type=cli.positive_int, default=DEFAULT_CALIBRATION_IMAGES,
                      help="training images the activation ranges are calibrated on, drawn at random with "
                           f"--seed (default {DEFAULT_CALIBRATION_IMAGES}; not yet measured on ImageNet weights here: "
                           "bench/bench_int8.py --weights W --data-dir D compares counts)")
    data.add_argument("--max-images", type=cli.positive_int, default=None,
                      help="score float and INT8 on only the first N val images (default: all; without val "
                           f"images, {HELD_OUT_IMAGES} held-out training images)")
    data.add_argument("--batch-size", "-b", type=cli.positive_int, default=32,
                      help="batch size for calibration, scoring and the speed measurement")
    data.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.non_negative_int,
                      default=min(8, os.cpu_count() or 1), help="loader processes (default: min(8, CPU count))")
    data.add_argument("--class-order", choices=("sorted", "devkit"), default=None,
                      help="label order of weights that do not record one (as evaluate.py)")
    data.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of the calibration draw")

    pre = p.add_argument_group("preprocessing (default: the checkpoint's, else the published one of a recognised "
                               "file, else torchvision's 256 / 224 / bilinear / ImageNet statistics)")
    pre.add_argument("--resize", type=cli.positive_int, default=None, help="shorter side before the centre crop")
    pre.add_argument("--input-size", "--crop", dest="input_size", type=cli.positive_int, default=None,
                     help="centre crop = network input size")
    pre.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=None)
    pre.add_argument("--mean", type=cli.finite_float, nargs=3, metavar=("R", "G", "B"), default=None)
    pre.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"), default=None)

    q = p.add_argument_group("quantization (bench/bench_int8.py compares the choices on given weights; README "
                                 "'INT8 for CPUs and phones')")
    q.add_argument("--calibration-method", choices=sorted(quantization.CALIBRATION_METHODS), default=DEFAULT_METHOD,
                   help="how activation ranges are set from the calibration images (onnxruntime's "
                        "calibrators; percentile keeps 99.999%%)")
    q.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="take the mean shift that rounding the weights causes out of each layer's bias")

    out = p.add_argument_group("outputs")
    out.add_argument("--export-pte", type=Path, default=None,
                     help="also write an INT8 ExecuTorch program for phones here (XNNPACK delegate, one image per "
                          "call), checked with ExecuTorch's runtime; needs pip install executorch")
    out.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    out.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args):
    """Run what the flags ask for; return the results dict. Errors end in one line and a non-zero exit."""
    try:
        return run(args)
    except cli.ScriptError as e:
        raise SystemExit(cli.report(e, "quantize.py")) from None
    except KeyboardInterrupt:  # Ctrl-C: what was asked is not done, and nothing half-written replaced a file
        print("quantize.py: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None



if __name__ == "__main__":
    main(get_args_parser().parse_args())
