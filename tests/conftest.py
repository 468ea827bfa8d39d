"""Shared fixtures: the data tests run on, built on the fly (a tiny fake ImageNet in the real ILSVRC2012
layout in tmp_path, the demo digits dataset once per session). Helpers they use are in helpers.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import make_fake_imagenet  # noqa: E402
from read_ImageNetData import make_demo  # noqa: E402


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
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


