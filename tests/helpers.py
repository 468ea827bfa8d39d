"""What the tests share: a tiny fake ImageNet in the real ILSVRC2012 layout, the public weight layouts
written independently of the loader, an untrusted pickle, and one way to run a script's command line.

Fixtures that build data live in conftest.py and use these; test modules import from here.
"""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

from mnv2 import distributed
from MobileNetV2 import STAGES

free_port = distributed.free_port  # for the tests' own rendezvous

REPO = Path(__file__).resolve().parents[1]


NUM_LEAVES = 1000
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")


def fake_synsets(seed=0, num_leaves=NUM_LEAVES):
    """[(ILSVRC2012_ID, WNID, words, children)] in devkit-ID order: num_leaves leaves plus 3 parent synsets.

    The leaf IDs are a shuffled assignment, so ID order and sorted-WNID order differ (as in the real devkit,
    where ID 1 is n02119789 but the first sorted WNID is n01440764).
    """
    rng = np.random.default_rng(seed)
    wnids = sorted({f"n{int(v):08d}" for v in rng.choice(10**7, size=num_leaves, replace=False) + 10**6})
    ids = rng.permutation(num_leaves) + 1
    leaves = [(int(ids[k]), wnids[k], f"class {wnids[k]}, fake", ()) for k in range(num_leaves)]
    parents = [(num_leaves + 1 + p, f"n{90000000 + p:08d}", f"parent {p}",
                tuple(int(i) for i in ids[p::3][:50])) for p in range(3)]
    return sorted(leaves + parents)


def write_meta_mat(path, synsets):
    """Write synsets as the devkit's meta.mat: a struct array 'synsets' (N x 1) with the real fields."""
    table = np.zeros((len(synsets), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for row, (ilsvrc_id, wnid, words, children) in enumerate(synsets):
        table[row, 0] = (np.array([[ilsvrc_id]], dtype=np.uint16), wnid, words, f"a {words}",
                         np.array([[len(children)]], dtype=np.uint16),
                         np.array(children, dtype=np.uint16).reshape(1, -1),
                         np.array([[1 if children else 0]], dtype=np.uint8), np.array([[732]], dtype=np.uint16))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})


def write_jpeg(path, size=(37, 29), seed=0, mode="RGB", fmt="JPEG"):
    """A small noisy image of size (w, h) at path, saved in format fmt whatever the file name says."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def make_fake_imagenet(root, num_image_classes=3, train_per_class=2, num_val=6, image_size=(37, 29), seed=0,
                       layout="seed", devkit_dir="ILSVRC2012_devkit_t12", val_folders=False,
                       ground_truth=True, meta=True):
    """Write a tiny ImageNet under root and return what a test needs to check labels against.

    root: folder to create. num_image_classes: how many of the 1000 leaf classes get images (every
    333rd sorted WNID, so their devkit IDs are out of sorted order). train_per_class: JPEGs per class in
    <train>/<wnid>/. num_val: val JPEGs ILSVRC2012_val_00000001.JPEG..., classes cycling in shuffled order.
    image_size: (w, h) of every JPEG (odd by default). layout: "seed" (ILSVRC2012_img_train/,
    ILSVRC2012_img_val/) or "torchvision" (train/, val/). devkit_dir: devkit folder name (also
    "ILSVRC2012_dev_kit_t12"). val_folders: put val images in <wnid>/ folders, as valprep.sh does.
    ground_truth / meta: write the devkit's ground-truth file / meta.mat.

    Returns a dict: root, train_dir, val_dir, meta_mat, ground_truth (Paths), synsets (fake_synsets),
    sorted_wnids (the 1000 leaf WNIDs sorted), ilsvrc_id ({wnid: ID}), image_wnids (the classes with
    images), train [(path, wnid)], val [(path, wnid)], truth (the ground-truth IDs, line order).
    """
    root = Path(root)
    synsets = fake_synsets(seed)
    leaves = [s for s in synsets if not s[3]]
    sorted_wnids = sorted(w for _, w, _, _ in leaves)
    ilsvrc_id = {w: i for i, w, _, _ in leaves}
    image_wnids = sorted_wnids[::333][:num_image_classes]
    train_name, val_name = ("ILSVRC2012_img_train", "ILSVRC2012_img_val") if layout == "seed" else ("train", "val")
    train_dir, val_dir = root / train_name, root / val_name
    devkit = root / devkit_dir / "data"
    devkit.mkdir(parents=True)
    train, val = [], []
    for c, wnid in enumerate(image_wnids):
        (train_dir / wnid).mkdir(parents=True)
        for k in range(train_per_class):
            path = write_jpeg(train_dir / wnid / f"{wnid}_{k + 1}.JPEG", image_size, seed=100 * c + k)
            train.append((path, wnid))
    rng = np.random.default_rng(seed)
    val_wnids = [image_wnids[k % len(image_wnids)] for k in rng.permutation(num_val)]
    val_dir.mkdir(parents=True)
    for number, wnid in enumerate(val_wnids, 1):
        folder = val_dir / wnid if val_folders else val_dir
        folder.mkdir(exist_ok=True)
        path = write_jpeg(folder / f"ILSVRC2012_val_{number:08d}.JPEG", image_size, seed=10_000 + number)
        val.append((path, wnid))
    truth = [ilsvrc_id[w] for w in val_wnids]
    gt_path = devkit / "ILSVRC2012_validation_ground_truth.txt"
    if ground_truth:
        gt_path.write_text("".join(f"{i}\n" for i in truth))
    meta_path = devkit / "meta.mat"
    if meta:
        write_meta_mat(meta_path, synsets)
    return {"root": root, "train_dir": train_dir, "val_dir": val_dir, "meta_mat": meta_path,
            "ground_truth": gt_path, "synsets": synsets, "sorted_wnids": sorted_wnids, "ilsvrc_id": ilsvrc_id,
            "image_wnids": image_wnids, "train": train, "val": val, "truth": truth}


class RunsCode:
    """A pickle that creates `marker` when loaded by an unsafe (plain pickle) loader: the untrusted file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------------------------------
