"""One run folder, one writer: the run lock, write errors (a full disk) that lose nothing, and a soak test of many
SIGKILLs in a row ending exactly where an uninterrupted run ends."""
import hashlib
import random

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SMALL_VANILLA, SMALL_WGAN, assert_same, run_hooked, run_script, start_hooked

SCRIPTS = {"vanilla": ("train_vanilla_gan", SMALL_VANILLA, ("G", "D"), "loss/D"),
           "wgan": ("train_wgan", SMALL_WGAN, ("G", "C"), "loss/critic")}


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def load(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_same_state(a, b, nets):
    assert a["step"] == b["step"]
    for net in nets:
        for key, value in a[net].items():
            assert_same(value, b[net][key], f"{net}.{key}")
    for opt in [k for k in a if k.startswith("opt_")]:
        for pid, state in a[opt]["state"].items():
            for key, value in state.items():
                assert_same(value, b[opt]["state"][pid][key], f"{opt}.{pid}.{key}")


@pytest.fixture
def paused_run(tmp_path, data_root):
    """A WGAN run that holds its folder, paused after step 5 (checkpoint at step 4), killed at the end of the test."""
    run = tmp_path / "runs" / "r"
    proc = start_hooked("train_wgan", 5, "pause", "--data-root", data_root, "--runs-dir", tmp_path / "runs",
                        "--run-name", "r", "--checkpoint-every", "4", *SMALL_WGAN)
    assert proc.stdout.readline().strip() == "paused", proc.stderr.read()
    yield run, proc
    proc.kill()
    proc.wait()


def test_the_lock_refuses_a_second_resume_and_a_new_run_of_the_same_folder(paused_run, tmp_path, data_root):
    run, holder = paused_run
    before = snapshot(run)
    second = run_script("train_wgan.py", "--resume", run, "--data-root", data_root)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr
    assert lines[0] == (f"error: run folder {run} is in use by process {holder.pid} (another training writes it);"
                        " wait for it to end or stop it, then --resume")
    again = run_script("train_wgan.py", "--data-root", data_root, "--runs-dir", tmp_path / "runs", "--run-name", "r",
                       *SMALL_WGAN)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"error: run folder {run} is in use by process {holder.pid};"
                                    " choose another --run-name")
    assert snapshot(run) == before  # neither wrote anything

    holder.kill()  # SIGKILL: the kernel drops the lock with the process, no stale lock is left
    holder.wait()
    resumed = run_script("train_wgan.py", "--resume", run, "--max-steps", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} at step 4" in resumed.stdout and load(run)["step"] == 8


def test_two_new_runs_racing_for_one_folder_leave_one_intact_run(tmp_path, data_root):
    common = ["--data-root", data_root, "--runs-dir", tmp_path / "runs", "--run-name", "same", "--max-steps", "6",
              "--no-eval", *SMALL_VANILLA]
    procs = [start_hooked("train_vanilla_gan", 999, "pause", *common) for _ in range(2)]
    outs = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    loser = next(err for code, err in outs if code == 2).strip()
    assert loser.startswith(f"error: run folder {tmp_path / 'runs' / 'same'} ")
    assert "in use by process" in loser or "already exists" in loser
    assert len(loser.splitlines()) == 1
    run = tmp_path / "runs" / "same"
    assert load(run)["step"] == 6
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch_mean/loss/D")] == [6]  # one writer's history only
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, data_root, algo):
    script, small, nets, _ = SCRIPTS[algo]
    common = ["--data-root", data_root, "--checkpoint-every", "4", "--no-eval", *small]
    reference = run_script(f"{script}.py", "--runs-dir", tmp_path / "a", "--run-name", "r", "--max-steps", "4",
                           *common)
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "b" / "r"
    out = run_hooked(script, 6, "full-disk-checkpoint", "--runs-dir", tmp_path / "b", "--run-name", "r", *common)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 4 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == (f"error: cannot write {run / 'checkpoint.pt'} (No space left on device); the last good"
                        f" checkpoint (step 4) is kept: free space or fix the folder, then --resume {run}")
    assert not list(run.glob("*.tmp"))
    assert_same_state(load(run), load(tmp_path / "a" / "r"), nets)  # bit-identical to the state at step 4
    resumed = run_script(f"{script}.py", "--resume", run, "--max-steps", "8")  # and it continues from there
    assert resumed.returncode == 0 and load(run)["step"] == 8


@pytest.mark.parametrize("action,path,kept", [("full-disk-png", "samples/epoch_001.png", 8),  # the grid follows it
                                              ("full-disk-events", None, 4)])
