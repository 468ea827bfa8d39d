"""Command-line plumbing shared by every script: one parser, one error type, one way to an exit code.

    parser = cli.Parser(prog="train.py", description="...", presets=lambda args: {...})
    sys.exit(cli.exit_code(error, "train.py"))

Every script reports a failure as one line `<script>: error: <what and what to do>`: exit code 2 for a
flag that cannot work (as argparse does), 1 for anything found while running. The lowest layer of the
repo: it imports nothing of the project, so the network, the data and the scripts can all use it.
"""
import argparse
import math
import sys
import unicodedata
from pathlib import Path

import torch


class ScriptError(Exception):
    """A failure the user can act on: reported as one line, never a traceback. `exit_code` says how."""
    exit_code = 1


class UsageError(ScriptError, ValueError):
    """A flag value that cannot work (a missing path, a device that is not there): exit code 2."""
    exit_code = 2


def own_message(error):
    """The error's one-line message; raised in a DataLoader worker, it arrives wrapped in that worker's
    traceback, with the original message on the last line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def printable(text, keep="\t"):
    """`text` with every control or unassigned character but those in `keep` escaped (ESC -> '\\x1b'), so
    that a file or folder name cannot drive the terminal it is printed on, nor break a line in two."""
    return "".join(c if c in keep or unicodedata.category(c)[0] != "C" else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in str(text))


def report(error, prog, prefix=None):
    """Print `error` as the script's one line on stderr and return its exit code."""
    print(f"{prefix or prog + ': error: '}{printable(own_message(error))}", file=sys.stderr, flush=True)
    return getattr(error, "exit_code", 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # A help that already says its default (a derived one) is not followed by a second one.
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and presets.

    `presets(namespace) -> dict`, when given, is asked after a first parse which defaults the command
    line selects (`--demo`, a recipe); those become the defaults of the final parse, so a flag the user
    typed always wins, even one equal to the preset's value or to the plain default.
    """

    def __init__(self, *args, presets=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.presets = presets

    def error(self, message):
        # One line, exit code 2, as argparse does, without the many-line usage block in front of it.
        self.exit(2, f"{self.prog}: error: {printable(message)} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.presets is None or namespace is not None:
            return super().parse_known_args(args, namespace)
        first, _ = super().parse_known_args(args)
        try:
            chosen = self.presets(first)
        except ScriptError as e:  # a --config file that cannot be read
            self.error(own_message(e))
        if not chosen:
            return super().parse_known_args(args)
        actions = {a.dest: a for a in self._actions}
        unknown = sorted(set(chosen) - set(actions))
        if unknown:
            source = f" in --config {first.config}" if getattr(first, "config", None) else ""
            self.error(f"{', '.join(unknown)}{source}: not {'a flag' if len(unknown) == 1 else 'flags'} of {self.prog}")
        for dest, value in chosen.items():  # argparse checks the choices of typed values only
            choices = actions[dest].choices
            if choices is not None and value is not None and value not in choices:
                source = f" (--config {first.config})" if getattr(first, "config", None) else ""
                self.error(f"{dest} {value!r}{source}: not one of {', '.join(map(str, choices))}")
        saved = {a.dest: a.default for a in self._actions if a.dest in chosen}
        self.set_defaults(**chosen)
        try:
            return super().parse_known_args(args)
        finally:
            self.set_defaults(**saved)


# --------------------------------------------------------------------------------------------------
# Argument types: a bad value becomes the parser's one-line error


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def data_location(text):
    """--data-dir: a URL as typed (a Path would fold its '//'), anything else a Path."""
    return text if "://" in text else Path(text)


def device(text):
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text} (cpu, cuda, cuda:1, ...)") from None


def logger(enabled):
    """print, or nothing: the one log function of every script (only rank 0 of a job speaks)."""
    def log(*parts):
        if enabled:
            print(*(printable(part, keep="\t\n") for part in parts), flush=True)
    return log
