"""The GPU data backend (`gpu_data.py`) on the CPU: the same draws as the CPU backend, the batched
crop-and-resize against the CPU backend's pixels (bounds stated below), odd and broken files, the
prefetching thread, and `train.py --data-backend gpu` end to end.

    python -m pytest tests/test_gpu_data.py -q

Bounds, in grey levels (0-255), measured on smooth JPEGs with a sharp edge, 150-500 px:
  * training crops vs an exact antialiased resize of the same box (torch's bilinear, antialias=True, on
    the fully decoded image): mean |diff| <= 1.5 at 64 px, <= 0.5 at 224 px (measured 0.95 and 0.12);
  * training crops vs the CPU backend (libjpeg's reduced-scale decoding and fast IDCT there): mean
    <= 6 at 64 px, <= 3 at 224 px (measured 4.6 and 2.0: most of it is the CPU backend's own shortcuts,
    which differ from the exact resize by 4.4 and 2.0);
  * evaluation vs the CPU backend (bit-identical to torchvision's Resize + CenterCrop): mean <= 0.5,
    99th percentile <= 2 (measured 0.25 and 1).
"""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers
import train
from mnv2.data import gpu_decode as gpu_data
from mnv2.data import loaders
from mnv2.data.transforms import EvalTransform, TrainTransform, decode_rgb


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth JPEGs with a sharp white band (an edge), 150-500 px a side."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(16):
        h, w = (int(v) for v in rng.integers(150, 500, 2))
        blobs = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        pixels = np.array(Image.fromarray(blobs).resize((w, h), Image.BICUBIC))
        pixels[h // 3:h // 3 + 20] = 255
        path = folder / f"{k}.JPEG"
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    return paths


def raw_batch(paths, transform, seed=1):
    read = gpu_data.DeviceRead(transform)
    torch.manual_seed(seed)
    return gpu_data.collate([(read(p), 0, k, 0) for k, p in enumerate(paths)])


def cpu_backend(paths, transform, seed=1):
    torch.manual_seed(seed)
    return torch.stack([transform(p) for p in paths])


def mean_diff(a, b):
    return (a.int() - b.int()).abs().float().mean().item()


def test_the_loader_draws_the_cpu_backends_boxes_and_flips(photos):
    transform = TrainTransform(64)
    _, _, geometry, *_ = raw_batch(photos, transform, seed=5)
    torch.manual_seed(5)
    for path, row in zip(photos, geometry.tolist()):
        width, height = Image.open(path).size
        i, j, h, w = transform.get_params(width, height)
        flip = bool(torch.rand(1) < transform.hflip)
        assert row == [j, i, j + w, i + h, j, i, j + w, i + h, float(flip)]
    assert 0 < geometry[:, 8].sum() < len(photos)  # both ways drawn


@pytest.mark.parametrize("size, exact_bound, cpu_bound", [(64, 1.5, 6.0), (224, 0.5, 3.0)])
def test_training_crops_agree_with_an_exact_resize_and_the_cpu_backend(photos, size, exact_bound, cpu_bound):
    transform = TrainTransform(size)
    batch = raw_batch(photos, transform)
    out = gpu_data.Decoder(size, "cpu")(batch)[0]
    exact = []
    for path, row in zip(photos, batch[2].tolist()):
        x1, y1, x2, y2 = (int(v) for v in row[:4])
        box = decode_rgb(str(path))[None, :, y1:y2, x1:x2].float()
        pixels = F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        exact.append(pixels.flip(-1) if row[8] else pixels)
    assert out.shape == (len(photos), 3, size, size) and out.dtype == torch.uint8
    assert mean_diff(out, torch.stack(exact)) <= exact_bound
    assert mean_diff(out, cpu_backend(photos, transform)) <= cpu_bound


def test_evaluation_crops_agree_with_torchvisions_resize_and_centre_crop(photos):
    transform = EvalTransform(224, 256)
    out = gpu_data.Decoder(224, "cpu")(raw_batch(photos, transform))[0]
    diff = (out.int() - cpu_backend(photos, transform).int()).abs().float()
    assert diff.mean() <= 0.5 and diff.flatten().quantile(0.99) <= 2


def test_an_upscaled_box_is_plain_bilinear_with_the_edges_of_a_cut_out_crop():
    # Boxes smaller than the output: one bilinear sample per pixel, exactly F.interpolate on the crop cut
    # out first (edge pixels repeat at the box's border, not the image's neighbours).
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((40, 50), (33, 21))]
    boxes = [(5, 7, 25, 37), (0, 3, 21, 19)]  # x1, y1, x2, y2
    geometry = torch.tensor([[*b, *b, 0] for b in boxes], dtype=torch.float64)
    out = gpu_data.crop_resize(images, geometry, 48)
    for image, (x1, y1, x2, y2), got in zip(images, boxes, out):
        want = F.interpolate(image[None, :, y1:y2, x1:x2].float(), size=(48, 48), mode="bilinear",
                             align_corners=False)[0]
        assert (got.float() - want).abs().max() <= 0.5 + 1e-3  # rounding only


