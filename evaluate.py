"""Measure a MobileNetV2: ImageNet top-1/top-5, single-image predictions, and export for deployment.

    python evaluate.py --weights pretrained/mobilenet_v2-b0353104.pth --data-dir /data/imagenet

Any weight file that `MobileNetV2.load_model` reads is accepted: this repo's checkpoints (which carry
their class order and preprocessing), torchvision's, the seed's, tonylins', d-li14's, timm's. Known public
files are recognised by their sha256 and get their published preprocessing; `--weights torchvision-v1`
and `--weights torchvision-v2` fetch torchvision's files into pretrained/ (see pretrained/README.md).

    python evaluate.py --weights torchvision-v2 cat.jpg photos/          # top-5 classes per image
    python evaluate.py --weights ckpt.pth --export-onnx mobilenet_v2.onnx  # checked against PyTorch
    python evaluate.py --weights mobilenet_v2.int8.onnx --data-dir /data/imagenet  # quantize.py's file
    python evaluate.py --weights output/best.pth --export-hub hub/my-model   # timm / Hugging Face Hub folder
    python evaluate.py --weights hub/my-model --data-dir photos/   # or model.safetensors, or hf-hub:ORG/NAME
    python evaluate.py --weights torchvision-v2 --data-dir /data/imagenet-r          # recognised: 200 classes
    python evaluate.py --weights torchvision-v2 --sets /data --table robustness.md   # every set found
    torchrun --nproc-per-node 8 evaluate.py --weights ckpt.pth --data-dir /data/imagenet

Every validation image is counted exactly once, also across processes; a file that does not decode is
scored as a miss and reported, never dropped.
"""
import argparse
import os
import sys
from pathlib import Path

from mnv2 import cli
from mnv2.deploy import export
from mnv2.data.robust import CLEAN, SETS
from mnv2.data.transforms import INTERPOLATIONS
from mnv2.evaluation import REAL_FROM_TIMM, run
from mnv2.weights import DOWNLOADABLE, PRETRAINED_DIR


