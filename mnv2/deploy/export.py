"""Exports for deployment (ONNX, torch.export's .pt2, ExecuTorch), each checked against the model as loaded on
real-looking images and refused when their logits differ by more than a tolerance; written atomically, so a
failed export never replaces a good file.

    export.export_onnx(model, "mobilenet_v2.onnx")   # returns max |logit diff|

ONNX files come from one of PyTorch's two exporters, always named: "dynamo" (torch.export-based, PyTorch's
default since 2.9; opset 18 and later) or "torchscript" (the older tracer, which PyTorch has deprecated;
kept for runtimes that need opset 17 or earlier).
"""
import contextlib
import copy
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnv2.checkpoint import unwrap
from mnv2.cli import ScriptError
from mnv2.outputs import atomic_write

METADATA_KEY = "mobilenetv2"   # one metadata_props entry: JSON, see deployment_metadata
METADATA_FORMAT = "mobilenetv2-deployment"

class InferenceError(ScriptError, RuntimeError):
    """An inference engine or an exported file that does not reproduce the model (exit code 1)."""


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



def parity_input(input_size, batch, seed=0):
    """`batch` real-looking images, normalised with ImageNet's mean and std: smooth random colour fields
    (8x8 random pixels, bicubically upsampled, clamped to 0..1) with a little pixel noise. The values and
    the spatial correlation of photos, so an export is checked where real images put the activations."""
    from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator)
    images = F.interpolate(coarse, size=(input_size, input_size), mode="bicubic", align_corners=False)
    images = (images + 0.02 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


ONNX_EXPORTERS = ("dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18


def default_opset(exporter):
    return DYNAMO_MIN_OPSET if exporter == "dynamo" else 17


def _onnx_bytes(model, example, opset, exporter):
    """The serialised ONNX graph of `model` from the named exporter, batch axis dynamic."""
    if exporter == "dynamo":
        if opset < DYNAMO_MIN_OPSET:
            raise InferenceError(f"the dynamo ONNX exporter writes opset {DYNAMO_MIN_OPSET} or later, not "
                                 f"{opset}; raise --opset or choose --onnx-exporter torchscript")
        quiet = logging.getLogger("torch.onnx")
        level, quiet.level = quiet.level, logging.ERROR
        try:  # it prints its progress on stdout
            with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                program = torch.onnx.export(model, (example,), None, input_names=["images"],
                                            output_names=["logits"], opset_version=opset, dynamo=True,
                                            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        finally:
            quiet.level = level
        return program.model_proto.SerializeToString()
    if exporter != "torchscript":
        raise InferenceError(f"unknown ONNX exporter {exporter!r}; one of {', '.join(ONNX_EXPORTERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # chosen by name: PyTorch announces this exporter's deprecation on every call
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(model, (example,), str(traced), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        return traced.read_bytes()


def export_onnx(model, path, input_size=224, opset=None, reference=None, check_batch=3, metadata=None,
                exporter="dynamo"):
    """Write `model` as ONNX with a dynamic batch axis (atomically; `metadata`, a dict, embedded as
    `with_metadata` does), made by `exporter` ("dynamo" or "torchscript", `ONNX_EXPORTERS`) at `opset`
    (default: 18 for dynamo, 17 for torchscript). Return the max |logit difference| between the file run
    by onnxruntime and `reference` (default: `model`) in PyTorch on real-looking images (`parity_input`),
    a batch of another size than the traced one so the dynamic axis is exercised; None when onnxruntime
    is not installed. Callers that must not write a disagreeing file write into a staging path."""
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it; say so in one line)
        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as e:
        raise InferenceError(f"{path}: ONNX export with the {exporter} exporter needs the {e.name} package: "
                             f"pip install {e.name}") from None
    opset = default_opset(exporter) if opset is None else opset
    data = _onnx_bytes(model, parity_input(input_size, 2), opset, exporter)
    if metadata is not None:
        data = with_metadata(data, metadata)
    try:
        import onnxruntime
    except ImportError:
        atomic_write(path, data)
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = parity_input(input_size, check_batch, seed=1)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = reference(x)
    atomic_write(path, data)
    return (got - want).abs().max().item()


def export_pt2(model, path, input_size=224, reference=None, check_batch=3):
    """Write `model` as a torch.export program (`torch.export.save`; batch size free), which
    `torch.export.load(path).module()` runs in Python and AOTInductor compiles for C++ (TorchScript's
    successor: PyTorch has deprecated torch.jit). Return the max |logit difference| between the reloaded
    file and `reference` (default: `model`) on real-looking images, a batch of another size than the
    exported one."""
    model = copy.deepcopy(unwrap(model)).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    reference = (model if reference is None else reference).cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(model, (parity_input(input_size, 2),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
    x = parity_input(input_size, check_batch, seed=1)
    with torch.no_grad():
        diff = (loaded(x) - reference(x)).abs().max().item()
    atomic_write(path, buffer.getvalue())
    return diff


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