def test_the_one_gather_canvas_equals_the_image_by_image_one(photos):
    # The CUDA default (one gather over all pixels) against the CPU default (a copy per image), on the CPU.
    transform = TrainTransform(64)
    _, _, geometry, *_ = raw_batch(photos, transform)
    images = [decode_rgb(str(p)) for p in photos]
    eval_geometry = raw_batch(photos, EvalTransform(64, 73))[2]
    for rows in (geometry, eval_geometry):
        assert torch.equal(gpu_data.crop_resize(images, rows, 64, gather=True),
                           gpu_data.crop_resize(images, rows, 64, gather=False))


def test_a_flip_mirrors_the_crop_exactly(photos):
    images = [decode_rgb(str(p)) for p in photos[:4]]
    rows = [[10, 20, 110, 90, 10, 20, 110, 90, flip] for flip in (0, 0, 0, 0)]
    plain = gpu_data.crop_resize(images, torch.tensor(rows, dtype=torch.float64), 32)
    for row in rows:
        row[8] = 1
    flipped = gpu_data.crop_resize(images, torch.tensor(rows, dtype=torch.float64), 32)
    assert torch.equal(flipped, plain.flip(-1))


def write_odd(path, kind, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (29, 37, 3), dtype=np.uint8)
    if kind == "png_as_jpeg":
        Image.fromarray(rgb).save(path, "PNG")
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, "JPEG")
    elif kind == "grayscale":
        Image.fromarray(rgb[..., 0]).save(path, "JPEG")
    elif kind == "truncated":  # the header is fine, the data stops: only the decoder can tell
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 500, dtype=np.uint8).tobytes())


GOOD_ODD, BAD = ["png_as_jpeg", "cmyk", "grayscale"], ["truncated", "empty", "random"]


def device_loader(dataset, train_set=None, size=32):
    loader = loaders.build_loader(gpu_data.device_dataset(dataset), 4, loaders.EvalSampler(len(dataset)), num_workers=0,
                               pin_memory=False, collate_fn=gpu_data.collate)
    return gpu_data.DeviceLoader(loader, gpu_data.Decoder(size, "cpu", fallback=train_set), prefetch=False)


def test_odd_files_decode_as_rgb_and_broken_ones_are_counted_as_on_the_cpu_backend(fake_imagenet_factory):
    info = fake_imagenet_factory(num_image_classes=3, train_per_class=4, num_val=6)
    for k, kind in enumerate(GOOD_ODD + BAD):
        write_odd(info["train"][k][0], kind, seed=k)
        write_odd(info["val"][k][0], kind, seed=k)
    train_set, val_set, classes, _ = loaders.build_datasets(info["root"], input_size=32, resize=36)
    index = classes.index_of()
    # evaluation: every file scored, the three broken ones as counted misses with their own labels
    images, targets, indices, failed = (torch.cat(t) for t in zip(*device_loader(val_set)))
    expected = {str(path): index[wnid] for path, wnid in info["val"]}
    assert {val_set.samples[i][0]: t for i, t in zip(indices.tolist(), targets.tolist())} == expected
    broken = {str(info["val"][k][0]) for k in range(len(GOOD_ODD), len(GOOD_ODD) + len(BAD))}
    assert {val_set.samples[i][0] for i in indices[failed > 0].tolist()} == broken
    for k in range(len(indices)):
        if failed[k]:
            assert images[k].max() == 0
        else:
            assert images[k].float().std() > 5  # a real picture, not a fill
    # training: the broken ones replaced by good images and counted (empty and random bytes in the
    # loader process, the truncated JPEG in the decoder)
    train_set.transform = TrainTransform(32)
    images, targets, indices, failed = (torch.cat(t) for t in zip(*device_loader(train_set, train_set)))
    assert len(images) == len(train_set) and failed.sum() >= len(BAD)
    assert all(images[k].float().std() > 5 for k in range(len(images)))


