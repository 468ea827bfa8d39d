"""The checkpoint format: what a checkpoint holds, how it is read safely and written atomically.

    data = checkpoint.read("output/last.pth")              # weights_only, digest verified
    checkpoint.write(checkpoint.make(...), [save_path / "last.pth"])

A checkpoint is one dict of plain types and tensors (`torch.load(weights_only=True)` reads it): the keys
are `KEYS` plus the format tag, the version and a sha256 of everything else, so a flipped bit inside a
tensor is an error instead of silent damage. Files are written to a unique temporary name, synced and
renamed into place (`outputs.atomic_write`): a crash leaves the old file or the new one, never a mix.
"""
import argparse
import hashlib
import io
import json
import math
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnv2.cli import ScriptError
from mnv2.outputs import CHECKPOINT_NAME, OutputError, atomic_write

FORMAT = "mobilenetv2-checkpoint"
VERSION = 1
# Everything a training checkpoint holds besides format, version and sha256.
KEYS = ("model", "model_ema", "model_config", "classes", "data", "epoch", "step", "optimizer", "scaler",
        "best_acc1", "rng", "sampler", "metrics", "partial", "world_size", "args", "run_id")
REQUIRED = ("model", "optimizer", "epoch", "step")  # what a resume cannot do without
# Files `--resume auto` considers; temporary files (".name.tmp-...") never match.
NAME = CHECKPOINT_NAME


class WeightsError(ScriptError, ValueError):
    """A weight or checkpoint file that cannot be used; the message is one line naming the file."""


class CheckpointError(WeightsError):
    """A checkpoint that cannot be written, or read back for resuming."""


def make(**fields):
    """A training checkpoint dict: exactly the fields in KEYS, tagged with the format and version."""
    missing, unknown = set(KEYS) - set(fields), set(fields) - set(KEYS)
    if missing or unknown:
        raise TypeError(f"checkpoint fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return {"format": FORMAT, "version": VERSION, **fields}


def is_checkpoint(data):
    """True for this repo's training checkpoints (as opposed to bare weight files of any layout)."""
    return isinstance(data, dict) and data.get("format") == FORMAT


def meta(data):
    """Class order, preprocessing and model config saved in a checkpoint or with safetensors weights; {} for
    bare weight files."""
    if not (is_checkpoint(data) or isinstance(data, dict) and data.get("format") == SAFETENSORS_FORMAT):
        return {}
    return {key: data[key] for key in ("classes", "data", "model_config", "epoch") if key in data}


# --------------------------------------------------------------------------------------------------
# Reading


def digest(data):
    """sha256 over everything in a checkpoint dict except its own "sha256" entry.

    A zip checkpoint with a flipped bit inside a tensor still loads, silently different; this digest,
    saved inside the file, makes such damage an error instead.
    """
    sha = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous().reshape(-1)
            sha.update(f"tensor {tensor.dtype} {tuple(obj.shape)};".encode())
            sha.update(tensor.view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            sha.update(f"dict {len(obj)};".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            sha.update(f"{type(obj).__name__} {len(obj)};".encode())
            for value in obj:
                feed(value)
        else:
            sha.update(f"{type(obj).__name__} {obj!r};".encode())

    feed({key: value for key, value in data.items() if key != "sha256"})
    return sha.hexdigest()


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# A weight file's records may declare at most this much data: compression of float tensors gains little, so
# a record claiming far more than the file holds is a decompression bomb, refused before any allocation.
MAX_EXPANSION = 4
MAX_DECLARED_BYTES = 8 * 2**30


def _check_declared_sizes(path):
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable weight file ({_first_line(e)}); "
                           "it is corrupt or truncated, use another copy") from None
    size = path.stat().st_size
    if declared > min(MAX_EXPANSION * size + 2**20, MAX_DECLARED_BYTES):
        raise WeightsError(f"{path}: its records declare {declared / 2**20:.0f} MiB in a {size / 2**20:.1f} MiB "
                           "file; refused before reading (a damaged or hostile file), use another copy")


# --------------------------------------------------------------------------------------------------
# safetensors: a JSON header and raw tensor bytes, no code. Checked here before the library reads it.

SAFETENSORS_FORMAT = "mobilenetv2-safetensors"   # what read_weights returns for a .safetensors file or Hub folder
SAFETENSORS_METADATA_KEY = "mobilenetv2"         # this repo's JSON (classes, data, model_config) in the metadata
SAFETENSORS_MAX_HEADER = 100 * 2**20              # the safetensors format's own limit on the header
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"


def safetensors_header(path):
    """The JSON header of the safetensors file at `path`, checked against the file before any tensor is
    read: a header over 100 MiB or past the end of the file, a dtype the format does not have, a tensor
    whose bytes do not fit its shape or lie outside the file are refused in one line."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: {size} bytes, too short for a safetensors file; use another copy")
        length = int.from_bytes(head, "little")
        if length > SAFETENSORS_MAX_HEADER:
            raise WeightsError(f"{path}: its header declares {length} bytes, over the format's 100 MiB limit "
                               "(a damaged or hostile file); refused before reading, use another copy")
        if 8 + length > size:
            raise WeightsError(f"{path}: its header declares {length} bytes but the file holds {size - 8} after "
                               "the length (truncated or damaged); use another copy")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: its safetensors header is not valid JSON ({_first_line(e)}); "
                               "use another copy") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: its safetensors header is not a JSON object; use another copy")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has no dtype, shape and data_offsets; use another copy") \
                from None
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype!r}, which safetensors does not define; "
                               "use another copy")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes) \
                or end - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype] or min(shape, default=0) < 0:
            raise WeightsError(f"{path}: tensor {name!r} ({dtype} {shape}) declares bytes {start}..{end} of the "
                               f"{data_bytes} the file holds; truncated or damaged, use another copy")
    return header


def read_safetensors(path):
    """{"format": SAFETENSORS_FORMAT, "model": tensors, + the classes/data/model_config this repo saved in
    the metadata} of a .safetensors file, checked by `safetensors_header` first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)}); use another copy") from None
    saved = {}
    text = (header.get("__metadata__") or {}).get(SAFETENSORS_METADATA_KEY)
    if text:
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            raise WeightsError(f"{path}: its {SAFETENSORS_METADATA_KEY!r} metadata is not valid JSON; "
                               "use another copy") from None
    keep = {key: saved[key] for key in ("classes", "data", "model_config") if saved.get(key) is not None}
    return {"format": SAFETENSORS_FORMAT, "model": tensors, **keep}


