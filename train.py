"""Train MobileNetV2 on ImageNet with the seed's recipe, on the CPU or on every visible GPU, with exact resume.

    python train.py --data-dir /ImageNet --batch-size 256

A plain launch with N visible GPUs starts one process per GPU (DistributedDataParallel); `torchrun`
works the same way (`torchrun --nproc_per_node=2 train.py --device cpu ...` on the CPU with gloo), and so
does `srun python train.py ...` (each SLURM task becomes the rank torchrun would have started);
`python train.py --demo` trains on a small generated dataset on the CPU in a few minutes.

Checkpoints (epoch_N.pth, last.pth, best.pth in --save-path; the format is `checkpoint.py`'s) are written
atomically by rank 0 only; `--resume auto` continues from the newest one that loads, also from the middle
of an epoch after SIGTERM/SIGUSR1 (cluster preemption). On the CPU a resumed run is bit-identical to an
uninterrupted one.
"""
import argparse
import functools
import os
import sys
from pathlib import Path

from mnv2 import cli, distributed
from mnv2.training import config, optimization, recipes
from mnv2.training.config import check_args
from mnv2.training.run import ensure_demo_data, guarded_run
from mnv2.weights import PRETRAINED_DIR


def get_args_parser(add_help=True):
    p = cli.Parser(prog="train.py", add_help=add_help, presets=config.presets,
                   description="Train MobileNetV2 on ImageNet. Defaults are the seed repository's recipe "
                               "(SGD momentum 0.9, lr 0.045 x0.98 per epoch, weight decay 4e-5, batch 256, "
                               "400 epochs, no dropout), which follows the paper (Sandler et al. 2018, Sec. 6.1: "
                               "RMSProp there; the seed reproduced it with SGD).")
    seed = p.add_argument_group("the seed's flags (same meaning)")
    seed.add_argument("--data-dir", default="/ImageNet",
                      help="ImageNet root in the seed's layout or train/ + val/; or any folder of classes: "
                           "D/train/<class>/ + D/val/<class>/, or D/<class>/ with --val-split; or a shard set (a folder, "
                           "an http(s):// or fsspec URL) or the folder of the official ILSVRC2012 archives "
                           "(docs/shards.md)")
    seed.add_argument("--batch-size", "-b", type=cli.positive_int, default=256,
                      help="global batch, split evenly over the processes (seed)")
    seed.add_argument("--num-classes", "--num-class", dest="num_classes", type=cli.positive_int, default=None,
                      help="number of classes (seed: --num-class); default: from the data (ImageNet: 1000), "
                           "which it must agree with")
    seed.add_argument("--num-epochs", "--epochs", dest="num_epochs", type=cli.positive_int, default=400,
                      help="total epochs (seed)")
    seed.add_argument("--lr", type=cli.positive_float, default=0.045, help="base learning rate (seed, paper)")
    seed.add_argument("--num-workers", "--workers", "-j", dest="num_workers", type=cli.non_negative_int,
                      default=min(8, os.cpu_count() or 1),
                      help="loader processes per training process (default: min(8, CPU count))")
    seed.add_argument("--print-freq", type=cli.positive_int, default=10,
                      help="steps between plain log lines when the output is not a terminal (seed)")
    seed.add_argument("--save-epoch-freq", type=cli.positive_int, default=1,
                      help="write epoch_N.pth every N epochs (seed)")
    seed.add_argument("--save-path", "--output-dir", dest="save_path", default="output",
                      help="checkpoints, metrics and curves go here (seed)")
    seed.add_argument("--resume", default="", metavar="FILE|auto",
                      help="continue from a checkpoint; 'auto': the newest one in --save-path that loads. "
                           "A seed-format weights file resumes at --start-epoch")
    seed.add_argument("--start-epoch", type=cli.non_negative_int, default=None,
                      help="epochs already done (default: the checkpoint's, else 0); sets lr 0.045 x 0.98^N")
    seed.add_argument("--gpus", default=None, help="seed flag: comma-separated GPU ids to use "
                                                    "(same as CUDA_VISIBLE_DEVICES)")

    opt = p.add_argument_group("optimisation (defaults: the seed's recipe; off switches are the seed's)")
    opt.add_argument("--momentum", type=cli.fraction, default=0.9, help="SGD momentum (seed)")
    opt.add_argument("--weight-decay", "--wd", dest="weight_decay", type=cli.non_negative_float, default=4e-5,
                     help="L2 weight decay (seed, paper)")
    opt.add_argument("--no-decay-norm-bias", action="store_true",
                     help="no weight decay on BatchNorm weights and biases (seed: decayed)")
    opt.add_argument("--lr-schedule", "--lr-scheduler", dest="lr_schedule", type=config.schedule_name,
                     choices=optimization.SCHEDULES, default="exponential",
                     help="exponential: lr x gamma every epoch (seed); step: x gamma every --lr-step-size epochs; "
                          "cosine: to --min-lr; all per step, after the warm-up (torchvision's steplr, "
                          "cosineannealinglr, exponentiallr are accepted)")
    opt.add_argument("--lr-gamma", type=cli.positive_float, default=0.98, help="per-epoch lr factor (seed, paper)")
    opt.add_argument("--warmup-epochs", "--lr-warmup-epochs", dest="warmup_epochs", type=cli.non_negative_float,
                     default=0.0, help="lr warm-up epochs (fractional allowed), per step; see --lr-warmup-method "
                                       "(seed: none)")
    opt.add_argument("--min-lr", "--lr-min", dest="min_lr", type=cli.non_negative_float, default=0.0,
                     help="final lr of the cosine schedule")
    opt.add_argument("--label-smoothing", type=cli.fraction, default=0.0, help="label smoothing (seed: none)")
    opt.add_argument("--crop-scale-min", type=cli.positive_float, default=0.08,
                     help="smallest area fraction of the random-resized crop (Inception, torchvision)")
    opt.add_argument("--hflip", type=cli.unit_interval, default=0.5,
                     help="probability of a horizontal flip (Inception, torchvision)")
    opt.add_argument("--dropout", type=cli.fraction, default=0.0,
                     help="dropout before the classifier (seed: none; the paper used 0.2 in TensorFlow)")
    opt.add_argument("--model-ema", action="store_true",
                     help="keep an exponential moving average of the weights, validated each epoch too")
    opt.add_argument("--model-ema-decay", type=cli.fraction, default=0.99998,
                     help="EMA decay per update (torchvision's default), adjusted as torchvision does unless "
                          "--no-model-ema-adjust (see --model-ema-steps)")
    opt.add_argument("--max-nonfinite", type=cli.positive_int, default=3,
                     help="stop after this many non-finite losses in a row (each such step is skipped)")

    model = p.add_argument_group("model and data")
    model.add_argument("--width-mult", type=cli.positive_float, default=1.0,
                       help="width multiplier (paper: 1.0; with --pretrained: the file's)")
    model.add_argument("--input-size", type=cli.positive_int, default=224,
                       help="training and validation crop where --train-crop-size/--val-crop-size are not "
                            "given (paper: 224)")
    model.add_argument("--val-resize-size", "--resize", dest="val_resize_size", type=cli.positive_int, default=None,
                       help="validation resize before the centre crop (default: the validation crop x 256/224)")
    model.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear",
                       help="validation resize interpolation (torchvision's reference)")
    model.add_argument("--class-order", choices=["sorted", "devkit"], default="sorted",
                       help="class index order: sorted WNIDs (torchvision, timm, public weights) or devkit "
                            "ILSVRC2012_ID - 1 (the seed repo's)")
    model.add_argument("--seed", type=cli.non_negative_int, default=0,
                       help="seed for init, sampling and augmentation")

    dev = p.add_argument_group("devices and speed")
    dev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: every visible GPU, else the CPU")
    dev.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision: bf16 where supported, else fp16 with a grad scaler "
                          "(default: on for CUDA, off on the CPU)")
    dev.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC memory format: same results, faster convolutions on CPU and tensor cores")
    dev.add_argument("--compile", action="store_true", help="torch.compile the model (the first step's time, "
                                                             "compilation included, is logged)")
    dev.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                     default="default", help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs)")
    dev.add_argument("--data-backend", choices=["cpu", "gpu"], default="cpu",
                     help="cpu: loader processes decode and crop (the default until the GPU backend is measured "
                          "faster); gpu: they only read the files, JPEGs are decoded (nvjpeg) and cropped on the "
                          "device in batches (on a CPU device: libjpeg in this process, for checks)")
    dev.add_argument("--sync-free", action=argparse.BooleanOptionalAction, default=None,
                     help="decide each step on the device, reading the statistics every --print-freq steps "
                          "(default: on CUDA with --opt sgd, sgd-nesterov or adamw and no float16)")
    dev.add_argument("--fused-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="CPU training with channels_last: BatchNorm (+ ReLU6) as one compiled kernel each way, "
                          "about 20%% faster, equal to float32 rounding (built once with the C++ compiler PyTorch "
                          "extensions use; without one, PyTorch's layers run)")
    dev.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    dev.add_argument("--dist-timeout", type=cli.positive_float, default=30.0,
                     help="minutes a rank waits for a silent peer before failing")

    out = p.add_argument_group("output")
    out.add_argument("--keep-last", type=cli.non_negative_int, default=0,
                     help="keep only the newest k epoch_N.pth files (0: keep all); last/best always stay")
    out.add_argument("--tensorboard", action="store_true", help="also log to <save-path>/tensorboard")
    out.add_argument("--start-over", action="store_true",
                     help="--save-path holds another run's files: move them into <save-path>/previous-<run id>/ "
                          "and start a new run there (without it such a start is refused)")
    out.add_argument("--demo", action="store_true",
                     help="train on a small generated digits dataset on the CPU (built in output/demo/data if "
                          "absent); its settings are defaults: flags given explicitly win")
    qat = p.add_argument_group("INT8: quantization-aware fine-tuning (torchvision's recipe as defaults)")
    qat.add_argument("--qat", metavar="WEIGHTS", default=None,
                     help="fine-tune these float weights (any file evaluate.py reads) with INT8 fake quantization "
                          "and write <save-path>/model.int8.onnx, as quantize.py writes it (defaults then: 10 "
                          "epochs at lr 1e-4, weight decay 1e-4)")
    qat.add_argument("--qat-bn-epochs", type=cli.non_negative_int, default=3,
                     help="epochs after which BatchNorm statistics are frozen (torchvision: 3)")
    qat.add_argument("--qat-observer-epochs", type=cli.non_negative_int, default=4,
                     help="epochs after which activation ranges are frozen (torchvision: 4)")
    qat.add_argument("--calibration-images", type=cli.positive_int, default=512,
                     help="training images the INT8 file's activation ranges are set on (as quantize.py)")
    kd = p.add_argument_group("knowledge distillation: a teacher run beside the student")
    kd.add_argument("--teacher", default=None, metavar="SPEC",
                    help="the teacher: torchvision:NAME[.WEIGHTS] (e.g. torchvision:resnet50.IMAGENET1K_V2), "
                         "timm:NAME, or any weights / ONNX file evaluate.py reads; it sees the student's exact "
                         "(augmented, mixed) pixels in its own normalisation, in eval mode, without gradients")
    kd.add_argument("--distill-loss", choices=("kd", "dist"), default="kd",
                    help="kd: T^2 KL(teacher || student) (Hinton et al. 2015); dist: DIST's inter- and "
                         "intra-class Pearson relations (Huang et al. 2022)")
    kd.add_argument("--distill-temperature", type=cli.positive_float, default=1.0, help="softmax temperature T")
    kd.add_argument("--distill-alpha", type=cli.non_negative_float, default=0.5,
                    help="weight of the label loss, in [0, 1]; the distillation term gets 1 - alpha")
    kd.add_argument("--distill-beta", type=cli.non_negative_float, default=1.0, help="DIST's inter-class weight")
    kd.add_argument("--distill-gamma", type=cli.non_negative_float, default=1.0, help="DIST's intra-class weight")
    kd.add_argument("--write-teacher-outputs", default=None, metavar="DIR",
                    help="do not train: store --teacher-views augmented views of every training image (drawn with "
                         "this command's augmentation flags) with the --teacher's top --teacher-top-k logits in DIR; "
                         "run the same command again to continue after a stop")
    kd.add_argument("--teacher-outputs", default=None, metavar="DIR",
                    help="learn from the teacher outputs stored in DIR (one stored view per image and epoch, "
                         "rebuilt exactly): no teacher runs while training")
    kd.add_argument("--teacher-views", type=cli.positive_int, default=10,
                    help="views stored per image with --write-teacher-outputs")
    kd.add_argument("--teacher-top-k", type=cli.positive_int, default=10,
                    help="teacher logits stored per view (the largest; the others count as probability 0)")
    add_recipe_arguments(p)

    tl = p.add_argument_group("fine-tuning on your own images (finetune.py, image_folders.py)")
    tl.add_argument("--pretrained", default=None, metavar="FILE|torchvision-v1|torchvision-v2",
                    help="start from these weights (any layout evaluate.py reads; the names are fetched into "
                         "--pretrained-dir): every tensor that fits is loaded, a classifier for another class "
                         "count starts afresh. Selects the fine-tuning recipe as defaults: "
                         + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipes.named("finetune").flags.items()
                                     if v is not None))
    tl.add_argument("--pretrained-dir", type=Path, default=PRETRAINED_DIR, help="where named public weights are stored")
    tl.add_argument("--freeze-backbone", action="store_true",
                    help="train only the classifier; the backbone's BatchNorm stays in eval mode. Selects as "
                         "defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                                                  f"--{'' if v else 'no-'}{k}" for k, v in
                                                  recipes.named("linear-probe").flags.items()))
    tl.add_argument("--lp-epochs", type=cli.non_negative_int, default=0,
                    help="LP-FT: before fine-tuning every layer, train the fresh classifier alone for this many "
                         "epochs on cached backbone features of centre crops (Kumar et al., ICLR 2022); 0: off. "
                         "With --pretrained, see recipes/finetune.yaml")
    tl.add_argument("--lp-lr", type=cli.positive_float, default=0.1,
                    help="the linear probe's lr with --lp-epochs (SGD momentum 0.9, per-step cosine, batch 32)")
    tl.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                    help="keep every BatchNorm's running statistics as the weights have them (eval-mode BatchNorm; "
                         "scale and shift still train). Default: on when the --pretrained file's BatchNorm is "
                         "folded into its convolutions (running means 0, variances 1, as converters leave them), "
                         "where batch statistics would change the network's function; off otherwise")
    tl.add_argument("--val-split", type=cli.fraction, default=None,
                    help="hold out this fraction of each class for validation when the data has no val/ "
                         "(seeded by --seed, recorded in the checkpoints: a resume and evaluate.py use the same)")
    tl.add_argument("--mean", type=cli.finite_float, nargs=3, metavar=("R", "G", "B"), default=None,
                    help="normalisation mean on 0..1 RGB (default: the --pretrained file's, else ImageNet's); "
                         "recorded in the checkpoints for evaluate.py")
    tl.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"), default=None,
                    help="normalisation std (default: the --pretrained file's, else ImageNet's)")
    tl.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="random-resized crops and flips for training; --no-augment trains on the validation "
                         "transform (resize + centre crop)")
    tl.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True,
                    help="with --freeze-backbone and --no-augment: compute the backbone's pooled features once "
                         "and train the classifier on them (same result, seconds instead of minutes)")
    return p


