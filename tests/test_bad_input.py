"""The failures users meet, one table: each is one line naming the problem and what to do, a non-zero exit code, no
traceback, and nothing already written is changed."""
import hashlib
import os

import pytest
import torch

import evaluate
import train_vanilla_gan
import train_wgan
from conftest import SMALL_VANILLA, SMALL_WGAN, make_dataset, run_in_process


class RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def world(tmp_path, data_root):
    """Data, a finished run of each script, a checkpoint of an older format, one that runs code, one that is noise."""
    runs = tmp_path / "runs"
    for module, small in ((train_vanilla_gan, SMALL_VANILLA), (train_wgan, SMALL_WGAN)):
        assert run_in_process(module, ["--data-root", data_root, "--runs-dir", runs, "--run-name", module.__name__,
                                       *small, "--max-steps", 2, "--no-eval"])[0] == 0
    ckpt = torch.load(runs / "train_wgan" / "checkpoint.pt", weights_only=True)
    for name, content in (("format1", {**ckpt, "format": 1}), ("unsafe", RunsCode(tmp_path / "ran"))):
        (runs / name).mkdir()
        torch.save(content, runs / name / "checkpoint.pt")
    (runs / "noise").mkdir()
    (runs / "noise" / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    broken = make_dataset(tmp_path / "broken", "MNIST") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:1000])
    return tmp_path


def snapshot(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = {  # name: (command, its flags ({t}: the test's folder), exit code, what the line says)
    "data missing offline": (train_wgan, "--data-root {t}/nothing", 1,
                             "fashion-mnist could not be read from {t}/nothing/FashionMNIST/raw nor downloaded"),
    "a truncated data file": (train_vanilla_gan, "--data-root {t}/broken", 1, "mnist could not be read from"),
    "a flag out of range": (train_vanilla_gan, "--epochs 0", 2, "argument --epochs: must be a positive integer, got"),
    "too few samples for precision/recall": (train_vanilla_gan, "--eval-n 3", 2,
                                             "argument --eval-n: must be at least 4"),
    "a batch larger than the data": (train_vanilla_gan, "--batch-size 129", 2,
                                     "argument --batch-size: must be at most 128, the training images"),
    "a seed torch cannot take": (train_wgan, "--seed 18446744073709551616", 2, "argument --seed: must be an integer"),
    "a mistyped flag": (train_wgan, "--n-critics 5", 2, "unrecognized arguments: --n-critics 5 (see --help)"),
    "a batch BatchNorm cannot train on": (train_wgan, "--batch-size 1", 2, "--batch-size: must be 2 or more"),
    "an unknown preset": (train_vanilla_gan, "--preset paper", 2, "argument --preset: invalid choice: 'paper'"),
    "no CUDA device": (train_vanilla_gan, "--device cuda", 2, "--device cuda: no CUDA device is available here"),
    "no MPS device": (evaluate, "{t}/runs/train_wgan --device mps", 2, "--device mps: no MPS device is available"),
    "a run folder that exists": (train_vanilla_gan, "--run-name train_vanilla_gan", 2,
                                 "{t}/runs/train_vanilla_gan exists; continue it with --resume"),
    "a runs folder that cannot be made": (train_vanilla_gan, "--runs-dir {t}/runs/noise/checkpoint.pt", 4,
                                           "cannot write {t}/runs/noise/checkpoint.pt/vanilla_gan-mnist-"),
    "no checkpoint there": (train_wgan, "--resume {t}/runs/none", 2, "{t}/runs/none: no such checkpoint"),
    "another script's checkpoint": (train_wgan, "--resume {t}/runs/train_vanilla_gan", 2,
                                    "is a checkpoint of train_vanilla_gan.py; resume it with that script"),
    "a resume with flags that change a network": (train_wgan, "--resume {t}/runs/train_wgan --g-widths 8", 2,
                                                   "its checkpoint does not fit these flags (RuntimeError: Error"),
    "a checkpoint of format 1": (evaluate, "{t}/runs/format1", 2,
                                 "is a checkpoint of format 1, but these scripts read format 4"),
    "a checkpoint that would run code": (train_wgan, "--resume {t}/runs/unsafe", 2,
                                         "is not a checkpoint these scripts can read safely (UnpicklingError"),
    "a file that is not a checkpoint": (evaluate, "{t}/runs/noise", 2, "is not a checkpoint these scripts can read"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_failure_users_meet_is_one_line_and_changes_nothing(world, case):
    module, flags, expected_code, says = CASES[case]
    if "CUDA" in case and torch.cuda.is_available() or "MPS" in case and torch.backends.mps.is_available():
        pytest.skip("the device is there")
    argv = flags.format(t=world).split()
    if module is not evaluate:  # a typed --data-root comes later and wins
        argv = ["--data-root", world / "data", "--runs-dir", world / "runs", "--no-progress", *argv]
    before = snapshot(world / "runs")
    code, out, err = run_in_process(module, argv)
    assert (code, err.count("\n")) == (expected_code, 1) and "Traceback" not in err, err
    assert err.startswith("error: ") and says.format(t=world) in err, err
    assert snapshot(world / "runs") == before and not (world / "ran").exists()


def test_running_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, data_root, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(train_vanilla_gan, "train_step", out_of_memory)
    code, _, err = run_in_process(train_vanilla_gan, ["--data-root", data_root, "--runs-dir", tmp_path, *SMALL_VANILLA])
    assert (code, err) == (1, "error: out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00"
                              " GiB); lower --batch-size, the widths or --eval-n\n")


def test_a_changed_shipped_feature_network_is_refused_before_training(tmp_path, data_root, monkeypatch):
    saved = torch.load(evaluate.SHIPPED_DIR / "mnist.pt", weights_only=True)
    saved["state_dict"]["head.bias"][3] += 1e-3  # one weight, a little
    (tmp_path / "classifiers").mkdir()
    torch.save(saved, tmp_path / "classifiers" / "mnist.pt")
    monkeypatch.setattr(evaluate, "SHIPPED_DIR", tmp_path / "classifiers")
    evaluate.reference.cache_clear()
    code, _, err = run_in_process(train_vanilla_gan, ["--data-root", data_root, "--runs-dir", tmp_path / "runs",
                                                      *SMALL_VANILLA])
    sha = hashlib.sha256((tmp_path / "classifiers" / "mnist.pt").read_bytes()).hexdigest()
    assert (code, err) == (1, f"error: {tmp_path / 'classifiers' / 'mnist.pt'} is not the shipped mnist feature"
                              f" network (SHA-256 {sha[:12]}..., expected {evaluate.SHIPPED_SHA256['mnist'][:12]}...);"
                              f" restore it: git -C {tmp_path} checkout -- classifiers/mnist.pt\n")
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
    evaluate.reference.cache_clear()
