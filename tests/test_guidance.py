"""Help that reads, and messages that give the next step: each asserted as the exact line a user sees."""
import subprocess
import sys

import pytest
import torchvision

import bench
import data
import evaluate
import train_vanilla_gan
import train_wgan
import utils
from conftest import ROOT, SMALL_VANILLA, SMALL_WGAN, run_in_process, subprocess_env


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("module", [train_vanilla_gan, train_wgan, bench, evaluate])
def test_help_keeps_the_examples_on_their_lines_and_says_what_a_switch_does_by_default(module):
    text = module.make_parser().format_help()
    examples = [line for line in module.__doc__.splitlines() if line.startswith("    python")]
    assert examples and all(line in text.splitlines() for line in examples)
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    if module in (train_vanilla_gan, train_wgan):
        assert "by default the run is evaluated at its end" in " ".join(text.split())


def test_a_mistyped_flag_gets_the_flag_meant():
    code, _, err = run_in_process(train_wgan, ["--epoch", "2", "--max_steps", "3", "--n-critics", "2"])
    assert code == 2 and err.strip() == ("error: unrecognized arguments: --epoch 2 --max_steps 3 --n-critics 2; did you"
                                         " mean --epochs and --max-steps and --n-critic? (see --help)")
    code, _, err = run_in_process(evaluate, ["runs/x", "--data_root=d"])
    assert code == 2 and err.strip() == ("error: unrecognized arguments: --data_root=d; did you mean --data-root?"
                                         " (see --help)")


def test_resuming_a_complete_run_says_so_and_changes_nothing(tmp_path, data_root):
    runs = tmp_path / "runs"
    base = ["--data-root", data_root, "--runs-dir", runs, "--no-eval", *SMALL_VANILLA]
    assert run_in_process(train_vanilla_gan, [*base, "--run-name", "e", "--epochs", "1"])[0] == 0
    assert run_in_process(train_vanilla_gan, [*base, "--run-name", "m", "--max-steps", "3"])[0] == 0
    before = snapshot(runs)
    run = runs / "e"
    code, out, err = run_in_process(train_vanilla_gan, ["--resume", run])
    assert code == 0 and err == "" and out.strip() == (
        f"{run} is complete: 1 of --epochs 1 done (step 8); to train further, --resume {run} --epochs 11; to score"
        f" it, python evaluate.py {run}")
    run = runs / "m"
    code, out, _ = run_in_process(train_vanilla_gan, ["--resume", run])
    assert code == 0 and out.strip() == (
        f"{run} is complete: --max-steps 3 reached (step 3); to train further, --resume {run} --max-steps 1003; to"
        f" score it, python evaluate.py {run}")
    assert snapshot(runs) == before
    assert run_in_process(train_vanilla_gan, ["--resume", run, "--max-steps", "5"])[0] == 0  # more steps: it trains


def test_resume_with_a_run_name_points_to_its_folder(tmp_path, data_root, monkeypatch):
    runs = tmp_path / "runs"
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", runs, "--run-name", "sig",
                                       "--max-steps", "2", "--no-eval", *SMALL_WGAN])[0] == 0
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(train_wgan, ["--resume", "sig", "--runs-dir", runs])
    assert code == 2 and err.strip() == f"error: --resume sig: no such folder; did you mean --resume {runs / 'sig'}?"


def test_an_interrupt_says_what_is_saved_and_how_to_go_on(tmp_path, data_root, monkeypatch):
    """A second Ctrl-C (a KeyboardInterrupt) mid-run after a checkpoint, and one during the final evaluation."""
    steps, real_step = [0], train_wgan.critic_step

    def interrupted_at_6(*args):
        steps[0] += 1
        if steps[0] == 6:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train_wgan, "critic_step", interrupted_at_6)
    base = ["--data-root", data_root, "--runs-dir", tmp_path, "--checkpoint-every", "4", *SMALL_WGAN]
    code, _, err = run_in_process(train_wgan, [*base, "--run-name", "a", "--max-steps", "8"])
    run = tmp_path / "a"
    assert code == 130 and err.strip() == (f"interrupted; the last checkpoint (step 4) is kept in {run}: continue with"
                                           f" --resume {run}, or score it with python evaluate.py {run}")
    monkeypatch.setattr(train_wgan, "critic_step", real_step)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.TrainingEval, "final", interrupted)
    code, _, err = run_in_process(train_wgan, [*base, "--run-name", "b", "--max-steps", "3"])
    run = tmp_path / "b"
    assert code == 130 and err.strip() == (f"interrupted during the final evaluation; the run is complete and saved in"
                                           f" {run}: evaluate it with python evaluate.py {run}")


def test_evaluate_says_which_files_it_wrote_and_warns_of_few_samples(tmp_path, data_root):
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "w",
                                       "--max-steps", "2", "--no-eval", *SMALL_WGAN])[0] == 0
    grid, npz, line = tmp_path / "g.png", tmp_path / "s.npz", tmp_path / "i.png"
    code, out, err = run_in_process(evaluate, [tmp_path / "w", "--n", "40", "--no-floor", "--grid", grid,
                                               "--export", npz, "--interpolate", line])
    assert code == 0
    assert [text for text in out.splitlines() if text.startswith("wrote")] == [
        f"wrote {grid} (the first 40 samples)", f"wrote {npz} (40 samples, key 'images', uint8 N x 28 x 28)",
        f"wrote {line} (8 rows of 10 images along straight lines in z)"]
    assert err.strip().splitlines()[-1] == ("warning: an FID of 40 samples is biased upward and noisy; compare numbers"
                                            " of --n 10000 (the default)")


def test_plot_takes_a_runs_checkpoint_as_evaluate_does(tmp_path, data_root):
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "w",
                                       "--epochs", "1", "--no-eval", *SMALL_WGAN])[0] == 0
    out = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(tmp_path / "w" / "checkpoint.pt")],
                         capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "w" / "curves.png").is_file()


def test_missing_data_names_the_split_that_failed_and_only_what_works(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: "URLError: <urlopen error [Errno -3] name resolution failed>")
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})
    code, _, err = run_in_process(train_vanilla_gan, ["--data-root", tmp_path / "none", "--runs-dir", tmp_path])
    raw = tmp_path / "none" / "MNIST" / "raw"
    assert code == 1 and err.strip() == (
        f"error: mnist train data not found in {raw} and the download failed (URLError: <urlopen error [Errno -3] name"
        " resolution failed>); put the IDX files (.gz or not) in <data-root>/MNIST/raw/ and pass --data-root")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # the train split alone
        (data_root / "MNIST" / "raw" / name).unlink()
    code, _, err = run_in_process(train_vanilla_gan, ["--data-root", data_root, "--runs-dir", tmp_path])
    assert code == 1 and "mnist test data not found" in err and err.strip().endswith(
        "; or pass --no-eval to train without the quality evaluation")


def test_a_failed_download_gives_its_whole_reason(tmp_path, monkeypatch):
    def offline(*args, **kwargs):  # what torchvision raises offline: the reason on the lines after the first
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/mnist/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})
    with pytest.raises(utils.DataError, match=r"the download failed \(RuntimeError: Error downloading "
                                              r"train-images-idx3-ubyte.gz: Tried https://example/mnist/, got: "
                                              r"<urlopen error \[Errno -2\] Name or service not known>\)"):
        data.load_split("mnist", tmp_path, "train")
