"""The shape of the repo: which module may import which, so the layering stays as the README draws it."""
import ast
from pathlib import Path

import pytest

import cli

REPO = Path(__file__).resolve().parents[1]

# module -> the project modules it may import. Lower layers know nothing of the ones above them: the
# network and the data nothing of training, evaluation nothing of train.py, and nothing imports train.py.
ALLOWED = {
    "cli": set(),
    "outputs": {"cli"},
    "checkpoint": {"cli", "outputs"},
    "MobileNetV2": set(),
    "weights": {"checkpoint", "MobileNetV2"},
    "read_ImageNetData": {"cli"},
    "augment": set(),
    "image_folders": {"cli", "read_ImageNetData"},
    "distributed": {"cli"},
    "optimization": set(),
    "fused_batchnorm": {"MobileNetV2"},
    "inference": {"checkpoint", "cli", "outputs"},
    "quantization": {"checkpoint", "cli", "inference", "outputs", "read_ImageNetData"},
    "finetune": {"checkpoint", "cli", "inference", "read_ImageNetData", "weights"},
    "evaluate": {"checkpoint", "cli", "distributed", "image_folders", "inference", "outputs", "read_ImageNetData",
                 "weights"},
    "count_flops": {"checkpoint", "cli", "MobileNetV2", "weights"},
    "quantize": {"checkpoint", "cli", "evaluate", "image_folders", "inference", "outputs", "quantization",
                 "read_ImageNetData", "weights"},
    "gpu_data": {"read_ImageNetData"},
    "train": {"augment", "checkpoint", "cli", "distributed", "evaluate", "finetune", "fused_batchnorm", "gpu_data",
              "image_folders", "MobileNetV2", "optimization", "outputs", "quantization", "read_ImageNetData",
              "weights"},
}


def project_imports(path):
    """The top-level project modules that `path` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_every_module_is_in_the_layering_table():
    assert {p.stem for p in REPO.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_the_layers_below_it(module):
    extra = project_imports(REPO / f"{module}.py") - ALLOWED[module]
    assert not extra, f"{module}.py imports {sorted(extra)}, outside its layer"


def test_the_layers_have_no_cycle():
    done, visiting = set(), set()

    def visit(module):
        assert module not in visiting, f"import cycle through {module}"
        if module in done:
            return
        visiting.add(module)
        for dependency in ALLOWED[module]:
            visit(dependency)
        visiting.discard(module)
        done.add(module)

    for module in ALLOWED:
        visit(module)


def test_one_parser_and_one_error_type_serve_every_script():
    for script in ("train", "evaluate", "count_flops", "read_ImageNetData", "quantize"):
        source = (REPO / f"{script}.py").read_text()
        assert "cli.Parser(" in source, f"{script}.py builds its parser elsewhere"
        assert "argparse.ArgumentParser(" not in source
    for module in ALLOWED:
        source = (REPO / f"{module}.py").read_text()
        assert module == "cli" or "class UsageError" not in source
    assert issubclass(cli.UsageError, cli.ScriptError) and cli.UsageError.exit_code == 2
