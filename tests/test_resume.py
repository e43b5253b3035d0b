"""What --resume promises: typed flags override the run's and take effect (or are refused in one line), no run is
ever stuck (a failed or lost evaluation is made, a run that died before its first checkpoint continues or starts
again), and a folder is one run's."""
import json
import signal
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import train_vanilla_gan
import train_wgan_gp
import utils
from conftest import SMALL_VANILLA, load, run_hooked, run_in_process


def train(data_root, runs, name, *flags):
    return run_in_process(train_vanilla_gan, ["--data-root", data_root, "--runs-dir", runs, "--run-name", name,
                                              *SMALL_VANILLA, *flags])


def resume(run, *flags):
    return run_in_process(train_vanilla_gan, ["--resume", run, *flags])


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_a_resume_in_the_second_of_the_file_before_it_keeps_its_points(tmp_path, data_root, monkeypatch):
    assert train(data_root, tmp_path, "r", "--max-steps", 4, "--no-eval")[0] == 0
    run, clock = tmp_path / "r", [2e9 + 0.5]
    old, = run.glob("events.out.tfevents.*")  # a killed run's file of this second, its name after ours (host, pid)
    old.rename(run / f"events.out.tfevents.{int(clock[0])}.zzzz.0")
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    assert resume(run, "--max-steps", 6)[0] == 0
    assert [s for s, _ in scalars(run, "train_seconds")] == [4, 6]


def test_flags_typed_with_resume_take_effect_and_are_the_ones_recorded(tmp_path, data_root):
    assert train(data_root, tmp_path, "r", "--max-steps", 4, "--no-eval")[0] == 0
    run = tmp_path / "r"
    code, _, err = resume(run, "--max-steps", 6, "--lr", 5e-4, "--d-lr", 7e-4, "--beta1", 0.3, "--beta2", 0.99,
                          "--d-dropout", 0.1)
    ckpt = load(run)
    assert code == 0 and ckpt["step"] == 6, err
    for opt, lr in (("opt_G", 5e-4), ("opt_D", 7e-4)):  # written into the restored optimizers, not only the flags
        assert [(g["lr"], tuple(g["betas"])) for g in ckpt[opt]["param_groups"]] == [(lr, (0.3, 0.99))]
    assert [ckpt["args"][k] for k in ("lr", "d_lr", "beta1", "beta2", "d_dropout", "eval")] == [5e-4, 7e-4, 0.3, 0.99,
                                                                                                0.1, False]
    code, out, _ = resume(run, "--eval")  # a --no-eval run, complete: --eval makes its evaluation
    assert code == 0 and "eval at step 6 (64 samples)" in out and json.loads((run / "metrics.json").read_text())["step"] == 6
    assert load(run)["args"]["eval"] is True
    code, _, _ = resume(run, "--max-steps", 0, "--epochs", 2)  # --max-steps 0: no limit; the epochs' end, 16
    assert code == 0 and load(run)["step"] == 16 and load(run)["args"]["max_steps"] == 0
    before = (run / "checkpoint.pt").read_bytes()
    for flag, value, was in (("--n-samples", 8, 32), ("--batch-size", 8, 16), ("--seed", 2, 1)):
        code, _, err = resume(run, "--epochs", 3, flag, value)
        assert (code, err) == (2, f"error: {flag} {value}: {run} was trained with {was}, which a resumed run keeps;"
                                  " start a new run for another\n")
    code, _, err = resume(run, "--epochs", 3, "--preset", "source")  # its batch size is 32
    assert (code, err) == (2, f"error: --preset source sets --batch-size 32: {run} was trained with 16, which a"
                              " resumed run keeps; start a new run for another\n")
    code, _, err = resume(run, "--epochs", 3, "--run-name", "other")
    assert (code, err) == (2, f"error: --runs-dir and --run-name name another folder than --resume {run}; drop them\n")
    assert (run / "checkpoint.pt").read_bytes() == before