def read_hub_folder(folder):
    """A timm / Hugging Face Hub folder (model.safetensors + config.json) as `read_safetensors` returns a
    file: the classes and preprocessing from this repo's entry in config.json when it wrote the folder,
    else from timm's label_names and pretrained_cfg."""
    data = read_safetensors(folder / HUB_WEIGHTS)
    config_path = folder / HUB_CONFIG
    if not config_path.is_file():
        return data
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_path}: not valid JSON ({_first_line(e)}); fix or remove it") from None
    ours = config.get(SAFETENSORS_METADATA_KEY) or {}
    for key in ("classes", "data", "model_config"):
        if ours.get(key) is not None:
            data.setdefault(key, ours[key])
    cfg = config.get("pretrained_cfg") or {}
    if "data" not in data and cfg.get("input_size") and cfg.get("mean") and cfg.get("std"):
        size = int(cfg["input_size"][-1])
        data["data"] = {"input_size": size, "resize": int(math.floor(size / float(cfg.get("crop_pct") or 0.875))),
                        "interpolation": cfg.get("interpolation") if cfg.get("interpolation") in ("bilinear", "bicubic")
                        else "bilinear", "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    names = config.get("label_names")
    if "classes" not in data and isinstance(names, list) and names:
        # timm's ImageNet label_names are the WNIDs in sorted order; other lists name the classes in label order
        imagenet = len(names) == 1000 and all(str(n).startswith("n") and str(n)[1:].isdigit() for n in names)
        data["classes"] = {"order": "sorted" if imagenet else "folders", "wnids": names if imagenet else None,
                           "names": [str(n) for n in names]}
    return data


def read_weights(path):
    """Read a weight or checkpoint file of any layout as plain data, refusing anything that would run code.

    `torch.load(weights_only=True)` never unpickles arbitrary objects; there is no unsafe fallback.
    `argparse.Namespace` (which torchvision's reference scripts save as "args") is allowed: it only holds
    attributes. A saved sha256 must match the contents. A .safetensors file (this repo's layout or timm's)
    and a Hub folder holding model.safetensors + config.json are read without pickle (`read_safetensors`).
    """
    path = Path(path)
    if path.is_dir() and (path / HUB_WEIGHTS).is_file():
        return read_hub_folder(path)
    if path.is_dir():
        raise WeightsError(f"{path}: a folder without {HUB_WEIGHTS}; pass a weight file or a Hub folder")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file; check the path")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download or save?); use another copy")
    _refuse_other_formats(path)
    _check_declared_sizes(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(f"{path}: refused, the file holds Python objects that could run code, not "
                               "plain weights; re-save it as a state_dict from a trusted source") from None
        raise WeightsError(f"{path}: not a readable weight file ({_first_line(e)}); "
                           "it is corrupt or truncated, use another copy") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: not a readable weight file ({_first_line(e)}); "
                           "it is corrupt or truncated, use another copy") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: holds a {type(data).__name__}, expected a dict of weights")
    if "sha256" in data and data["sha256"] != digest(data):
        raise WeightsError(f"{path}: contents differ from the checksum saved inside it (a damaged copy "
                           "or bit rot); use another checkpoint")
    if is_checkpoint(data):
        _check_entries(data, path)
    return data