def test_a_full_disk_while_writing_grids_or_events_is_one_line_and_exit_4(tmp_path, data_root, action, path, kept):
    run = tmp_path / "r"
    out = run_hooked("train_vanilla_gan", 5, action, "--data-root", data_root, "--runs-dir", tmp_path,
                     "--run-name", "r", "--checkpoint-every", "4", "--log-every", "1", "--no-eval", *SMALL_VANILLA)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 4 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"(No space left on device); the last good checkpoint (step {kept}) is kept" in lines[0]
    if path:
        assert lines[0].startswith(f"error: cannot write {run / path} ")
        assert not (run / path).exists() and not list(run.rglob("*.tmp"))
    assert load(run)["step"] == kept


def test_a_failed_final_evaluation_is_one_line_and_the_finished_run_is_kept(tmp_path, data_root):
    run = tmp_path / "r"
    common = ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "r", "--epochs", "2", *SMALL_VANILLA]
    out = run_hooked("train_vanilla_gan", 1, "broken-evaluation", *common)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == (f"error: the final evaluation failed (RuntimeError: the evaluation broke); the run is complete"
                        f" and saved in {run}: evaluate it with python evaluate.py {run}")
    assert load(run)["step"] == 16 and (run / "samples" / "epoch_002.png").is_file()
    redo = run_script("evaluate.py", run, "--n", "64", "--no-floor", "--json")
    assert redo.returncode == 0 and '"step": 16' in redo.stdout, redo.stderr


def test_a_failed_evaluation_during_training_is_a_warning_and_training_goes_on(tmp_path, data_root):
    out = run_hooked("train_vanilla_gan", 1, "broken-evaluation", "--data-root", data_root, "--runs-dir", tmp_path,
                     "--run-name", "r", "--epochs", "2", "--eval-every", "1", *SMALL_VANILLA)
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "warning: the evaluation at step 8 failed (RuntimeError: the evaluation broke); training goes on"
    assert lines[1].startswith("error: the final evaluation failed") and len(lines) == 2, out.stderr
    assert load(tmp_path / "r")["step"] == 16  # the second epoch trained


def test_out_of_memory_in_a_step_is_one_line_exit_1_and_the_run_resumes(tmp_path, data_root):
    run = tmp_path / "r"
    out = run_hooked("train_vanilla_gan", 6, "out-of-memory", "--data-root", data_root, "--runs-dir", tmp_path,
                     "--run-name", "r", "--checkpoint-every", "4", "--no-eval", *SMALL_VANILLA)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: out of memory (RuntimeError: [enforce fail at alloc_cpu.cpp:127]")
    assert lines[0].endswith("; the last good checkpoint (step 4) is kept: lower --batch-size, the widths,"
                             " --img-size or --eval-n, or free memory")
    assert load(run)["step"] == 4
    resumed = run_script("train_vanilla_gan.py", "--resume", run, "--max-steps", "8")
    assert resumed.returncode == 0 and load(run)["step"] == 8, resumed.stderr


@pytest.mark.parametrize("algo", ["vanilla", "wgan"])
def test_soak_eight_sigkills_end_bit_identical_to_an_uninterrupted_run(tmp_path, data_root, algo):
    """8 SIGKILLs at steps drawn at random, a new process resumed after each; the run ends with every parameter,
    buffer, optimizer state (and the EMA) bit-identical to a run never stopped, and TensorBoard holds each step once."""
    script, small, nets, tag = SCRIPTS[algo]
    total = 48  # 6 epochs of 8 steps
    common = ["--data-root", data_root, "--epochs", "6", "--log-every", "1", "--checkpoint-every", "2", "--no-eval",
              "--ema-decay", "0.7", *small]
    full = run_script(f"{script}.py", "--runs-dir", tmp_path / "a", "--run-name", "r", *common)
    assert full.returncode == 0, full.stderr

    rng = random.Random()
    seed = rng.randrange(2**32)
    rng = random.Random(seed)
    kill_steps = sorted(rng.sample(range(3, total), 8))  # global steps, each killed inside that step (after the
    # first checkpoint, at step 2)
    run = tmp_path / "b" / "r"
    saved = 0
    for i, kill_at in enumerate(kill_steps):  # each after the last checkpoint, which lies before the last kill
        flags = ["--runs-dir", tmp_path / "b", "--run-name", "r", *common] if i == 0 else ["--resume", run]
        out = run_hooked(script, kill_at - saved, "SIGKILL", *flags)
        assert out.returncode == -9, (seed, kill_at, out.stderr)
        saved = load(run)["step"]
        assert saved == max(s for s in range(kill_at) if s % 2 == 0 or s % 8 == 0), (seed, kill_at)
    last = run_script(f"{script}.py", "--resume", run)
    assert last.returncode == 0, (seed, last.stderr)

    assert_same_state(load(tmp_path / "a" / "r"), load(run), (*nets, "G_ema"))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars(tag)] == list(range(1, total + 1)), seed