def add_recipe_arguments(p):
    """--recipe and the parts of the published recipes, named as in torchvision's reference script."""
    names = "; ".join(f"{name}: {recipes.named(name).summary()}" for name in recipes.training_recipes())
    names = names.replace("%", "%%")
    rec = p.add_argument_group("recipes and their parts (flags of torchvision's references/classification/train.py)")
    rec.add_argument("--recipe", choices=recipes.training_recipes(), default="seed",
                     help="a published recipe (recipes/NAME.yaml) as defaults (explicit flags win; with --demo, "
                          "the demo's data, sizes, batch and epochs win). Its lr scales linearly with --batch-size "
                          f"unless --lr is given (the seed's stays 0.045). {names}")
    rec.add_argument("--config", metavar="FILE", default=None,
                     help="a YAML file of flag values (a recipe file's `flags:`, or a flat mapping such as a run's "
                          "args.yaml) over the recipe's defaults; flags typed on the command line still win")
    rec.add_argument("--opt", choices=optimization.OPTIMIZERS, default="sgd",
                     help="sgd (seed), sgd-nesterov, rmsproptf (TensorFlow's RMSProp, the paper's), rmsprop "
                          "(torch's), adamw; momentum is --momentum, RMSProp's decay 0.9")
    rec.add_argument("--opt-eps", type=cli.positive_float, default=None,
                     help="optimizer epsilon (default: rmsproptf 1e-3, rmsprop 0.0316, adamw 1e-8)")
    rec.add_argument("--norm-weight-decay", type=cli.non_negative_float, default=None,
                     help="weight decay of BatchNorm weights and biases (default: --weight-decay)")
    rec.add_argument("--bias-weight-decay", type=cli.non_negative_float, default=None,
                     help="weight decay of biases (default: --weight-decay)")
    rec.add_argument("--lr-step-size", type=cli.positive_float, default=1.0,
                     help="epochs between the step schedule's decays (fractional allowed, e.g. 2.4)")
    rec.add_argument("--lr-warmup-method", choices=optimization.WARMUP_METHODS, default="linear",
                     help="linear: from --lr-warmup-decay x lr up to lr; constant: --lr-warmup-decay x lr")
    rec.add_argument("--lr-warmup-decay", type=cli.unit_interval, default=0.0,
                     help="lr factor at the start of the warm-up (torchvision's default is 0.01; 0 keeps the "
                          "seed's ramp from the first step)")
    rec.add_argument("--clip-grad-norm", type=cli.positive_float, default=None,
                     help="clip the gradients' global L2 norm to this (default: no clipping)")
    rec.add_argument("--accum-steps", type=cli.positive_int, default=1,
                     help="split each process's share of --batch-size (the global batch) into this many "
                          "forward/backward passes before one optimizer step: a published batch on fewer GPUs")
    rec.add_argument("--drop-path", type=cli.fraction, default=0.0,
                     help="stochastic depth of the residual blocks, rising linearly to this (default: none)")
    rec.add_argument("--auto-augment", type=config.policy_name, default=None,
                     help="after the crop: ta_wide, ra, imagenet (AutoAugment), augmix, or a timm policy string "
                          "like rand-m9-mstd0.5 (default: none)")
    rec.add_argument("--ra-magnitude", type=cli.non_negative_int, default=9, help="RandAugment's magnitude bin (of 31)")
    rec.add_argument("--augmix-severity", type=cli.positive_int, default=3, help="AugMix's severity (1..10)")
    rec.add_argument("--random-erase", type=cli.unit_interval, default=0.0,
                     help="probability of random erasing, after the policy (default: 0)")
    rec.add_argument("--mixup-alpha", type=cli.non_negative_float, default=0.0, help="mixup's Beta alpha (0: off)")
    rec.add_argument("--cutmix-alpha", type=cli.non_negative_float, default=0.0,
                     help="cutmix's Beta alpha (0: off); with both, each batch gets one of the two at random")
    rec.add_argument("--ra-sampler", action="store_true", help="repeated augmentation (torchvision's RASampler)")
    rec.add_argument("--ra-reps", type=cli.positive_int, default=3, help="repetitions of each image with --ra-sampler")
    rec.add_argument("--train-crop-size", type=cli.positive_int, default=None,
                     help="random-resized crop size for training (default: --input-size)")
    rec.add_argument("--val-crop-size", type=cli.positive_int, default=None,
                     help="centre crop size for validation (default: --input-size)")
    rec.add_argument("--model-ema-steps", type=cli.positive_int, default=32,
                     help="optimizer steps between EMA updates (torchvision's default)")
    rec.add_argument("--model-ema-adjust", action=argparse.BooleanOptionalAction, default=True,
                     help="torchvision's adjustment of the EMA decay: 1 - decay scaled by global batch x "
                          "--model-ema-steps / epochs; --no-model-ema-adjust uses --model-ema-decay as it is")






def main(args, on_step=None):
    """Entry point; `on_step(epoch, step, indices)` is called after every training step (tests use it)."""
    try:
        distributed.adopt_slurm()  # `srun python train.py`: each task becomes the rank torchrun would start
        flags = dict(vars(args))
        args = check_args(args)
        args_yaml = recipes.args_yaml(flags)
        device_type = distributed.resolve_device_type(args.device)
        if args.demo and not distributed.launched_by_launcher():
            ensure_demo_data(args.data_dir, args.seed)
    except cli.ScriptError as e:
        sys.exit(cli.report(e, "train.py"))
    code = distributed.launch(functools.partial(guarded_run, on_step=on_step, args_yaml=args_yaml), args, device_type)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