def get_args_parser(add_help=True):
    p = cli.Parser(prog="evaluate.py", add_help=add_help,
                   description="Score MobileNetV2 weights on ImageNet val, predict images, or export the model.")
    p.add_argument("images", nargs="*", help="image files or directories to predict (top-k classes each); "
                   "with images, --data-dir only supplies the class names")
    p.add_argument("--weights", required=True,
                   help="weight file or checkpoint of any public layout, or a named public file: "
                        + ", ".join(DOWNLOADABLE) + " (fetched into --pretrained-dir)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a checkpoint")
    p.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                   help="classes the weights must have (default: read from the file)")
    p.add_argument("--width-mult", type=cli.positive_float, default=None,
                   help="width the weights must have (default: read from the file)")
    p.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR,
                   help="where named public weights are stored")

    data = p.add_argument_group("data (named as in train.py)")
    data.add_argument("--data-dir", type=cli.data_location, default=None,
                      help="ImageNet root (devkit + val images), or a folder of classes (D/val/<class>/, or "
                           "D/<class>/: the images a checkpoint held out with --val-split, else all), matched to "
                           "the weights' classes by name; or a shard set (folder, http(s):// or fsspec URL) or the folder "
                           "of the official ILSVRC2012 archives (docs/shards.md)")
    data.add_argument("--batch-size", "-b", type=cli.positive_int, default=64)
    data.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.non_negative_int, default=min(8, os.cpu_count() or 1),
                      help="loader processes per evaluation process (default: min(8, CPU count), as train.py)")
    data.add_argument("--class-order", choices=("sorted", "devkit"), default=None,
                      help="label order of weights that do not record one (default sorted WNIDs, as "
                           "torchvision; the seed repo trained with devkit order). A checkpoint's own "
                           "order wins")
    data.add_argument("--dataset", choices=SETS + CLEAN, default=None,
                      help="which evaluation set --data-dir holds, where its layout does not say (a partial copy): "
                           "ImageNet-V2's folders 0..999 are read as class numbers, ImageNet-A/-R score their "
                           "200 classes only (default: recognised from the layout); imagenet-a-clean / "
                           "imagenet-r-clean: ImageNet val on A's / R's 200 classes, as timm reports beside them")
    data.add_argument("--real-labels", type=Path, nargs="?", const=REAL_FROM_TIMM, default=None, metavar="FILE",
                      help="also score ImageNet val against ReaL's labels (real.json; without FILE, the copy "
                           "timm ships): any of the top-k in an image's label set counts; unlabelled images "
                           "are skipped")
    data.add_argument("--sets", type=Path, default=None, metavar="ROOT",
                      help="score every evaluation set found in ROOT and its subfolders (ImageNet val + ReaL, "
                           "-V2, -A, -R, -Sketch) and write the table to --table")
    data.add_argument("--table", type=Path, default=None, metavar="FILE.md",
                      help="with --sets: the table as markdown here and as CSV beside it (FILE.csv)")
    data.add_argument("--max-images", type=cli.positive_int, default=None,
                      help="score only the first N val images (in file-name order)")
    data.add_argument("--device", type=cli.device, default=None, help="default: cuda when available, else cpu")

    pre = p.add_argument_group("preprocessing (default: the checkpoint's, else the published one of a "
                               "recognised file, else torchvision's 256 / 224 / bilinear / ImageNet "
                               "statistics)")
    pre.add_argument("--resize", "--val-resize-size", dest="resize", type=cli.positive_int, default=None,
                     help="shorter side before the centre crop (as train.py's --val-resize-size)")
    pre.add_argument("--input-size", "--crop", "--val-crop-size", dest="input_size", type=cli.positive_int,
                     default=None, help="centre crop = network input size (as train.py's --val-crop-size)")
    pre.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default=None)
    pre.add_argument("--mean", type=cli.finite_float, nargs=3, metavar=("R", "G", "B"), default=None)
    pre.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"), default=None)

    out = p.add_argument_group("outputs")
    out.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    out.add_argument("--per-class", type=Path, nargs="?", const="-", default=None, metavar="FILE",
                     help="print top-1 of each class and the most confused pairs; with FILE also write them as "
                          "CSV (index, wnid, name, top1, count)")
    out.add_argument("--confusion", type=Path, default=None, metavar="FILE.png",
                     help="draw the confusion matrix (for more than 30 classes: the most confused pairs)")
    out.add_argument("--predictions", type=Path, default=None, help="write per-image top-5 as CSV")
    out.add_argument("--topk", type=cli.positive_int, default=5, help="classes shown per single image")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")

    speed = p.add_argument_group("speed")
    speed.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start)")
    speed.add_argument("--plain", action="store_true",
                       help="run the model as loaded: no BatchNorm folding, NCHW (to check the fast path)")
    speed.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                       help="CPU scoring engine; auto: onnxruntime when installed and within 1e-4 of "
                            "PyTorch's logits, else PyTorch with BatchNorm folded and channels_last")

    exp = p.add_argument_group("export (dynamic batch size, checked against PyTorch)")
    exp.add_argument("--export-onnx", type=Path, default=None, help="write an ONNX model here")
    exp.add_argument("--onnx-exporter", choices=export.ONNX_EXPORTERS, default="dynamo",
                     help="PyTorch's exporter for --export-onnx: dynamo (torch.export-based, opset >= 18) or "
                          "torchscript (deprecated by PyTorch; for runtimes that need opset <= 17)")
    exp.add_argument("--export-pt2", type=Path, default=None,
                     help="write a torch.export program here (torch.export.load(FILE).module() runs it; "
                          "AOTInductor compiles it)")
    exp.add_argument("--export-torchscript", type=Path, default=None, help=argparse.SUPPRESS)
    exp.add_argument("--export-hub", type=Path, default=None, metavar="DIR",
                     help="write a timm / Hugging Face Hub folder here (model.safetensors in timm's layout, "
                          "config.json with the class names and preprocessing, README.md model card); "
                          "timm.create_model('local-dir:DIR') loads it")
    exp.add_argument("--export-pte", type=Path, default=None,
                     help="write an ExecuTorch program for phones here (XNNPACK, float32, one image per call; "
                          "needs pip install executorch; INT8: quantize.py --export-pte)")
    exp.add_argument("--opset", type=cli.positive_int, default=None,
                     help="ONNX opset (default: 18 with the dynamo exporter, 17 with torchscript)")
    exp.add_argument("--export-tolerance", type=cli.positive_float, default=1e-4,
                     help="largest |logit difference| the exported model may show")
    return p


def main(args):
    """Run what the flags ask for; return the results dict. Errors end in one line and a non-zero exit."""
    try:
        return run(args)
    except cli.ScriptError as e:
        raise SystemExit(cli.report(e, "evaluate.py")) from None
    except KeyboardInterrupt:  # Ctrl-C: what was asked is not done, and nothing half-written replaced a file
        print("evaluate.py: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None



if __name__ == "__main__":
    main(get_args_parser().parse_args())