# An ONNX ModelProto opens with ir_version (field 1, a small varint), then a producer, domain, graph or
# opset field; no torch.save file opens so (a zip: "PK", a legacy pickle: 0x80).
_ONNX_NEXT_FIELDS = (0x12, 0x1a, 0x22, 0x2a, 0x32, 0x3a, 0x42)


def _refuse_other_formats(path):
    """Model files that are not weights, named for what they are, with what to pass instead."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return  # torch.load says it in its own words
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise WeightsError(f"{path}: a TorchScript program (torch.jit.save), not weights: pass the weights or "
                               "checkpoint it was exported from")
        if any(n.endswith("/archive_format") for n in names) and any(n.endswith("/models/model.json") for n in names):
            raise WeightsError(f"{path}: a torch.export program (evaluate.py --export-pt2), not weights: pass the "
                               "weights or checkpoint it was exported from")
    elif path.suffix.lower() == ".onnx" or (len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80
                                            and head[2] in _ONNX_NEXT_FIELDS):
        raise WeightsError(f"{path}: an ONNX model, not PyTorch weights: evaluate.py --weights scores it as it is; "
                           "to fine-tune, resume, quantize or count it, pass the weights or checkpoint it was "
                           "exported from")


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# What each entry of a training checkpoint must be, when present: a file that claims the format but holds
# something else is refused here in one line instead of failing deep inside a resume or an evaluation.
_SHAPES = {
    "model": lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    "model_ema": lambda v: v is None or (isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())),
    "model_config": lambda v: v is None or (isinstance(v, dict) and _is_int(v.get("num_classes"), 1)
                                            and isinstance(v.get("width_mult"), (int, float)) and v["width_mult"] > 0
                                            and isinstance(v.get("dropout", 0.0), (int, float))),
    "classes": lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(v.get(k), (list, tuple)) and all(isinstance(x, str) for x in v[k])
        for k in ("wnids", "names") if v.get(k) is not None)),
    "data": lambda v: v is None or isinstance(v, dict),
    "epoch": _is_int,
    "step": _is_int,
    "optimizer": lambda v: isinstance(v, dict),
    "metrics": lambda v: v is None or (isinstance(v, list) and all(isinstance(m, dict) for m in v)),
    "rng": lambda v: v is None or isinstance(v, dict),
    "sampler": lambda v: v is None or isinstance(v, dict),
    "args": lambda v: v is None or isinstance(v, dict),
}


def _check_entries(data, path):
    for key, fits in _SHAPES.items():
        if key in data and not fits(data[key]):
            raise WeightsError(f"{path}: its {key!r} entry is not what a {FORMAT} holds "
                               f"({type(data[key]).__name__}); the file is damaged or not one of this repo's, "
                               "use another copy")


def read(path):
    """A checkpoint or weights file as a dict (see read_weights); a training checkpoint must hold what a
    resume needs. Raises WeightsError/CheckpointError with one line naming the file."""
    data = read_weights(path)
    if is_checkpoint(data):
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; use another one")
    return data


def find_latest(directory, log=print):
    """The newest checkpoint in `directory` that loads, by the epoch and step stored in it (never by file
    times, which a copy changes): (path, data), or (None, None) if there is none. On a tie last.pth wins.

    last.pth and best.pth are read, then epoch_N.pth from the highest N down while N could still be newer
    than the best found, so a long run's hundred epoch files are not all read. Unreadable files are skipped
    with a note; if every candidate is unreadable, that is an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None, None
    candidates = [p for p in directory.iterdir() if NAME.match(p.name) and p.is_file()]
    named = [p for p in candidates if not NAME.match(p.name).group(2)]
    numbered = sorted((p for p in candidates if NAME.match(p.name).group(2)),
                      key=lambda p: -int(NAME.match(p.name).group(2)))
    best = None  # ((epoch, step, is last.pth), path, data)
    for path in sorted(named, key=lambda p: p.name != "last.pth") + numbered:
        number = NAME.match(path.name).group(2)
        if number is not None and best is not None and int(number) <= best[0][0]:
            break  # epoch_N.pth holds epoch N at step 0: it cannot be newer than what was found
        try:
            data = read(path)
        except WeightsError as e:
            log(f"note: --resume auto skips {e}")
            continue
        if not is_checkpoint(data):
            log(f"note: --resume auto skips {path}: not a training checkpoint of this repo")
            continue
        key = (int(data["epoch"]), int(data["step"]), path.name == "last.pth")
        if best is None or key > best[0]:
            best = (key, path, data)
    if best is not None:
        return best[1], best[2]
    if candidates:
        raise CheckpointError(f"--resume auto: none of the {len(candidates)} checkpoints in {directory} loads; "
                              "pass --resume FILE or move them away to start afresh")
    return None, None


