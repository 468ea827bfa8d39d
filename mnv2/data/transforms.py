"""From an image file to a uint8 CHW tensor: decoding, the training crop, the evaluation resize and crop."""
import io
import math
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

try:  # optional: decodes JPEGs for training faster than PIL; PIL does everything without it
    import simplejpeg
except ImportError:
    simplejpeg = None

# ImageNet's per-channel mean and std on 0..1 RGB, as torchvision and every public weight file use them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

def _open(src):
    """A lazily decoded PIL image of a path, a file's bytes (a member of a shard) or a PIL image; ImageNet
    holds CMYK, grayscale and PNG-in-.JPEG files, all opened by content."""
    if isinstance(src, Image.Image):
        return src
    return Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)


def _to_rgb(im):
    if im.mode.startswith("I;16"):
        # 16-bit greyscale (PNG): keep the top 8 bits; convert() would clip every value above 255 to white
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    # convert() also decodes; for RGB files load() avoids convert()'s full copy
    if im.mode != "RGB":
        return im.convert("RGB")
    im.load()
    return im


def _to_tensor(im):
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def decode_rgb(src):
    """uint8 [3, H, W] of a path or PIL image, decoded by Pillow as RGB (CMYK, greyscale, palette, 16-bit too)."""
    return _to_tensor(_to_rgb(_open(src))).contiguous()


