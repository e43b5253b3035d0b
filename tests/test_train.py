"""End-to-end runs of both scripts on tiny data: what they write, exact resume after SIGKILL, SIGINT, divergence."""
import json
import random
import re

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import classifier
import training
from conftest import SMALL_VANILLA, SMALL_WGAN, assert_same, run_hooked, run_in_process, run_script

SCRIPTS = {
    "vanilla": ("train_vanilla_gan.py", SMALL_VANILLA, ["loss/D", "loss/G", "D(x)", "D(G(z))"]),
    "wgan": ("train_wgan.py", SMALL_WGAN, ["loss/critic", "loss/G", "wasserstein_estimate"]),
}


def events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def load(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_run_writes_events_grids_and_checkpoint(tmp_path, data_root, algo):
    script, small, scalars = SCRIPTS[algo]
    size = 32 if algo == "wgan" else 28
    out = run_script(script, "--data-root", data_root, "--runs-dir", tmp_path / "runs", "--run-name", "r",
                     "--epochs", 2, "--log-every", 2, "--img-size", size, *small)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("epoch ") == 2 and "epoch 2/2  step 16" in out.stdout  # 128 images / 16 = 8 steps/epoch
    run = tmp_path / "runs" / "r"
    acc = events(run)
    tags = acc.Tags()
    assert set(scalars) <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars(scalars[0])] == list(range(2, 17, 2))
    assert {"fake", "real"} <= set(tags["images"])
    assert [e.step for e in acc.Images("fake")] == [8, 16]
    assert "config/text_summary" in tags["tensors"]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"batch_size": 16' in config
    for epoch in (1, 2):  # the fixed-noise grid: 8 columns of size + 2 px padding
        grid = Image.open(run / "samples" / f"epoch_{epoch:03d}.png")
        n = 32 if algo == "vanilla" else 64
        assert grid.size == (8 * (size + 2) + 2, (n // 8) * (size + 2) + 2)
    ckpt = load(run)
    assert ckpt["step"] == 16 and ckpt["order"]["epoch"] == 2 and ckpt["order"]["position"] == 0
    assert ckpt["args"]["img_size"] == size
    assert not list(run.glob("*.tmp"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 16 and metrics["n"] == 64 and 0 <= metrics["precision"] <= 1 and metrics["fid"] > 0
    assert metrics["classifier_sha256"] == classifier.SHIPPED_SHA256[ckpt["args"]["dataset"]]
    assert [e.step for e in acc.Scalars("eval/fid")] == [16]
    assert "eval at step 16 (64 samples): fid" in out.stdout


def test_decayed_lr_is_constant_then_falls_linearly_over_the_last_share_of_the_steps():
    lrs = [training.decayed_lr(0.3, step, 10, 0.4) for step in range(1, 11)]  # the last 4 of 10 steps decay
    assert lrs == pytest.approx([0.3] * 7 + [0.225, 0.15, 0.075])
    assert [training.decayed_lr(0.3, step, 10, 1.0) for step in (1, 2, 10)] == pytest.approx([0.3, 0.27, 0.03])
    assert {training.decayed_lr(0.3, step, 10, 0.0) for step in range(1, 11)} == {0.3}


def test_wgan_warns_when_its_wasserstein_estimate_falls_to_or_below_zero_and_goes_on(tmp_path, data_root,
                                                                                   monkeypatch):
    import train_wgan
    real_step = train_wgan.critic_step
    argv = ["--data-root", data_root, "--epochs", "2", "--no-eval", *SMALL_WGAN]
    # an estimate of 4e-5, above 0 (4 decimal places would show it as 0): no warning
    monkeypatch.setattr(train_wgan, "critic_step", lambda *a: real_step(*a) * 0 - 4e-5)
    code, _, err = run_in_process(train_wgan, [*argv, "--runs-dir", tmp_path, "--run-name", "healthy"])
    assert code == 0 and "warning" not in err, err
    # a critic whose loss is above 0: mean C(x) < mean C(G(z)), an estimate below 0
    monkeypatch.setattr(train_wgan, "critic_step", lambda *a: real_step(*a).abs() + 0.01)
    code, out, err = run_in_process(train_wgan, [*argv, "--runs-dir", tmp_path, "--run-name", "dying"])
    assert code == 0 and out.count("\nepoch ") + out.startswith("epoch ") == 2 and "done: " in out
    lines = err.splitlines()  # one line, after the first epoch: not repeated after the second
    assert len(lines) == 1 and all(re.fullmatch(
        rf"warning: the Wasserstein estimate of the epoch ending at step {step} is -\d\.\d\de-\d\d, at or below 0: the"
        " critic no longer tells real images from generated ones, and samples tend to get worse from here on: stop"
        r" the run \(Ctrl-C keeps its checkpoint\) and score it with evaluate\.py, or train with fewer --epochs", line)
        for step, line in zip((8, 16), lines)), err


def test_wgan_generator_steps_every_n_critic(tmp_path, data_root, monkeypatch):
    import train_wgan
    import utils

    calls = []
    real_step = train_wgan.generator_step
    monkeypatch.setattr(train_wgan, "generator_step", lambda *a: calls.append(1) or real_step(*a))
    utils.run_main(train_wgan.main, ["--data-root", str(data_root), "--runs-dir", str(tmp_path), "--run-name", "g",
                                     "--max-steps", "13", *SMALL_WGAN])  # n_critic 3
    assert len(calls) == 4  # after critic steps 3, 6, 9, 12
    assert load(tmp_path / "g")["step"] == 13


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_root, algo):
    script, small, scalars = SCRIPTS[algo]
    common = ["--data-root", str(data_root), "--epochs", "3", "--log-every", "1", "--checkpoint-every", "5",
              "--ema-decay", "0.7", "--lr-decay", "0.5", *small]  # a short average: it moves a lot each step
    full = run_script(script, "--runs-dir", tmp_path / "a", "--run-name", "r", *common)
    assert full.returncode == 0, full.stderr

    kill_at = random.Random().randint(6, 23)  # 24 steps in all; a fresh random step each time the test runs
    argv = ["--runs-dir", str(tmp_path / "b"), "--run-name", "r", *common]
    killed = run_hooked(script[:-3], kill_at, "SIGKILL", *argv)
    assert killed.returncode == -9, killed.stderr
    saved = load(tmp_path / "b" / "r")["step"]
    # killed inside step kill_at: the last checkpoint is the last periodic (every 5) or epoch-end (every 8) one before
    assert saved == max(s for s in range(kill_at) if s % 5 == 0 or s % 8 == 0), kill_at
    resumed = run_script(script, "--resume", tmp_path / "b" / "r")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'b' / 'r'} at step {saved}" in resumed.stdout

    a, b = load(tmp_path / "a" / "r"), load(tmp_path / "b" / "r")
    assert a["step"] == b["step"] == 24
    assert not torch.equal(a["G_ema"]["net.0.weight"], a["G"]["net.0.weight"])  # an average, not G
    for net in [k for k in a if k in ("G", "D", "C", "G_ema")]:
        for key in a[net]:
            assert_same(a[net][key], b[net][key], f"{net}.{key} differs (killed at {kill_at})")
    for opt in [k for k in a if k.startswith("opt_")]:
        for pid, state in a[opt]["state"].items():
            for key, value in state.items():
                assert_same(value, b[opt]["state"][pid][key], f"{opt}.{pid}.{key}")
    steps = [e.step for e in events(tmp_path / "b" / "r").Scalars(scalars[0])]
    assert steps == list(range(1, 25)), f"TensorBoard steps doubled or missing (killed at {kill_at})"
    # --lr-decay 0.5 of 24 steps: the learning rate of steps 1-13 is --lr, then it falls by lr/12 a step, to lr/12
    lr = a["args"]["lr"]
    logged = {e.step: e.value for e in events(tmp_path / "b" / "r").Scalars("lr")}
    assert list(logged) == list(range(1, 25))
    assert all(logged[step] == pytest.approx(lr * min(1, (25 - step) / 12), rel=1e-6) for step in logged), logged
    assert [g["lr"] for opt in ("opt_G", "opt_D", "opt_C") if opt in b for g in b[opt]["param_groups"]] == \
        pytest.approx([lr / 12] * 2, rel=1e-12)


@pytest.mark.parametrize("algo,sig,code", [("vanilla", "SIGINT", 130), ("wgan", "SIGINT", 130),
                                           ("wgan", "SIGTERM", 143)])
def test_sigint_sigterm_save_a_loadable_checkpoint_and_exit(tmp_path, data_root, algo, sig, code):
    script, small, _ = SCRIPTS[algo]
    argv = ["--data-root", str(data_root), "--runs-dir", str(tmp_path), "--run-name", "r", "--epochs", "3",
            "--checkpoint-every", "0", *small]
    out = run_hooked(script[:-3], 11, sig, *argv)
    assert out.returncode == code, out.stderr
    assert f"interrupted by {sig}: checkpoint saved" in out.stderr and "Traceback" not in out.stderr
    ckpt = load(tmp_path / "r")
    assert ckpt["step"] == 11 and ckpt["order"]["position"] == 3  # mid-epoch 2


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_nan_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, data_root, algo):
    script, small, _ = SCRIPTS[algo]
    out = run_hooked(script[:-3], 7, "nan", "--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r",
                     "--log-every", "1", "--checkpoint-every", "4", *small)  # a weight of D turns NaN before step 7
    assert out.returncode == 3, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged at step 7: loss/")
    assert "Traceback" not in out.stderr
    ckpt = load(tmp_path / "r")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for net in ("G", "D", "C") if net in ckpt for v in ckpt[net].values()
               if v.is_floating_point())


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_evaluations_during_training_do_not_change_the_training(tmp_path, data_root, algo):
    """--eval-every 1 ends with the same networks as --no-eval: loading the feature network and evaluating draw
    nothing from the training's random numbers."""
    script, small, _ = SCRIPTS[algo]
    common = ["--data-root", str(data_root), "--epochs", "3", *small]
    for name, flags in (("a", ["--eval-every", "1"]), ("b", ["--no-eval"])):
        out = run_script(script, "--runs-dir", tmp_path, "--run-name", name, *common, *flags)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("eval at") == (0 if name == "b" else 3)
    b = load(tmp_path / "b")
    a = load(tmp_path / "a")
    for net in [k for k in a if k in ("G", "D", "C", "G_ema")]:
        for key in a[net]:
            assert_same(a[net][key], b[net][key], f"{net}.{key}")
