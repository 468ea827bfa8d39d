"""The fused CPU BatchNorm (+ ReLU6) kernel against float64 arithmetic and PyTorch's own layers."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from mnv2.training import fused_batchnorm
from mnv2.training.fused_batchnorm import FusedBatchNorm2d
from MobileNetV2 import MobileNetV2, ReLU6

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel():
    """The built kernel. Only a machine with no C++ compiler at all skips; a failing build fails."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here, so train.py runs PyTorch's layers (the no-compiler test covers that)")
    return fused_batchnorm.load_kernel()


def _case(shape, seed=0):
    torch.manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.empty(channels).uniform_(0.5, 4.0), torch.empty(channels).uniform_(-1.0, 1.0)
    return x, grad, weight, bias


def _exact(x, grad, weight, bias, relu6):
    """Output, gradients, running stats and pre-activation in float64 through torch's own layers."""
    x, weight, bias = (t.double().requires_grad_() for t in (x, weight, bias))
    running_mean = torch.zeros(x.shape[1], dtype=torch.float64)
    running_var = torch.ones(x.shape[1], dtype=torch.float64)
    pre = nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    out = nn.functional.hardtanh(pre, 0.0, 6.0) if relu6 else pre
    grads = torch.autograd.grad(out, (x, weight, bias), grad.double())
    return (out.detach(), *grads, running_mean, running_var), pre.detach()


@pytest.mark.parametrize("relu6", [True, False])
@pytest.mark.parametrize("shape", [(4, 24, 10, 10), (2, 96, 7, 5), (3, 8, 1, 1)])
def test_kernel_agrees_with_float64_arithmetic(kernel, shape, relu6):
    x, grad, weight, bias = _case(shape)
    (want, pre) = _exact(x, grad, weight, bias, relu6)
    xx, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
    bn = FusedBatchNorm2d(shape[1], relu6)
    bn.weight, bn.bias = nn.Parameter(w), nn.Parameter(b)
    out = bn(xx)
    got = (out.detach(), *torch.autograd.grad(out, (xx, bn.weight, bn.bias), grad), bn.running_mean,
           bn.running_var)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert bn.num_batches_tracked.item() == 1
    # ReLU6's gradient mask can only differ where float32 rounding decides the side of 0 or 6
    clear = ((pre.abs() > 1e-4) & ((pre - 6).abs() > 1e-4)) if relu6 else torch.ones_like(pre, dtype=torch.bool)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, g, w_ in zip(names, got, want):
        if name == "grad_input":
            g, w_ = g[clear], w_[clear]
        if name == "grad_weight" or name == "grad_bias":
            assert (g.double() - w_).abs().max() <= 1e-5 * max(1.0, w_.abs().max()), name
            continue
        assert (g.double() - w_).abs().max() <= 2e-6 * max(1.0, w_.abs().max()), name
    if relu6 and shape[0] * shape[2] * shape[3] > 10:  # both clips exercised
        assert out.min() == 0 and out.max() == 6


@pytest.mark.slow
def test_a_swapped_model_keeps_its_names_and_trains_as_pytorch_does(kernel):
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, width_mult=0.35).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(model)
    assert fused_batchnorm.use_for_cpu_training(fused) == 52
    assert sum(isinstance(m, FusedBatchNorm2d) and m.relu6 for m in fused.modules()) == 35
    assert not any(type(m) is nn.BatchNorm2d for m in fused.modules())
    assert not any(isinstance(c, ReLU6) for s in fused.modules() if isinstance(s, nn.Sequential) for c in s.children())
    assert list(fused.state_dict()) == list(model.state_dict())

    x = torch.randn(6, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (6,))
    with torch.no_grad():  # evaluation runs PyTorch's own layers: the very same numbers
        assert torch.equal(fused.eval()(x), model.eval()(x))

    def one_step(m, dtype=torch.float32):
        m = copy.deepcopy(m).to(dtype).train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        nn.functional.cross_entropy(m(x.to(dtype)), y).backward()
        optimizer.step()
        return [v.double() for v in m.state_dict().values() if v.is_floating_point()]

    def error(got, want):
        return max(((g - w).abs().max() / max(1.0, w.abs().max())).item() for g, w in zip(got, want))

    # Training at this scale is chaotic (float32 and float64 part ways within a few steps), so one step is
    # compared: the kernel lands as close to exact arithmetic as PyTorch's float32 layers do, or closer.
    exact = one_step(model, torch.float64)  # float64 runs PyTorch's layers
    assert error(one_step(fused), exact) <= max(2 * error(one_step(model), exact), 1e-5)