def test_a_weight_average_typed_with_resume_starts_at_the_generator_and_resume_dot_is_the_folder_here(
        tmp_path, data_root, monkeypatch):
    assert train(data_root, tmp_path, "r", "--max-steps", 4, "--ema-decay", 0, "--no-eval")[0] == 0
    assert load(tmp_path / "r")["G_ema"] is None
    monkeypatch.chdir(tmp_path / "r")
    assert resume(".", "--max-steps", 6, "--ema-decay", 0.5)[0] == 0
    ckpt = load(tmp_path / "r")
    assert ckpt["step"] == 6 and ckpt["G_ema"]["updates"] == 2
    assert [p.name for p in (tmp_path / "r").iterdir() if p.is_dir()] == ["samples"]  # no run folder made in it
    for key, value in ckpt["G_ema"]["model"].items():  # between G at step 4 (the start) and G at step 6
        assert not torch.equal(value, ckpt["G"][key]) or not value.is_floating_point(), key


def test_a_preset_typed_with_resume_sits_above_the_runs_flags_and_below_the_typed_ones(tmp_path):
    parser, script = train_wgan_gp.make_parser(), "train_wgan_gp"
    run = tmp_path / "r"
    run.mkdir()
    saved = {**vars(parser.parse_args([])), "lr": 2e-3, "beta1": 0.7, "gp_weight": 5.0, "run_name": "r"}
    torch.save({"format": utils.CHECKPOINT_FORMAT, "script": script, "step": 1, "args": saved}, run / "checkpoint.pt")
    args, ckpt = utils.parse_flags(parser, train_wgan_gp.PRESETS, script, ["--resume", str(run)])
    assert (args.lr, args.beta1, args.gp_weight, args.preset) == (2e-3, 0.7, 5.0, "default") and ckpt["step"] == 1
    args, _ = utils.parse_flags(parser, train_wgan_gp.PRESETS, script,
                                ["--resume", str(run), "--preset", "paper", "--lr", "3e-4"])
    assert (args.lr, args.beta1, args.gp_weight, args.ema_decay, args.preset) == (3e-4, 0.0, 10.0, 0.0, "paper")