# --------------------------------------------------------------------------------------------------
# Writing


def unwrap(model):
    """The plain module inside DistributedDataParallel, DataParallel and torch.compile wrappers: the one
    whose state is saved, so no `module.` or `_orig_mod.` prefix is ever written."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_state(model):
    """The state of the unwrapped model as contiguous CPU tensors: the file does not depend on the device
    or the memory format it was trained with."""
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def serialize(data):
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def write(data, paths):
    """Digest, serialise once, then write each path atomically (in order: the first is the new epoch file).
    Non-finite weights are never written."""
    for key in ("model", "model_ema"):
        if data.get(key) is not None and not all_finite(data[key]):
            raise CheckpointError(f"refusing to write {paths[0]}: the {key} weights hold NaN/inf; the last good "
                                  "checkpoint is kept; lower --lr")
    data["sha256"] = digest(data)
    payload = serialize(data)
    for path in paths:
        try:
            atomic_write(path, payload)
        except OutputError as e:
            raise CheckpointError(f"{e}; the earlier checkpoints are intact; free space or fix the path, "
                                  "then --resume auto") from None


def epoch_files(directory):
    """epoch_N.pth files in `directory` as (N, path), oldest first."""
    found = []
    for path in Path(directory).glob("epoch_*.pth"):
        m = NAME.match(path.name)
        if m and m.group(2):
            found.append((int(m.group(2)), path))
    return sorted(found)


def prune(directory, keep, log=print):
    """Keep the newest `keep` epoch files. Called only after the newest was written and synced, so the
    files deleted always have a safely written successor."""
    if keep <= 0:
        return []
    removed = []
    for _, path in epoch_files(directory)[:-keep]:
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log(f"warning: could not delete old checkpoint {path}: {e.strerror}")
    return removed


# --------------------------------------------------------------------------------------------------
# Random number generators: captured into a checkpoint, restored on resume


def capture_rng():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device