@pytest.mark.parametrize("case", ["nchw", "float64", "eval", "no_grad_eval"])
def test_inputs_the_kernel_does_not_cover_run_pytorchs_layers(case):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.BatchNorm2d(8), ReLU6())
    nn.init.uniform_(reference[0].weight, 1.0, 4.0)
    fused = FusedBatchNorm2d.from_batchnorm(copy.deepcopy(reference[0]), relu6=True)
    x = torch.randn(2, 8, 5, 5)
    if case == "float64":
        reference, fused = reference.double(), fused.double()
        x = x.double().contiguous(memory_format=torch.channels_last)
    if case.endswith("eval"):
        reference.eval(), fused.eval()
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.set_grad_enabled(case != "no_grad_eval"):
        want, got = reference(x * 1), fused(x * 1)
    assert torch.equal(got, want)
    assert torch.equal(fused.running_mean, reference[0].running_mean)


@pytest.mark.slow
def test_train_py_uses_the_kernel_on_the_cpu_and_can_be_told_not_to(kernel, demo_data, tmp_path, capsys):
    data = demo_data
    common = ["--data-dir", str(data), "--batch-size", "8", "--num-epochs", "1", "--width-mult", "0.25",
              "--input-size", "32", "--num-workers", "0", "--device", "cpu"]
    train.main(train.get_args_parser().parse_args(common + ["--save-path", str(tmp_path / "a")]))
    assert "fused CPU BatchNorm kernel for 52 layers" in capsys.readouterr().out
    train.main(train.get_args_parser().parse_args(common + ["--save-path", str(tmp_path / "b"), "--no-fused-bn"]))
    assert "fused" not in capsys.readouterr().out


@pytest.mark.slow
def test_without_a_compiler_training_goes_on_with_a_note(demo_data, tmp_path):
    data = demo_data
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "build"), CXX=str(tmp_path / "no-such-compiler"))
    proc = subprocess.run([sys.executable, "train.py", "--data-dir", str(data), "--save-path", str(tmp_path / "out"),
                           "--batch-size", "8", "--num-epochs", "1", "--width-mult", "0.25", "--input-size", "32",
                           "--num-workers", "0", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if "fused CPU BatchNorm kernel could not be built" in line]
    assert len(notes) == 1 and "PyTorch's BatchNorm and ReLU6 run instead" in notes[0]
    assert (tmp_path / "out" / "last.pth").exists()


@pytest.mark.slow
def test_torch_compile_sees_the_swapped_model_as_one_graph(kernel):
    model = MobileNetV2(num_classes=10, width_mult=0.35).to(memory_format=torch.channels_last)
    fused_batchnorm.use_for_cpu_training(model)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert torch._dynamo.explain(model.train())(x).graph_break_count == 0


def test_the_build_folder_is_keyed_by_source_flags_torch_and_environment(monkeypatch, tmp_path):
    name = fused_batchnorm.kernel_name()
    assert name.startswith("mobilenetv2_fused_batchnorm_") and name == fused_batchnorm.kernel_name()
    other = tmp_path / "fused_batchnorm.cpp"
    other.write_bytes(fused_batchnorm.SOURCE.read_bytes() + b"\n// another checkout's edit\n")
    monkeypatch.setattr(fused_batchnorm, "SOURCE", other)
    edited = fused_batchnorm.kernel_name()
    assert edited != name  # a second checkout with other sources builds beside this one, not over it
    monkeypatch.setattr(fused_batchnorm.sys, "prefix", str(tmp_path / "another-venv"))
    assert fused_batchnorm.kernel_name() not in (name, edited)  # and so does another venv
