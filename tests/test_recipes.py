"""The published recipes and their parts: presets as defaults, optimizers, schedules, the EMA, gradient
accumulation and clipping, stochastic depth, and exact resume with a recipe.

    python -m pytest tests/test_recipes.py -q
"""
import math
import os
import signal

import pytest
import torch

import helpers
import train
from mnv2 import cli, distributed
from mnv2.data.loaders import RASampler
from mnv2.data.transforms import normalize
from mnv2.training import config, learner, loop, optimization, recipes
from MobileNetV2 import MobileNetV2

BATCH = 8
TINY = ("--batch-size", str(BATCH), "--num-epochs", "1", "--width-mult", "0.25", "--input-size", "32",
        "--train-crop-size", "32", "--val-crop-size", "32", "--val-resize-size", "36", "--num-workers", "0",
        "--print-freq", "100", "--device", "cpu")


@pytest.fixture(autouse=True)
def keep_rng_state():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def parse(*argv):
    return config.check_args(train.get_args_parser().parse_args(list(argv)))


def run(data, out, *extra, on_step=None):
    args = train.get_args_parser().parse_args(["--data-dir", str(data), "--save-path", str(out), *TINY, *extra])
    return helpers.run_main(train, args, on_step=on_step)


# ----------------------------------------------------------------------------------------------------
# Recipes as files, --config, args.yaml


def test_every_training_recipe_file_states_where_it_was_published():
    names = recipes.training_recipes()
    assert names[0] == "seed" and {"torchvision-v1", "torchvision-v2", "rmsproptf", "d-li14", "cvnets"} <= set(names)
    dests = {a.dest for a in train.get_args_parser()._actions}
    for name in names:
        recipe = recipes.named(name)
        assert recipe.source and recipe.top1 > 70 and recipe.batch_size > 0 and recipe.lr > 0, name
        assert set(recipe.flags) <= dests, f"recipes/{name}.yaml sets {set(recipe.flags) - dests}"
    for name in recipes.PRESETS:  # the defaults of --demo, --qat, --pretrained, --freeze-backbone
        assert set(recipes.named(name).flags) <= dests, name


def test_precedence_is_defaults_recipe_config_then_command_line(tmp_path):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("flags:\n  label-smoothing: 0.2\n  mixup_alpha: 0.4\n  num_epochs: 7\n")
    args = parse("--recipe", "torchvision-v2", "--config", str(config_file), "--num-epochs", "3",
                 "--data-dir", str(tmp_path))
    assert args.opt == "sgd" and args.auto_augment == "ta_wide"            # the recipe over the defaults
    assert (args.label_smoothing, args.mixup_alpha) == (0.2, 0.4)           # --config over the recipe
    assert args.num_epochs == 3                                             # the command line over --config
    assert args.momentum == 0.9 and args.seed == 0                          # untouched defaults


