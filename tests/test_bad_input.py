"""Every bad input: one line naming the problem and the fix, a non-zero exit code, no traceback, nothing overwritten."""
import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

import data
import train_vanilla_gan
import train_wgan
import utils
from conftest import SMALL_VANILLA, make_dataset, write_idx


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """torchvision's download fails as it does without a network (and never touches one in tests)."""
    monkeypatch.setattr(data, "_download", lambda *a: "URLError: <urlopen error [Errno -3] name resolution failed>")


def cli(module, argv, capsys):
    """Run a script's main in-process as the command line would; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(module.main, [str(a) for a in argv])
        raise SystemExit(0)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    return d


def vanilla(data_root, runs, *extra):
    return ["--data-root", data_root, "--runs-dir", runs, *SMALL_VANILLA, *extra]


def test_missing_data_offline_names_the_folders_and_the_flag(tmp_path, runs, capsys, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"fashion-mnist": [tmp_path / "system"]})
    code, err = cli(train_wgan, ["--data-root", tmp_path / "nothing", "--runs-dir", runs], capsys)
    line = one_error_line(err)
    assert code == 1
    assert str(tmp_path / "nothing" / "FashionMNIST" / "raw") in line and str(tmp_path / "system") in line
    assert "--data-root" in line and "download failed" in line
    assert not any(runs.iterdir())  # no empty run folder left behind


def test_the_system_dataset_folder_is_the_fallback_when_offline(tmp_path, monkeypatch):
    make_dataset(tmp_path / "sys", "FashionMNIST", n_train=40)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {"fashion-mnist": [tmp_path / "sys" / "FashionMNIST" / "raw"]})
    images, labels = data.load_split("fashion-mnist", tmp_path / "empty", "train")
    assert images.shape == (40, 28, 28) and labels.shape == (40,) and images.dtype == torch.uint8


def test_uncompressed_idx_files_load(tmp_path):
    make_dataset(tmp_path, "MNIST", n_train=20, compress=False)
    images, labels = data.load_split("mnist", tmp_path, "train")
    assert images.shape == (20, 28, 28) and int(images.max()) == 255 and int(labels.max()) <= 9


def break_file(raw, how):
    path = raw / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    if how == "corrupt gz":
        path.write_bytes(b"this is not gzip data at all")
        return "cannot read it"
    if how == "truncated gz":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return "cannot read it"
    if how == "wrong magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + data[4:]))
        return "not an IDX file"
    if how == "wrong dimensions":  # the header claims 128 x 28 x 28 but the body holds 128 x 27 x 28 bytes
        path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 128, 28, 28) + bytes(128 * 27 * 28)))
        return "header says shape (128, 28, 28)"
    if how == "count mismatch":
        write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(100, np.uint8))
        return "holds 128 images but"


@pytest.mark.parametrize("how", ["corrupt gz", "truncated gz", "wrong magic", "wrong dimensions", "count mismatch"])
def test_a_broken_idx_file_is_one_line_naming_the_file_and_exit_1(data_root, runs, capsys, how):
    expected = break_file(data_root / "MNIST" / "raw", how)
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs), capsys)
    line = one_error_line(err)
    assert code == 1 and expected in line and "train-" in line, line
    assert not any(runs.iterdir())


@pytest.mark.parametrize("module,flag,value", [
    (train_vanilla_gan, "--epochs", "0"), (train_vanilla_gan, "--batch-size", "-3"), (train_vanilla_gan, "--lr", "0"),
    (train_wgan, "--lr", "-1e-4"), (train_wgan, "--clip-value", "0"), (train_wgan, "--n-critic", "0"),
    (train_wgan, "--epochs", "x"), (train_vanilla_gan, "--dataset", "cifar10"),
    (train_vanilla_gan, "--ema-decay", "1"), (train_wgan, "--ema-decay", "-0.5"),
    (train_vanilla_gan, "--d-dropout", "nan"), (train_vanilla_gan, "--leaky-slope", "x"),
    (train_wgan, "--preset", "fast"), (train_vanilla_gan, "--preset", "paper"),
])
def test_out_of_range_flag_values_are_refused_with_exit_2_before_any_file(data_root, runs, capsys, module, flag, value):
    code, err = cli(module, ["--data-root", data_root, "--runs-dir", runs, flag, value], capsys)
    assert code == 2 and flag in one_error_line(err)
    assert not any(runs.iterdir())


def test_a_batch_larger_than_the_dataset_is_refused_before_a_run_folder_exists(data_root, runs, capsys):
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs, "--batch-size", 129), capsys)
    line = one_error_line(err)
    assert code == 2 and "--batch-size 129 is larger than the dataset (128 images)" in line
    assert not any(runs.iterdir())


def test_an_unwritable_runs_folder_is_one_line_and_exit_2(data_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = cli(train_vanilla_gan, vanilla(data_root, blocker / "runs"), capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot create run folder" in line and "--runs-dir" in line
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def finished_run(data_root, runs, capsys):
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs, "--run-name", "done", "--max-steps", 3), capsys)
    assert code == 0, err
    return runs / "done"


def test_existing_run_name_is_refused_and_left_alone(data_root, runs, finished_run, capsys):
    before = snapshot(finished_run)
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs, "--run-name", "done"), capsys)
    line = one_error_line(err)
    assert code == 2 and "already exists" in line and f"--resume {finished_run}" in line
    assert snapshot(finished_run) == before


def test_resume_of_a_missing_or_corrupt_checkpoint_is_one_line(data_root, runs, tmp_path, capsys):
    code, err = cli(train_vanilla_gan, ["--resume", runs / "nope"], capsys)
    assert code == 2 and "no checkpoint there" in one_error_line(err)
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00garbage" * 100)
    code, err = cli(train_vanilla_gan, ["--resume", bad], capsys)
    assert code == 2 and "not a readable checkpoint" in one_error_line(err)
    assert bad.read_bytes() == b"\x00garbage" * 100


def test_resume_with_the_other_script_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    code, err = cli(train_wgan, ["--resume", finished_run], capsys)
    assert code == 2 and "it is a vanilla_gan checkpoint; resume it with train_vanilla_gan.py" in one_error_line(err)
    assert snapshot(finished_run) == before


def test_resume_with_conflicting_flags_lists_them(finished_run, capsys):
    before = snapshot(finished_run)
    code, err = cli(train_vanilla_gan, ["--resume", finished_run, "--z-dim", 16, "--dataset", "fashion-mnist",
                                        "--g-hidden", 32], capsys)  # g-hidden agrees with the checkpoint
    line = one_error_line(err)
    assert code == 2 and "--dataset fashion-mnist (checkpoint: mnist)" in line and "--z-dim 16 (checkpoint: 8)" in line
    assert "g-hidden" not in line
    assert snapshot(finished_run) == before


def test_resume_takes_the_checkpoints_configuration_and_runtime_flags(finished_run, capsys):
    code, err = cli(train_vanilla_gan, ["--resume", finished_run, "--max-steps", 5], capsys)  # no sizes given
    assert code == 0, err
    ckpt = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["args"]["batch_size"] == 16 and ckpt["args"]["z_dim"] == 8


def test_a_missing_test_split_is_refused_before_training_unless_no_eval(data_root, runs, capsys):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data_root / "MNIST" / "raw" / name).unlink()
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs, "--max-steps", 2), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: mnist test data not found in ") and lines[0].endswith(
        "or pass --no-eval to train without the quality evaluation")
    assert not any(runs.iterdir())  # refused before anything was written (it used to fail after the whole run)
    code, err = cli(train_vanilla_gan, vanilla(data_root, runs, "--max-steps", 2, "--no-eval"), capsys)
    assert code == 0, err


def test_argparse_errors_are_one_line_naming_the_flag(data_root, runs, capsys):
    code, err = cli(train_wgan, ["--data-root", data_root, "--runs-dir", runs, "--n-critic"], capsys)
    assert code == 2 and err == "error: argument --n-critic: expected one argument (see --help)\n"
