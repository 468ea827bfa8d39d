"""Running a trained MobileNetV2 for inference on the CPU, and exporting it for deployment.

    fast, channels_last, backend = inference.inference_model(model, "cpu")   # onnxruntime or packed oneDNN
    inference.export_onnx(model, "mobilenet_v2.onnx")                          # returns max |logit diff|

Everything here keeps the model's function: BatchNorm folded into the convolutions, weights pre-packed
for oneDNN, onnxruntime's fused graph, ONNX and TorchScript files are each checked against the model as
loaded and refused when their logits differ by more than a tolerance.
"""
import copy
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from checkpoint import WeightsError, unwrap
from cli import ScriptError
from outputs import atomic_write


class InferenceError(ScriptError, RuntimeError):
    """An inference engine or an exported file that does not reproduce the model (exit code 1)."""


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    At inference a BatchNorm is a fixed per-channel affine map, so conv+BN is one conv with scaled
    weights and a bias: one pass over the activations instead of two, identical outputs up to rounding.
    Works on the Sequential units MobileNetV2 (and torchvision's) are built from. Returns the count.
    """
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
                    and bn.track_running_stats and bn.running_mean is not None):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded



class PackedConv2d(nn.Module):
    """A CPU convolution whose weights are reordered once into oneDNN's blocked layout, with the
    following ReLU6 (if any) applied inside the convolution.

    Eager PyTorch hands oneDNN plain-layout weights on every call, to be reordered each time, and runs
    ReLU6 as a separate pass over the widest activations of each block (the 6x expansions); both costs
    go. Inference only: the packed weights are
    constants. CPU only.
    """

    def __init__(self, conv, relu6, input_shape):
        super().__init__()
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        padding, stride, dilation, groups = self.geometry
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), padding, stride, dilation, groups, list(input_shape))
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.attr, self.scalars = ("hardtanh", [0.0, 6.0]) if relu6 else ("none", [])

    def forward(self, x):
        padding, stride, dilation, groups = self.geometry
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight, self.bias, padding, stride,
                                                       dilation, groups, self.attr, self.scalars, "")


def pack_for_cpu(model, input_size=224, batch_size=32):
    """Replace the convolutions of a BatchNorm-folded, channels_last `model` by `PackedConv2d`, in place.

    Returns the number replaced: 0 (model untouched) where this PyTorch build lacks the oneDNN ops or
    the packed model does not reproduce the logits within 1e-5 (relative to their largest magnitude).
    """
    if not (hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()):
        return 0
    shapes = {}

    def record(conv, inputs, output):
        shapes[conv] = tuple(inputs[0].shape)  # returns None: a hook's return value replaces the output

    hooks = [m.register_forward_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    example = parity_input(input_size, 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(example)
    for h in hooks:
        h.remove()
    replaced = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.Sequential):
                continue
            names = list(module._modules)
            for i, name in enumerate(names):
                conv = module._modules[name]
                if type(conv) is not nn.Conv2d or conv not in shapes or conv.padding_mode != "zeros":
                    continue
                # the next layer that computes something (a folded BatchNorm left an Identity)
                after = [n for n in names[i + 1:] if type(module._modules[n]) is not nn.Identity]
                relu6 = bool(after) and isinstance(module._modules[after[0]], nn.ReLU6)
                act_name = after[0] if relu6 else None
                replaced.append((module, name, conv, act_name, module._modules[act_name] if relu6 else None))
                module._modules[name] = PackedConv2d(conv, relu6, (batch_size,) + shapes[conv][1:])
                if relu6:
                    module._modules[act_name] = nn.Identity()
        with torch.inference_mode():
            diff = (model(example) - want).abs().max().item()
        # float32 rounding grows with the logits' magnitude; ImageNet logits are tens at most
        if not diff <= 1e-5 * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"packed convolutions change the logits by {diff:.2e}")
    except RuntimeError as e:  # an op missing or behaving differently in this build: stay unpacked
        for module, name, conv, act_name, act in reversed(replaced):
            module._modules[name] = conv
            if act_name is not None:
                module._modules[act_name] = act
        warnings.warn(f"oneDNN packed convolutions not used ({e})")
        return 0
    return len(replaced)


def prepare_for_inference(model, channels_last=True, device="cpu", pack=True, input_size=224, batch_size=32):
    """A copy of `model` made fast for inference on `device`; the original is untouched.

    BatchNorm folded into the convolutions, parameters frozen, channels_last memory layout (on CPU the
    depthwise and pointwise convolutions run much faster on NHWC data), and on CPU the convolutions
    packed for oneDNN with ReLU6 fused in (`pack_for_cpu`, unless pack=False: for autocast or
    torch.compile, which packs by itself; a packed copy stays on the CPU). Logits stay
    within 1e-4 of the plain model. Run it under `torch.inference_mode()`, as `evaluate` does.
    `input_size`/`batch_size` only tune the packed layout; any batch and size still work.
    """
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if pack and torch.device(device).type == "cpu":
            pack_for_cpu(model, input_size, batch_size)
    return model.to(device)


class OnnxRuntimeModel(nn.Module):
    """The model exported to ONNX and run by onnxruntime on the CPU: the fastest CPU path here.

    onnxruntime fuses each convolution with its folded BatchNorm and ReLU6 and runs them in its blocked
    layout, about twice the speed of the best eager PyTorch path on MobileNetV2 (bench/run_all.py).
    Takes and returns torch tensors, so `evaluate` runs it like any model.
    """

    def __init__(self, model, input_size=224, threads=None):
        super().__init__()
        import onnxruntime  # ImportError: the caller falls back to PyTorch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            self.max_abs_diff = export_onnx(model, path, input_size=input_size)
            if not self.max_abs_diff <= 1e-4:
                raise InferenceError(f"onnxruntime's logits differ by {self.max_abs_diff:.1e} from PyTorch's")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()  # the cores PyTorch would use
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, images):
        logits = self.session.run(None, {"images": images.float().contiguous().numpy()})[0]
        return torch.from_numpy(logits)



def inference_model(model, device, backend="auto", input_size=224, batch_size=32, log=print):
    """The fastest faithful way to run `model` for scoring: (model, wants channels_last input, backend).

    On the CPU, onnxruntime when it is installed and reproduces the logits within 1e-4 ("auto"), else
    PyTorch with `prepare_for_inference`; on CUDA always PyTorch.
    """
    if backend != "torch" and torch.device(device).type == "cpu":
        try:
            return OnnxRuntimeModel(model, input_size), False, "onnxruntime"
        except (ImportError, InferenceError) as e:
            if backend == "onnxruntime":
                raise InferenceError(f"--backend onnxruntime: {e}") from None
            log(f"note: scoring in PyTorch, onnxruntime not used ({e})")
    fast = prepare_for_inference(model, device=device, input_size=input_size, batch_size=batch_size)
    return fast, True, "torch"


def maybe_compile(model, example, log=print):
    """`model` compiled by torch.compile, or `model` itself when compiling fails here (on CPU inductor
    needs a C++ toolchain). `example` is a batch to compile with, so failures show up now, not mid-loop.

    Freezing turns the weights into constants, which lets inductor pre-pack them for oneDNN and fuse
    each ReLU6 into its convolution: the model must not be trained afterwards (use a copy from
    `prepare_for_inference`). The result is checked against the eager model on `example`.
    """
    try:
        compiled = torch.compile(model, dynamic=False, options={"freezing": True})
        with torch.inference_mode():
            got, want = compiled(example), model(example)
        diff = (got.float() - want.float()).abs().max().item()
        if not diff <= 1e-4:
            raise InferenceError(f"compiled model differs from eager by {diff:.2e}")
    except Exception as e:  # whatever the compiler raises, the evaluation goes on in eager mode
        log(f"torch.compile not used ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "running eager")
        return model
    return compiled


# --------------------------------------------------------------------------------------------------
# Weight files: named public weights, checksums


# --------------------------------------------------------------------------------------------------
# Export


def parity_input(input_size, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, input_size, input_size, generator=generator)


def export_onnx(model, path, input_size=224, opset=17, reference=None, check_batch=3, metadata=None):
    """Write `model` as ONNX with a dynamic batch axis (atomically; `metadata`, a dict, embedded as
    `with_metadata` does). Return the max |logit difference| between the file run by onnxruntime and
    `reference` (default: `model`) in PyTorch, on a batch of another size than the traced one so the
    dynamic axis is exercised; None when onnxruntime is not installed."""
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = parity_input(input_size, 2)
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; say so in one line)
    except ImportError:
        raise InferenceError(f"{path}: ONNX export needs the onnx package: pip install onnx") from None
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
            torch.onnx.export(model, (example,), str(traced), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        data = traced.read_bytes()
    if metadata is not None:
        data = with_metadata(data, metadata)
    atomic_write(path, data)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = parity_input(input_size, check_batch, seed=1)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = reference(x)
    return (got - want).abs().max().item()


def export_torchscript(model, path, input_size=224, reference=None, check_batch=3):
    """Write `model` as TorchScript (traced; batch size free). Return the max |logit difference| between
    the reloaded file and `reference` (default: `model`), on a batch of another size than the traced one."""
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit announces its deprecation; it is what deployments load
        with torch.no_grad():
            traced = torch.jit.trace(model, parity_input(input_size, 2))
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = parity_input(input_size, check_batch, seed=1)
    with torch.no_grad():
        return (loaded(x) - reference(x)).abs().max().item()


def export_pte(model, path, input_size=224, reference=None, metadata=None, check_inputs=None):
    """Write `model` as an ExecuTorch program (.pte) for phones: exported with torch.export for one image
    at a time, every operator XNNPACK runs lowered to its delegate; float32, or INT8 when `model` comes
    from `quantization.quantize_pt2e`. `metadata` (a dict) is kept as JSON in the program's constant
    method "metadata", as ONNX files keep it. The written file is then run by ExecuTorch's runtime:
    returns the max |logit difference| to `reference` (default: `model`) in PyTorch over `check_inputs`
    (single images, default: three random ones)."""
    path = Path(path)
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise InferenceError(f"{path}: writing an ExecuTorch program needs the executorch package (about 130 MB, "
                             "with torchao; its release must match this torch): pip install executorch") from None
    if not isinstance(model, torch.fx.GraphModule):
        model = copy.deepcopy(unwrap(model)).cpu().eval()
        for p in model.parameters():
            p.requires_grad_(False)
    reference = model if reference is None else reference
    with torch.no_grad():
        exported = torch.export.export(model, (parity_input(input_size, 1),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes from the lowering passes
        program = to_edge_transform_and_lower(
            exported, partitioner=[XnnpackPartitioner()],
            constant_methods={"metadata": json.dumps(metadata)} if metadata is not None else None).to_executorch()
    data = program.buffer
    try:
        program = ExecuTorchModel(data)
    except RuntimeError as e:  # XNNPACK refuses parameters it has no kernel for; a phone would refuse them too
        raise InferenceError(f"{path}: ExecuTorch's runtime cannot load the program ({str(e).splitlines()[0]}); "
                             "nothing was written") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    x = parity_input(input_size, 3, seed=1) if check_inputs is None else check_inputs
    with torch.no_grad():
        return (program(x) - reference(x)).abs().max().item()


class ExecuTorchModel(nn.Module):
    """A program `export_pte` wrote, run by ExecuTorch's Python runtime (XNNPACK on this CPU), one image at
    a time as on a phone. Takes and returns torch tensors, so `evaluate` scores it like any model."""

    def __init__(self, program):
        super().__init__()
        from executorch.runtime import Runtime
        # the method runs inside the loaded program, which reads the bytes in place: all three must live
        self.data = program
        self.program = Runtime.get().load_program(program)
        self.method = self.program.load_method("forward")

    def forward(self, images):
        return torch.cat([self.method.execute([x[None].float().contiguous()])[0] for x in images])


# --------------------------------------------------------------------------------------------------
# Single images


# --------------------------------------------------------------------------------------------------
# ONNX files as weights: the metadata a deployed file carries, and reading one as untrusted input

METADATA_KEY = "mobilenetv2"   # one metadata_props entry: JSON, see deployment_metadata
METADATA_FORMAT = "mobilenetv2-deployment"
MAX_ONNX_BYTES = 1 << 30       # a float width-1.4 MobileNetV2 is 25 MB; protobuf itself stops at 2 GB
MAX_METADATA_CHARS = 1 << 22   # 1000 class names and WNIDs take about 40 kB
ONNX_DOMAINS = ("", "ai.onnx", "com.microsoft")  # the standard operators and onnxruntime's own kernels
CLASS_ORDERS = ("sorted", "devkit", "folders")  # folders: sorted class-folder names (image_folders.py)


def is_onnx_file(path):
    """True for weights named *.onnx: evaluate.py runs those in onnxruntime instead of PyTorch."""
    return str(path).lower().endswith(".onnx")


def deployment_metadata(classes, preprocessing, model_config=None, **more):
    """What a deployed file says of itself, so that evaluate.py reads it without flags: the class order
    with WNIDs and names in the model's label order ({"order", "wnids", "names"}; wnids None when not
    known), the preprocessing ({"resize", "input_size", "interpolation", "mean", "std"}), the model's
    constructor arguments, and whatever else `more` adds (how it was quantized). Keys as in a checkpoint."""
    return {"format": METADATA_FORMAT, "version": 1, "classes": classes, "data": preprocessing,
            "model_config": model_config, **more}


def with_metadata(data, metadata):
    """The serialised ONNX model `data` with `metadata` (a dict) as its METADATA_KEY entry, as JSON."""
    import onnx
    model = onnx.load_model_from_string(data)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in kept + [(METADATA_KEY, json.dumps(metadata))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


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
    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file; check the path")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted copy or export?); use another copy")
    if size > MAX_ONNX_BYTES:
        raise WeightsError(f"{path}: {size / 2**20:.0f} MB, larger than any MobileNetV2 "
                           f"({MAX_ONNX_BYTES >> 20} MB at most); not a file to score")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise WeightsError(f"{path}: not a readable ONNX model ({type(e).__name__}); it is damaged or "
                           "another format") from None
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
    facts = {"input": inputs[0].name, "output": graph.output[0].name, "batch": dims[0],
             "size": (dims[2], dims[3]) if dims[2] and dims[3] else None, "num_classes": out_dims[1],
             "int8": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
                         for n in graph.node)}
    text = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    meta = {}
    if text is not None:
        if len(text) > MAX_METADATA_CHARS:
            raise WeightsError(f"{path}: its {METADATA_KEY} metadata is {len(text)} characters, too long to be "
                               "class names and preprocessing")
        try:
            meta = json.loads(text)
        except ValueError:
            raise WeightsError(f"{path}: its {METADATA_KEY} metadata is not valid JSON; re-export the file") from None
        meta = _check_metadata(meta, path, facts["num_classes"])
    return data, meta, facts


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
