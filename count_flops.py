"""Parameters and multiply-adds of MobileNetV2, by three counters side by side.

    python count_flops.py                      # width 1.0 at 224 px: 3.50 M parameters, 300.8 M MAdds

The counters disagree because they count different things:
- exact: every multiply-add of the convolutions and the classifier, nothing else (the paper's measure);
- torchsummaryX: the same, plus one per BatchNorm weight (a BN layer's weight count, not per pixel);
- thop: also counts BatchNorm's arithmetic on every activation and the average pooling (ReLU6 and the
  residual adds count as free); older thop releases counted slightly differently (the seed's gave 328.78 M).
"""
import json
import sys
from pathlib import Path

from mnv2 import cli, resolve
from mnv2.checkpoint import WeightsError, meta, read_weights
from mnv2.flops import GRID_SIZES, GRID_WIDTHS, count_parameters, exact_macs, format_grid, format_report, measure
from mnv2.weights import load_model
from MobileNetV2 import MobileNetV2


def get_args_parser():
    parser = cli.Parser(prog="count_flops.py", description="Count MobileNetV2 parameters and multiply-adds.")
    parser.add_argument("--width-mult", type=float, default=None,
                        help="width multiplier (paper: 0.35-1.4; default 1.0, or the file's with --weights)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input side in pixels (>= 32; default: the crop a --weights checkpoint was "
                             "trained and scored at, else 224)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default 1000 as ImageNet, or the file's with --weights)")
    parser.add_argument("--weights", default=None,
                        help="count the model saved in this weight file instead; --width-mult and "
                             "--num-classes, if given, must be what it holds")
    parser.add_argument("--grid", action="store_true",
                        help="the paper's trade-off grid: widths 0.35-1.4 x resolutions 96-224 (exact count)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    return parser


def load_counted_model(parser, args):
    """(the model in --weights, the input size its checkpoint records or None). A missing file, or a flag the
    file contradicts, is a usage error (exit 2); a file that cannot be used is exit 1. Either way one line."""
    if not (Path(args.weights).exists() or args.weights.startswith(resolve.HF_HUB_PREFIX)):
        parser.error(f"argument --weights: no such file: {args.weights}")
    try:
        data = read_weights(resolve.locate(args.weights, "--weights"))
        model = load_model(data)
    except cli.UsageError as e:
        sys.exit(cli.report(e, parser.prog))
    except WeightsError as e:
        message = str(e) if str(e).startswith(args.weights) else f"{args.weights}: {e}"
        sys.exit(cli.report(WeightsError(message), parser.prog))
    for flag, key, value in (("--width-mult", "width_mult", args.width_mult),
                             ("--num-classes", "num_classes", args.num_classes)):
        if value is not None:
            try:
                load_model(data, **{key: value})
            except WeightsError as e:
                parser.error(f"argument {flag}: {args.weights}: {str(e).removeprefix('weights: ')}")
    return model, (meta(data).get("data") or {}).get("input_size")


def main(args):
    parser = get_args_parser()
    if args.input_size is not None and args.input_size < 32:
        parser.error(f"--input-size must be at least 32 (five stride-2 stages), got {args.input_size}")
    if args.width_mult is not None and args.width_mult <= 0:
        parser.error(f"--width-mult must be positive, got {args.width_mult}")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be at least 1, got {args.num_classes}")
    num_classes = 1000 if args.num_classes is None else args.num_classes
    if args.grid:
        rows = []
        for w in GRID_WIDTHS:  # the paper's grid: every size, whatever --input-size says
            model = MobileNetV2(num_classes=num_classes, width_mult=w)
            params = count_parameters(model)
            for s in GRID_SIZES:
                rows.append({"width_mult": w, "input_size": s, "params": params,
                             "macs_exact": exact_macs(model, s)})
        print(json.dumps(rows, indent=2) if args.json else format_grid(rows))
        return rows
    size = None
    if args.weights:
        model, size = load_counted_model(parser, args)
    else:
        model = MobileNetV2(num_classes=num_classes, width_mult=1.0 if args.width_mult is None else args.width_mult)
    row = measure(model, args.input_size or size or 224)
    print(json.dumps(row, indent=2) if args.json else format_report(row))
    return row


if __name__ == "__main__":
    main(get_args_parser().parse_args())
