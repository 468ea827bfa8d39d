"""Knowledge distillation with an online teacher: the losses against their papers' formulas on fixed tensors,
the teacher's input (the student's exact pixels, mixed ones too, in the teacher's normalisation), what the
checkpoint records, bit-exact resume, and the one-line refusals."""
import math

import numpy as np
import pytest
import torch

import train
from helpers import assert_same_tensors, one_line, run_main, run_script, save_checkpoint
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from mnv2.training import distill
from MobileNetV2 import MobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=generator) * 3, torch.randn(4, 5, generator=generator) * 3


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_hintons_tempered_kl_times_t_squared(temperature):
    s, t = fixed_logits()
    p_s = np.exp(s.double().numpy() / temperature)
    p_s /= p_s.sum(1, keepdims=True)
    p_t = np.exp(t.double().numpy() / temperature)
    p_t /= p_t.sum(1, keepdims=True)
    want = temperature ** 2 * (p_t * np.log(p_t / p_s)).sum() / len(p_t)
    assert distill.kd_loss(s, t, temperature).item() == pytest.approx(want, rel=1e-5)
    assert distill.kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())


@pytest.mark.parametrize("temperature, beta, gamma", [(1.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist_is_the_papers_inter_and_intra_class_relations(temperature, beta, gamma):
    s, t = fixed_logits()
    y_s = torch.softmax(s.double() / temperature, 1).numpy()
    y_t = torch.softmax(t.double() / temperature, 1).numpy()
    inter = 1 - np.mean([pearson(y_s[i], y_t[i]) for i in range(len(y_s))])
    intra = 1 - np.mean([pearson(y_s[:, c], y_t[:, c]) for c in range(y_s.shape[1])])
    want = temperature ** 2 * (beta * inter + gamma * intra)
    assert distill.dist_loss(s, t, temperature, beta, gamma).item() == pytest.approx(want, rel=1e-5)
    assert distill.dist_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


class Recorder(torch.nn.Module):
    """A teacher that remembers what it was given and answers with fixed logits."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.seen = num_classes, []
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something for requires_grad_(False) to switch off

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(len(x), self.num_classes)


def test_the_teacher_sees_the_students_pixels_mixed_too_in_its_own_normalisation():
    teacher = distill.Teacher(Recorder(3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "recorder", None, 3)
    loss = distill.Distillation(teacher, IMAGENET_MEAN, IMAGENET_STD, "kd")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    x = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    mixed = 0.3 * x[:1] + 0.7 * x[1:]  # mixup of the two images, as the student gets it
    loss(torch.tensor(0.0), torch.zeros(1, 3), mixed)
    want = normalize(pixels, (0.5,) * 3, (0.25,) * 3)
    want_mixed = 0.3 * want[:1] + 0.7 * want[1:]
    assert torch.allclose(teacher.model.seen[0], want_mixed, atol=1e-5)


def test_the_loss_is_alpha_times_the_label_loss_plus_one_minus_alpha_times_the_distillation_term():
    teacher = distill.Teacher(Recorder(5), IMAGENET_MEAN, IMAGENET_STD, "recorder", None, 5)
    s, _ = fixed_logits()
    for name, term in (("kd", distill.kd_loss(s, torch.zeros_like(s), 2.0)),
                       ("dist", distill.dist_loss(s, torch.zeros_like(s), 2.0, 0.5, 3.0))):
        loss = distill.Distillation(teacher, IMAGENET_MEAN, IMAGENET_STD, name, 2.0, alpha=0.25, beta=0.5, gamma=3.0)
        got = loss(torch.tensor(2.0), s, torch.zeros(4, 3, 8, 8))
        assert got.item() == pytest.approx(0.25 * 2.0 + 0.75 * term.item(), rel=1e-6)


COMMON = ["--batch-size", "10", "--width-mult", "0.25", "--input-size", "32", "--num-workers", "0",
          "--print-freq", "100", "--device", "cpu", "--lr", "0.05"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A width-0.5 MobileNetV2 checkpoint for the demo (ImageNet's 1000 outputs), saved with its own mean/std (0.5)."""
    torch.manual_seed(3)
    model = MobileNetV2(num_classes=1000, width_mult=0.5).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    return save_checkpoint(path, model, {"input_size": 32, "resize": 36, "interpolation": "bilinear",
                                         "mean": [0.5] * 3, "std": [0.5] * 3})


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kd", "dist"])
def test_distillation_records_its_teacher_never_holds_it_and_resumes_bit_exactly(demo_data, teacher_file, tmp_path,
                                                                                  loss):
    flags = ["--teacher", teacher_file, "--distill-loss", loss, "--distill-temperature", "2", "--distill-alpha",
             "0.5", "--mixup-alpha", "0.2", "--label-smoothing", "0.1"]

    def args(out, *extra):
        return train.get_args_parser().parse_args(["--data-dir", str(demo_data), "--save-path", str(out), *COMMON,
                                                   *map(str, flags), *extra])
    assert run_main(train, args(tmp_path / "straight", "--num-epochs", "2")) == 0
    assert run_main(train, args(tmp_path / "resumed", "--num-epochs", "1")) == 0
    assert run_main(train, args(tmp_path / "resumed", "--num-epochs", "2", "--resume", "auto")) == 0
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    for key in ("model", "optimizer", "epoch", "sampler"):
        assert_same_tensors(resumed[key], straight[key])
    assert straight["args"]["teacher"] == str(teacher_file) and len(straight["args"]["teacher_sha256"]) == 64
    student_keys = set(MobileNetV2(num_classes=1000, width_mult=0.25).state_dict())
    assert set(straight["model"]) == student_keys  # the teacher's tensors are nowhere in the checkpoint
    # and the teacher changed the training: the same run without it ends elsewhere
    plain = train.get_args_parser().parse_args(["--data-dir", str(demo_data), "--save-path", str(tmp_path / "plain"),
                                                *COMMON, "--mixup-alpha", "0.2", "--label-smoothing", "0.1",
                                                "--num-epochs", "2"])
    assert run_main(train, plain) == 0
    alone = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)
    assert not torch.equal(alone["model"]["classifier.1.weight"], straight["model"]["classifier.1.weight"])


@pytest.mark.parametrize("extra, words", [
    (["--freeze-backbone"], ["--teacher needs the images", "--freeze-backbone"]),
    (["--distill-alpha", "1.5"], ["--distill-alpha 1.5", "between 0 and 1"]),
    (["--teacher", "torchvision:resnet9000"], ["torchvision:resnet9000", "not a torchvision classification model"]),
])
def test_teacher_misuse_is_one_line(demo_data, teacher_file, tmp_path, extra, words):
    argv = ["--data-dir", demo_data, "--save-path", tmp_path / "out", *COMMON, "--teacher", teacher_file, *extra]
    code, err, _ = run_script(train, *argv)
    line = one_line(err)
    assert code == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out" / "last.pth").exists()


def test_a_teacher_for_other_classes_is_one_line(demo_data, tmp_path):
    model = MobileNetV2(num_classes=7, width_mult=0.25)
    torch.save(model.state_dict(), tmp_path / "seven.pth")
    code, err, _ = run_script(train, "--data-dir", demo_data, "--save-path", tmp_path / "out", *COMMON,
                              "--teacher", tmp_path / "seven.pth")
    line = one_line(err)
    assert code == 2 and "predicts 7 classes, the student 1000" in line


def test_a_torchvision_teacher_is_read_from_the_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cache / weights.url.rsplit("/", 1)[1])
    teacher = distill.load_teacher("torchvision:resnet18.IMAGENET1K_V1", log=lambda *a: None)
    assert teacher.num_classes == 1000 and teacher.mean == pytest.approx(IMAGENET_MEAN)
    assert teacher.name == "torchvision:resnet18.IMAGENET1K_V1" and len(teacher.sha256) == 64
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
