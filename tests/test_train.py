"""The scripts end to end on tiny data: the files a run writes, exact resume after kill -9 and after SIGTERM, one
writer per run folder, a NaN, a full disk, a copied script, a dataset with no shipped feature network."""
import importlib.util
import json
import random
import shutil
import time

import pytest
import torch
import torchvision
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import train_vanilla_gan
import train_wgan
import train_wgan_gp
import utils
from conftest import ROOT, SMALL_VANILLA, SMALL_WGAN, assert_same_training, load, make_dataset, run_hooked, run_in_process

SCRIPTS = {"vanilla": (train_vanilla_gan, SMALL_VANILLA, ["loss/D", "loss/G", "D(x)", "D(G(z))"]),
           "wgan": (train_wgan, SMALL_WGAN, ["loss/critic", "wasserstein_estimate", "loss/G"]),
           "wgan_gp": (train_wgan_gp, SMALL_WGAN, ["loss/critic", "wasserstein_estimate", "gradient_penalty",
                                                   "grad_norm", "loss/G"])}


def events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def train(algo, data_root, runs, name, *flags):
    module, small, _ = SCRIPTS[algo]
    return run_in_process(module, ["--data-root", data_root, "--runs-dir", runs, "--run-name", name, *small, *flags])


@pytest.mark.parametrize("algo", ["vanilla", "wgan", "wgan_gp"])
def test_a_run_writes_scalars_grids_gif_checkpoint_and_metrics(tmp_path, data_root, algo):
    size = 32 if algo == "wgan" else 28
    code, out, err = train(algo, data_root, tmp_path, "r", "--epochs", 2, "--log-every", 1, "--img-size", size)
    assert code == 0, err
    assert out.count("\nepoch ") + out.startswith("epoch ") == 2 and "epoch 2/2  step 16" in out  # 128 / 16 = 8 a epoch
    run = tmp_path / "r"
    acc = events(run)
    scalars = SCRIPTS[algo][2]
    assert set(scalars) | {f"epoch_mean/{s}" for s in scalars} | {f"eval/{m}" for m in evaluate.LOGGED} | \
        {"train_seconds"} == set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train_seconds")] == [8, 16] and 0 < acc.Scalars("train_seconds")[0].value
    critic_steps = [e.step for e in acc.Scalars(scalars[0])]
    assert critic_steps == list(range(1, 17))
    for name in scalars:  # an epoch mean is the mean of its steps' values (the WGAN's loss/G: of its G steps)
        steps = {e.step: e.value for e in acc.Scalars(name)}
        g_steps = [s for s in range(1, 9) if algo == "vanilla" or name != "loss/G" or s % 3 == 0]
        assert acc.Scalars(f"epoch_mean/{name}")[0].value == pytest.approx(
            sum(steps[s] for s in g_steps) / len(g_steps), rel=1e-5), name
    assert [e.step for e in acc.Images("fake")] == [8, 16] and [e.step for e in acc.Images("real")] == [0]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"batch_size": 16' in config
    n = 32 if algo == "vanilla" else 64  # the fixed-noise grid: 8 columns of size + 2 px padding
    for epoch in (1, 2):
        assert Image.open(run / "samples" / f"epoch_{epoch:03d}.png").size == (8 * (size + 2) + 2,
                                                                                (n // 8) * (size + 2) + 2)
    with Image.open(run / "samples" / "progress.gif") as gif:
        assert gif.n_frames == 2
    ckpt = load(run)
    assert ckpt["format"] == 4 and ckpt["script"] == SCRIPTS[algo][0].SCRIPT
    assert ckpt["step"] == 16 and ckpt["args"]["img_size"] == size and ckpt["G_class"] in ("Generator", "WGANGenerator")
    assert not list(run.glob("*.tmp"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 16 and metrics["n"] == 64 and 0 <= metrics["precision"] <= 1 and metrics["fid"] > 0
    assert metrics["classifier_sha256"] == evaluate.SHIPPED_SHA256[ckpt["args"]["dataset"]]
    assert [e.step for e in acc.Scalars("eval/fid")] == [16] and "eval at step 16 (64 samples): fid" in out


@pytest.mark.parametrize("algo", ["wgan", "wgan_gp"])
def test_the_wgans_step_their_generator_every_n_critic_critic_steps(tmp_path, data_root, monkeypatch, algo):
    calls, module = [], SCRIPTS[algo][0]
    real_step = module.generator_step
    monkeypatch.setattr(module, "generator_step", lambda *a: calls.append(1) or real_step(*a))
    assert train(algo, data_root, tmp_path, "g", "--max-steps", 13, "--no-eval")[0] == 0  # n_critic 3
    assert len(calls) == 4 and load(tmp_path / "g")["step"] == 13  # after critic steps 3, 6, 9, 12
    assert load(tmp_path / "g")["G_ema"]["updates"] == 4


@pytest.mark.parametrize("algo,sig,kill_at", [("vanilla", "SIGKILL", 13), ("wgan", "SIGKILL", None),
                                              ("wgan", "SIGTERM", None), ("wgan_gp", "SIGKILL", None)])
def test_a_run_killed_mid_epoch_resumes_bit_identical_to_a_run_never_stopped(tmp_path, data_root, algo, sig, kill_at):
    common = ["--epochs", 3, "--log-every", 1, "--checkpoint-every", 5, "--ema-decay", 0.7, "--no-eval"]
    assert train(algo, data_root, tmp_path / "a", "r", *common)[0] == 0
    # 24 steps in all: at 13, the checkpoint of step 10 is mid-epoch; else a fresh random step each time the test runs
    kill_at = kill_at or random.Random().randint(6, 23)
    module, small, scalars = SCRIPTS[algo]
    run = tmp_path / "b" / "r"
    killed = run_hooked(module.__name__, kill_at, sig, "--data-root", data_root, "--runs-dir", tmp_path / "b",
                        "--run-name", "r", *small, *common)
    if sig == "SIGKILL":  # the last checkpoint is the last periodic (every 5) or epoch-end (every 8) one before
        assert killed.returncode == -9, killed.stderr
        saved = max(s for s in range(kill_at) if s % 5 == 0 or s % 8 == 0)
    else:  # SIGTERM: the step finishes, its checkpoint is saved, exit 128 + 15 with one line
        assert (killed.returncode, killed.stderr) == (143, f"error: stopped by SIGTERM: the checkpoint of step"
                                                           f" {kill_at} is saved; continue with --resume {run}\n")
        saved = kill_at
    assert load(run)["step"] == saved, kill_at
    time.sleep(1)  # TensorBoard reads event files in the order of the second they were made in, then the process id
    code, out, err = run_in_process(module, ["--resume", run])
    assert code == 0 and f"resuming {run} at step {saved}" in out, err
    a, b = load(tmp_path / "a" / "r"), load(run)
    assert a["step"] == b["step"] == 24
    assert not torch.equal(a["G_ema"]["model"]["net.0.weight"], a["G"]["net.0.weight"])  # an average, not G
    assert_same_training(a, b)
    steps = [e.step for e in events(run).Scalars(scalars[0])]
    assert steps == list(range(1, 25)), f"TensorBoard steps doubled or missing (killed at {kill_at})"
    never_stopped, resumed = events(tmp_path / "a" / "r"), events(run)
    assert set(resumed.Tags()["scalars"]) == set(never_stopped.Tags()["scalars"])
    for tag in set(never_stopped.Tags()["scalars"]) - {"train_seconds"}:  # every point, the epoch means whole
        points = [[(e.step, e.value) for e in acc.Scalars(tag)] for acc in (never_stopped, resumed)]
        assert points[1] == points[0], (tag, kill_at)
    assert [e.step for e in resumed.Scalars(f"epoch_mean/{scalars[0]}")] == [8, 16, 24]


def test_a_second_process_on_a_run_folder_is_refused_while_the_first_trains(tmp_path, data_root):
    argv = ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r", *SMALL_VANILLA, "--no-eval"]
    first = run_hooked("train_vanilla_gan", 3, "pause", *argv, "--checkpoint-every", 2, wait=False)
    try:
        assert first.stdout.readline() == "paused\n"
        code, _, err = run_in_process(train_vanilla_gan, ["--resume", tmp_path / "r"])
        assert (code, err) == (2, f"error: {tmp_path / 'r'} is in use by another training process; wait for it to end"
                                  " or stop it\n")
        assert load(tmp_path / "r")["step"] == 2  # untouched
    finally:
        first.kill()
        first.wait()
    assert run_in_process(train_vanilla_gan, ["--resume", tmp_path / "r", "--max-steps", 4])[0] == 0  # free again


@pytest.mark.parametrize("algo", ["vanilla", "wgan", "wgan_gp"])
def test_a_nan_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, data_root, algo, monkeypatch):
    module = SCRIPTS[algo][0]
    step_name = "train_step" if algo == "vanilla" else "critic_step"
    real_step, count = getattr(module, step_name), [0]

    def step(G, D, *args):  # a weight of D (the critic) turns NaN before step 7, as after an exploding update
        count[0] += 1
        if count[0] == 7:
            with torch.no_grad():
                next(D.parameters()).fill_(float("nan"))
        return real_step(G, D, *args)

    monkeypatch.setattr(module, step_name, step)
    code, _, err = train(algo, data_root, tmp_path, "r", "--log-every", 1, "--checkpoint-every", 4)
    assert code == 3 and err.count("\n") == 1 and err.startswith("error: training diverged at step 7: loss/"), err
    ckpt = load(tmp_path / "r")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["G"].values() if v.is_floating_point())


def test_a_full_disk_ends_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    assert train("wgan", data_root, tmp_path, "r", "--max-steps", 4, "--no-eval")[0] == 0
    good = (tmp_path / "r" / "checkpoint.pt").read_bytes()

    def full_disk(state, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_in_process(train_wgan, ["--resume", tmp_path / "r", "--max-steps", 8])
    assert (code, err) == (4, f"error: cannot write {tmp_path / 'r' / 'checkpoint.pt'} (No space left on device);"
                              " every file written before is kept: free space or fix the folder, then run the command"
                              " again (a training run that saved a checkpoint: with --resume)\n")
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == good and not list((tmp_path / "r").glob("*.tmp"))


def test_the_wgan_warns_once_when_its_wasserstein_estimate_falls_to_zero(tmp_path, data_root, monkeypatch):
    real_step = train_wgan.critic_step
    monkeypatch.setattr(train_wgan, "critic_step", lambda *a: real_step(*a).abs() + 0.01)  # mean C(x) < mean C(G(z))
    code, out, err = train("wgan", data_root, tmp_path, "dying", "--epochs", 2, "--no-eval")
    assert code == 0 and "done: " in out and err.count("\n") == 1, err  # after the first epoch, not again
    assert err.startswith("warning: the Wasserstein estimate is -") and " at step 8: " in err


def test_a_preset_sets_defaults_that_typed_flags_override_and_a_resume_keeps(tmp_path, data_root):
    code, _, err = train("wgan", data_root, tmp_path, "p", "--preset", "source", "--max-steps", 2, "--no-eval",
                         "--n-critic", 2)
    assert code == 0, err
    args = load(tmp_path / "p")["args"]
    assert (args["clip_value"], args["img_size"], args["n_critic"], args["lr"]) == (0.005, 32, 2, 5e-5)
    assert run_in_process(train_wgan, ["--resume", tmp_path / "p", "--max-steps", 4])[0] == 0
    assert load(tmp_path / "p")["args"] == {**args, "max_steps": 4, "resume": str(tmp_path / "p")}
    before = (tmp_path / "p" / "checkpoint.pt").read_bytes()
    code, out, _ = run_in_process(train_wgan, ["--resume", tmp_path / "p"])  # --max-steps 4 reached: nothing to do
    assert (code, out) == (0, f"{tmp_path / 'p'} is complete at step 4: to train further, --resume it with more"
                              " --epochs or --max-steps\n")
    assert (tmp_path / "p" / "checkpoint.pt").read_bytes() == before
    assert set(train_wgan.PRESETS["paper"]) <= set(args) and utils.CHECKPOINT_FORMAT == 4
    code, _, err = train("wgan_gp", data_root, tmp_path, "gp", "--preset", "paper", "--max-steps", 2, "--no-eval")
    gp = load(tmp_path / "gp")
    assert code == 0 and [gp["args"][k] for k in ("beta1", "beta2", "ema_decay", "layer_norm")] == [0, 0.9, 0, False]
    assert set(gp["C"]) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}, err  # no LayerNorm
    assert train("wgan_gp", data_root, tmp_path, "ln", "--layer-norm", "--max-steps", 2, "--no-eval")[0] == 0
    assert run_in_process(train_wgan_gp, ["--resume", tmp_path / "ln", "--max-steps", 4])[0] == 0  # rebuilt with it
    ln = load(tmp_path / "ln")
    assert ln["step"] == 4 and ln["args"]["layer_norm"] and ln["C"]["net.1.weight"].shape == (32,)


def test_the_wgan_presets_keep_what_the_sources_ran_whatever_the_defaults():
    """--preset paper / source keep the paper's and the source's batch 64 and RMSprop 5e-5, and the 20 epochs they ran
    before the default became 24."""
    for preset in ("paper", "source"):
        args, _ = utils.parse_flags(train_wgan.make_parser(), train_wgan.PRESETS, "train_wgan", ["--preset", preset])
        assert (args.batch_size, args.lr, args.epochs) == (64, 5e-5, 20)


def test_a_copied_script_is_a_script_of_its_own(tmp_path, data_root):
    """A student's train_my_loss.py, copied from train_wgan.py: its runs are named after it and resumed by it only."""
    shutil.copy(ROOT / "train_wgan.py", tmp_path / "train_my_loss.py")
    spec = importlib.util.spec_from_file_location("train_my_loss", tmp_path / "train_my_loss.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    code, out, err = run_in_process(copy, ["--data-root", data_root, "--runs-dir", tmp_path / "runs", *SMALL_WGAN,
                                           "--max-steps", 2, "--no-eval"])
    run, = (tmp_path / "runs").iterdir()
    assert code == 0 and run.name.startswith("my_loss-fashion-mnist-") and load(run)["script"] == "train_my_loss", err
    assert run_in_process(train_wgan, ["--resume", run])[2] == f"error: {run / 'checkpoint.pt'} is a checkpoint of" \
                                                                " train_my_loss.py; resume it with that script\n"
    assert run_in_process(copy, ["--resume", run, "--max-steps", 4])[0] == 0 and load(run)["step"] == 4


def test_a_dataset_without_a_shipped_feature_network_trains_without_evaluation_and_can_make_one(
        tmp_path, data_root, monkeypatch):
    """A third torchvision dataset, added to utils.DATASETS: it trains, says in one line how to evaluate on it, and
    tools/train_classifier.py makes its feature network."""
    import train_classifier

    make_dataset(data_root, "KMNIST", seed=2)
    monkeypatch.setitem(utils.DATASETS, "kmnist", torchvision.datasets.KMNIST)
    code, _, err = train("vanilla", data_root, tmp_path, "k", "--dataset", "kmnist", "--max-steps", 2)
    assert (code, err) == (0, "warning: no feature network ships for kmnist: make one with python"
                              " tools/train_classifier.py --dataset kmnist --out classifiers/kmnist.pt, and add the"
                              " SHA-256 it prints to evaluate.SHIPPED_SHA256; this run trains without evaluation\n")
    assert load(tmp_path / "k")["args"]["eval"] is False and not (tmp_path / "k" / "metrics.json").exists()
    code, out, err = run_in_process(train_classifier, ["--dataset", "kmnist", "--data-root", data_root, "--epochs", 1,
                                                       "--no-progress", "--out", tmp_path / "kmnist.pt"])
    assert code == 0 and out.splitlines()[1].startswith("no kmnist feature network ships to compare it with"), err
    assert torch.load(tmp_path / "kmnist.pt", weights_only=True)["dataset"] == "kmnist"


def test_an_oserror_that_is_not_a_full_disk_is_a_bug_that_shows_its_traceback(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(train_vanilla_gan, "train_step", lambda *args: open(tmp_path / "a fork's missing file"))
    with pytest.raises(FileNotFoundError):  # not "cannot write ...: free space"
        train("vanilla", data_root, tmp_path, "r", "--no-eval")