# Public weight layouts, written from torchvision's names without the loader's mappings


def _flat_from_torchvision(key, block_prefix):
    """torchvision block key -> the flat Sequential numbering of the older repos."""
    m = re.fullmatch(r"features\.(\d+)\.conv\.(.+)", key)
    if not m:
        return None
    index, rest = int(m.group(1)), m.group(2)
    if index == 1:  # t == 1: dw(0) bn(1) relu(2) pw-linear(3) bn(4)
        table = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    else:           # pw(0) bn(1) relu(2) dw(3) bn(4) relu(5) pw-linear(6) bn(7)
        table = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    for old, new in table.items():
        if rest.startswith(old + "."):
            return f"{block_prefix}.{index}.conv.{new}.{rest[len(old) + 1:]}"
    raise AssertionError(key)


def to_seed(sd):
    out = {}
    for k, v in sd.items():
        new = _flat_from_torchvision(k, "network")
        if new is None:
            new = k.replace("features.", "network.").replace("classifier.1.", "classifier.")
        out["module." + new] = v
    return out


def to_tonylins(sd, bare_linear=True):
    out = {}
    for k, v in sd.items():
        new = _flat_from_torchvision(k, "features") or k
        if bare_linear:
            new = new.replace("classifier.1.", "classifier.")
        out[new] = v
    return out


def to_dli14(sd):
    out = {}
    for k, v in sd.items():
        new = _flat_from_torchvision(k, "features") or k
        new = new.replace("features.18.", "conv.").replace("classifier.1.", "classifier.")
        out[new] = v
    return out


def to_timm(sd):
    names = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
    first = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
    starts = []  # feature index of each stage's first block
    index = 1
    for _, _, n, _ in STAGES:
        starts.append(index)
        index += n
    out = {}
    for k, v in sd.items():
        if k.startswith("features.0."):
            new = k.replace("features.0.0.", "conv_stem.").replace("features.0.1.", "bn1.")
        elif k.startswith("features.18."):
            new = k.replace("features.18.0.", "conv_head.").replace("features.18.1.", "bn2.")
        elif k.startswith("classifier.1."):
            new = k.replace("classifier.1.", "classifier.")
        else:
            m = re.fullmatch(r"features\.(\d+)\.conv\.(\d(?:\.\d)?)\.(\w+)", k)
            i = int(m.group(1))
            stage = max(s for s in range(len(starts)) if starts[s] <= i)
            table = first if i == 1 else names
            new = f"blocks.{stage}.{i - starts[stage]}.{table[m.group(2)]}.{m.group(3)}"
        out[new] = v
    return out


def _compile_prefix(sd):
    return {"_orig_mod." + k: v for k, v in sd.items()}


LAYOUTS = {
    "torchvision": lambda sd: sd,
    "torchvision under module._orig_mod.": lambda sd: {"module." + k: v for k, v in _compile_prefix(sd).items()},
    "seed": to_seed,
    "tonylins": to_tonylins,
    "tonylins with classifier.1": lambda sd: to_tonylins(sd, bare_linear=False),
    "d-li14": to_dli14,
    "timm": to_timm,
    "timm inside a training checkpoint": lambda sd: {"state_dict": to_timm(sd), "epoch": 3},
}


# --------------------------------------------------------------------------------------------------
# Running a script


def save_checkpoint(path, model, data, **extra):
    """A minimal checkpoint of `model` in this repo's format (what evaluate.py and --teacher read): its
    weights, constructor arguments and preprocessing `data` (input_size, resize, interpolation, mean, std)."""
    torch.save({"format": "mobilenetv2-checkpoint", "version": 1, "model": model.state_dict(), "model_ema": None,
                "model_config": dict(model.config), "epoch": 1, "step": 0, "data": data, **extra}, path)
    return path


def run_script(module, *argv):
    """(exit code, stderr, stdout) of `python <module>.py argv`, run in this process as its last line does:
    main(get_args_parser().parse_args(argv)). Any other exception would have been a traceback: it propagates
    and fails the test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    real = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = [f"{module.__name__}.py"], stdout, stderr  # argparse's prog, as the shell
    try:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv, sys.stdout, sys.stderr = real
    err = stderr.getvalue()
    if isinstance(code, str):  # sys.exit("message"): the interpreter prints it and exits with 1
        err, code = err + code + "\n", 1
    return code or 0, err, stdout.getvalue()


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_main(module, args, **kwargs):
    """module.main(args) on an already parsed command line, in this process: the exit code (0 when it
    returns normally)."""
    try:
        module.main(args, **kwargs)
    except SystemExit as e:
        return e.code
    return 0


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    """a == b, tensors bit for bit, through nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


class NanAt:
    """CrossEntropy that returns NaN on the given calls (counted from 1)."""

    def __init__(self, calls):
        self.calls, self.n = set(calls), 0
        self.inner = torch.nn.CrossEntropyLoss()

    def __call__(self, logits, targets):
        self.n += 1
        loss = self.inner(logits, targets)
        return loss * float("nan") if self.n in self.calls else loss


def torchrun(script, *args, nproc=2, timeout=240):
    """`torchrun --nproc_per_node=nproc script args...` on 127.0.0.1, one thread per process, the repo importable."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={distributed.free_port()}", str(script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
