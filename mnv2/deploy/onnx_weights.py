"""ONNX files as weights: the metadata a deployed file carries (class order, names, preprocessing) and
reading such a file, as untrusted input, into a model evaluate.py scores like any other.
"""
import json
import math
from pathlib import Path

import torch
from torch import nn

from mnv2.checkpoint import WeightsError
from mnv2.deploy.export import METADATA_KEY, InferenceError

# ONNX files as weights: the metadata a deployed file carries, and reading one as untrusted input

MAX_ONNX_BYTES = 1 << 30       # a float width-1.4 MobileNetV2 is 25 MB; protobuf itself stops at 2 GB
MAX_METADATA_CHARS = 1 << 22   # 1000 class names and WNIDs take about 40 kB
ONNX_DOMAINS = ("", "ai.onnx", "com.microsoft")  # the standard operators and onnxruntime's own kernels
CLASS_ORDERS = ("sorted", "devkit", "folders")  # folders: sorted class-folder names (image_folders.py)


def is_onnx_file(path):
    """True for weights named *.onnx: evaluate.py runs those in onnxruntime instead of PyTorch."""
    return str(path).lower().endswith(".onnx")


def _all_tensors(graph):
    """Every tensor stored in `graph`: initializers and constant attributes, nested graphs included."""
    import onnx
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_tensors(sub)


def _check_metadata(meta, path, num_classes):
    """The metadata dict, checked so that nothing in it can make the scoring misread or misbehave."""
    def bad(what):
        return WeightsError(f"{path}: its {METADATA_KEY} metadata {what}; re-export the file, or remove the "
                            "entry and pass the preprocessing flags")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    out = {}
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, dict) or classes.get("order") not in CLASS_ORDERS:
            raise bad(f"has no class order ({' or '.join(CLASS_ORDERS)})")
        out["classes"] = {"order": classes["order"]}
        for key in ("wnids", "names"):
            values = classes.get(key)
            if values is None:
                continue
            if (not isinstance(values, list) or not all(isinstance(v, str) and len(v) < 1000 for v in values)
                    or (num_classes is not None and len(values) != num_classes)):
                raise bad(f"has class {key} that are not {num_classes} strings")
            out["classes"][key] = values
    data = meta.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise bad("has preprocessing that is not a JSON object")
        checked = {}
        for key in ("resize", "input_size"):
            if key in data:
                if not (isinstance(data[key], int) and 1 <= data[key] <= 8192):
                    raise bad(f"has {key} {data[key]!r}, not a size in pixels")
                checked[key] = data[key]
        for key in ("mean", "std"):
            if key in data:
                v = data[key]
                if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                                    for x in v)
                        and (key == "mean" or all(x > 0 for x in v))):
                    raise bad(f"has {key} {v!r}, not three finite numbers" + (" above 0" if key == "std" else ""))
                checked[key] = [float(x) for x in v]
        if "interpolation" in data:
            if not isinstance(data["interpolation"], str):
                raise bad("has an interpolation that is not a name")
            checked["interpolation"] = data["interpolation"][:40]
        split = data.get("val_split")  # the images a folder run held out: evaluate.py scores exactly them
        if split is not None:
            if not (isinstance(split, dict) and isinstance(split.get("files"), list)
                    and all(isinstance(f, str) for f in split["files"])
                    and isinstance(split.get("fraction", 0), (int, float))):
                raise bad("has a val_split that is not a list of file names")
            checked["val_split"] = {"fraction": split.get("fraction", 0), "files": split["files"]}
        out["data"] = checked
    config = meta.get("model_config")
    if isinstance(config, dict):
        out["model_config"] = {k: v for k, v in config.items()
                               if isinstance(k, str) and isinstance(v, (int, float, str, bool)) and k[:1] != "_"}
    for key in ("int8", "format", "version"):
        if key in meta:
            out[key] = meta[key]
    return out


def read_onnx(path):
    """(serialised model, metadata dict, facts) of an ONNX file, read as untrusted input.

    Refused with one line naming the file: an empty, oversized or undecodable file, a graph that fails
    ONNX's checker, tensors kept in external files (they could name any file on this machine), control
    flow or operators outside the standard and onnxruntime domains, more than one image input, inputs
    that are not float [batch, 3, height, width], and metadata that does not check out. facts:
    {"input", "output", "batch" (fixed batch size or None), "size" ((height, width) when fixed),
    "num_classes" (when the graph fixes it), "int8" (holds quantized operators)}.
    """
    path = Path(path)
    try:
        import onnx
    except ImportError:
        raise WeightsError(f"{path}: reading ONNX files needs onnx and onnxruntime: "
                           "pip install onnx onnxruntime") from None
    data = _read_bounded(path)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise WeightsError(f"{path}: not a readable ONNX model ({type(e).__name__}); it is damaged or "
                           "another format") from None
    _check_graph(onnx, model, path)
    facts = _graph_facts(onnx, model.graph, path)
    return data, _read_metadata(model, path, facts["num_classes"]), facts


def _read_bounded(path):
    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file; check the path")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted copy or export?); use another copy")
    if size > MAX_ONNX_BYTES:
        raise WeightsError(f"{path}: {size / 2**20:.0f} MB, larger than any MobileNetV2 "
                           f"({MAX_ONNX_BYTES >> 20} MB at most); not a file to score")
    return path.read_bytes()