@pytest.mark.parametrize("text, message", [
    ("flags:\n  lrr: 0.1\n", "lrr in --config"),
    ("opt: lamb\n", "opt 'lamb'"),
    ("lr: [0.1\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        train.get_args_parser().parse_args(["--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_a_run_writes_args_yaml_and_it_repeats_the_run(demo_data, tmp_path):
    out = tmp_path / "first"
    assert run(demo_data, out, "--recipe", "torchvision-v1", "--lr", "0.01") == 0
    written = recipes.read_config(out / "args.yaml")
    assert written["recipe"] == "torchvision-v1" and written["lr"] == 0.01 and written["lr_step_size"] == 1.0
    again = parse("--config", str(out / "args.yaml"), "--save-path", str(tmp_path / "second"))
    first = parse("--data-dir", str(demo_data), "--save-path", str(tmp_path / "second"), *TINY,
                  "--recipe", "torchvision-v1", "--lr", "0.01")
    assert vars(again) == {**vars(first), "config": str(out / "args.yaml")}


# ----------------------------------------------------------------------------------------------------
# Presets


def test_torchvision_v2_preset_is_the_published_command(tmp_path):
    args = parse("--recipe", "torchvision-v2", "--data-dir", str(tmp_path))
    # vision PR #5560's mobilenet_v2 command, on 8 GPUs x 128
    expected = dict(opt="sgd", momentum=0.9, lr=0.5, batch_size=1024, lr_schedule="cosine", warmup_epochs=5.0,
                    lr_warmup_method="linear", lr_warmup_decay=0.01, auto_augment="ta_wide", random_erase=0.1,
                    label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, weight_decay=2e-5, norm_weight_decay=0.0,
                    bias_weight_decay=None, train_crop_size=176, val_resize_size=232, val_crop_size=224,
                    model_ema=True, model_ema_steps=32, model_ema_decay=0.99998, ra_sampler=True, ra_reps=4,
                    num_epochs=600)
    assert {k: getattr(args, k) for k in expected} == expected


def test_an_explicit_flag_wins_over_the_preset_even_at_the_plain_default(tmp_path):
    args = parse("--recipe", "torchvision-v2", "--data-dir", str(tmp_path), "--weight-decay", "4e-5",
                 "--lr-scheduler", "exponential", "--no-model-ema-adjust")
    assert args.weight_decay == 4e-5 == train.get_args_parser().get_default("weight_decay")
    assert args.lr_schedule == "exponential" and args.model_ema_adjust is False and args.mixup_alpha == 0.2
    assert train.get_args_parser().get_default("mixup_alpha") == 0.0  # the parser's defaults stay as they were


def test_a_recipe_lr_scales_linearly_with_the_batch_unless_lr_is_given(tmp_path):
    scaled = parse("--recipe", "torchvision-v2", "--data-dir", str(tmp_path), "--batch-size", "256")
    assert scaled.lr == pytest.approx(0.5 * 256 / 1024)
    assert "scaled linearly to --batch-size 256" in config.recipe_lines(scaled)[1]
    given = parse("--recipe", "torchvision-v2", "--data-dir", str(tmp_path), "--batch-size", "256", "--lr", "0.5")
    assert given.lr == 0.5 and "as given" in config.recipe_lines(given)[1]
    seed = parse("--data-dir", str(tmp_path), "--batch-size", "128")  # the seed's commands keep lr 0.045
    assert seed.lr == 0.045 and config.recipe_lines(seed) == []  # and the seed's runs print what they did


def test_demo_and_recipe_compose_demo_sizes_recipe_method():
    args = parse("--demo", "--recipe", "torchvision-v2")
    assert (args.train_crop_size, args.val_crop_size, args.val_resize_size, args.batch_size, args.num_epochs) == \
        (64, 64, 73, 32, 15)
    assert (args.lr_schedule, args.auto_augment, args.mixup_alpha, args.hflip) == ("cosine", "ta_wide", 0.2, 0.0)
    assert args.lr == pytest.approx(0.5 * 32 / 1024) and args.warmup_epochs == 5.0
    assert parse("--demo").lr == 0.05  # without a recipe the demo's own method


def test_torchvisions_spellings_are_accepted():
    args = parse("--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "5", "--lr-min", "1e-5",
                 "--resize", "232", "--demo")
    assert (args.lr_schedule, args.warmup_epochs, args.min_lr, args.val_resize_size) == ("cosine", 5.0, 1e-5, 232)
    assert parse("--lr-scheduler", "steplr", "--demo").lr_schedule == "step"


def test_help_names_each_recipe_with_its_source_and_published_result(capsys):
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for name in recipes.training_recipes():
        recipe = recipes.named(name)
        assert "".join(f"{name}: {recipe.source}; {recipe.top1}% top-1".split()) in text


@pytest.mark.parametrize("flags, message", [
    (["--auto-augment", "rand-q9"], "--auto-augment"),
    (["--recipe", "resnet"], "--recipe"),
    (["--opt", "lamb"], "--opt"),
    (["--lr-scheduler", "poly"], "--lr-scheduler"),
])
def test_bad_recipe_flags_exit_2_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args_parser().parse_args(flags)
    assert e.value.code == 2
    assert message in helpers.one_line(capsys.readouterr().err)


def test_flag_combinations_that_cannot_work_are_usage_errors(tmp_path):
    for flags, message in ((["--batch-size", "10", "--accum-steps", "4"], "--accum-steps"),
                           (["--val-crop-size", "240", "--val-resize-size", "232"], "--val-resize-size"),
                           (["--ra-magnitude", "31"], "--ra-magnitude")):
        with pytest.raises(cli.UsageError, match=message):
            parse("--data-dir", str(tmp_path), *flags)


# ----------------------------------------------------------------------------------------------------
# Optimizers


def test_rmsproptf_is_tensorflows_rmsprop():
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(6)]
    lrs = [0.1, 0.1, 0.05, 0.05, 0.02, 0.02]
    w = torch.nn.Parameter(w0.clone())
    opt = optimization.RMSpropTF([w], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-2)
    for g, lr in zip(grads, lrs):
        w.grad = g.clone()
        optimization.set_lr(opt, lr)
        opt.step()
    # tf.compat.v1.train.RMSPropOptimizer: ms starts at 1; eps inside the root; lr inside the momentum
    ref, ms, mom = w0.clone(), torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for g, lr in zip(grads, lrs):
        g = g + 1e-2 * ref
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + lr * g / torch.sqrt(ms + 1e-3)
        ref = ref - mom
    assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)
    torch_rms = torch.nn.Parameter(w0.clone())  # and it is not torch's RMSprop
    plain = torch.optim.RMSprop([torch_rms], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        torch_rms.grad = g.clone()
        plain.step()
    assert (torch_rms.detach() - ref).abs().max() > 1e-3


def test_opt_builds_each_optimizer_with_its_epsilon():
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    built = {name: optimization.build_optimizer(model, 0.1, opt=name) for name in optimization.OPTIMIZERS}
    assert type(built["sgd"]) is torch.optim.SGD and not built["sgd"].defaults["nesterov"]
    assert built["sgd-nesterov"].defaults["nesterov"]
    assert isinstance(built["rmsproptf"], optimization.RMSpropTF) and built["rmsproptf"].defaults["eps"] == 1e-3
    assert type(built["rmsprop"]) is torch.optim.RMSprop and built["rmsprop"].defaults["eps"] == 0.0316
    assert type(built["adamw"]) is torch.optim.AdamW and built["adamw"].defaults["eps"] == 1e-8
    assert optimization.build_optimizer(model, 0.1, opt="rmsprop", eps=1e-5).defaults["eps"] == 1e-5


def test_norm_and_bias_weight_decay_go_to_their_own_groups():
    model = MobileNetV2(num_classes=10, width_mult=0.25)
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    groups = optimization.parameter_groups(model, 2e-5, norm_weight_decay=0.0)  # torchvision-v2
    assert [g["weight_decay"] for g in groups] == [2e-5, 0.0]
    assert {id(p) for p in groups[1]["params"]} == norm
    assert id(model.classifier[1].bias) in {id(p) for p in groups[0]["params"]}  # a bias: --weight-decay unless told
    both = optimization.parameter_groups(model, 4e-5, norm_weight_decay=0.0, bias_weight_decay=0.0)
    assert {id(p) for p in both[1]["params"]} == norm | {id(model.classifier[1].bias)}
    old = optimization.parameter_groups(model, 4e-5, decay_norm_and_bias=False)  # the older switch: same groups
    assert [[id(p) for p in g["params"]] for g in old] == [[id(p) for p in g["params"]] for g in both]


# ----------------------------------------------------------------------------------------------------
# Schedules and the EMA


def test_step_schedule_decays_every_fractional_step_size_at_step_granularity():
    s = optimization.LRSchedule(0.032, 450, "step", gamma=0.973, step_size=2.4)
    assert s(2, 3, 10) == pytest.approx(0.032)          # epoch 2.3
    assert s(2, 4, 10) == pytest.approx(0.032 * 0.973)  # epoch 2.4: the first decay, inside epoch 3
    assert s(4, 8, 10) == pytest.approx(0.032 * 0.973 ** 2)
    exp = optimization.LRSchedule(0.1, 10, "exponential", gamma=0.5, warmup_epochs=2)
    assert exp(2, 0, 10) == pytest.approx(0.1) and exp(3, 5, 10) == pytest.approx(0.05)  # counted after warm-up


def test_warmup_methods_and_decay():
    linear = optimization.LRSchedule(0.5, 600, "cosine", warmup_epochs=5, warmup_decay=0.01)
    assert linear(0, 0, 100) == pytest.approx(0.5 * (0.01 + 0.99 / 500))
    assert linear(2, 49, 100) == pytest.approx(0.5 * (0.01 + 0.99 * 250 / 500))
    assert linear(5, 0, 100) == pytest.approx(0.5)
    constant = optimization.LRSchedule(0.5, 600, "cosine", warmup_epochs=5, warmup_method="constant",
                                       warmup_decay=0.1)
    assert constant(4, 99, 100) == pytest.approx(0.05) and constant(5, 0, 100) == pytest.approx(0.5)
    cosine = optimization.LRSchedule(0.5, 600, "cosine", warmup_epochs=5, min_lr=1e-3)
    assert cosine(302, 50, 100) == pytest.approx(1e-3 + 0.5 * (0.5 - 1e-3))
    assert cosine(600, 0, 100) == pytest.approx(1e-3)


def test_ema_decay_is_adjusted_as_torchvision_does():
    # torchvision: alpha = (1 - decay) x world_size x batch_size x model_ema_steps / epochs
    assert optimization.ema_decay(0.99998, 32, 1024, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert optimization.ema_decay(0.9, 32, 1024, 10) == 0.0  # alpha is capped at 1
    assert optimization.ema_decay(0.9999, 1, 512, 450, adjust=False) == 0.9999


def test_ema_updates_every_k_steps_and_copies_through_the_warmup():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = optimization.ModelEma(model, decay=0.5, every=2, warmup_epochs=1)

    def after(value, epoch, index):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.after_step(model, epoch, index)
        return ema.module.weight[0, 0].item()

    assert after(4.0, 0, 0) == 4.0    # first update: a copy
    assert after(8.0, 0, 1) == 4.0    # not an update step
    assert after(8.0, 0, 2) == 8.0    # inside the warm-up: a copy
    assert after(2.0, 1, 0) == 2.0    # the first update after the warm-up: a copy
    assert after(6.0, 1, 2) == 4.0    # then the average: 0.5 x 2 + 0.5 x 6


# ----------------------------------------------------------------------------------------------------
# Accumulation, clipping, stochastic depth (float64 so that only the arithmetic order differs)


def batches(count, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, size, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (count, size), generator=g)
    return [(images[k], targets[k], torch.arange(size), torch.zeros(size, dtype=torch.int64)) for k in range(count)]


def learner_for(model, lr=0.05, **kwargs):
    optimizer = torch.optim.SGD(optimization.parameter_groups(model, 4e-5), lr=lr, momentum=0.9)
    return learner.Learner(model, model, torch.nn.CrossEntropyLoss(), optimizer, optimization.LRSchedule(lr, 1),
                         torch.device("cpu"), channels_last=False, **kwargs)


def fresh_model():
    torch.manual_seed(0)
    return MobileNetV2(num_classes=10, width_mult=0.25).double()


@pytest.mark.slow
def test_accumulation_steps_on_the_mean_of_the_passes_losses(one_thread):
    model = fresh_model()
    meter, steps, _ = loop.train_one_epoch(learner_for(model, accum_steps=2), batches(5, 4), 0, 2,
                                            distributed.Context(), log=lambda *a: None)
    assert steps == 2 and meter.count == 16  # the fifth batch, a step short of its pair, is left out
    reference = fresh_model()
    optimizer = torch.optim.SGD(optimization.parameter_groups(reference, 4e-5), lr=0.05, momentum=0.9)
    criterion, data = torch.nn.CrossEntropyLoss(), batches(5, 4)
    reference.train()
    for step in range(2):
        losses = [criterion(reference(normalize(x).double()), t) for x, t, _, _ in data[2 * step:2 * step + 2]]
        optimizer.zero_grad()
        ((losses[0] + losses[1]) / 2).backward()
        optimizer.step()
    worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    assert worst < 1e-10


@pytest.mark.slow
def test_clip_grad_norm_limits_the_update(one_thread):
    clipped, plain = fresh_model(), fresh_model()
    for model, clip in ((clipped, 1e-3), (plain, None)):
        learner = learner_for(model, lr=1.0, clip_grad_norm=clip)
        learner.optimizer.param_groups[0]["momentum"] = 0.0
        learner.optimizer.param_groups[0]["weight_decay"] = 0.0
        loop.train_one_epoch(learner, batches(1, 4), 0, 1, distributed.Context(), log=lambda *a: None)
    start = fresh_model()
    moved = torch.cat([(p - q).flatten() for p, q in zip(clipped.parameters(), start.parameters())]).norm()
    assert moved.item() == pytest.approx(1e-3, rel=1e-6)  # lr 1 x a gradient of norm 1e-3
    moved_plain = torch.cat([(p - q).flatten() for p, q in zip(plain.parameters(), start.parameters())]).norm()
    assert moved_plain > 10 * moved


def test_drop_path_drops_whole_residual_branches_in_training_only():
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, width_mult=0.25, drop_path=0.2)
    assert model.state_dict().keys() == MobileNetV2(num_classes=10, width_mult=0.25).state_dict().keys()
    blocks = list(model.features[1:-1])
    assert [b.drop_path for b in blocks if b.use_residual] == \
        [pytest.approx(0.2 * i / 17) for i, b in enumerate(blocks) if b.use_residual]  # linear in depth
    assert model.config["drop_path"] == 0.2 and not any(b.drop_path for b in blocks if not b.use_residual)
    block = next(b for b in model.features[1:-1] if b.use_residual and b.drop_path > 0)
    block.drop_path = 0.5
    x = torch.randn(64, block.conv[0][0].in_channels, 8, 8)
    block.train()
    out = block(x)
    dropped = [torch.equal(out[i], x[i]) for i in range(64)]
    assert 10 < sum(dropped) < 54
    branch = block.conv(x)
    kept = [i for i in range(64) if not dropped[i]]
    assert torch.allclose(out[kept], x[kept] + branch[kept] / 0.5, atol=1e-5)
    block.eval()
    assert torch.allclose(block(x), x + block.conv(x))


# ----------------------------------------------------------------------------------------------------
# Whole runs with a recipe


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["torchvision-v2", "rmsproptf", "cvnets"])
def test_resume_with_a_recipe_is_bit_exact(demo_data, tmp_path, recipe):
    """Every part of the recipe (policy, erasing, mixup/cutmix, RA sampler, EMA, RMSProp-TF, step decay,
    stochastic depth) draws from the seeded, checkpointed generators: 1 + 1 epochs equal 2."""
    extra = ("--recipe", recipe, "--drop-path", "0.1", "--num-workers", "1", "--warmup-epochs", "1")
    assert run(demo_data, tmp_path / "straight", *extra, "--num-epochs", "2") == 0
    assert run(demo_data, tmp_path / "resumed", *extra) == 0
    assert run(demo_data, tmp_path / "resumed", *extra, "--num-epochs", "2", "--resume", "auto") == 0
    straight, resumed = (helpers.load_checkpoint(tmp_path / d / "last.pth") for d in ("straight", "resumed"))
    for key in ("model", "model_ema", "optimizer", "sampler"):
        assert checkpoint_equal(straight[key], resumed[key]), key
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in m.items() if k not in timing} for m in straight["metrics"]] == \
        [{k: v for k, v in m.items() if k not in timing} for m in resumed["metrics"]]
    assert straight["args"]["recipe"] == recipe and straight["args"]["drop_path"] == 0.1