def test_the_prefetching_thread_yields_the_same_batches_and_passes_errors_on(photos):
    class Files(torch.utils.data.Dataset):
        def __init__(self, paths):
            self.read = gpu_data.DeviceRead(TrainTransform(32))
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, k):
            if self.paths[k] is None:
                raise ValueError("no such file")
            return self.read(self.paths[k]), 0, k, 0

    def batches(paths, prefetch):
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(Files(paths), batch_size=4, collate_fn=gpu_data.collate)
        return list(gpu_data.DeviceLoader(loader, gpu_data.Decoder(32, "cpu"), prefetch=prefetch))

    threaded, plain = batches(photos[:8], True), batches(photos[:8], False)
    assert len(threaded) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(threaded, plain))
    with pytest.raises(ValueError, match="no such file"):
        batches(photos[:4] + [None], True)
    # dropped after one batch (a preempted epoch): the thread stops instead of holding the loader
    loader = torch.utils.data.DataLoader(Files(photos[:16]), batch_size=2, collate_fn=gpu_data.collate)
    first = iter(gpu_data.DeviceLoader(loader, gpu_data.Decoder(32, "cpu"), prefetch=True, depth=1))
    next(first)
    thread = first.thread
    del first
    thread.join(timeout=10)
    assert not thread.is_alive()


def parse(data_dir, out, *extra):
    return train.get_args_parser().parse_args(
        ["--data-dir", str(data_dir), "--save-path", str(out), "--batch-size", "8", "--num-epochs", "1",
         "--width-mult", "0.25", "--input-size", "32", "--num-workers", "1", "--print-freq", "100",
         "--device", "cpu", *extra])


@pytest.mark.slow
def test_train_with_the_gpu_backend_on_the_cpu_trains_and_resumes_exactly(demo_data, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert helpers.run_main(train, parse(demo_data, straight, "--data-backend", "gpu", "--num-epochs", "2")) == 0
    assert "data backend gpu: loader processes read the files" in capsys.readouterr().out
    assert helpers.run_main(train, parse(demo_data, split, "--data-backend", "gpu")) == 0
    assert helpers.run_main(train, parse(demo_data, split, "--data-backend", "gpu", "--num-epochs", "2",
                                         "--resume", "auto")) == 0
    a, b = helpers.load_checkpoint(straight / "last.pth"), helpers.load_checkpoint(split / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"][-1]["train_loss"] == b["metrics"][-1]["train_loss"]
    assert a["metrics"][-1]["val_top1"] == b["metrics"][-1]["val_top1"]


@pytest.mark.parametrize("flags, message", [
    (["--auto-augment", "ta_wide"], "--data-backend gpu"),
    (["--interpolation", "bicubic"], "--data-backend gpu"),
])
def test_what_the_gpu_backend_cannot_do_is_one_line(demo_data, tmp_path, capsys, flags, message):
    assert helpers.run_main(train, parse(demo_data, tmp_path, "--data-backend", "gpu", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and flags[0] in err[0]


def test_exif_orientation_is_ignored_on_both_backends_as_pillow_reads_imagenet(tmp_path):
    """TorchCodec applies a JPEG's EXIF orientation; Pillow (the CPU backend, torchvision's and timm's
    pipelines) does not. The GPU backend drops the EXIF segment, so both decode the stored pixels."""
    rng = np.random.default_rng(1)
    pixels = np.array(Image.fromarray(rng.integers(0, 256, (6, 10, 3)).astype(np.uint8)).resize((100, 60)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.JPEG"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    data = path.read_bytes()
    stripped = gpu_data.without_exif(data)
    assert b"Exif\x00\x00" in data and b"Exif\x00\x00" not in stripped and len(stripped) < len(data)
    assert gpu_data.without_exif(stripped) == stripped  # nothing else changes
    plain = tmp_path / "plain.JPEG"
    Image.fromarray(pixels).save(plain, quality=95)
    assert gpu_data.without_exif(plain.read_bytes()) == plain.read_bytes()

    payload, kind, _ = gpu_data.DeviceRead(EvalTransform(48, 48))(path)
    assert kind == gpu_data.JPEG
    decoded = gpu_data.Decoder(48, "cpu").decode_jpegs([payload])[0]
    assert decoded.shape == (3, 60, 100) and torch.equal(decoded, decode_rgb(path))
    # and end to end: the evaluation crop equals the CPU backend's
    batch = gpu_data.collate([(gpu_data.DeviceRead(EvalTransform(48, 48))(path), 0, 0, 0)])
    assert mean_diff(gpu_data.Decoder(48, "cpu")(batch)[0][0], EvalTransform(48, 48)(path)) <= 0.5