def _decode_jpeg_reduced(data, width, height, reduce):
    """HWC uint8 array of a JPEG decoded straight by libjpeg-turbo (simplejpeg) at about 1/reduce scale, or
    None when simplejpeg is missing or declines the file (CMYK, recoverable damage): then PIL decodes it.

    Faster than PIL here: no RGB->RGBX->RGB repacking, and the fast IDCT and chroma upsampling, whose
    differences (about one grey level) are far below what the augmentation changes anyway.
    """
    if simplejpeg is None:
        return None
    try:
        return simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True,
                                      min_height=-(-height // reduce), min_width=-(-width // reduce))
    except ValueError:
        return None


def _jpeg_size(data):
    """(width, height) from a JPEG header without decoding, or None (not a JPEG, or simplejpeg missing)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":  # judged by content: ImageNet has PNGs named .JPEG
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _refuse_bomb(width, height):
    """Pillow's decompression-bomb rule for images that Pillow does not open: over twice
    Image.MAX_IMAGE_PIXELS is refused (a small file can declare gigapixels)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise Image.DecompressionBombError(f"image size ({width * height} pixels) exceeds limit of "
                                           f"{2 * limit} pixels, could be decompression bomb DOS attack")


class TrainTransform:
    """RandomResizedCrop + horizontal flip with torchvision's sampling, decoding JPEGs at reduced scale.

    The crop box and flip come from torch's global RNG in the same draws and order as torchvision's
    RandomResizedCrop.get_params and RandomHorizontalFlip, so seeded runs sample identical boxes. When the
    box is at least 2x/4x/8x the output size, libjpeg decodes at 1/2, 1/4 or 1/8 scale (its DCT scaling:
    still a downscale, so no detail the output could show is lost), and box edges move by under one
    reduced pixel. Resizing uses torch's antialiased uint8 kernel, within one grey level of PIL's.
    """

    def __init__(self, input_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.input_size = int(input_size)
        self.scale, self.ratio, self.hflip, self.interpolation = tuple(scale), tuple(ratio), hflip, interpolation
        # float32 like torchvision's torch.log(torch.tensor(ratio)), so the same draws give the same boxes
        self._log_ratio = torch.log(torch.tensor(ratio)).tolist()
        self.drawn = None

    def get_params(self, width, height):
        """(top, left, height, width) of the crop, drawn exactly as RandomResizedCrop.get_params."""
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(self._log_ratio[0], self._log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, src):
        data = None
        if isinstance(src, Image.Image):
            im, size = src, src.size
        else:
            if isinstance(src, (bytes, bytearray)):
                data = bytes(src)
            else:
                with open(src, "rb") as f:
                    data = f.read()
            size = _jpeg_size(data)
            if size:
                _refuse_bomb(*size)  # libjpeg would decode it: Pillow's limit has to be applied here
            im = None if size else Image.open(io.BytesIO(data))
            size = size or im.size
        width, height = size
        i, j, h, w = self.get_params(width, height)
        reduce = next(s for s in (8, 4, 2, 1) if s == 1 or min(h, w) >= s * self.input_size)
        pixels = _decode_jpeg_reduced(data, width, height, reduce) if im is None else None
        if pixels is not None:
            scale = width / pixels.shape[1]
            pixels = torch.from_numpy(pixels)
        else:
            im = im or Image.open(io.BytesIO(data))
            drafted = im.draft(None, (width // reduce, height // reduce)) if reduce > 1 and im.format == "JPEG" else None
            # draft's box is the full image in reduced pixels: libjpeg's scale, 1 when nothing was reduced
            scale = width / drafted[1][2] if drafted else 1
            im = _to_rgb(im)
        left, top = round(j / scale), round(i / scale)
        right, bottom = max(round((j + w) / scale), left + 1), max(round((i + h) / scale), top + 1)
        if pixels is not None:
            crop = pixels[top:bottom, left:right].permute(2, 0, 1)
        else:
            crop = _to_tensor(im.crop((left, top, right, bottom)))
        # channels-last uint8 is the layout torch's vectorised antialiased resize runs fastest on
        crop = crop[None].contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(crop, size=(self.input_size, self.input_size),
                                              mode=self.interpolation, antialias=True, align_corners=False)[0]
        flipped = bool(torch.rand(1) < self.hflip)
        if flipped:
            out = out.flip(-1)
        self.drawn = (i, j, h, w, flipped)  # the view's record: its crop box (top, left, height, width) and flip
        return out


def _resized_size(width, height, size):
    # torchvision's Resize(int): the short side becomes `size`, the long side is truncated, not rounded
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _exact_span(n_in, n_out, start, count):
    """Source span (lo, hi) whose resize to `count` pixels gives output pixels [start, start + count) of the
    full n_in -> n_out resize bit for bit, or None.

    PIL computes each output pixel from center = lo + (x + 0.5) * (hi - lo) / count with lo, hi in float32.
    When n_in / n_out is a binary fraction (the short side resized to 256) every step is exact, so the
    taps and weights equal those of the full resize. Otherwise no box reproduces them and that axis is
    resized in full.
    """
    scale = Fraction(n_in, n_out)
    if scale.denominator & (scale.denominator - 1):
        return None
    lo, hi = start * scale, (start + count) * scale
    if any(float(np.float32(v)) != v for v in (lo, hi, hi - lo)):
        return None
    return float(lo), float(hi)


def _source_lines(n_in, n_out, start, count, support):
    """Source lines [first, last) that output pixels [start, start + count) read, with a line of margin."""
    scale = Fraction(n_in, n_out)
    reach = support * max(scale, 1)
    first = math.floor((start + Fraction(1, 2)) * scale - reach + Fraction(1, 2)) - 1
    last = math.floor((start + count - Fraction(1, 2)) * scale + reach + Fraction(1, 2)) + 1
    return max(first, 0), min(last, n_in)


def _probe_pass_order():
    """How this Pillow orders the two passes of a resize: a function (w, h, new_w, new_h) -> vertical first.

    Each pass rounds to uint8, so the order changes pixels and the fast path must follow Pillow's. Pillow
    up to 12 always runs the horizontal pass first; Pillow 13 runs the vertical one first when the height
    shrinks by more than twice as many pixels as the width. None when neither rule explains this Pillow.
    """
    rng = np.random.default_rng(0)
    rules = (lambda w, h, nw, nh: False,
             lambda w, h, nw, nh: h - nh > 0 and h - nh > 2 * (w - nw))
    probes = [((9, 64), (6, 16)), ((64, 9), (16, 6)), ((40, 50), (17, 13)), ((50, 40), (13, 17))]
    images = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), (nw, nh))
              for (w, h), (nw, nh) in probes]
    for rule in rules:
        for im, (nw, nh) in images:
            w, h = im.size
            if rule(w, h, nw, nh):
                two_pass = im.resize((w, nh), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
            else:
                two_pass = im.resize((nw, h), Image.BILINEAR).resize((nw, nh), Image.BILINEAR)
            if two_pass.tobytes() != im.resize((nw, nh), Image.BILINEAR).tobytes():
                break
        else:
            return rule
    return None


_FILTER_SUPPORT = {"bilinear": 1, "bicubic": 2}


class EvalTransform:
    """Resize(resize) + CenterCrop(input_size), bit-identical to torchvision's on PIL images, as uint8.

    The speed comes from not resampling what the crop throws away. Pillow resizes in two 1-D passes, each
    rounded to uint8; this runs the same passes in the same order, as two single-axis resizes, but only
    over the lines the crop keeps, and along an axis whose scale is a binary fraction (the short side at
    resize=256) only for the output pixels the crop keeps. JPEG draft decoding is not used: it changes pixels.
    """

    def __init__(self, input_size=224, resize=256, interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if resize < input_size:
            raise ValueError(f"resize ({resize}) must be at least input_size ({input_size})")
        self.input_size, self.resize, self.interpolation = int(input_size), int(resize), interpolation
        self._vertical_first = _probe_pass_order()

    def __call__(self, src):
        im = _to_rgb(_open(src))
        width, height = im.size
        new_w, new_h = _resized_size(width, height, self.resize)
        crop = self.input_size
        # torchvision's CenterCrop offsets (Python's round: halves go to even)
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        if (new_w, new_h) != (width, height):
            if self._vertical_first is None:  # unknown Pillow: the reference resize, then crop
                im = im.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
            else:
                im, left, top = self._resize_kept(im, new_w, new_h, left, top)
        if im.size != (crop, crop):
            im = im.crop((left, top, left + crop, top + crop))
        return _to_tensor(im)

    def _resize_kept(self, im, new_w, new_h, left, top):
        """The kept part of im.resize((new_w, new_h)), plus the crop offsets left in it."""
        crop, filt, support = self.input_size, INTERPOLATIONS[self.interpolation], _FILTER_SUPPORT[self.interpolation]
        width, height = im.size
        # axis: (input size, output size, crop offset); transposed so "first" is the pass Pillow runs first
        axes = [(width, new_w, left), (height, new_h, top)]
        vertical_first = self._vertical_first(width, height, new_w, new_h)
        first, second = axes[::-1] if vertical_first else axes

        def box(lo_first, hi_first, lo_second, hi_second):
            return ((lo_second, lo_first, hi_second, hi_first) if vertical_first
                    else (lo_first, lo_second, hi_first, hi_second))

        def size(n_first, n_second):
            return (n_second, n_first) if vertical_first else (n_first, n_second)

        span_first, span_second = _exact_span(*first, crop), _exact_span(*second, crop)
        # 1. the first pass only over the source lines that the kept output lines of the second pass read
        if span_second:
            lo2, hi2 = _source_lines(*second, crop, support)
            im = im.crop(box(0, first[0], lo2, hi2))
        else:
            lo2, hi2 = 0, second[0]
        n2 = hi2 - lo2
        if span_first:
            im = im.resize(size(crop, n2), filt, box=box(span_first[0], span_first[1], 0, n2))
            off_first = 0
        else:
            im = im.resize(size(first[1], n2), filt, box=box(0, first[0], 0, n2))
            off_first = first[2]
            im = im.crop(box(off_first, off_first + crop, 0, n2))
        # 2. the second pass
        if span_second:
            im = im.resize(size(crop, crop), filt, box=box(0, crop, span_second[0] - lo2, span_second[1] - lo2))
            off_second = 0
        else:
            im = im.resize(size(crop, second[1]), filt, box=box(0, crop, 0, second[0]))
            off_second = second[2]
        left, top = (off_second, 0) if vertical_first else (0, off_second)
        return im, left, top


def train_transform(input_size=224, interpolation="bilinear"):
    """Callable(path, bytes or PIL image) -> uint8 [3, input_size, input_size]: RandomResizedCrop + flip."""
    return TrainTransform(input_size, interpolation=interpolation)


def eval_transform(input_size=224, resize=256, interpolation="bilinear"):
    """Callable(path, bytes or PIL image) -> uint8 [3, input_size, input_size]: Resize + CenterCrop."""
    return EvalTransform(input_size, resize, interpolation)


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last=False):
    """uint8 images -> float, with torchvision's ToTensor + Normalize arithmetic (same bits), on their device."""
    x = images_uint8
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div_(255).sub_(m).div_(s)


def _check_one(path):
    try:
        with Image.open(path) as im:
            _to_rgb(im)
        return None
    except Exception as e:
        return f"{path}\t{type(e).__name__}: {e}"


def check_images(paths, workers=1):
    """Decode every image; returns 'path<TAB>error' for each bad one."""
    from tqdm import tqdm

    bad = []
    if workers > 1:
        import multiprocessing
        with multiprocessing.Pool(workers) as pool:
            results = pool.imap(_check_one, paths, chunksize=64)
            bad = [r for r in tqdm(results, total=len(paths), desc="decoding", unit="img") if r]
    else:
        bad = [r for r in map(_check_one, tqdm(paths, desc="decoding", unit="img")) if r]
    return bad

