"""The GPU data backend (`train.py --data-backend gpu`): loader processes only read file bytes and draw the
crop; JPEGs are decoded on the GPU in batches (nvJPEG, through TorchCodec's decode_jpeg: one call per batch)
and cropped, resized and flipped there as one batched crop-and-resize.

    loader = DeviceLoader(build_loader(device_dataset(train_set, "train"), ...), Decoder(224, device, ...))

What stays where it was:
  * the draws: RandomResizedCrop's box and the flip come from the loader process's torch generator in the
    same calls and order as `read_ImageNetData.TrainTransform` makes them, so a seeded run crops the same
    boxes on either backend; evaluation's Resize + CenterCrop box is computed as `EvalTransform`'s;
  * the failure rules: a file the loader process cannot open (empty, not an image, a decompression bomb by
    Pillow's limit) is replaced and counted there, as on the CPU backend; a file Pillow reads but nvjpeg
    should not (PNG named .JPEG, CMYK, 16-bit, palette) is decoded by Pillow in the loader process (the CPU
    backend's decoding) and travels decoded; a JPEG that nvjpeg then fails on (a damaged file) is decoded by
    Pillow in this process, and if that fails too it is a counted failure: replaced by the CPU backend's
    next good sample in training, a counted miss in evaluation;
  * the batches: uint8 [B, 3, S, S] with targets, indices and failure counts, as `build_loader`'s, so the
    training and evaluation loops do not change.

`crop_resize` runs on CPU tensors as well, which is how the suite compares it with the CPU backend.
Its resampling is bilinear, and where it shrinks it averages a grid of bilinear samples per output pixel
(torchvision.ops.roi_align with its adaptive sampling), where the CPU backend uses Pillow-style
antialiasing (and, in training, libjpeg's reduced-scale decoding): the pixels agree closely, not exactly
(tests/test_gpu_data.py states the bounds). On the CPU, the JPEG decoding here is libjpeg's, file by file.

EXIF orientation is not applied, on either backend: Pillow (the CPU backend, and the torchvision and timm
pipelines every public ImageNet score was measured with) leaves it alone, while TorchCodec always applies
it. The loader process therefore drops a JPEG's EXIF segment before its bytes travel (`without_exif`), so
both backends decode the same upright-as-stored pixels and the crop box drawn on Pillow's width and height
stays right.
"""
import io
import math
import queue
import threading

import torch
from PIL import Image

from mnv2.data.transforms import EvalTransform, TrainTransform, decode_rgb

# What a loader process hands over for one image
JPEG, DECODED, FINISHED = 0, 1, 2  # bytes for the device decoder; a uint8 [3,H,W] image; a uint8 [3,S,S] crop
# geometry row: the box (x1, y1, x2, y2) in source pixels, the rectangle outside which edge pixels repeat
# (train: the box itself, as a crop-then-resize sees it; eval: the image), and the flip
GEOMETRY = 9


class DeviceRead:
    """Transform for `ImageNetDataset` on the GPU backend: path -> (payload, kind, geometry [9]).

    Opens the file with Pillow (the header only), which applies Pillow's decompression-bomb limit and
    raises for what is not an image, so the dataset replaces and counts such files as on the CPU backend.
    Baseline and progressive JPEGs in RGB or greyscale travel as bytes; everything else is decoded here
    by Pillow as the CPU backend decodes it.
    """

    def __init__(self, cpu_transform):
        if not isinstance(cpu_transform, (TrainTransform, EvalTransform)):
            raise TypeError(f"DeviceRead follows a TrainTransform or EvalTransform, not {type(cpu_transform).__name__}")
        self.cpu_transform = cpu_transform
        self.input_size = cpu_transform.input_size  # ImageNetDataset's blank image for a failed eval file

    def __call__(self, path):
        if isinstance(path, (bytes, bytearray)):  # a member of a shard or an archive, already read
            data = bytes(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
        im = Image.open(io.BytesIO(data))  # Pillow's decompression-bomb check happens here
        width, height = im.size
        geometry = self.geometry(width, height)
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return torch.frombuffer(bytearray(without_exif(data)), dtype=torch.uint8), JPEG, geometry
        return decode_rgb(im), DECODED, geometry

    def geometry(self, width, height):
        t = self.cpu_transform
        if isinstance(t, TrainTransform):
            # RandomResizedCrop's box, then the flip: the same draws, in the same order, as TrainTransform
            i, j, h, w = t.get_params(width, height)
            flip = bool(torch.rand(1) < t.hflip)
            return torch.tensor([j, i, j + w, i + h, j, i, j + w, i + h, flip], dtype=torch.float64)
        x1, y1, x2, y2 = eval_box(width, height, t.resize, t.input_size)
        return torch.tensor([x1, y1, x2, y2, 0, 0, width, height, 0], dtype=torch.float64)


def without_exif(data):
    """JPEG bytes `data` without their EXIF (APP1 "Exif") segments, so no decoder rotates the image by its
    orientation tag; everything else, pixels included, byte for byte. `data` itself when it has none or
    its markers cannot be followed (the decoder then judges the file)."""
    if data[:2] != b"\xff\xd8":
        return data
    kept, pos, dropped = [data[:2]], 2, False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker < 0xC0 or 0xD0 <= marker <= 0xDA:
            break  # start of scan (or a marker without a length): the rest is kept as it is
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data):
            return data
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
    return b"".join(kept) + data[pos:] if dropped else data