def test_a_failed_final_evaluation_and_a_lost_scheduled_one_are_made_on_resume(tmp_path, data_root, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "score", out_of_memory)
        code, _, err = train(data_root, tmp_path, "r", "--epochs", 1)
    run = tmp_path / "r"
    assert code == 1 and "out of memory" in err and load(run)["step"] == 8 and not (run / "metrics.json").exists()
    code, out, err = resume(run)
    assert code == 0 and "eval at step 8 (64 samples)" in out, err
    assert json.loads((run / "metrics.json").read_text())["step"] == 8 and [s for s, _ in scalars(run, "eval/fid")] == [8]
    assert resume(run)[1] == f"{run} is complete at step 8: to train further, --resume it with more --epochs or" \
                             " --max-steps\n"
    # SIGTERM in the last step of epoch 1, whose evaluation is due: the checkpoint is saved, the evaluation is owed
    stopped = run_hooked("train_vanilla_gan", 8, "SIGTERM", "--data-root", data_root, "--runs-dir", tmp_path,
                         "--run-name", "s", *SMALL_VANILLA, "--epochs", 2, "--eval-every", 1)
    assert stopped.returncode == 143 and load(tmp_path / "s")["step"] == 8, stopped.stderr
    code, out, err = resume(tmp_path / "s")
    assert code == 0 and out.index("eval at step 8") < out.index("epoch 2/2"), err
    assert [s for s, _ in scalars(tmp_path / "s", "eval/fid")] == [8, 16]
    # SIGTERM during the final evaluation: the evaluation ends and is saved, the run is done
    real_score, handlers = evaluate.score, [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]

    def stopped_while_scoring(*args):
        signal.raise_signal(signal.SIGTERM)
        return real_score(*args)

    try:
        with monkeypatch.context() as patch:
            patch.setattr(evaluate, "score", stopped_while_scoring)
            code, out, err = train(data_root, tmp_path, "t", "--epochs", 1)
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    assert (code, err) == (0, "") and "done: " in out and json.loads((tmp_path / "t" / "metrics.json").read_text())[
        "step"] == 8
    # A run stopped at step 12 and resumed with fewer --epochs (1: 8 steps) is complete: its final evaluation is made
    assert train(data_root, tmp_path, "e", "--epochs", 2, "--max-steps", 12, "--no-eval")[0] == 0
    code, out, _ = resume(tmp_path / "e", "--epochs", 1, "--max-steps", 0, "--eval")
    assert code == 0 and "eval at step 12 (64 samples)" in out


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_its_start_and_a_bare_folder_starts(
        tmp_path, data_root, monkeypatch):
    real_step, count = train_vanilla_gan.train_step, [0]

    def step(G, D, *args):  # D turns NaN at step 3: the run dies before its first periodic checkpoint (5)
        count[0] += 1
        if count[0] == 3:
            with torch.no_grad():
                next(D.parameters()).fill_(float("nan"))
        return real_step(G, D, *args)

    with monkeypatch.context() as patch:
        patch.setattr(train_vanilla_gan, "train_step", step)
        code, _, err = train(data_root, tmp_path, "r", "--max-steps", 6, "--log-every", 1, "--checkpoint-every", 5,
                             "--lr", 1e-3, "--no-eval")
    assert code == 3 and "training diverged at step 3" in err
    code, out, err = resume(tmp_path / "r", "--lr", 2e-4)  # its flags, from step 0, with the lower --lr typed
    ckpt = load(tmp_path / "r")
    assert code == 0 and "at step 0" in out and ckpt["step"] == 6 and ckpt["args"]["max_steps"] == 6, err
    assert ckpt["args"]["lr"] == 2e-4 and [s for s, _ in scalars(tmp_path / "r", "loss/D")] == list(range(1, 7))
    assert [ckpt[opt]["param_groups"][0]["lr"] for opt in ("opt_G", "opt_D")] == [2e-4, 2e-4]  # no --d-lr: D's too
    # A folder with no checkpoint at all (the run was killed before it wrote one): started by its name or by --resume
    for name, resumed in (("named", False), ("resumed", True)):
        (tmp_path / name).mkdir()
        with torch.utils.tensorboard.SummaryWriter(tmp_path / name) as writer:  # the dead run's point
            writer.add_scalar("loss/D", 99.0, 1)
        dead = next((tmp_path / name).glob("events.*"))
        dead.rename(tmp_path / name / "events.out.tfevents.1700000000.dead")  # written before, as it would be
        flags = ["--max-steps", 2, "--log-every", 1, "--no-eval"]
        code, out, err = resume(tmp_path / name, "--data-root", data_root, *SMALL_VANILLA, *flags) if resumed else \
            train(data_root, tmp_path, name, *flags)
        points = scalars(tmp_path / name, "loss/D")
        assert code == 0 and load(tmp_path / name)["step"] == 2 and [s for s, _ in points] == [1, 2], err
        assert 99.0 not in [v for _, v in points]
    assert "resumed has no checkpoint yet: starting it from the beginning, with the flags typed now" in out


def test_train_seconds_count_the_train_loop_over_resumes_and_no_evaluation(tmp_path, data_root, monkeypatch):
    clock = [1000.0]  # a fake clock: each training step takes 1 s, each evaluation 100 s
    monkeypatch.setattr(utils.time, "perf_counter", lambda: clock[0])
    step, score = train_vanilla_gan.train_step, evaluate.score
    monkeypatch.setattr(train_vanilla_gan, "train_step", lambda *a: clock.__setitem__(0, clock[0] + 1) or step(*a))
    monkeypatch.setattr(evaluate, "score", lambda *a: clock.__setitem__(0, clock[0] + 100) or score(*a))
    saved, save = [], utils.save_checkpoint  # and each checkpoint 1 s to write, which counts neither
    monkeypatch.setattr(utils, "save_checkpoint", lambda run: clock.__setitem__(0, clock[0] + 1) or save(run)
                        or saved.append((run.step, run.train_seconds)))
    assert train(data_root, tmp_path, "r", "--epochs", 2, "--max-steps", 12, "--eval-every", 1,
                 "--checkpoint-every", 5)[0] == 0
    run = tmp_path / "r"
    assert saved == [(0, 0), (5, 5), (8, 8), (10, 10), (12, 12)] and load(run)["train_seconds"] == 12
    clock[0] += 5000  # the time between the runs counts neither
    code, out, err = resume(run, "--max-steps", 0)
    assert code == 0 and "epoch 2/2  step 16" in out and "(4.0s)" in out, err
    assert scalars(run, "train_seconds") == [(8, 8), (12, 12), (16, 16)] and load(run)["train_seconds"] == 16
