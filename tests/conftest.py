"""Shared fixtures: a tiny fake ImageNet in the real ILSVRC2012 layout, built in tmp_path in well under a second;
a guard that fails a test which leaves torch flags, the environment, cwd or signal handlers changed."""
import operator
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


@pytest.fixture
def fake_imagenet(tmp_path):
    """make_fake_imagenet(tmp_path / "imagenet") with the defaults: 3 classes x 2 train JPEGs, 6 val JPEGs."""
    return make_fake_imagenet(tmp_path / "imagenet")


@pytest.fixture
def fake_imagenet_factory(tmp_path):
    """make_fake_imagenet with root defaulting to a fresh folder in tmp_path: factory(**kwargs) -> dict."""
    count = iter(range(10**6))

    def factory(root=None, **kwargs):
        return make_fake_imagenet(root or tmp_path / f"imagenet{next(count)}", **kwargs)
    return factory


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny tensors gain nothing from a second thread, and on a shared
    machine OpenMP threads that wait for a busy core slow each operator down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RunsCode:
    """A pickle that creates `marker` when loaded by an unsafe (plain pickle) loader: the untrusted file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---- every test leaves the process as it found it ------------------------------------------------------
# A change that outlives its test reaches every later one: a torch.cuda.is_available left returning True
# once made DataLoader pin memory, and every later test failed with "Found no NVIDIA driver".

def _attribute(label):
    """(label, get, set) for an attribute named by its path from torch, e.g. "torch.backends.cudnn.benchmark"."""
    path, name = label.removeprefix("torch.").rsplit(".", 1)
    owner = operator.attrgetter(path)(torch)
    return label, lambda: getattr(owner, name), lambda value: setattr(owner, name, value)


# Not a test's doing: pytest names the running test and its phase in PYTEST_CURRENT_TEST; scikit-learn and
# joblib set KMP_INIT_AT_FORK when first imported, in whichever test that happens.
ENVIRON_IGNORED = {"PYTEST_CURRENT_TEST", "KMP_INIT_AT_FORK"}


def _environ():
    return {k: v for k, v in os.environ.items() if k not in ENVIRON_IGNORED}


def _set_environ(saved):
    for key in _environ().keys() - saved.keys():
        del os.environ[key]
    os.environ.update(saved)


def _signal_handler(signum):
    def restore(handler):
        if handler is not None:  # None: installed outside Python, nothing to put back from here
            signal.signal(signum, handler)
    return f"signal handler for {signum.name}", lambda: signal.getsignal(signum), restore


def _set_deterministic(mode):
    torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


# (label, get, set), restored in this order: cuBLAS's allow_tf32 before the matmul precision it implies.
GLOBAL_STATE = (
    _attribute("torch.backends.cudnn.allow_tf32"),
    _attribute("torch.backends.cudnn.benchmark"),
    _attribute("torch.backends.cudnn.deterministic"),
    _attribute("torch.backends.cuda.matmul.allow_tf32"),
    ("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ("torch.are_deterministic_algorithms_enabled() and warn_only",
     lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
     _set_deterministic),
    _attribute("torch.cuda.is_available"),
    ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    ("os.environ", _environ, _set_environ),
    ("os.getcwd()", os.getcwd, os.chdir),
    *(_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)),
)


def snapshot_global_state():
    return {label: get() for label, get, _ in GLOBAL_STATE}


def _describe(label, before, now):
    if label == "os.environ":  # names only: values may be long or private
        added, removed = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
        changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
        return f"os.environ: added {added}, removed {removed}, changed {changed}"
    return f"{label}: {before!r} -> {now!r}"


def restore_global_state(before):
    """Put back whatever differs from `before` (a snapshot_global_state()); returns one line per change."""
    changes = []
    for label, get, set_ in GLOBAL_STATE:
        now = get()
        if now != before[label]:
            changes.append(_describe(label, before[label], now))
            set_(before[label])
    return changes


def _check_global_state(before, who):
    changes = restore_global_state(before)
    if changes:
        pytest.fail(f"{who} changed global state and left it changed (now put back):\n  " + "\n  ".join(changes),
                    pytrace=False)


@pytest.fixture(autouse=True)
def global_state_guard():
    """Fails the test in its teardown, after monkeypatch's undo and the other fixtures' (the guard's setup
    runs first). Module fixtures such as one_thread are set up before it, so their state is the baseline."""
    before = snapshot_global_state()
    yield
    _check_global_state(before, "this test or one of its fixtures")


@pytest.fixture(scope="module", autouse=True)
def module_global_state_guard():
    """The same for a module's fixtures (one_thread, a trained model), checked after the module's last test."""
    before = snapshot_global_state()
    yield
    _check_global_state(before, "this module's fixtures")