def _check_graph(onnx, model, path):
    """Refuse what an image classifier never holds and what could reach outside the file."""
    graph = model.graph
    if not graph.node or not graph.output:
        raise WeightsError(f"{path}: holds no ONNX graph; it is damaged or another format")
    if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in _all_tensors(graph)):
        raise WeightsError(f"{path}: keeps tensors in external files; only self-contained ONNX files are read "
                           "(re-save it with onnx.save(model, path, save_as_external_data=False))")
    if model.functions:
        raise WeightsError(f"{path}: defines its own ONNX functions; an image classifier needs none")
    for node in graph.node:
        if node.domain not in ONNX_DOMAINS:
            raise WeightsError(f"{path}: uses operator {node.op_type} of domain {node.domain!r}; only the "
                               "standard and onnxruntime operators are run")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise WeightsError(f"{path}: holds control flow ({node.op_type}); an image classifier needs none")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # onnx.checker.ValidationError, or a C++ error for a malformed graph
        raise WeightsError(f"{path}: not a valid ONNX graph ({str(e).strip().splitlines()[0][:200]})") from None


def _graph_facts(onnx, graph, path):
    """One float [batch, 3, H, W] input, one float [batch, classes] output, and what the graph fixes."""
    stored = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in stored]
    if len(inputs) != 1:
        raise WeightsError(f"{path}: the graph takes {len(inputs)} inputs; an image classifier takes one")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or dims[1] not in (3, None):
        raise WeightsError(f"{path}: its input {inputs[0].name!r} is not float [batch, 3, height, width]")
    out = graph.output[0].type.tensor_type
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in out.shape.dim]
    if out.elem_type != onnx.TensorProto.FLOAT or len(out_dims) != 2:
        raise WeightsError(f"{path}: its output {graph.output[0].name!r} is not float [batch, classes] logits")
    return {"input": inputs[0].name, "output": graph.output[0].name, "batch": dims[0],
            "size": (dims[2], dims[3]) if dims[2] and dims[3] else None, "num_classes": out_dims[1],
            "int8": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
                        for n in graph.node)}


def _read_metadata(model, path, num_classes):
    text = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    if text is None:
        return {}
    if len(text) > MAX_METADATA_CHARS:
        raise WeightsError(f"{path}: its {METADATA_KEY} metadata is {len(text)} characters, too long to be "
                           "class names and preprocessing")
    try:
        meta = json.loads(text)
    except ValueError:
        raise WeightsError(f"{path}: its {METADATA_KEY} metadata is not valid JSON; re-export the file") from None
    return _check_metadata(meta, path, num_classes)


class OnnxFileModel(nn.Module):
    """An ONNX file (float, or INT8 as quantize.py writes it) run by onnxruntime on the CPU, read as
    untrusted input (`read_onnx`). Takes and returns torch tensors, so `evaluate` scores it like any model.

    `meta` is what the file says of itself (class order and names, preprocessing, as a checkpoint does);
    `config` has "num_classes" and "width_mult" (None when the file does not say). A graph with a fixed
    batch size is fed in pieces of that size.
    """

    def __init__(self, path, threads=None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise WeightsError(f"{path}: scoring an ONNX file needs onnxruntime: pip install onnxruntime") from None
        data, self.meta, facts = read_onnx(path)
        self.path, self.int8 = Path(path), facts["int8"]
        self.input_name, self.output_name, self.batch = facts["input"], facts["output"], facts["batch"]
        self.size = facts["size"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the cores PyTorch would use
        options.log_severity_level = 3  # its warnings about unused constants help nobody
        try:
            self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for graphs it cannot run
            raise WeightsError(f"{path}: onnxruntime cannot run this graph "
                               f"({(str(e).strip().splitlines() or [''])[0][:200]})") from None
        saved = (self.meta.get("data") or {}).get("input_size")
        side = self.size[0] if self.size else saved or 224
        probe = torch.zeros(1, 3, side, self.size[1] if self.size else side)
        num_classes = self.forward(probe).shape[1]
        if facts["num_classes"] not in (None, num_classes):
            raise WeightsError(f"{path}: declares {facts['num_classes']} classes but computes {num_classes}")
        config = self.meta.get("model_config") or {}
        if config.get("num_classes") not in (None, num_classes):
            raise WeightsError(f"{path}: its metadata says {config['num_classes']} classes, the graph has "
                               f"{num_classes}; re-export the file")
        self.config = {"num_classes": num_classes, "width_mult": config.get("width_mult")}

    def forward(self, images):
        x = images.float().contiguous().numpy()
        n = len(x)
        try:
            if self.batch in (None, n):
                logits = self.session.run([self.output_name], {self.input_name: x})[0]
            else:  # a graph exported for a fixed batch: pieces of that size, the last one padded
                pieces = []
                for start in range(0, n, self.batch):
                    piece = torch.from_numpy(x[start:start + self.batch])
                    if len(piece) < self.batch:
                        piece = torch.cat([piece, piece.new_zeros((self.batch - len(piece),) + piece.shape[1:])])
                    pieces.append(self.session.run([self.output_name], {self.input_name: piece.numpy()})[0])
                logits = torch.cat([torch.from_numpy(p) for p in pieces]).numpy()[:n]
        except Exception as e:  # a shape the graph does not take, a kernel failing
            raise InferenceError(f"{self.path}: onnxruntime failed on a batch of {tuple(x.shape)} "
                                 f"({(str(e).strip().splitlines() or [''])[0][:200]})") from None
        logits = torch.from_numpy(logits)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise InferenceError(f"{self.path}: gave logits of shape {tuple(logits.shape)} for {n} images")
        return logits
