"""Shared fixtures: the data tests run on, built on the fly (a tiny fake ImageNet in the real ILSVRC2012
layout in tmp_path, the demo digits dataset once per session), and a guard that fails a test which leaves
torch flags, the environment, cwd or signal handlers changed. Helpers the tests share are in helpers.py."""
import operator
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import make_fake_imagenet  # noqa: E402
from mnv2.data.demo import make_demo  # noqa: E402


# This repo's own code: a deprecation warning raised from it (a call into an API its owners are removing)
# fails the test that triggers it. Warnings that third-party code raises about its own internals stay warnings.
OWN_MODULES = r"(mnv2|train|evaluate|quantize|count_flops|read_ImageNetData|MobileNetV2|bench|helpers|conftest|test_)"


def pytest_configure(config):
    for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}:{OWN_MODULES}")
    config.addinivalue_line("markers", "slow: over about half a second (a subprocess, a real run, torchrun, a "
                                       "kernel build); `-m \"not slow\"` leaves them out for a sub-minute loop")


@pytest.fixture
def fake_imagenet(tmp_path):
    """make_fake_imagenet(tmp_path / "imagenet") with the defaults: 3 classes x 2 train JPEGs, 6 val JPEGs."""
    return make_fake_imagenet(tmp_path / "imagenet")


@pytest.fixture
def fake_imagenet_factory(tmp_path):
    """make_fake_imagenet with root defaulting to a fresh folder in tmp_path: factory(**kwargs) -> dict."""
    count = iter(range(10**6))

    def factory(root=None, **kwargs):
        return make_fake_imagenet(root or tmp_path / f"imagenet{next(count)}", **kwargs)
    return factory


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo digits dataset at 32 px, 10 classes x (4 train + 1 val) images: what the command-line
    tests train and score on (a 1-epoch width-0.25 run takes seconds)."""
    return make_demo(tmp_path_factory.mktemp("demo"), seed=0, train_per_class=4, val_per_class=1, image_size=32)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny tensors gain nothing from a second thread, and on a shared
    machine OpenMP threads that wait for a busy core slow each operator down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- every test leaves the process as it found it ------------------------------------------------------
# A change that outlives its test reaches every later one: a torch.cuda.is_available left returning True
# once made DataLoader pin memory, and every later test failed with "Found no NVIDIA driver".

def _attribute(label):
    """(label, get, set) for an attribute named by its path from torch, e.g. "torch.backends.cudnn.benchmark"."""
    path, name = label.removeprefix("torch.").rsplit(".", 1)
    owner = operator.attrgetter(path)(torch)
    return label, lambda: getattr(owner, name), lambda value: setattr(owner, name, value)


# Not a test's doing: pytest names the running test and its phase in PYTEST_CURRENT_TEST; scikit-learn and
# joblib set KMP_INIT_AT_FORK when first imported, in whichever test that happens.
ENVIRON_IGNORED = {"PYTEST_CURRENT_TEST", "KMP_INIT_AT_FORK"}


def _environ():
    return {k: v for k, v in os.environ.items() if k not in ENVIRON_IGNORED}


def _set_environ(saved):
    for key in _environ().keys() - saved.keys():
        del os.environ[key]
    os.environ.update(saved)


def _signal_handler(signum):
    def restore(handler):
        if handler is not None:  # None: installed outside Python, nothing to put back from here
            signal.signal(signum, handler)
    return f"signal handler for {signum.name}", lambda: signal.getsignal(signum), restore


def _set_deterministic(mode):
    torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


# (label, get, set), restored in this order: cuBLAS's allow_tf32 before the matmul precision it implies.
GLOBAL_STATE = (
    _attribute("torch.backends.cudnn.allow_tf32"),
    _attribute("torch.backends.cudnn.benchmark"),
    _attribute("torch.backends.cudnn.deterministic"),
    _attribute("torch.backends.cuda.matmul.allow_tf32"),
    ("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ("torch.are_deterministic_algorithms_enabled() and warn_only",
     lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
     _set_deterministic),
    _attribute("torch.cuda.is_available"),
    ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    ("os.environ", _environ, _set_environ),
    ("os.getcwd()", os.getcwd, os.chdir),
    *(_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)),
)


def snapshot_global_state():
    return {label: get() for label, get, _ in GLOBAL_STATE}


def _describe(label, before, now):
    if label == "os.environ":  # names only: values may be long or private
        added, removed = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
        changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
        return f"os.environ: added {added}, removed {removed}, changed {changed}"
    return f"{label}: {before!r} -> {now!r}"


def restore_global_state(before):
    """Put back whatever differs from `before` (a snapshot_global_state()); returns one line per change."""
    changes = []
    for label, get, set_ in GLOBAL_STATE:
        now = get()
        if now != before[label]:
            changes.append(_describe(label, before[label], now))
            set_(before[label])
    return changes


def _check_global_state(before, who):
    changes = restore_global_state(before)
    if changes:
        pytest.fail(f"{who} changed global state and left it changed (now put back):\n  " + "\n  ".join(changes),
                    pytrace=False)


@pytest.fixture(autouse=True)
def global_state_guard():
    """Fails the test in its teardown, after monkeypatch's undo and the other fixtures' (the guard's setup
    runs first). Module fixtures such as one_thread are set up before it, so their state is the baseline."""
    before = snapshot_global_state()
    yield
    _check_global_state(before, "this test or one of its fixtures")


@pytest.fixture(scope="module", autouse=True)
def module_global_state_guard():
    """The same for a module's fixtures (one_thread, a trained model), checked after the module's last test."""
    before = snapshot_global_state()
    yield
    _check_global_state(before, "this module's fixtures")
