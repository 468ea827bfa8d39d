#!/usr/bin/env bash
# GPU smoke tests and the benchmark suite on a machine with one NVIDIA GPU, in under five minutes:
# installs requirements.txt, trains one demo epoch with --device cuda --amp --channels-last, scores the
# checkpoint with evaluate.py, checks the model's GPU logits against the CPU's, then runs
# bench/run_all.py on the GPU (synthetic-data training images/s, the real loader at several worker counts,
# GPU JPEG decoding, ...). Everything it prints also goes to files in one folder, whose path it prints.
#
#     bash bench/gpu_check.sh
#
# Environment (all optional): OUT=DIR results folder (default bench/results/gpu_<date>_<time>);
# IMAGES=DIR real JPEGs for the pipeline rows (default: generated); SKIP_INSTALL=1 keeps the installed
# packages (without network the install fails, and the check goes on if what the scripts import is
# there); PYTHON=interpreter (default: python, else python3); COMPILE=0 skips the torch.compile
# training row; QUICK=1 runs the suite with --quick;
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
BUDGET=290  # seconds: the last, optional step gets what is left of five minutes

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
    step "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    # Offline, pip fails after its retries: that is fine when every package the scripts import is there.
    if ! step "install requirements" 150 "$PYTHON" -m pip install -q --retries 1 --timeout 10 -r requirements.txt; then
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
step "train.py, one demo epoch, --amp --channels-last" 150 \
    "$PYTHON" train.py --demo --device "$DEVICE" --amp --channels-last --num-epochs 1 --num-workers 4 \
        --data-dir "$WORK/data" --save-path "$WORK/train"
test -s "$WORK/train/last.pth"

step "evaluate.py on the checkpoint" 90 \
    "$PYTHON" evaluate.py --weights "$WORK/train/last.pth" --data-dir "$WORK/data" --device "$DEVICE" \
        --num-workers 4 --no-progress --json "$RESULTS/evaluate_demo.json"

step "model on the GPU equals the model on the CPU" 90 "$PYTHON" - "$DEVICE" "$WORK/train/last.pth" <<'EOF'
import sys
import torch
sys.path.insert(0, ".")
from MobileNetV2 import MobileNetV2, load_model
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

# The suite: its exit status is kept, so a failed row still leaves the other rows and this script's summary.
suite_flags=()
if [[ -n ${IMAGES:-} ]]; then suite_flags+=(--images "$IMAGES"); fi
if [[ ${QUICK:-0} == 1 ]]; then suite_flags+=(--quick); fi
suite_status=0
step "bench/run_all.py --device $DEVICE" 240 \
    "$PYTHON" bench/run_all.py --device "$DEVICE" ${suite_flags[@]+"${suite_flags[@]}"} --json "$RESULTS/gpu_suite.json" \
    | tee "$RESULTS/gpu_suite.txt" || suite_status=$?

compile_status=skipped
left=$((BUDGET - SECONDS))
if [[ ${COMPILE:-1} == 1 && $DEVICE == cuda && $left -ge 60 ]]; then
    compile_status=0
    step "training step with torch.compile" "$left" \
        "$PYTHON" bench/run_all.py --device cuda --only train --compile --json "$RESULTS/gpu_compile.json" \
        | tee "$RESULTS/gpu_compile.txt" || compile_status=$?
elif [[ ${COMPILE:-1} == 1 && $DEVICE == cuda ]]; then
    echo "== torch.compile row skipped: only ${left} s of the five-minute budget left"
fi

# The headline figure: synthetic-data training images/s with AMP + channels_last (goal on one H200: 10,000).
"$PYTHON" - "$RESULTS" <<'EOF' | tee "$RESULTS/summary.txt"
import json, sys
from pathlib import Path
results = Path(sys.argv[1])
for name in ("gpu_suite.json", "gpu_compile.json"):
    path = results / name
    if path.is_file():
        for row, r in json.loads(path.read_text()).items():
            if row.startswith("training"):
                print(f"{row}: {r['ours']:,.0f} {r['unit']} (reference {r['reference']:,.0f}, {r['ratio']:.2f}x)")
print("goal on one H200: >= 10,000 training images/s with synthetic data, AMP + channels_last")
EOF
echo "gpu_check: done in $SECONDS s; suite exit status $suite_status, compile row $compile_status"
echo "gpu_check: results in $RESULTS"
[[ $suite_status == 0 ]]