def eval_box(width, height, resize, crop):
    """The source rectangle that Resize(resize) + CenterCrop(crop) keep, in source pixel coordinates."""
    new_w, new_h = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def collate(samples):
    """Loader batches of raw samples: (payloads, kinds, geometry [B, 9], targets, indices, n_failed). An
    evaluation file that failed in the loader process comes as the dataset's blank image (FINISHED)."""
    raw = [s[0] if isinstance(s[0], tuple) else (s[0], FINISHED, torch.zeros(GEOMETRY, dtype=torch.float64))
           for s in samples]
    payloads = [r[0] for r in raw]
    kinds = torch.tensor([r[1] for r in raw], dtype=torch.int64)
    geometry = torch.stack([r[2] for r in raw])
    targets = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    failed = torch.tensor([s[3] for s in samples], dtype=torch.int64)
    return payloads, kinds, geometry, targets, indices, failed


def device_dataset(dataset):
    """A copy of an `ImageNetDataset` (same samples and failure rules) that hands over raw samples
    (`DeviceRead`) instead of crops; use it with `collate`."""
    clone = type(dataset).__new__(type(dataset))
    clone.__dict__.update(dataset.__dict__)
    clone._logged = set()
    clone.transform = DeviceRead(dataset.transform)
    return clone


# --------------------------------------------------------------------------------------------------
# The batched crop-and-resize


def _shelf_pack(heights, widths):
    """Places rectangles on shelves of one canvas: ([(y, x)], canvas height, canvas width)."""
    area = sum(h * w for h, w in zip(heights, widths))
    canvas_w = max(max(widths), math.ceil(math.sqrt(area * 1.25)))
    order = sorted(range(len(heights)), key=lambda k: -heights[k])
    places = [None] * len(heights)
    y = x = shelf = 0
    for k in order:
        if x + widths[k] > canvas_w:
            y, x, shelf = y + shelf, 0, 0
        places[k] = (y, x)
        x += widths[k]
        shelf = max(shelf, heights[k])
    return places, y + shelf, canvas_w


