#!/usr/bin/env bash
# One NVIDIA GPU measured in one run of at most 8 minutes: installs requirements.txt, trains one demo
# epoch with --device cuda --amp --channels-last --data-backend gpu (the sync-free step), scores the
# checkpoint with evaluate.py, checks the model's GPU logits against the CPU's, then bench/bench_gpu.py:
# synthetic-data training images/s eager and compiled (with compile times), real-JPEG images/s with the
# CPU and GPU data backends at 4, 8 and 16 loader processes, peak GPU memory. Without a GPU it stops at
# once, saying so. Everything it prints also goes to files in one folder, whose path it prints.
#
#     bash bench/gpu_check.sh
#
# Environment (all optional): OUT=DIR results folder (default bench/results/gpu_<date>_<time>);
# IMAGES=DIR real JPEGs for the pipeline rows (default: generated); SKIP_INSTALL=1 keeps the installed
# packages (without network the install fails, and the check goes on if what the scripts import is
# there); PYTHON=interpreter (default: python, else python3); COMPILE=0 skips the torch.compile
# rows; COMPILE_LIMIT=seconds per compiled mode (default 100); SUITE=1 also runs bench/run_all.py after;
# DEVICE=cpu runs the same steps on the CPU (a dry run of this script where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
RESULTS=${OUT:-bench/results/gpu_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
# The whole log goes to the results folder as well as the terminal.
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
BUDGET=470  # seconds: the measurements get what is left of eight minutes

step() {  # step NAME SECONDS COMMAND...: a hung step fails after SECONDS instead of stalling the check
    # The status is passed on explicitly: bash ignores `set -e` inside a function called left of `||`.
    local name=$1 limit=$2 t0=$SECONDS status=0
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" || status=$?
    if [[ $status != 0 ]]; then
        echo "== $name: FAILED with exit status $status$([[ $status == 124 ]] && echo ' (timed out)') after $((SECONDS - t0)) s"
        return "$status"
    fi
    echo "== $name: ok, $((SECONDS - t0)) s"
}

echo "gpu_check: results in $RESULTS"
if [[ $DEVICE == cuda ]]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none): nothing was measured; DEVICE=cpu runs the same steps on the CPU as a dry run"
        exit 1
    fi
    step "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    # Offline, pip fails after its retries: that is fine when every package the scripts import is there.
    if ! step "install requirements" 120 "$PYTHON" -m pip install -q --retries 1 --timeout 10 -r requirements.txt; then
        step "packages the scripts import are installed" 60 "$PYTHON" -c \
            "import torch, torchvision, numpy, scipy, PIL, tqdm, matplotlib, onnx, onnxruntime, sklearn, simplejpeg"
    fi
fi

step "torch sees the device" 60 "$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if device == "cuda":
    assert torch.cuda.is_available(), "no CUDA GPU visible to torch (CPU-only wheel, or no driver)"
    print("GPU:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
EOF

# One demo epoch (45 steps of 32 images, then validation and a checkpoint), AMP + channels_last as on a real run.
step "train.py, one demo epoch, --amp --channels-last --data-backend gpu" 120 \
    "$PYTHON" train.py --demo --device "$DEVICE" --amp --channels-last --num-epochs 1 --num-workers 4 \
        --data-backend gpu --data-dir "$WORK/data" --save-path "$WORK/train"
test -s "$WORK/train/last.pth"

step "evaluate.py on the checkpoint" 90 \
    "$PYTHON" evaluate.py --weights "$WORK/train/last.pth" --data-dir "$WORK/data" --device "$DEVICE" \
        --num-workers 4 --no-progress --json "$RESULTS/evaluate_demo.json"

step "model on the GPU equals the model on the CPU" 90 "$PYTHON" - "$DEVICE" "$WORK/train/last.pth" <<'EOF'
import sys
import torch
sys.path.insert(0, ".")
from MobileNetV2 import MobileNetV2
from mnv2.weights import load_model
device, checkpoint = torch.device(sys.argv[1]), sys.argv[2]
# fp32 parity: TF32 would round the matmuls and convolutions to 10-bit mantissas on purpose.
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
x = torch.randn(8, 3, 224, 224)
for name, model in (("random init", MobileNetV2().eval()), ("demo checkpoint", load_model(checkpoint))):
    with torch.no_grad():
        want = model(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            on_device = model.to(device, memory_format=fmt)
            got = on_device(x.to(device).contiguous(memory_format=fmt)).cpu()
            diff = (got - want).abs().max().item()
            print(f"{name}, {fmt}: max |GPU - CPU| = {diff:.2e}")
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"{name}: GPU differs from CPU by {diff}"
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    amp = on_device(x.to(device).contiguous(memory_format=fmt)).float().cpu()
                print(f"  with bf16 autocast: max |diff| = {(amp - want).abs().max().item():.2e} (not asserted)")
            model = model.cpu().to(memory_format=torch.contiguous_format)
print("parity ok")
EOF

# The online teacher's cost (bench/bench_distill.py): the training step with a ResNet-50 teacher over the plain
# step, amp, batch 256 (about 20 s).
step "bench/bench_distill.py, online teacher" 60 "$PYTHON" bench/bench_distill.py --device "$DEVICE" \
    --batch-size "$([[ $DEVICE == cuda ]] && echo 256 || echo 8)" --amp --repeats 5 \
    --json "$RESULTS/gpu_distill.json" | tee "$RESULTS/gpu_distill.txt" || true

# The measurements (bench/bench_gpu.py): synthetic images/s eager and compiled (each compiled mode in its
# own process, with its compile time), real-JPEG images/s with the CPU and GPU data backends at 4, 8 and 16
# loader processes, peak GPU memory, the batched crop-and-resize. It gets what is left of the 8 minutes.
left=$((BUDGET - SECONDS - 10))
bench_flags=(--device "$DEVICE" --json "$RESULTS/gpu_bench.json" --compile-limit "${COMPILE_LIMIT:-100}")
if [[ -n ${IMAGES:-} ]]; then bench_flags+=(--images "$IMAGES"); fi
if [[ ${COMPILE:-1} != 1 ]]; then bench_flags+=(--compile-modes); fi
if [[ $DEVICE != cuda ]]; then bench_flags+=(--quick); fi
bench_status=0
step "bench/bench_gpu.py" "$left" "$PYTHON" bench/bench_gpu.py "${bench_flags[@]}" \
    | tee "$RESULTS/gpu_bench.txt" || bench_status=$?

if [[ ${SUITE:-0} == 1 ]]; then  # the side-by-side suite of the CPU table, on the GPU (about 4 minutes more)
    step "bench/run_all.py --device $DEVICE" 300 "$PYTHON" bench/run_all.py --device "$DEVICE" \
        --json "$RESULTS/gpu_suite.json" | tee "$RESULTS/gpu_suite.txt" || true
fi
echo "gpu_check: done in $SECONDS s; bench exit status $bench_status"
echo "gpu_check: results in $RESULTS"
[[ $bench_status == 0 ]]
