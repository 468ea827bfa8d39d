"""The shape of the repo, as docs/architecture.md draws it: thin scripts at the root over one package, whose
layers import only downwards, with no cycle, and nothing but the tests importing a root script."""
import ast
import re
import warnings
from pathlib import Path

import pytest

from mnv2 import cli

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "evaluate", "count_flops", "read_ImageNetData", "quantize")

# Lowest first. A module may import modules of its own layer or of the layers below it, never above:
# the network and the data know nothing of training, scoring knows the network and the data, deploy
# knows scoring, training knows all of them, and only the scripts sit on top.
LAYERS = (
    ("network", ("MobileNetV2",)),
    ("base", ("mnv2.cli", "mnv2.outputs", "mnv2.distributed", "mnv2.checkpoint", "mnv2.weights", "mnv2.hub",
              "mnv2.flops")),
    ("data", ("mnv2.data.imagenet", "mnv2.data.transforms", "mnv2.data.loaders", "mnv2.data.demo",
              "mnv2.data.folders", "mnv2.data.augment", "mnv2.data.gpu_decode", "mnv2.data.robust",
              "mnv2.data.ranges", "mnv2.data.archives", "mnv2.data.shards")),
    ("engines", ("mnv2.deploy.export", "mnv2.deploy.inference", "mnv2.deploy.onnx_weights",
                 "mnv2.deploy.quantization")),
    ("scoring", ("mnv2.resolve", "mnv2.scoring", "mnv2.evaluation")),
    ("deploy", ("mnv2.deploy.ptq",)),
    ("training", ("mnv2.training.optimization", "mnv2.training.finetune", "mnv2.training.distill",
                  "mnv2.training.teacher_outputs",
                  "mnv2.training.fused_batchnorm",
                  "mnv2.training.recipes", "mnv2.training.config", "mnv2.training.state", "mnv2.training.learner",
                  "mnv2.training.datasets", "mnv2.training.loop", "mnv2.training.run")),
    ("scripts", SCRIPTS),
)
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
PACKAGES = ("mnv2", "mnv2.data", "mnv2.training", "mnv2.deploy")


def module_name(path):
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def project_imports(path):
    """The project modules that `path` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # from mnv2.data import folders
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return {name for name in found if name in RANK or name.split(".")[0] in SCRIPTS}


def library_files():
    return sorted(REPO.joinpath("mnv2").rglob("*.py")) + [REPO / "MobileNetV2.py"]


def test_every_module_is_in_the_layering_table():
    modules = {module_name(p) for p in library_files()} - set(PACKAGES)
    assert modules == set(RANK) - set(SCRIPTS)
    assert {p.stem for p in REPO.glob("*.py")} == set(SCRIPTS) | {"MobileNetV2"}, "the root holds the scripts alone"


@pytest.mark.parametrize("module", sorted(set(RANK)))
def test_module_imports_only_its_layer_and_those_below(module):
    path = REPO / (module.replace(".", "/") + ".py")
    above = sorted(name for name in project_imports(path) if RANK.get(name, len(LAYERS)) > RANK[module])
    assert not above, f"{module} imports {above}, above its layer"


def test_nothing_imports_a_root_script_but_the_tests():
    for path in library_files() + sorted(REPO.joinpath("bench").glob("*.py")) + [REPO / f"{s}.py" for s in SCRIPTS]:
        scripts = sorted(name for name in project_imports(path) if name in SCRIPTS and name != path.stem)
        assert not scripts, f"{path.relative_to(REPO)} imports the script(s) {scripts}"


def test_the_modules_have_no_import_cycle():
    graph = {module_name(p): project_imports(p) for p in library_files()}
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for dependency in graph.get(module, ()):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_network_imports_only_torch():
    imported = set()
    for node in ast.walk(ast.parse((REPO / "MobileNetV2.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "math", "__future__", "collections", "typing"}, imported


def test_scripts_are_a_parser_and_a_main():
    for script in SCRIPTS:
        tree = ast.parse((REPO / f"{script}.py").read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert {"get_args_parser", "main"} <= functions, script
        # besides them: parser groups (add_*), and at most one step of main's own
        others = {name for name in functions - {"get_args_parser", "main"} if not name.startswith("add_")}
        assert len(others) <= 1, f"{script}.py defines {sorted(others)}: that belongs in the package"
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)], f"{script}.py defines a class"


def test_old_import_paths_still_work():
    import read_ImageNetData
    from mnv2.data import imagenet, loaders
    from MobileNetV2 import MobileNetV2  # noqa: F401
    from read_ImageNetData import (EvalSampler, ImageNetDataset, TrainTransform, build_loader,  # noqa: F401
                                   find_layout, make_demo, normalize, read_classes)
    assert read_ImageNetData.find_layout is imagenet.find_layout and read_ImageNetData.build_loader is loaders.build_loader


def test_one_parser_and_one_error_type_serve_every_script():
    for script in SCRIPTS:
        source = (REPO / f"{script}.py").read_text()
        assert "cli.Parser(" in source, f"{script}.py builds its parser elsewhere"
        assert "argparse.ArgumentParser(" not in source
    for path in library_files():
        assert path.name == "cli.py" or "class UsageError" not in path.read_text()
    assert issubclass(cli.UsageError, cli.ScriptError) and cli.UsageError.exit_code == 2


DEPRECATED_CALLS = {  # what its owners deprecated -> what this repo uses instead
    "torch.ao.quantization": "torchao.quantization.pt2e",
    "torch.quantization": "torchao.quantization.pt2e",
    "torchvision.io": "torchcodec.decoders",
    "torch.jit.trace": "torch.export",
    "torch.jit.script": "torch.export",
}


def test_no_module_calls_an_api_its_owners_deprecated():
    offenders = []
    for path in [*REPO.glob("*.py"), *(REPO / "mnv2").rglob("*.py"), *(REPO / "bench").rglob("*.py")]:
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {old} (use {new})" for old, new in DEPRECATED_CALLS.items()
                      if re.search(rf"\b{re.escape(old)}\b", text)]
    assert offenders == []


def test_this_repos_deprecation_warnings_fail_the_suite():
    with pytest.raises(DeprecationWarning):
        warnings.warn("an API on its way out", DeprecationWarning)
    with pytest.raises(FutureWarning):
        warnings.warn("an API on its way out", FutureWarning)