def crop_resize(images, geometry, size, gather=None):
    """uint8 [B, 3, size, size]: each image's box resized to size x size (bilinear; shrinking averages
    roi_align's adaptive grid of samples per output pixel) and flipped where asked, as one batched operation.

    `images`: uint8 [3, H, W] tensors on one device (CPU or GPU); `geometry`: float [B, 9] rows of
    (x1, y1, x2, y2, clamp x0, y0, x1, y1, flip) in source pixels (pixel k spans [k, k + 1)). Outside the
    clamp rectangle the edge pixels repeat, so a training crop resizes as if cut out first (as the CPU
    backend does) and an evaluation box reads its true neighbours.

    The boxes, with a pixel of margin, are gathered from all images into one canvas, and one roi_align
    call resizes them all. `gather` (default: on CUDA) fills the canvas with one index operation over all
    images, a fixed number of kernels whatever the batch; otherwise one copy per image fills it, which on
    the CPU is several times faster. Both give the same canvas.
    """
    from torchvision.ops import roi_align

    device = images[0].device
    geo = geometry.tolist()  # host numbers from the loader: no device sync
    n = len(images)
    r0 = [math.floor(g[1]) - 1 for g in geo]
    c0 = [math.floor(g[0]) - 1 for g in geo]
    heights = [math.ceil(g[3]) + 1 - r for g, r in zip(geo, r0)]
    widths = [math.ceil(g[2]) + 1 - c for g, c in zip(geo, c0)]
    places, canvas_h, canvas_w = _shelf_pack(heights, widths)
    if gather is None:
        gather = device.type == "cuda"
    canvas = (_gathered if gather else _copied)(images, geo, r0, c0, heights, widths, places, canvas_h, canvas_w)

    boxes = torch.tensor([[0.0, places[k][1] + geo[k][0] - c0[k], places[k][0] + geo[k][1] - r0[k],
                           places[k][1] + geo[k][2] - c0[k], places[k][0] + geo[k][3] - r0[k]] for k in range(n)],
                         dtype=torch.float32).to(device, non_blocking=True)
    out = roi_align(canvas.view(1, 3, canvas_h, canvas_w), boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                    aligned=True)
    flips = geometry[:, 8].to(device, non_blocking=True).bool().view(-1, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _copied(images, geo, r0, c0, heights, widths, places, canvas_h, canvas_w):
    """The canvas filled image by image (edge pixels repeated outside each clamp rectangle)."""
    canvas = torch.zeros(3, canvas_h, canvas_w, dtype=torch.float32, device=images[0].device)
    for k, image in enumerate(images):
        g = geo[k]
        rows = torch.arange(r0[k], r0[k] + heights[k]).clamp_(int(g[5]), math.ceil(g[7]) - 1)
        cols = torch.arange(c0[k], c0[k] + widths[k]).clamp_(int(g[4]), math.ceil(g[6]) - 1)
        region = image.index_select(1, rows.to(image.device)).index_select(2, cols.to(image.device))
        y, x = places[k]
        canvas[:, y:y + heights[k], x:x + widths[k]] = region
    return canvas.view(3, -1)


def _gathered(images, geo, r0, c0, heights, widths, places, canvas_h, canvas_w):
    """The canvas filled by one gather over all images' pixels (edge pixels repeated as in `_copied`)."""
    device, n = images[0].device, len(images)
    # Per image: region origin and size, clamp rectangle, source shape and offset, place on the canvas
    sizes = [img.shape[1] * img.shape[2] for img in images]
    bases = [0]
    for s in sizes[:-1]:
        bases.append(bases[-1] + 3 * s)
    table = torch.tensor([[r0[k], c0[k], heights[k], widths[k], int(geo[k][5]), int(geo[k][4]),
                           int(math.ceil(geo[k][7])), int(math.ceil(geo[k][6])), images[k].shape[2], sizes[k],
                           bases[k], places[k][0], places[k][1]] for k in range(n)], dtype=torch.int64)
    table = table.to(device, non_blocking=True)
    (row0, col0, height, width, y_lo, x_lo, y_hi, x_hi, src_w, plane, base, place_y, place_x) = table.unbind(1)
    counts = height * width
    total = sum(h * w for h, w in zip(heights, widths))  # known on the host: no sync for the output size
    item = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=total)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - start[item]
    rr, cc = local // width[item], local % width[item]
    src_r = torch.minimum(torch.maximum(row0[item] + rr, y_lo[item]), y_hi[item] - 1)
    src_c = torch.minimum(torch.maximum(col0[item] + cc, x_lo[item]), x_hi[item] - 1)
    src = base[item] + src_r * src_w[item] + src_c
    dst = (place_y[item] + rr) * canvas_w + place_x[item] + cc
    del local, rr, cc, src_r, src_c
    flat = torch.cat([img.reshape(-1) for img in images])
    canvas = torch.zeros(3, canvas_h * canvas_w, dtype=torch.float32, device=device)
    for c in range(3):
        canvas[c, dst] = flat[src + c * plane[item]].float()
    del item, src, dst, flat
    return canvas


# --------------------------------------------------------------------------------------------------
# Decoding


