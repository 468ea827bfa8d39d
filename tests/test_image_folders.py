"""image_folders.py: any folder of classes, read as torchvision's ImageFolder reads it; the seeded holdout;
the WNID table; the ImageNet layouts left to read_ImageNetData.py.

    python -m pytest tests/test_image_folders.py -q
"""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

import read_ImageNetData
from helpers import fake_synsets, run_script
from mnv2.data import demo, folders, imagenet

ODD_NAMES = ["tulip", "Rosé rouge", "daisy", "Ölbaum 橄榄", "rose"]
FORMATS = {".jpg": "JPEG", ".JPEG": "JPEG", ".png": "PNG", ".Png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}


def write_image(path, value=0, fmt="JPEG", size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, fmt)
    return path


def make_classes(root, names=ODD_NAMES, per_class=5):
    """root/<name>/ with per_class images of mixed types (one in a subfolder), as a user's photos come."""
    extensions = list(FORMATS)
    for c, name in enumerate(names):
        for k in range(per_class):
            ext = extensions[(c + k) % len(extensions)]
            sub = "more/" if k == per_class - 1 else ""
            write_image(root / name / f"{sub}img{k:02d}{ext}", 30 * c + k, FORMATS[ext])
    return root


def add_clutter(root, names=ODD_NAMES):
    """What real folders hold besides images: hidden files and folders, notes, files beside the classes."""
    for name in names:
        (root / name / ".DS_Store").write_bytes(b"\0")
        (root / name / "notes.txt").write_text("taken in May")
    write_image(root / ".ipynb_checkpoints" / "img.jpg")
    (root / "README.md").write_text("my photos")


def test_odd_class_names_and_mixed_files_are_read_as_imagefolder_reads_them(tmp_path):
    root = make_classes(tmp_path / "photos")
    reference = torchvision.datasets.ImageFolder(str(root))
    add_clutter(root)
    found = folders.build_datasets(root, input_size=16, resize=16)
    assert found.kind == "folders" and found.val is None
    # names as they are, in ImageFolder's (code-point) order: capitals before lower case, unicode last
    assert found.classes.names == reference.classes == ["Rosé rouge", "daisy", "rose", "tulip", "Ölbaum 橄榄"]
    assert found.train.samples == [(p, label) for p, label in reference.samples]
    assert len(found.train) == 25 and {Path(p).suffix for p, _ in found.train.samples} == set(FORMATS)
    # the clutter is skipped and counted in one note
    assert found.note == (f"note: {root}: skipped 6 hidden files or folders, 5 files that are not images, "
                          "1 file outside the class folders (.txt)")
    image, label, _, failed = found.train[len(found.train) - 1]
    assert tuple(image.shape) == (3, 16, 16) and label == 4 and failed == 0


def test_val_folders_are_labelled_by_name_not_by_position(tmp_path):
    for name in ("apple", "banana", "cherry"):
        write_image(tmp_path / "train" / name / "a.jpg")
    write_image(tmp_path / "val" / "apple" / "v.png")
    write_image(tmp_path / "val" / "cherry" / "v.jpg")  # no banana in val: cherry is still class 2
    found = folders.build_datasets(tmp_path, input_size=16, resize=16)
    assert found.classes.names == ["apple", "banana", "cherry"]
    assert [(Path(p).parent.name, label) for p, label in found.val.samples] == [("apple", 0), ("cherry", 2)]


@pytest.mark.parametrize("case, needle", [
    ("class only in val", "val/lily: class only in val/"),
    ("empty class folder", "train/rose: class folder without images"),
    ("split with no images", "val: no images in any of its 2 class folders"),
    ("no class folders", "no class folders"),
])
def test_a_broken_folder_dataset_is_one_line_naming_it(case, needle, tmp_path):
    root = tmp_path / "photos"
    for name in ("daisy", "rose"):
        write_image(root / "train" / name / "a.jpg")
        write_image(root / "val" / name / "b.jpg")
    if case == "class only in val":
        write_image(root / "val" / "lily" / "c.jpg")
    elif case == "empty class folder":
        (root / "train" / "rose" / "a.jpg").unlink()
    elif case == "split with no images":
        for name in ("daisy", "rose"):
            (root / "val" / name / "b.jpg").unlink()
            (root / "val" / name / "b.txt").write_text("")
    else:
        root = tmp_path / "flat"
        write_image(root / "a.jpg")
    code, err, _ = run_script(read_ImageNetData, "--data-dir", root)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("read_ImageNetData.py: error: ")
    assert needle in lines[0], lines[0]


def test_val_split_is_seeded_stratified_and_independent_per_class(tmp_path):
    root = tmp_path / "photos"
    sizes = {"a": 10, "b": 7, "c": 2, "d": 1}
    for name, n in sizes.items():
        for k in range(n):
            write_image(root / name / f"{k}.jpg", k)
    found, _ = folders.scan_classes(root)
    held = folders.holdout(found, 0.25, seed=0)
    per_class = Counter(f.split("/")[0] for f in held)
    # round(0.25 n), at least one image of each class with two or more, never the last one
    assert per_class == {"a": 3, "b": 2, "c": 1}
    assert held == folders.holdout(found, 0.25, seed=0)
    assert held != folders.holdout(found, 0.25, seed=1)
    # a class's split does not move when another class is added
    write_image(root / "e" / "0.jpg")
    write_image(root / "e" / "1.jpg")
    grown, _ = folders.scan_classes(root)
    assert [f for f in folders.holdout(grown, 0.25, seed=0) if not f.startswith("e/")] == held
    dataset = folders.build_datasets(root, input_size=16, resize=16, val_split=0.25, seed=0)
    assert dataset.val_split == {"fraction": 0.25, "seed": 0, "files": folders.holdout(grown, 0.25, seed=0)}
    assert len(dataset.train) + len(dataset.val) == 22
    assert not {p for p, _ in dataset.train.samples} & {p for p, _ in dataset.val.samples}
    # a recorded split wins over a new draw
    again = folders.build_datasets(root, input_size=16, resize=16, val_split=0.5, seed=7,
                                   recorded_split=dataset.val_split, log=lambda *a: None)
    assert again.val.samples == dataset.val.samples


def test_the_wnid_table_is_imagenets_1000_classes_in_sorted_order_with_torchvisions_names():
    wnids, names, words = folders.imagenet_classes()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert all(imagenet.WNID.match(w) for w in wnids)
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert list(names) == categories
    # published facts: the first and last classes, and the one the devkit numbers 1
    assert (wnids[0], names[0], wnids[999], names[999]) == ("n01440764", "tench", "n15075141", "toilet tissue")
    assert names[wnids.index("n02119789")] == "kit fox"
    assert words[0] == "tench, Tinca tinca" and all(n.lower() in w.lower() or " " in n for n, w in zip(names, words))
    assert folders.display_name("n01443537") == "goldfish" and folders.display_name("Rosé") == "Rosé"


def _wnid_folders(root, wnids, split="train"):
    for k, w in enumerate(wnids):
        write_image(root / split / w / f"{w}_{k}.JPEG", k)
    return root


@pytest.mark.slow
def test_imagenet_layouts_stay_with_read_imagenetdata_and_wnid_subsets_map_to_true_indices(tmp_path,
                                                                                          fake_imagenet_factory):
    # every ImageNet layout keeps today's reader
    assert folders.is_imagenet_layout(fake_imagenet_factory()["root"])
    assert folders.is_imagenet_layout(fake_imagenet_factory(layout="torchvision")["root"])
    assert folders.is_imagenet_layout(fake_imagenet_factory(layout="torchvision", meta=False)["root"])
    complete = sorted(w for _, w, _, children in fake_synsets() if not children)
    full = tmp_path / "full"
    for w in complete:
        (full / "train" / w).mkdir(parents=True)
    assert folders.is_imagenet_layout(full)
    # a subset of real WNIDs without a devkit (Imagenette-like) is a folder dataset ...
    wnids, _, _ = folders.imagenet_classes()
    subset = [wnids[900], wnids[3], wnids[217]]
    root = _wnid_folders(tmp_path / "imagenette", subset)
    assert not folders.is_imagenet_layout(root)
    own = folders.build_datasets(root, input_size=16, resize=16)
    assert own.classes.names == sorted(subset) and own.classes.wnids == sorted(subset)
    # ... and with --num-classes 1000 each folder keeps its true ImageNet index, never its position
    imagenet = folders.build_datasets(root, input_size=16, resize=16, num_classes=1000)
    assert imagenet.classes.wnids == list(wnids) and imagenet.classes.order == "sorted"
    assert sorted(label for _, label in imagenet.train.samples) == [3, 217, 900]
    with pytest.raises(folders.UsageError, match="--num-classes 5, but the data has 3 class folders"):
        folders.build_datasets(root, num_classes=5)


def test_model_index_goes_by_names_then_wnids_and_by_position_only_without_names():
    saved = {"order": "folders", "names": ["daisy", "rose", "tulip"], "wnids": ["", "", ""]}
    assert folders.model_index(["daisy", "tulip"], saved, 3, "folders") == {"daisy": 0, "tulip": 2}
    with pytest.raises(imagenet.DataError, match="'lily' is not among the 3 class names"):
        folders.model_index(["daisy", "lily"], saved, 3, "folders")
    wnids = list(folders.imagenet_classes()[0])
    assert folders.model_index([wnids[5], wnids[2]], None, 1000, "sorted") == {wnids[5]: 5, wnids[2]: 2}
    with pytest.raises(imagenet.DataError, match="devkit"):
        folders.model_index([wnids[5]], None, 1000, "devkit")
    notes = []
    assert folders.model_index(["b", "a"], None, 2, "sorted", log=notes.append) == {"b": 0, "a": 1}
    assert "no class names" in notes[0]
    with pytest.raises(imagenet.DataError, match="no way to match"):
        folders.model_index(["a", "b", "c"], None, 2, "sorted")


@pytest.mark.slow
def test_make_demo_writes_named_digit_folders_of_jpg_and_png(tmp_path):
    code, _, out = run_script(read_ImageNetData, "--make-demo", tmp_path / "digits", "--demo-layout", "folders")
    assert code == 0
    found, skipped = folders.scan_classes(tmp_path / "digits")
    assert sorted(found) == sorted(demo.DEMO_DIGITS) and sum(map(len, found.values())) == 1797
    assert {Path(f).suffix for files in found.values() for f in files} == {".jpg", ".png"}
    code, _, out = run_script(read_ImageNetData, "--data-dir", tmp_path / "digits", "--val-split", "0.1")
    assert code == 0 and "10 classes; 1618 train / 179 val images" in out and "  zero" in out


def test_the_folder_demo_refuses_a_folder_of_someone_elses_classes(tmp_path):
    mine = tmp_path / "photos"
    write_image(mine / "tulip" / "a.jpg")
    code, err, _ = run_script(read_ImageNetData, "--make-demo", mine, "--demo-layout", "folders")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "left alone" in err
    assert sorted(p.name for p in mine.iterdir()) == ["tulip"]  # nothing written beside the user's class
    code, _, _ = run_script(read_ImageNetData, "--make-demo", tmp_path / "digits", "--demo-layout", "folders")
    assert code == 0
    code, _, _ = run_script(read_ImageNetData, "--make-demo", tmp_path / "digits", "--demo-layout", "folders")
    assert code == 0  # its own folder: written again, the same


def test_a_link_back_to_a_class_folder_lists_each_image_once(tmp_path):
    root = tmp_path / "photos"
    for name in ("daisy", "rose"):
        for k in range(3):
            write_image(root / name / f"{k}.jpg", k)
    (root / "rose" / "again").symlink_to(root / "rose")       # a loop: rose/again/again/... is rose
    (root / "rose" / "daisy-too").symlink_to(root / "daisy")  # not a loop: another class's folder, read once here
    found, skipped = folders.scan_classes(root)
    assert sorted(found["rose"]) == ["rose/0.jpg", "rose/1.jpg", "rose/2.jpg", "rose/daisy-too/0.jpg",
                                     "rose/daisy-too/1.jpg", "rose/daisy-too/2.jpg"]
    assert skipped.loops == 1 and "link back to a folder already read" in skipped.note("photos")
