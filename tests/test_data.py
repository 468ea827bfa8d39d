"""read_ImageNetData: layouts, exact labels in both class orders, devkit errors, odd images, the bad-file
policy, transforms against torchvision, samplers, the demo dataset and the command line."""
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from scipy import stats

import read_ImageNetData as data
from helpers import fake_synsets, write_jpeg, write_meta_mat
from mnv2.data import demo, imagenet, loaders, transforms

REPO = Path(__file__).resolve().parent.parent


def labels_of(samples):
    return {Path(p).name: label for p, label in samples}


def load(info, class_order="sorted"):
    layout = imagenet.find_layout(info["root"])
    return layout, imagenet.read_classes(layout, class_order)


# ---------------------------------------------------------------------------------------------- labels
def test_sorted_order_labels_are_positions_in_sorted_wnids(fake_imagenet):
    layout, classes = load(fake_imagenet)
    assert layout.kind == "seed" and layout.val_flat
    assert classes.wnids == fake_imagenet["sorted_wnids"] and len(classes.names) == 1000
    index = {w: i for i, w in enumerate(fake_imagenet["sorted_wnids"])}
    train = labels_of(imagenet.list_samples(layout, "train", classes))
    assert train == {p.name: index[w] for p, w in fake_imagenet["train"]}
    val = labels_of(imagenet.list_samples(layout, "val", classes))
    assert val == {p.name: index[w] for p, w in fake_imagenet["val"]}


def test_devkit_order_labels_are_ilsvrc_id_minus_one(fake_imagenet):
    layout, classes = load(fake_imagenet, "devkit")
    ids = fake_imagenet["ilsvrc_id"]
    assert classes.ilsvrc_ids == list(range(1, 1001))
    assert all(ids[w] == i + 1 for i, w in enumerate(classes.wnids))
    assert classes.wnids != fake_imagenet["sorted_wnids"]  # the fixture's IDs are out of sorted order
    for split in ("train", "val"):
        got = labels_of(imagenet.list_samples(layout, split, classes))
        assert got == {p.name: ids[w] - 1 for p, w in fake_imagenet[split]}


@pytest.mark.slow
def test_partial_train_set_keeps_true_labels(fake_imagenet):
    layout, classes = load(fake_imagenet)
    full = labels_of(imagenet.list_samples(layout, "train", classes))
    removed = fake_imagenet["image_wnids"][0]
    shutil.rmtree(fake_imagenet["train_dir"] / removed)
    partial = labels_of(imagenet.list_samples(layout, "train", imagenet.read_classes(layout)))
    assert partial == {name: label for name, label in full.items() if not name.startswith(removed)}
    assert len(imagenet.read_classes(layout).wnids) == 1000


def test_val_subset_is_labelled_by_file_number(fake_imagenet):
    layout, classes = load(fake_imagenet)
    full = labels_of(imagenet.list_samples(layout, "val", classes))
    for path, _ in fake_imagenet["val"][:4]:  # keep only the last two: positions change, labels must not
        path.unlink()
    subset = labels_of(imagenet.list_samples(layout, "val", classes))
    assert subset == {name: full[name] for name in subset} and len(subset) == 2


@pytest.mark.parametrize("kwargs", [dict(devkit_dir="ILSVRC2012_dev_kit_t12"), dict(val_folders=True),
                                    dict(layout="torchvision"), dict(layout="torchvision", val_folders=True)])
def test_other_layouts_give_the_same_labels(fake_imagenet_factory, kwargs):
    info = fake_imagenet_factory(**kwargs)
    layout, classes = load(info)
    assert layout.val_flat == (not kwargs.get("val_folders", False))
    index = {w: i for i, w in enumerate(info["sorted_wnids"])}
    for split in ("train", "val"):
        assert labels_of(imagenet.list_samples(layout, split, classes)) == \
            {p.name: index[w] for p, w in info[split]}


