"""The network against the paper's and torchvision's published facts, and the weight-file loader."""

import pytest
import torch
import torchvision
from torch import nn

from helpers import LAYOUTS, RunsCode, to_dli14, to_seed, to_timm
from mnv2.checkpoint import WeightsError
from mnv2.checkpoint import digest as checkpoint_digest
from mnv2.checkpoint import read_weights
from mnv2.weights import load_model, to_torchvision_keys
from MobileNetV2 import STAGES, MobileNetV2, ReLU6, global_average_pool

TORCHVISION_PARAMS = {0.35: 1_677_128, 0.5: 1_968_680, 0.75: 2_636_424, 1.0: 3_504_872, 1.4: 6_108_776}


@pytest.mark.parametrize("width", sorted(TORCHVISION_PARAMS))
def test_parameter_count_and_names_equal_torchvision(width):
    model = MobileNetV2(width_mult=width)
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[width]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs


def test_stage_table_is_the_papers_table_2():
    assert STAGES == [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                      [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 97])
def test_outputs_equal_torchvision_with_its_weights(size):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().eval()
    # Give BatchNorm non-trivial statistics, so a wrong layer order could not hide behind identity BNs.
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model = MobileNetV2()
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_initialisation_follows_torchvision_scheme():
    torch.manual_seed(0)
    model = MobileNetV2()
    linear = model.classifier[1]
    assert abs(linear.weight.std().item() - 0.01) < 1e-3 and linear.bias.abs().sum() == 0
    conv = model.features[0][0]  # kaiming normal, fan_out = 32 * 3 * 3
    assert abs(conv.weight.std().item() - (2 / (32 * 9)) ** 0.5) < 0.02
    bn = model.features[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_any_input_size_and_number_of_classes():
    model = MobileNetV2(num_classes=7, width_mult=0.35).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
        assert model(torch.randn(3, 3, 250, 190)).shape == (3, 7)


def test_linear_bottleneck_has_no_activation_after_projection_or_add():
    model = MobileNetV2()
    for block in model.features[1:-1]:
        assert isinstance(block.conv[-1], nn.BatchNorm2d)  # project ends in BN, no ReLU6
        assert isinstance(block.conv[-2], nn.Conv2d) and block.conv[-2].kernel_size == (1, 1)
    # A residual block's output goes negative: nothing clips it after the add.
    block = model.features[2 + 1]  # second block of the 24-channel stage: has the shortcut
    assert block.use_residual
    with torch.no_grad():
        assert block.eval()(torch.randn(1, 24, 8, 8)).min() < 0


def test_dropout_is_off_by_default_and_one_flag_away():
    assert MobileNetV2().classifier[0].p == 0.0
    assert MobileNetV2(dropout=0.2).classifier[0].p == 0.2


def _bn_relu6_pass(relu6, x):
    """Output, input gradient and the aten ops run by BatchNorm + `relu6`, forward and backward."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(x.shape[1])
    nn.init.constant_(bn.weight, 4.0)  # outputs beyond 6 too
    x = x.clone().requires_grad_()
    weights = torch.randn(x.shape)
    with torch.profiler.profile() as prof:
        y = relu6(bn(x))
        grad, = torch.autograd.grad((y * weights).sum(), x)
    return y.detach(), grad, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_relu6_while_training_equals_torchs_in_one_pass(memory_format):
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=memory_format)
    want_y, want_grad, torch_ops = _bn_relu6_pass(nn.ReLU6(inplace=True), x)
    y, grad, ops = _bn_relu6_pass(ReLU6(), x)
    assert torch.equal(y, want_y) and torch.equal(grad, want_grad)
    assert 0 < (want_y == 6).sum() and 0 < (want_y == 0).sum()  # both clips exercised
    # torch's in-place hardtanh_ copies the activations out and back under autograd; ours does not
    assert {"aten::clone", "aten::copy_"} <= torch_ops
    assert not {"aten::clone", "aten::copy_"} & ops
    with torch.no_grad():  # inference: torch's own in-place op
        z = torch.linspace(-3, 9, 50)
        assert ReLU6()(z) is z and torch.equal(z, torch.linspace(-3, 9, 50).clamp(0, 6))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_global_pooling_equals_adaptive_pooling_and_keeps_the_gradient_layout(memory_format):
    x = torch.randn(3, 40, 7, 5).contiguous(memory_format=memory_format).requires_grad_()
    pooled = global_average_pool(x)
    assert torch.equal(pooled, nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))
    grad, = torch.autograd.grad((pooled * torch.randn(3, 40)).sum(), x)
    assert grad.is_contiguous(memory_format=memory_format)


# ---- public weight layouts, each written independently of the loader's own mapping ---------------

@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_public_layout_loads_and_gives_the_same_outputs(layout, reference, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(LAYOUTS[layout](reference.state_dict()), path)
    model = load_model(path)
    assert model.config["width_mult"] == 0.5 and model.config["num_classes"] == 10
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_layout_is_named_by_the_conversion(reference):
    assert to_torchvision_keys(to_timm(reference.state_dict()))[1] == "timm"
    assert to_torchvision_keys(to_seed(reference.state_dict()))[1] == "seed"
    assert to_torchvision_keys(to_dli14(reference.state_dict()))[1] == "d-li14"


def test_a_file_of_another_architecture_names_its_first_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "conv1.weight" in message and "\n" not in message


def test_a_layout_with_foreign_keys_names_them(reference, tmp_path):
    sd = to_timm(reference.state_dict())
    sd["blocks.1.0.se.fc.weight"] = torch.zeros(1)
    path = tmp_path / "timm_se.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"blocks\.1\.0\.se\.fc\.weight"):
        load_model(path)


def test_class_and_width_mismatches_name_the_problem(reference, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(WeightsError, match="classifier.1.weight has 10 classes"):
        load_model(path, num_classes=1000)
    with pytest.raises(WeightsError, match="width 0.5 model, not width 1"):
        load_model(path, width_mult=1.0)
    assert load_model(path, num_classes=10, width_mult=0.5).config["width_mult"] == 0.5


def test_repo_checkpoint_rebuilds_the_model_from_its_config(tmp_path):
    torch.manual_seed(2)
    model = MobileNetV2(num_classes=5, width_mult=0.35, dropout=0.2)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_3.pth"
    torch.save({"format": "mobilenetv2-checkpoint", "version": 1, "model": model.state_dict(),
                "model_ema": ema, "model_config": model.config, "epoch": 3}, path)
    loaded = load_model(path)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    loaded_ema = load_model(path, use_ema=True)
    assert torch.equal(loaded_ema.classifier[1].bias, ema["classifier.1.bias"])


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker)}, path)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused"):
        read_weights(path)
    with pytest.raises(WeightsError, match="refused"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not a zip"])
def test_damaged_files_give_one_line_naming_the_file(damage, reference, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"hello, not a checkpoint" * 10)
    with pytest.raises(WeightsError) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_flipped_bit_in_a_checksummed_checkpoint_is_caught(tmp_path):
    model = MobileNetV2(num_classes=3, width_mult=0.35)
    data = {"format": "mobilenetv2-checkpoint", "version": 1, "model": model.state_dict(),
            "model_config": model.config, "epoch": 1}
    data["sha256"] = checkpoint_digest(data)
    path = tmp_path / "last.pth"
    torch.save(data, path)
    assert load_model(path).config == model.config
    raw = bytearray(path.read_bytes())
    # Flip one bit inside the classifier's stored floats: the zip container itself stays valid.
    weight = model.classifier[1].weight.detach().numpy().tobytes()
    offset = bytes(raw).find(weight[:64])
    assert offset > 0
    raw[offset + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="checksum"):
        read_weights(path)


def test_torchvision_reference_checkpoint_with_namespace_args_loads(reference, tmp_path):
    import argparse
    path = tmp_path / "model_89.pth"
    torch.save({"model": reference.state_dict(), "epoch": 89, "args": argparse.Namespace(lr=0.1)}, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), reference(x))


@pytest.mark.slow
def test_torch_compile_sees_the_training_model_as_one_graph():
    model = MobileNetV2(num_classes=10, width_mult=0.35).train()
    x = torch.randn(2, 3, 32, 32)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