def checkpoint_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(checkpoint_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(checkpoint_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_preempted_mid_epoch_with_the_ra_sampler_resumes_with_exactly_the_unseen_samples(demo_data, tmp_path):
    consumed = []

    def preempt(epoch, step, indices):
        consumed.append((epoch, indices.tolist()))
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    flags = ("--ra-sampler", "--ra-reps", "4", "--num-epochs", "2")
    assert run(demo_data, tmp_path, *flags, on_step=preempt) == 128 + signal.SIGTERM

    def record(epoch, step, indices):
        consumed.append((epoch, indices.tolist()))

    assert run(demo_data, tmp_path, *flags, "--resume", "auto", on_step=record) == 0
    sampler = RASampler(40, seed=0, repetitions=4)
    sampler.set_epoch(0)
    epoch0 = [i for epoch, batch in consumed if epoch == 0 for i in batch]
    assert epoch0 == list(sampler)[:40 // BATCH * BATCH]
    assert [epoch0[4 * k:4 * k + 4] for k in range(3)] == [[epoch0[4 * k]] * 4 for k in range(3)]  # repeats


@pytest.mark.slow
def test_recipe_torchvision_v2_trains_on_the_demo_end_to_end(demo_data, tmp_path):
    code, err, out = helpers.run_script(train, "--demo", "--recipe", "torchvision-v2", "--data-dir", demo_data,
                                        "--save-path", tmp_path, "--num-epochs", "2", "--batch-size", "8",
                                        "--input-size", "32", "--width-mult", "0.25")
    assert code == 0, err
    first = out.splitlines()
    assert first[0].startswith("recipe torchvision-v2: torchvision IMAGENET1K_V2, vision PR #5560; 72.154% top-1")
    assert first[1].startswith("lr 0.00390625: the recipe's 0.5 at global batch 1024, scaled linearly")
    ckpt = helpers.load_checkpoint(tmp_path / "last.pth")
    assert ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2 and ckpt["model_ema"] is not None
    assert ckpt["args"]["auto_augment"] == "ta_wide" and ckpt["args"]["ra_sampler"] and ckpt["args"]["cutmix_alpha"] == 1.0
    assert all(math.isfinite(m["train_loss"]) for m in ckpt["metrics"])
    assert ckpt["data"]["train_crop_size"] == 32 and ckpt["data"]["input_size"] == 32


DDP_ACCUMULATION = """
import sys, torch
from mnv2 import distributed
from mnv2.training import loop, optimization
from mnv2.training.learner import Learner
from MobileNetV2 import MobileNetV2
context = distributed.setup("cpu")
g = torch.Generator().manual_seed(1)
images = torch.randint(0, 256, (2, 16, 3, 64, 64), dtype=torch.uint8, generator=g)
targets = torch.randint(0, 10, (2, 16), generator=g)
# rank r takes images 8r..8r+7 of each global batch of 16, in two passes of 4
loader = [(images[s, 8 * context.rank + 4 * k:8 * context.rank + 4 * k + 4], targets[s, 8 * context.rank + 4 * k:
           8 * context.rank + 4 * k + 4], torch.arange(4), torch.zeros(4, dtype=torch.int64))
          for s in range(2) for k in range(2)]
torch.manual_seed(0)
model = MobileNetV2(num_classes=10, width_mult=0.25).double()
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(optimization.parameter_groups(model, 4e-5), lr=0.05, momentum=0.9)
learner = Learner(ddp, model, torch.nn.CrossEntropyLoss(), optimizer, optimization.LRSchedule(0.05, 1),
                        torch.device("cpu"), channels_last=False, accum_steps=2)
loop.train_one_epoch(learner, loader, 0, 2, context, log=lambda *a: None)
if context.is_main:
    torch.save({k: v.detach().contiguous() for k, v in model.named_parameters()}, sys.argv[1])
distributed.cleanup()
"""


@pytest.mark.slow
def test_ddp_with_accumulation_steps_on_the_mean_of_all_passes_of_the_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_ACCUMULATION)
    proc = helpers.torchrun(script, tmp_path / "ddp.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 16, 3, 64, 64), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (2, 16), generator=g)
    reference = fresh_model()
    optimizer = torch.optim.SGD(optimization.parameter_groups(reference, 4e-5), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    reference.train()
    for s in range(2):  # each pass of 4 images through the model on its own; the mean of the 4 losses
        losses = [criterion(reference(normalize(images[s, q:q + 4]).double()), targets[s, q:q + 4]) for q in (0, 4, 8, 12)]
        optimizer.zero_grad()
        (sum(losses) / 4).backward()
        optimizer.step()
    worst = max((ddp[k] - p).abs().max().item() for k, p in reference.named_parameters())
    assert worst <= 1e-9


def test_the_demo_with_a_recipe_writes_beside_the_quick_start_not_over_it():
    assert parse("--demo").save_path == "output/demo"
    assert parse("--demo", "--recipe", "torchvision-v2").save_path == "output/demo-torchvision-v2"
    assert parse("--demo", "--recipe", "d-li14", "--save-path", "mine").save_path == "mine"
