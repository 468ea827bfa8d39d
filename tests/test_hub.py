"""Weights that leave the repo: safetensors files, timm / Hugging Face Hub folders that timm loads with the
same logits, the round trip back through evaluate.py, doctored files refused, hf-hub: names read from the
local cache."""
import csv
import json
import struct

import pytest
import torch

import count_flops
import evaluate
import train
from helpers import one_line, run_main, run_script
from mnv2 import checkpoint, hub
from mnv2.data.demo import make_folder_demo
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from MobileNetV2 import MobileNetV2

pytestmark = pytest.mark.usefixtures("one_thread")
timm = pytest.importorskip("timm")

NAMES = {"zero": "Zéro", "four": "四", "six": "Six (6)"}  # names a user might give their folders


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_folder_demo(tmp_path_factory.mktemp("photos") / "photos", seed=3, per_class=12)
    for plain, odd in NAMES.items():
        (root / plain).rename(root / odd)
    return root


@pytest.fixture(scope="module")
def run_dir(photos, tmp_path_factory):
    """Ten epochs on half the photos at width 0.5 (timm's mobilenetv2_050), the other half held out."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = train.get_args_parser().parse_args([
        "--data-dir", str(photos), "--save-path", str(out), "--device", "cpu", "--num-workers", "0",
        "--input-size", "32", "--print-freq", "1000", "--val-split", "0.5", "--width-mult", "0.5",
        "--num-epochs", "10", "--batch-size", "12", "--lr", "0.05", "--no-augment", "--warmup-epochs", "1"])
    assert run_main(train, args) == 0
    return out


def random_model(width, num_classes, seed=0):
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=num_classes, width_mult=width).eval()
    for m in model.modules():  # statistics that are not the identity, so every buffer matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


PRE = {"resize": 36, "input_size": 32, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
       "std": list(IMAGENET_STD)}


@pytest.mark.parametrize("width, arch", [(0.5, "mobilenetv2_050"), (1.0, "mobilenetv2_100")])
def test_timm_loads_a_written_folder_with_the_same_logits_and_preprocessing(tmp_path, width, arch):
    model = random_model(width, 3)
    classes = {"order": "folders", "wnids": None, "names": ["cat", "dög", "犬"]}
    assert hub.write_folder(model, tmp_path / "hub", classes, PRE, {"recipe": "finetune", "epochs": 4})[0] == arch
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == arch and config["num_classes"] == 3 and config["label_names"] == classes["names"]
    cfg = timm.data.resolve_data_config({}, model=loaded)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["interpolation"] == "bilinear"
    assert cfg["crop_pct"] == pytest.approx(32 / 36) and list(cfg["mean"]) == pytest.approx(list(IMAGENET_MEAN))
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "library_name: timm" in card and "# license:" in card and "recipe: finetune" in card
    assert "epochs trained: 4" in card


def test_a_width_timm_does_not_define_is_one_line_and_nothing_is_written(tmp_path):
    with pytest.raises(hub.HubError, match="width 0.25 has no timm architecture"):
        hub.write_folder(random_model(0.25, 3), tmp_path / "hub", {"order": "folders", "wnids": None,
                                                                   "names": list("abc")}, PRE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_training_run_leaves_model_safetensors_with_its_classes(run_dir):
    best = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    shared = checkpoint.read_weights(run_dir / "model.safetensors")
    assert shared.keys() >= {"model", "classes", "data", "model_config"}
    assert shared["model"].keys() == best["model"].keys()
    assert all(torch.equal(shared["model"][k], best["model"][k]) for k in best["model"])
    assert shared["classes"] == best["classes"] and "Zéro" in shared["classes"]["names"]
    assert shared["data"] == best["data"]
    assert b"\x80\x02" not in (run_dir / "model.safetensors").read_bytes()[:8]  # not a pickle


def predictions(path):
    with open(path, newline="") as f:
        return [(row["file"], row["target_name"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_folders_to_hub_folder_to_evaluate_gives_the_same_top1_and_class_names(run_dir, photos, tmp_path):
    common = ["--data-dir", photos, "--device", "cpu", "--num-workers", "0", "--no-progress", "--backend", "torch"]
    code, err, _ = run_script(evaluate, "--weights", run_dir / "best.pth", *common, "--json", tmp_path / "a.json",
                              "--predictions", tmp_path / "a.csv", "--export-hub", tmp_path / "hub")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["export"]["hub"]["architecture"] == "mobilenetv2_050" and a["export"]["hub"]["max_abs_diff"] <= 1e-4
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "top-1:" in card and "photos" in card and "Zéro" in card
    for weights in (tmp_path / "hub", tmp_path / "hub" / "model.safetensors", run_dir / "model.safetensors"):
        code, err, _ = run_script(evaluate, "--weights", weights, *common, "--json", tmp_path / "b.json",
                                  "--predictions", tmp_path / "b.csv")
        assert code == 0, err
        b = json.loads((tmp_path / "b.json").read_text())
        assert b["images"] == a["images"] and b["top1"] == a["top1"], weights
        assert predictions(tmp_path / "b.csv") == predictions(tmp_path / "a.csv"), weights
    # the folder's own classes and preprocessing came back without flags
    assert b["class_order"] == a["class_order"] and b["preprocessing"] == a["preprocessing"]


@pytest.mark.slow
def test_an_existing_hub_folder_is_refused_and_kept(run_dir, tmp_path, capsys):
    target = tmp_path / "hub"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"someone else's")
    code, err, _ = run_script(evaluate, "--weights", run_dir / "best.pth", "--export-hub", target)
    assert code == 2 and "--export-hub" in one_line(err) and "not an empty folder" in err
    assert (target / "model.safetensors").read_bytes() == b"someone else's"


def safetensors_bytes(header, data=b""):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("case, needle", [
    ("header past the end", "the file holds"),
    ("huge header", "over the format's 100 MiB limit"),
    ("unknown dtype", "dtype 'F128'"),
    ("tensor past the end", "declares bytes 0..4096"),
    ("not json", "not valid JSON"),
])
def test_doctored_safetensors_are_refused_in_one_line_before_reading(tmp_path, case, needle):
    path = tmp_path / "doctored.safetensors"
    tensor = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "header past the end":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "huge header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "unknown dtype":
        path.write_bytes(safetensors_bytes({"w": dict(tensor, dtype="F128")}, bytes(8)))
    elif case == "tensor past the end":
        path.write_bytes(safetensors_bytes({"w": dict(tensor, shape=[1024], data_offsets=[0, 4096])}, bytes(8)))
    else:
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    code, err, _ = run_script(count_flops, "--weights", path)
    line = one_line(err)
    assert code == 1 and str(path) in line and needle in line, line


@pytest.mark.slow
def test_timm_layout_safetensors_and_hub_folders_are_read_by_every_script(tmp_path):
    model = random_model(0.5, 3)
    hub.write_folder(model, tmp_path / "hub", {"order": "folders", "wnids": None, "names": list("abc")}, PRE)
    for weights in (tmp_path / "hub", tmp_path / "hub" / "model.safetensors"):
        code, err, out = run_script(count_flops, "--weights", weights, "--input-size", "32")
        assert code == 0, err
    from mnv2.weights import load_model
    rebuilt = load_model(tmp_path / "hub" / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def fake_hub_cache(cache, repo, folder):
    """The Hugging Face cache layout (models--ORG--NAME/refs/main -> snapshots/<commit>/files)."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    for f in folder.iterdir():
        (base / "snapshots" / commit / f.name).write_bytes(f.read_bytes())