class Decoder:
    """Loader batch (`collate`'s) -> (uint8 [B, 3, S, S] on `device`, targets, indices, n_failed).

    `fallback`: the CPU backend's dataset (training: a damaged JPEG found here is replaced by its next
    good sample, as the CPU backend would; None in evaluation, where it is a counted miss).
    """

    def __init__(self, size, device, fallback=None, log=None):
        self.size, self.device, self.fallback = int(size), torch.device(device), fallback
        self.log = log or (lambda message: None)

    def decode_jpegs(self, datas):
        """Decoded uint8 [3, H, W] images on the device, or None for a file that did not decode."""
        if not datas:
            return []
        try:
            from torchcodec.decoders import decode_jpeg
        except ImportError:
            raise RuntimeError("the GPU data backend decodes with TorchCodec: pip install torchcodec") from None
        if self.device.type == "cuda":
            try:  # one batched nvJPEG call; a file it refuses makes the whole call fail, then file by file
                return list(decode_jpeg(list(datas), mode="RGB", device=self.device))
            except RuntimeError:
                pass
        images = []
        for data in datas:
            try:
                image = decode_jpeg(data, mode="RGB", device=self.device)
            except RuntimeError:
                try:  # the CPU backend's decoder
                    image = decode_rgb(Image.open(io.BytesIO(data.numpy().tobytes()))).to(self.device)
                except Exception as e:  # any decoder error, as the CPU backend counts it
                    self.log(f"unreadable image: {type(e).__name__}: {e}")
                    image = None
            images.append(image)
        return images

    def __call__(self, batch):
        payloads, kinds, geometry, targets, indices, failed = batch
        kinds, failed = kinds.tolist(), failed.clone()
        jpeg_slots = [k for k, kind in enumerate(kinds) if kind == JPEG]
        images = dict(zip(jpeg_slots, self.decode_jpegs([payloads[k] for k in jpeg_slots])))
        for k, kind in enumerate(kinds):
            if kind == DECODED:
                images[k] = payloads[k].to(self.device, non_blocking=True)
        finished = {k: payloads[k] for k, kind in enumerate(kinds) if kind == FINISHED}
        for k in [k for k, image in images.items() if image is None]:
            del images[k]
            finished[k], extra = self._replace(int(indices[k]))
            failed[k] += extra
        out = torch.empty(len(kinds), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        if images:
            slots = sorted(images)
            out[slots] = crop_resize([images[k] for k in slots], geometry[slots], self.size)
        for k, crop in finished.items():
            out[k] = crop.to(self.device, non_blocking=True)
        return out, targets, indices, failed

    def _replace(self, index):
        """(uint8 crop, failures) for a sample whose JPEG neither decoder read."""
        if self.fallback is None:  # evaluation: a counted miss, never dropped
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), 1
        # The CPU backend's next sample, drawn from a generator of its own so that this process's
        # stream (dropout, mixup) is the same as when nothing failed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(index)
            crop, _, _, n_failed = self.fallback[(index + 1) % len(self.fallback)]
        return crop, 1 + n_failed


class DeviceLoader:
    """Iterates a loader of raw samples and yields decoded batches on the device, as `build_loader`'s.

    With `prefetch` (the default on CUDA) a thread decodes the next batches on a CUDA stream of its own
    while the training step runs; the step's stream waits for them on the device, not on the host.
    """

    def __init__(self, loader, decoder, prefetch=None, depth=2):
        self.loader, self.decoder, self.depth = loader, decoder, depth
        self.prefetch = decoder.device.type == "cuda" if prefetch is None else prefetch

    def __len__(self):
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    def __iter__(self):
        batches = iter(self.loader)
        if self.prefetch:
            return _Prefetched(batches, self.decoder, self.depth)
        return _Decoded(batches, self.decoder)


class _Decoded:
    def __init__(self, batches, decoder):
        self.batches, self.decoder = batches, decoder

    @property
    def _workers(self):  # train.py tells a dead loader process by these
        return getattr(self.batches, "_workers", None)

    def __iter__(self):
        return self

    def __next__(self):
        return self.decoder(next(self.batches))


_END = object()


class _Prefetched(_Decoded):
    def __init__(self, batches, decoder, depth):
        super().__init__(batches, decoder)
        self.queue, self.closing = queue.Queue(depth), threading.Event()
        device = decoder.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The thread holds the loader iterator but not this object, so dropping this object (the end of an
        # epoch, a preemption, an error) stops the thread, and with it the loader processes.
        self.thread = threading.Thread(target=_produce, args=(batches, decoder, stream, self.queue, self.closing),
                                       name="gpu_data decode", daemon=True)
        self.thread.start()

    def __next__(self):
        if self.closing.is_set():
            raise StopIteration
        item = self.queue.get()
        if item is _END:
            self.closing.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self.closing.set()
            raise item
        out, event = item
        if event is not None:
            current = torch.cuda.current_stream(self.decoder.device)
            current.wait_event(event)
            out[0].record_stream(current)  # made on the decode stream, used and freed on this one
        return out

    def close(self):
        self.closing.set()
        self.thread.join(timeout=30)

    def __del__(self):
        self.closing.set()


def _produce(batches, decoder, stream, out, closing):
    """The prefetching thread: decoded batches (with the event that marks them done on `stream`) into `out`,
    then _END or the exception that ended it; gives up when `closing` is set."""
    def put(item):
        while not closing.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            for batch in batches:
                decoded = decoder(batch)
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                if not put((decoded, event)):
                    return
        put(_END)
    except BaseException as e:  # handed to the consumer, which raises it where it waits
        put(e)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
