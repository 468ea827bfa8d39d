"""Recipes as files: `recipes/<name>.yaml` holds a published run's flag values and where it was published.

    recipes.named("torchvision-v2").flags                 # {"opt": "sgd", "lr_schedule": "cosine", ...}
    recipes.read_config("output/run/args.yaml")           # any file of flags, as train.py --config reads it

A recipe file has a `flags:` mapping (train.py's option names, `-` or `_` alike) and, for a training recipe,
a `published:` block (source, top1, batch_size, lr, and note, scale_lr where they apply). The same files hold
the defaults of --demo, --qat, --pretrained (finetune.yaml) and --freeze-backbone (linear-probe.yaml). The
precedence, lowest first: train.py's defaults < the recipe (--recipe NAME) < --config FILE < flags typed on
the command line; `config.presets` applies it.
"""
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mnv2.cli import UsageError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PRESETS = ("demo", "qat", "finetune", "linear-probe")  # files of defaults that --recipe does not name
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Recipe:
    """A published training run: the flags (argparse dests) that differ from train.py's plain defaults,
    the global batch and lr it was published with, its source and its ImageNet val top-1."""
    name: str
    source: str = ""
    top1: float = None
    batch_size: int = None
    lr: float = None
    flags: dict = field(default_factory=dict)
    note: str = ""
    scale_lr: bool = True     # the lr follows --batch-size linearly unless --lr is given

    def lr_for(self, batch_size):
        return self.lr * batch_size / self.batch_size if self.scale_lr else self.lr

    def summary(self):
        return (f"{self.source}; {self.top1}% top-1, {self.flags.get('num_epochs', 400)} epochs, global batch "
                f"{self.batch_size}, lr {self.lr:g}")


def _load_yaml(path, what):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"{what} {path}: {path.stat().st_size} bytes, too large for a file of flags")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"{what} {path}: not valid YAML{line}; fix the file or give another") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    return data


def _flags(mapping, path, what):
    if not isinstance(mapping, dict):
        raise UsageError(f"{what} {path}: `flags:` must be a mapping of flag names to values")
    flags = {}
    for key, value in mapping.items():
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and len(value) == 3):
            raise UsageError(f"{what} {path}: the value of {key!r} is a {type(value).__name__}, not a flag value")
        flags[str(key).lstrip("-").replace("-", "_")] = value
    return flags


def named(name):
    """The recipe recipes/<name>.yaml."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"--recipe {name}: no recipes/{name}.yaml (known: {', '.join(training_recipes())})")
    data = _load_yaml(path, "recipe")
    published = data.get("published") or {}
    return Recipe(name=name, flags=_flags(data.get("flags") or {}, path, "recipe"),
                  **{k: published[k] for k in ("source", "top1", "batch_size", "lr", "note", "scale_lr")
                     if k in published})


def training_recipes():
    """The names --recipe takes: every recipe file with a published global batch and lr."""
    return sorted((p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem not in PRESETS),
                  key=lambda name: (name != "seed", name))


def read_config(path):
    """The flags of a --config file: a recipe file (its `flags:`), or a flat mapping of flag names to values
    such as the args.yaml a run writes (keys that are not flags of train.py are refused by the parser)."""
    data = _load_yaml(path, "--config")
    mapping = data["flags"] if "flags" in data else {k: v for k, v in data.items() if k != "published"}
    return _flags(mapping or {}, path, "--config")


def args_yaml(flags):
    """The text of args.yaml: the flags a run resolved (its command line over its presets), as plain values,
    sorted by name, so that `train.py --config args.yaml` repeats the run."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    text = yaml.safe_dump({k: plain(v) for k, v in sorted(flags.items())}, sort_keys=False,
                          default_flow_style=False, width=120)
    return "# the flags this run resolved; `python train.py --config args.yaml` repeats it\n" + text