def test_unknown_layout_error_shows_expected_and_found(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(imagenet.DataError) as e:
        imagenet.find_layout(tmp_path)
    message = str(e.value)
    assert "ILSVRC2012_img_train" in message and "images/" in message and "notes.txt" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- devkit
def _no_synsets(info):
    import scipy.io
    scipy.io.savemat(info["meta_mat"], {"classes": np.arange(3)})


def _few_leaves(info):
    write_meta_mat(info["meta_mat"], fake_synsets()[:900])


def _corrupt_meta(info):
    info["meta_mat"].write_bytes(b"not a mat file at all")


def _missing_meta(info):
    info["meta_mat"].unlink()


def _gt_short(info):
    info["ground_truth"].write_text("".join(f"{i}\n" for i in info["truth"][:-1]))


def _gt_too_long(info):
    info["ground_truth"].write_text("1\n" * 50001)


def _gt_bad_id(info):
    info["ground_truth"].write_text("".join(f"{i}\n" for i in info["truth"][:-1]) + "1001\n")


def _gt_not_a_number(info):
    info["ground_truth"].write_text("3\nthree\n" + "".join(f"{i}\n" for i in info["truth"][2:]))


def _val_beyond_truth(info):
    write_jpeg(info["val_dir"] / "ILSVRC2012_val_00000099.JPEG")


def _val_bad_name(info):
    write_jpeg(info["val_dir"] / "holiday.JPEG")


def _gt_missing(info):
    info["ground_truth"].unlink()


@pytest.mark.slow
@pytest.mark.parametrize("breaker, names, words", [
    (_missing_meta, "ILSVRC2012_devkit_t12", "meta.mat"),
    (_no_synsets, "meta.mat", "synsets"),
    (_few_leaves, "meta.mat", "900 leaf"),
    (_corrupt_meta, "meta.mat", "MATLAB"),
    (_gt_short, "ILSVRC2012_val_00000006", "5 lines"),
    (_gt_too_long, "ground_truth.txt", "50001 lines"),
    (_gt_bad_id, "ground_truth.txt", "line 6"),
    (_gt_not_a_number, "ground_truth.txt", "line 2"),
    (_val_beyond_truth, "ILSVRC2012_val_00000099", "6 lines"),
    (_val_bad_name, "holiday.JPEG", "ILSVRC2012_val_"),
    (_gt_missing, "ILSVRC2012_img_val", "ground_truth"),
])
def test_wrong_devkit_gives_one_line_naming_the_file(fake_imagenet, breaker, names, words):
    breaker(fake_imagenet)
    with pytest.raises(imagenet.DataError) as e:
        layout, classes = load(fake_imagenet)
        imagenet.list_samples(layout, "val", classes)
    message = str(e.value)
    assert names in message and words in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- images
def _odd_images(folder):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (41, 53, 3), dtype=np.uint8)
    files = {}
    Image.fromarray(rgb).convert("CMYK").save(files.setdefault("cmyk", folder / "cmyk.JPEG"), "JPEG")
    Image.fromarray(rgb).convert("L").save(files.setdefault("gray", folder / "gray.JPEG"), "JPEG")
    Image.fromarray(rgb).save(files.setdefault("png_as_jpeg", folder / "png.JPEG"), "PNG")
    Image.fromarray(rgb).convert("P").save(files.setdefault("palette", folder / "palette.png"))
    Image.fromarray(rgb).convert("RGBA").save(files.setdefault("rgba", folder / "rgba.png"))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(files.setdefault("png16", folder / "16bit.png"))
    return files


@pytest.mark.parametrize("transform", [transforms.train_transform(32), transforms.eval_transform(32, 40)], ids=["train", "eval"])
def test_odd_images_load_as_rgb(tmp_path, transform):
    for kind, path in _odd_images(tmp_path).items():
        out = transform(str(path))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8, kind


def test_odd_images_keep_their_label(tmp_path):
    files = list(_odd_images(tmp_path).values())
    dataset = loaders.ImageNetDataset([(str(p), 7) for p in files], transforms.eval_transform(32, 40), train=False)
    assert [dataset[i][1:] for i in range(len(files))] == [(7, i, 0) for i in range(len(files))]


def _bad_files(folder):
    good = write_jpeg(folder / "good.JPEG")
    truncated = folder / "truncated.JPEG"
    truncated.write_bytes(good.read_bytes()[:300])
    empty = folder / "empty.JPEG"
    empty.write_bytes(b"")
    noise = folder / "noise.JPEG"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return good, [truncated, empty, noise]


