"""The step decided on the device (`--sync-free`, the default on CUDA), through its CPU twin: torch's fused
CPU optimizer kernels take the same device flag as the CUDA ones.

    python -m pytest tests/test_sync_free.py -q

A skipped step must change nothing (weights, BatchNorm statistics and counters, optimizer state, EMA),
compared bit for bit; the host reads the statistics only every --print-freq steps; the stop rules and the
exact resume hold as with a step decided on the host.
"""
import contextlib
import copy

import pytest
import torch

import helpers
import train
from mnv2 import distributed
from mnv2.training import loop, optimization
from mnv2.training.learner import Learner
from MobileNetV2 import MobileNetV2


def batches(count, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, size, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (count, size), generator=g)
    return [(images[k], targets[k], torch.arange(size), torch.zeros(size, dtype=torch.int64)) for k in range(count)]


NanAt = helpers.NanAt


def learner(sync_free, criterion=None, ema=True, read_every=10, opt="sgd", max_nonfinite=3):
    """A learner as build_learner makes it: the buffers flattened before anything keeps references."""
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    average = optimization.ModelEma(model, 0.9, every=1) if ema else None
    optimizer = optimization.build_optimizer(model, 0.05, opt=opt, fused=True)
    guard = optimization.StepGuard(optimizer) if sync_free else None
    keeper = optimization.BufferKeeper(model)
    return Learner(model, model, criterion or torch.nn.CrossEntropyLoss(), optimizer,
                         optimization.LRSchedule(0.05, 1), torch.device("cpu"), channels_last=False, ema=average,
                         max_nonfinite=max_nonfinite, guard=guard, read_every=read_every, buffers=keeper)


def state_of(learner):
    """Everything a step may change, cloned: weights and buffers, optimizer state, EMA."""
    return copy.deepcopy({"model": learner.raw.state_dict(), "optimizer": learner.optimizer.state_dict(),
                          "ema": learner.ema.module.state_dict()})


def run_epoch(learner, data, log=None, on_step=None):
    return loop.train_one_epoch(learner, data, 0, len(data), distributed.Context(), on_step=on_step,
                                 log=log or (lambda *a: None))