def test_hf_hub_names_read_the_local_cache_and_say_what_to_fetch_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err, _ = run_script(count_flops, "--weights", "hf-hub:someone/mobilenetv2-photos", "--input-size", "32")
    line = one_line(err)
    assert code == 2 and "hf-hub:someone/mobilenetv2-photos" in line and "hf download someone/mobilenetv2-photos" \
        in line and "model.safetensors" in line
    model = random_model(0.5, 3)
    hub.write_folder(model, tmp_path / "hub", {"order": "folders", "wnids": None, "names": list("abc")}, PRE)
    fake_hub_cache(tmp_path / "cache", "someone/mobilenetv2-photos", tmp_path / "hub")
    code, err, out = run_script(count_flops, "--weights", "hf-hub:someone/mobilenetv2-photos", "--input-size", "32")
    assert code == 0, err


@pytest.mark.slow
def test_fine_tuning_starts_from_a_hub_folder(run_dir, photos, tmp_path):
    """The pair: a folder written here is a --pretrained for the next fine-tuning run."""
    code, err, _ = run_script(evaluate, "--weights", run_dir / "best.pth", "--export-hub", tmp_path / "hub")
    assert code == 0, err
    args = train.get_args_parser().parse_args([
        "--data-dir", str(photos), "--save-path", str(tmp_path / "out"), "--device", "cpu", "--num-workers", "0",
        "--input-size", "32", "--print-freq", "1000", "--val-split", "0.5", "--pretrained", str(tmp_path / "hub"),
        "--freeze-backbone", "--num-epochs", "1", "--batch-size", "12"])
    assert run_main(train, args) == 0
    tuned = torch.load(tmp_path / "out" / "best.pth", map_location="cpu", weights_only=True)
    source = checkpoint.read_weights(run_dir / "model.safetensors")["model"]
    # the backbone is the folder's, unchanged by a linear probe
    assert torch.equal(tuned["model"]["features.0.0.weight"], source["features.0.0.weight"])