def test_train_replaces_bad_files_counts_and_logs_each_once(tmp_path, caplog):
    good, bad = _bad_files(tmp_path)
    samples = [(str(p), 1) for p in bad] + [(str(good), 2)]
    dataset = loaders.ImageNetDataset(samples, transforms.train_transform(32), train=True)
    with caplog.at_level(logging.WARNING, logger="mnv2.data"):
        image, target, index, n_failed = dataset[0]
        assert (image.shape, target, index, n_failed) == ((3, 32, 32), 2, 0, 3)
        assert dataset[1][3] == 2 and dataset[3][3] == 0
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and all(any(str(p) in m for m in logged) for p in bad)


def test_train_stops_after_too_many_bad_files_in_a_row(tmp_path):
    _, bad = _bad_files(tmp_path)
    dataset = loaders.ImageNetDataset([(str(p), 0) for p in bad], transforms.train_transform(32), train=True,
                                   max_consecutive_failures=2)
    with pytest.raises(imagenet.DataError, match="3 images in a row failed"):
        dataset[0]


def test_eval_counts_bad_files_instead_of_dropping_them(tmp_path):
    good, bad = _bad_files(tmp_path)
    dataset = loaders.ImageNetDataset([(str(p), 5) for p in [good] + bad], transforms.eval_transform(32, 40), train=False)
    loader = loaders.build_loader(dataset, 2, loaders.EvalSampler(len(dataset)), num_workers=0)
    images, targets, indices, failed = (torch.cat(t) for t in zip(*loader))
    assert images.dtype == torch.uint8 and targets.dtype == indices.dtype == failed.dtype == torch.int64
    assert indices.tolist() == [0, 1, 2, 3] and failed.tolist() == [0, 1, 1, 1] and targets.tolist() == [5] * 4
    assert images[1:].sum() == 0 and images[0].sum() > 0


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    path = write_jpeg(tmp_path / "big.JPEG", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 2x over the limit: Pillow refuses
    dataset = loaders.ImageNetDataset([(str(path), 0)], transforms.eval_transform(32, 40), train=False)
    assert dataset[0][3] == 1


# ---------------------------------------------------------------------------------------------- transforms
ODD_SIZES = [(333, 251), (251, 333), (500, 375), (97, 131), (640, 257), (257, 901), (224, 224), (255, 256)]


@pytest.mark.parametrize("resize, crop, interpolation", [(256, 224, "bilinear"), (232, 224, "bilinear"),
                                                         (256, 224, "bicubic"), (160, 128, "bilinear")])
def test_eval_tensors_equal_torchvision_exactly(tmp_path, resize, crop, interpolation):
    """uint8 comparison, tolerance 0, on JPEGs of odd sizes (portrait, landscape, upsampled, tall)."""
    mode = T.InterpolationMode(interpolation)
    reference = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop), T.PILToTensor()])
    ours = transforms.eval_transform(crop, resize, interpolation)
    for k, size in enumerate(ODD_SIZES):
        path = tmp_path / f"{k}.JPEG"
        write_jpeg(path, size, seed=k)
        with Image.open(path) as im:
            expected = reference(im.convert("RGB"))
        assert torch.equal(ours(str(path)), expected), size


def test_normalize_matches_torchvision_float_pipeline_bit_for_bit(tmp_path):
    path = write_jpeg(tmp_path / "a.JPEG", (301, 203))
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
    with Image.open(path) as im:
        expected = reference(im.convert("RGB"))
    batch = transforms.eval_transform()(str(path))[None]
    out = transforms.normalize(batch, channels_last=True)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[0], expected)


def test_train_boxes_and_flips_equal_torchvision_with_the_same_seed():
    ours = transforms.TrainTransform(224)
    image = Image.new("RGB", (500, 375))
    for seed in range(200):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert ours.get_params(500, 375) == expected