@contextlib.contextmanager
def counted_host_reads():
    """Counts Tensor.item and Tensor.tolist calls (a GPU's host syncs) inside the block, then puts both back."""
    counts = {"item": 0, "tolist": 0}
    originals = {name: getattr(torch.Tensor, name) for name in counts}

    def counting(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in counts:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_a_skipped_step_changes_no_weight_statistic_optimizer_or_ema_state(one_thread, opt):
    learner_ = learner(True, NanAt({3}), opt=opt)
    states = {}
    run_epoch(learner_, batches(5), on_step=lambda epoch, step, indices: states.setdefault(step, state_of(learner_)))
    helpers.assert_same_tensors(states[3], states[2])  # step 3 was the NaN one: everything as after step 2, bit for bit
    for key in ("model", "ema"):
        moved = [k for k in states[2][key] if not torch.equal(states[4][key][k], states[3][key][k])]
        assert any("running_mean" in k for k in moved) and any("weight" in k for k in moved)  # step 4 ran


@pytest.mark.slow
def test_the_device_decided_step_equals_the_host_decided_one(one_thread):
    on_device, on_host = learner(True, NanAt({2})), learner(False, NanAt({2}))
    meters = [run_epoch(each, batches(6))[0] for each in (on_device, on_host)]
    helpers.assert_same_tensors(state_of(on_device), state_of(on_host))
    counted = [(m.loss_sum, m.correct, m.count, m.skipped, m.failed) for m in meters]
    assert counted[0] == counted[1]
    assert meters[0].skipped == 1 and meters[0].count == 5 * 4


@pytest.mark.slow
def test_statistics_are_read_once_per_print_freq_not_once_per_step(one_thread):
    data = batches(8)
    reads = {}
    for sync_free in (True, False):
        learner_ = learner(sync_free, read_every=4, ema=False)
        with counted_host_reads() as counts:
            meter = run_epoch(learner_, data)[0]
        reads[sync_free] = counts["item"] + counts["tolist"]
        assert meter.count == 32
    assert reads == {True: 2, False: 8}  # steps 4 and 8 read four steps each; the host-decided step reads each


def test_an_epoch_not_a_multiple_of_print_freq_reads_its_tail(one_thread):
    learner_ = learner(True, read_every=4, ema=False)
    with counted_host_reads() as counts:
        meter, steps, stopped = run_epoch(learner_, batches(6))
    assert (steps, stopped, meter.count) == (6, False, 24) and counts["tolist"] == 2


def test_max_nonfinite_in_a_row_still_stops_with_the_step_named(one_thread):
    lines = []
    learner_ = learner(True, NanAt({2, 3, 4}), read_every=5, ema=False)
    with pytest.raises(loop.TrainingError, match=r"non-finite for 3 steps in a row \(epoch 1, step 4\)"):
        run_epoch(learner_, batches(6), log=lines.append)
    assert sum("step skipped" in line for line in lines) == 3


def test_a_stop_vote_is_taken_at_the_next_read(one_thread):
    class Stop:
        signum = None

    stop, seen = Stop(), []

    def on_step(epoch, step, indices):
        seen.append(step)
        if step == 2:
            stop.signum = 15

    learner_ = learner(True, read_every=3, ema=False)
    meter, steps, stopped = loop.train_one_epoch(learner_, batches(8), 0, 8, distributed.Context(),
                                                  stop=stop, on_step=on_step, log=lambda *a: None)
    assert stopped and steps == 3 and seen == [1, 2, 3] and meter.count == 12


def test_the_buffer_keeper_restores_nan_statistics_and_counters_exactly():
    model = MobileNetV2(num_classes=10, width_mult=0.25).train()
    keeper = optimization.BufferKeeper(model)
    before = copy.deepcopy(model.state_dict())
    model(torch.full((2, 3, 32, 32), float("nan")))  # the forward pass moves the statistics to NaN
    assert not torch.equal(model.features[0][1].num_batches_tracked, before["features.0.1.num_batches_tracked"])
    keeper.settle(torch.tensor(False))
    helpers.assert_same_tensors(model.state_dict(), before)
    model(torch.randn(2, 3, 32, 32))
    keeper.settle(True)
    kept = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 3, 32, 32))
    keeper.settle(False)
    helpers.assert_same_tensors(model.state_dict(), kept)


@pytest.mark.slow
def test_sync_free_resume_is_bit_exact(demo_data, tmp_path):
    def parse(out, *extra):
        return train.get_args_parser().parse_args(
            ["--data-dir", str(demo_data), "--save-path", str(out), "--batch-size", "8", "--width-mult", "0.25",
             "--input-size", "32", "--num-workers", "0", "--print-freq", "3", "--device", "cpu", "--sync-free",
             "--model-ema", "--model-ema-steps", "1", "--no-model-ema-adjust", "--model-ema-decay", "0.9", *extra])

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert helpers.run_main(train, parse(straight, "--num-epochs", "2")) == 0
    assert helpers.run_main(train, parse(split, "--num-epochs", "1")) == 0
    assert helpers.run_main(train, parse(split, "--num-epochs", "2", "--resume", "auto")) == 0
    a, b = helpers.load_checkpoint(straight / "last.pth"), helpers.load_checkpoint(split / "last.pth")
    for key in ("model", "model_ema", "optimizer", "epoch", "step", "sampler"):
        helpers.assert_same_tensors(a[key], b[key])
    timing = ("seconds", "images_per_s")
    assert ([{k: v for k, v in m.items() if k not in timing} for m in a["metrics"]]
            == [{k: v for k, v in m.items() if k not in timing} for m in b["metrics"]])


def test_sync_free_with_an_optimizer_without_a_fused_kernel_is_one_line(demo_data, tmp_path, capsys):
    args = train.get_args_parser().parse_args(
        ["--data-dir", str(demo_data), "--save-path", str(tmp_path), "--batch-size", "8", "--device", "cpu",
         "--num-workers", "0", "--sync-free", "--opt", "rmsproptf"])
    assert helpers.run_main(train, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sync-free needs --opt sgd, sgd-nesterov, adamw" in err[0]
