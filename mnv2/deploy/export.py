"""Exports for deployment (ONNX, TorchScript, ExecuTorch), each checked against the model as loaded and
refused when their logits differ by more than a tolerance; written atomically, so a failed export never replaces
a good file.

    export.export_onnx(model, "mobilenet_v2.onnx")   # returns max |logit diff|
"""
import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch
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