def test_train_crop_distribution_matches_torchvision():
    """Independent draws: scale, aspect ratio and box centre of ours vs torchvision's get_params (KS test)."""
    ours, image = transforms.TrainTransform(224), Image.new("RGB", (500, 375))
    torch.manual_seed(1)
    a = np.array([ours.get_params(500, 375) for _ in range(3000)], dtype=float)
    torch.manual_seed(2)
    b = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)], dtype=float)

    def features(boxes):
        i, j, h, w = boxes.T
        return {"scale": h * w / (500 * 375), "log_ratio": np.log(w / h), "cx": j + w / 2, "cy": i + h / 2}
    fa, fb = features(a), features(b)
    for name in fa:
        assert stats.ks_2samp(fa[name], fb[name]).pvalue > 1e-3, name
    assert stats.ks_2samp(fa["scale"], fb["scale"] * 0.8).pvalue < 1e-6  # the test can tell a change


def test_train_flip_rate_is_one_half(tmp_path):
    path = write_jpeg(tmp_path / "a.JPEG", (64, 48))
    transform = transforms.TrainTransform(16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    torch.manual_seed(0)
    outs = [transform(str(path)) for _ in range(400)]
    flips = sum(not torch.equal(o, outs[0]) for o in outs)
    assert stats.binomtest(flips, 400, 0.5).pvalue > 1e-3


@pytest.mark.parametrize("fast_decoder", [True, False], ids=["simplejpeg", "pil"])
def test_train_crop_matches_torchvision_pixels_including_reduced_decoding(tmp_path, monkeypatch, fast_decoder):
    """Same seed, same box: our uint8 output is torchvision's RandomResizedCrop + flip within a few grey
    levels, also for a large photo where the JPEG is decoded at 1/2 or 1/4 scale."""
    if not fast_decoder:
        monkeypatch.setattr(transforms, "simplejpeg", None)
    elif transforms.simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    size = (1200, 900)
    smooth = Image.radial_gradient("L").resize(size, Image.BICUBIC)
    Image.merge("RGB", [smooth, smooth.transpose(Image.FLIP_LEFT_RIGHT), smooth.rotate(90).resize(size)]) \
        .save(tmp_path / "photo.JPEG", quality=95)
    reference = T.Compose([T.RandomResizedCrop(112, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])
    ours = transforms.TrainTransform(112, scale=(0.5, 1.0))
    for seed in range(6):
        torch.manual_seed(seed)
        with Image.open(tmp_path / "photo.JPEG") as im:
            expected = reference(im.convert("RGB")).float()
        torch.manual_seed(seed)
        got = ours(str(tmp_path / "photo.JPEG")).float()
        assert (got - expected).abs().mean() < 3, seed


# ---------------------------------------------------------------------------------------------- samplers
def test_eval_sampler_covers_every_image_exactly_once():
    for n, replicas in [(10, 3), (7, 4), (3, 5)]:
        shards = [list(loaders.EvalSampler(n, replicas, r)) for r in range(replicas)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert [len(loaders.EvalSampler(n, replicas, r)) for r in range(replicas)] == [len(s) for s in shards]


def test_train_sampler_pads_ranks_equally_and_reshuffles_each_epoch():
    samplers = [loaders.TrainSampler(10, 3, r, seed=4) for r in range(3)]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [4, 4, 4] and set().union(*map(set, shards)) == set(range(10))
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != shards


def test_train_sampler_resume_yields_exactly_the_unseen_rest():
    sampler = loaders.TrainSampler(20, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=7)
    state = sampler.state_dict()
    resumed = loaders.TrainSampler(20, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == full[7:] and len(resumed) == 13
    two = [loaders.TrainSampler(20, 2, r) for r in range(2)]  # a 1-process state read by 2 processes
    for s in two:
        s.load_state_dict(state)
    assert sorted(i for s in two for i in s) == sorted(full[6:])


def torchvision_ra_order(n, replicas, rank, reps, seed, epoch):
    """torchvision's RASampler (references/classification/sampler.py), written out from its description:
    a (seed + epoch) permutation, each index repeated reps times in a row, padded by wrapping to a
    multiple of the ranks, every replicas-th from rank, the first floor(n // 256 * 256 / replicas)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = [i for i in torch.randperm(n, generator=g).tolist() for _ in range(reps)]
    total = int(np.ceil(n * reps / replicas)) * replicas
    indices += indices[:total - len(indices)]
    return indices[rank:total:replicas][:int(np.floor(n // 256 * 256 / replicas))]


@pytest.mark.parametrize("n, replicas, reps", [(600, 1, 3), (600, 2, 4), (777, 3, 3), (300, 4, 2)])
def test_ra_sampler_equals_torchvisions(n, replicas, reps):
    for epoch in (0, 5):
        for rank in range(replicas):
            sampler = loaders.RASampler(n, replicas, rank, seed=7, repetitions=reps)
            sampler.set_epoch(epoch)
            assert list(sampler) == torchvision_ra_order(n, replicas, rank, reps, 7, epoch)
            assert len(sampler) == sampler.num_samples == n // 256 * 256 // replicas


def test_ra_sampler_sends_the_copies_of_an_image_to_different_ranks_and_keeps_small_sets():
    shards = [list(loaders.RASampler(40, 4, r, repetitions=4)) for r in range(4)]
    assert all(len(s) == 10 for s in shards)  # under 256 images the epoch is not rounded down to nothing
    assert shards[0] == shards[1] == shards[2] == shards[3]  # each rank augments its own copy of the same image


def test_ra_sampler_resume_yields_exactly_the_unseen_rest_also_on_another_world_size():
    sampler = loaders.RASampler(600, seed=3, repetitions=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=96)
    state = sampler.state_dict()
    resumed = loaders.RASampler(600, seed=0, repetitions=3)
    resumed.load_state_dict(state)
    assert list(resumed) == full[96:] and state["repetitions"] == 3
    two = [loaders.RASampler(600, 2, r, repetitions=3) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    assert [i for pair in zip(*two) for i in pair] == full[96:96 + 2 * len(two[0])]


# ---------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_dataset_reads_back_with_the_right_labels(tmp_path):
    from sklearn.datasets import load_digits

    root = demo.make_demo(tmp_path / "demo", train_per_class=3, val_per_class=2, image_size=16)
    assert (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").is_file()
    train, val, classes, layout = loaders.build_datasets(root, input_size=16, resize=16)
    assert layout.kind == "seed" and layout.val_flat and len(train) == 30 and len(val) == 20
    digits = load_digits()
    reference = digits.images.reshape(len(digits.images), -1) * (255 / 16)
    for split in (train, val):
        for path, label in split.samples:
            pixels = np.asarray(Image.open(path).convert("L").resize((8, 8), Image.BOX), dtype=float).ravel()
            nearest = digits.target[np.argmin(((reference - pixels) ** 2).sum(1))]
            assert classes.names[label] == f"digit {demo.DEMO_DIGITS[nearest]}", path
    devkit = imagenet.read_classes(layout, "devkit")
    assert devkit.wnids != classes.wnids
    again = demo.make_demo(tmp_path / "again", train_per_class=3, val_per_class=2, image_size=16)
    assert sorted(p.name for p in (again / "ILSVRC2012_img_val").iterdir()) == \
        sorted(p.name for p in (root / "ILSVRC2012_img_val").iterdir())
    assert (again / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read_text() == \
        (root / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read_text()


def test_loader_batches_are_uint8_images_and_int64_tensors(fake_imagenet):
    train, val, classes, _ = loaders.build_datasets(fake_imagenet["root"], input_size=24, resize=28)
    loader = loaders.build_loader(train, 4, loaders.TrainSampler(len(train)), num_workers=0)
    images, targets, indices, failed = next(iter(loader))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.uint8
    assert targets.dtype == indices.dtype == failed.dtype == torch.int64
    assert [train.samples[i][1] for i in indices] == targets.tolist()


# ---------------------------------------------------------------------------------------------- CLI
def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "read_ImageNetData.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_summary_and_list(fake_imagenet, capsys):
    data.main(data.get_args_parser().parse_args(["--data-dir", str(fake_imagenet["root"])]))
    out = capsys.readouterr().out
    assert "layout: seed" in out and "train: 6 images in 3 classes; missing 997" in out and "val: 6 images" in out
    data.main(data.get_args_parser().parse_args(["--data-dir", str(fake_imagenet["root"]), "--list", "val",
                                                 "--class-order", "devkit"]))
    lines = capsys.readouterr().out.splitlines()
    ids = fake_imagenet["ilsvrc_id"]
    assert lines == [f"ILSVRC2012_img_val/{p.name}\t{ids[w] - 1}\t{w}" for p, w in fake_imagenet["val"]]


def test_cli_check_lists_bad_images_and_fails(fake_imagenet, capsys):
    bad = fake_imagenet["train"][0][0]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(SystemExit) as e:
        data.main(data.get_args_parser().parse_args(["--data-dir", str(fake_imagenet["root"]), "--check",
                                                     "--workers", "1"]))
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "check: 1 unreadable image(s)" in out and str(bad) in out


@pytest.mark.parametrize("args", [["--class-order", "alphabetical"], ["--list", "test"], ["--workers", "0"],
                                  ["--data-dir", "/no/such/dir"], []])
def test_cli_bad_flags_exit_2(args):
    with pytest.raises(SystemExit) as e:
        data.main(data.get_args_parser().parse_args(["--data-dir", "."] * ("--data-dir" not in args and bool(args))
                                                    + args))
    assert e.value.code == 2


@pytest.mark.slow
def test_cli_data_error_is_one_line(fake_imagenet):
    fake_imagenet["meta_mat"].unlink()
    result = cli("--data-dir", fake_imagenet["root"])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "meta.mat" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_make_demo(tmp_path):
    result = cli("--make-demo", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "demo" / "ILSVRC2012_img_val").iterdir())) > 300


def test_without_devkit_a_complete_train_folder_gives_the_sorted_order(tmp_path):
    wnids = sorted(w for _, w, _, children in fake_synsets() if not children)
    for w in wnids:
        (tmp_path / "train" / w).mkdir(parents=True)
    write_jpeg(tmp_path / "train" / wnids[7] / "a.JPEG")
    layout = imagenet.find_layout(tmp_path)
    assert layout.meta_mat is None
    classes = imagenet.read_classes(layout, "sorted")
    assert classes.wnids == wnids
    assert labels_of(imagenet.list_samples(layout, "train", classes)) == {"a.JPEG": 7}
    with pytest.raises(imagenet.DataError, match="devkit needs|ILSVRC2012 IDs"):
        imagenet.read_classes(layout, "devkit")
    # One class folder fewer would shift every later label: refused, not guessed.
    shutil.rmtree(tmp_path / "train" / wnids[3])
    with pytest.raises(imagenet.DataError, match="999 <wnid>/ folders"):
        imagenet.read_classes(layout, "sorted")


def test_a_symbolic_link_loop_in_a_flat_val_folder_is_no_traceback(fake_imagenet):
    val = fake_imagenet["root"] / "ILSVRC2012_img_val"
    (val / "loop_a").symlink_to(val / "loop_b")
    (val / "loop_b").symlink_to(val / "loop_a")
    layout = imagenet.find_layout(fake_imagenet["root"])
    samples = imagenet.list_samples(layout, "val", imagenet.read_classes(layout))
    assert len(samples) == 6 and layout.val_flat  # the fixture's 6 val images; the links are no images


def test_each_draw_seed_follows_its_position_in_the_epoch_whatever_the_world_size_or_resume():
    SeededDraws, TrainSampler = loaders.SeededDraws, loaders.TrainSampler
    one = TrainSampler(10, seed=3)
    one.set_epoch(2)
    whole = list(SeededDraws(one))
    assert len({seed for _, seed in whole}) == 10  # every position its own seed
    ranks = []
    for rank in range(2):
        sampler = TrainSampler(10, num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(2)
        ranks.append(list(SeededDraws(sampler)))
    assert [pair for both in zip(*ranks) for pair in both] == whole  # rank r takes positions r, r + 2, ...
    one.set_epoch(2, skip=4)
    assert list(SeededDraws(one)) == whole[4:]  # a resumed epoch draws its rest with the same seeds
    one.set_epoch(3)
    assert [seed for _, seed in SeededDraws(one)] != [seed for _, seed in whole]  # a new epoch, new draws
