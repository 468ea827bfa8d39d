"""The guard in conftest.py: a test that leaves global state changed fails in its teardown, naming what
changed, and the tests after it find the state as it was."""
import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

LEAKY_TESTS = '''
import os, signal, torch


def state():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.cuda.is_available,
            torch.get_num_threads(), torch.get_default_dtype(), env, os.getcwd(), signal.getsignal(signal.SIGTERM))


BEFORE = state()  # at collection, before any test ran


def test_leaves_torch_flags_changed():
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = not torch.backends.cuda.matmul.allow_tf32
    torch.cuda.is_available = lambda: True


def test_leaves_the_process_changed():
    torch.set_num_threads(torch.get_num_threads() + 1)
    torch.set_default_dtype(torch.float64)
    os.environ["LEFT_BEHIND"] = "1"
    os.chdir("..")
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def test_restores_what_it_changes():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not saved
    torch.backends.cudnn.benchmark = saved


def test_later_tests_find_everything_put_back():
    assert state() == BEFORE
'''


@pytest.mark.slow
def test_a_test_that_leaves_global_state_changed_fails_and_later_tests_find_it_put_back(pytester, monkeypatch):
    # In a process of its own, so that nothing the leaky tests do can reach this one; the copied conftest
    # finds the repo's modules and the tests' helpers through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(CONFTEST.parents[1]), str(CONFTEST.parent)]))
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=4, errors=2)  # the last test passed: the state was put back
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_leaves_torch_flags_changed*",
        "*this test or one of its fixtures changed global state and left it changed (now put back):",
        "*torch.backends.cudnn.benchmark: * -> *",
        "*torch.backends.cuda.matmul.allow_tf32: * -> *",
        "*torch.cuda.is_available: <function*",
        "*ERROR at teardown of test_leaves_the_process_changed*",
        "*torch.get_default_dtype(): torch.float32 -> torch.float64",
        "*torch.get_num_threads(): *",
        "*os.environ: added ?'LEFT_BEHIND'?, removed ??, changed ??",  # ? for [ and ]: fnmatch reads them as a set
        "*os.getcwd(): *",
        "*signal handler for SIGTERM: *",
    ])
