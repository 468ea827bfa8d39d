"""The demo dataset: scikit-learn's digits written in the real ILSVRC2012 layout, devkit included."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mnv2.data.imagenet import DEVKIT_DIRS, GROUND_TRUTH_NAME, NUM_CLASSES, DataError

# The demo writer's record in the folders it writes: it writes only into an empty folder or its own.
DEMO_MARKER = ".demo-dataset.json"
DEMO_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def demo_synsets():
    """The demo's 1000 leaves (plus one parent) as [(ILSVRC2012_ID, WNID, words, children)], in ID order.

    Devkit IDs follow a fixed stride permutation of the sorted WNIDs, so the two class orders differ;
    the 10 digits are leaves spread over the sorted list.
    """
    wnids = [f"n{1000000 + 7919 * k:08d}" for k in range(NUM_CLASSES)]
    words = [f"synthetic class {k}" for k in range(NUM_CLASSES)]
    for digit, k in enumerate(range(37, NUM_CLASSES, 100)):
        words[k] = f"digit {DEMO_DIGITS[digit]}"
    ids = [(k * 389 + 17) % NUM_CLASSES + 1 for k in range(NUM_CLASSES)]
    synsets = [(ids[k], wnids[k], words[k], ()) for k in range(NUM_CLASSES)]
    digit_ids = tuple(ids[k] for k in range(37, NUM_CLASSES, 100))
    synsets.append((NUM_CLASSES + 1, "n09999999", "digit", digit_ids))
    return sorted(synsets)


def write_meta_mat(path, synsets):
    """Write synsets [(ILSVRC2012_ID, WNID, words, children)] as the devkit's meta.mat struct array."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    table = np.zeros((len(synsets), 1), dtype=[(f, object) for f in fields])
    for row, (ilsvrc_id, wnid, words, children) in enumerate(synsets):
        table[row, 0] = (float(ilsvrc_id), wnid, words, f"gloss of {words}", float(len(children)),
                         np.array(children, dtype=float).reshape(1, -1), float(bool(children)), 0.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})


def make_demo(root, seed=0, train_per_class=None, val_per_class=None, image_size=None):
    """Write a small dataset in the exact ILSVRC2012 archive layout under root; returns root as a Path.

    Images: scikit-learn's bundled 8x8 handwritten digits (1,797, no download), upscaled to image_size
    (default 32) RGB JPEGs, for the 10 digit classes among meta.mat's 1000. Each class keeps val_per_class
    (default 20%) for val, the rest (or train_per_class) for train; val files are shuffled and numbered
    like the real ILSVRC2012_val_%08d.JPEG set. Deterministic for a given seed.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    image_size = image_size or 32
    settings = {"seed": seed, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "image_size": image_size}
    made = _demo_marker(root)
    if made is not None and made.get("settings") != settings:
        raise DataError(f"{root} holds a demo dataset made with other settings ({made.get('settings')}); "
                        "delete that folder or choose another one")
    if made is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not empty and was not written by the demo writer: its files are left "
                        "alone; choose an empty or new folder for the demo dataset")
    if made is not None and made.get("complete"):
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": False}) + "\n")
    digits = load_digits()
    synsets = demo_synsets()
    by_words = {words: (ilsvrc_id, wnid) for ilsvrc_id, wnid, words, _ in synsets}
    rng = np.random.default_rng(seed)
    train_dir, val_dir = root / "ILSVRC2012_img_train", root / "ILSVRC2012_img_val"
    devkit = root / DEVKIT_DIRS[0] / "data"
    for d in (train_dir, val_dir, devkit):
        d.mkdir(parents=True, exist_ok=True)

    def save(pixels, path):
        im = Image.fromarray(np.uint8(pixels * (255 / 16)), "L").resize((image_size, image_size), Image.BILINEAR)
        im.convert("RGB").save(path, quality=90)

    val_items = []
    for digit, name in enumerate(DEMO_DIGITS):
        ilsvrc_id, wnid = by_words[f"digit {name}"]
        idx = rng.permutation(np.flatnonzero(digits.target == digit))
        n_val = val_per_class if val_per_class is not None else len(idx) // 5
        n_train = train_per_class if train_per_class is not None else len(idx) - n_val
        if n_val + n_train > len(idx):
            raise ValueError(f"digit {digit} has {len(idx)} images, asked for {n_train} train + {n_val} val")
        (train_dir / wnid).mkdir(exist_ok=True)
        for k in idx[n_val:n_val + n_train]:
            save(digits.images[k], train_dir / wnid / f"{wnid}_{k}.JPEG")
        val_items += [(k, ilsvrc_id) for k in idx[:n_val]]
    val_items = [val_items[k] for k in rng.permutation(len(val_items))]
    for number, (k, _) in enumerate(val_items, 1):
        save(digits.images[k], val_dir / f"ILSVRC2012_val_{number:08d}.JPEG")
    (devkit / GROUND_TRUTH_NAME).write_text("".join(f"{ilsvrc_id}\n" for _, ilsvrc_id in val_items))
    write_meta_mat(devkit / "meta.mat", synsets)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": True}) + "\n")
    return root


def _demo_marker(root):
    """What the demo writer recorded in root (its settings, whether it finished), or None."""
    try:
        made = json.loads((Path(root) / DEMO_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return made if isinstance(made, dict) else None


def demo_is_complete(root):
    return bool((_demo_marker(root) or {}).get("complete"))


# --------------------------------------------------------------------------------------------------
# Demo: the digits as named class folders


def make_folder_demo(root, seed=0, image_size=32, per_class=None):
    """The demo digits (scikit-learn's bundled 8x8 handwritten digits, upscaled) as root/<zero..nine>/
    image files, without a split: odd-numbered images as .png, the others as .jpg. Returns root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    settings = {"layout": "folders", "seed": seed, "image_size": image_size, "per_class": per_class}
    made = _demo_marker(root)
    if made is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} is not empty and was not written by the demo writer: its files (your classes?) "
                        "are left alone; choose an empty or new folder for the demo digits")
    if made is not None and made.get("settings") != settings:
        raise DataError(f"{root} holds demo digits made with other settings ({made.get('settings')}); delete that "
                        "folder or choose another one")
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": False}) + "\n")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit, name in enumerate(DEMO_DIGITS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        idx = rng.permutation(np.flatnonzero(digits.target == digit))[:per_class]
        for n, k in enumerate(idx):
            im = Image.fromarray(np.uint8(digits.images[k] * (255 / 16)), "L")
            im = im.resize((image_size, image_size), Image.BILINEAR).convert("RGB")
            if n % 2:
                im.save(folder / f"{name}_{k}.png")
            else:
                im.save(folder / f"{name}_{k}.jpg", quality=90)
    (root / DEMO_MARKER).write_text(json.dumps({"settings": settings, "complete": True}) + "\n")
    return root
