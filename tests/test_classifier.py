"""The shipped feature network: its checksum, the same features on any thread count, its training command."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import classifier
import evaluate
import train_wgan
from conftest import DEVICE, SMALL_WGAN, run_in_process, subprocess_env
from data import load_split

FID_IN_A_PROCESS = """
import hashlib, sys, numpy as np, torch
import classifier, evaluate
torch.set_num_threads(int(sys.argv[1]))
images = torch.from_numpy(np.load(sys.argv[2]))
model, _ = classifier.load("mnist", torch.device("cpu"))
feats, _ = classifier.predict(model, images, torch.device("cpu"))
print(repr(evaluate.fid(feats[:200], feats[200:])), hashlib.sha256(feats.tobytes()).hexdigest())
"""


@pytest.mark.parametrize("dataset", sorted(classifier.SHIPPED_SHA256))
def test_the_shipped_networks_are_the_files_their_checksums_name(dataset):
    path = classifier.SHIPPED_DIR / f"{dataset}.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == classifier.SHIPPED_SHA256[dataset]
    model, network = classifier.load(dataset, torch.device("cpu"))
    assert network == {"sha256": classifier.SHIPPED_SHA256[dataset], "test_accuracy": network["test_accuracy"],
                       "shipped": True} and network["test_accuracy"] > 0.9
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_a_changed_or_missing_shipped_network_is_refused_before_any_work(tmp_path, data_root, monkeypatch):
    changed = bytearray((classifier.SHIPPED_DIR / "mnist.pt").read_bytes())
    changed[-1000] ^= 1  # one bit of one weight
    monkeypatch.setattr(classifier, "SHIPPED_DIR", tmp_path / "classifiers")
    (tmp_path / "classifiers").mkdir()
    (tmp_path / "classifiers" / "mnist.pt").write_bytes(bytes(changed))
    sha, shipped = hashlib.sha256(bytes(changed)).hexdigest(), classifier.SHIPPED_SHA256["mnist"]
    argv = ["--data-root", data_root, "--runs-dir", tmp_path / "runs", "--run-name", "r", "--max-steps", "2",
            *SMALL_WGAN, "--dataset", "mnist"]
    code, out, err = run_in_process(train_wgan, argv)
    restore = "restore the shipped file: git checkout -- classifiers/mnist.pt"
    assert (code, out, err) == (1, "", f"error: {tmp_path / 'classifiers' / 'mnist.pt'} is not the shipped mnist"
                                       f" feature network (SHA-256 {sha[:12]}..., expected {shipped[:12]}...);"
                                       f" {restore}; or pass --no-eval to train without the quality evaluation\n")
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
    assert run_in_process(train_wgan, [*argv, "--no-eval"])[0] == 0
    (tmp_path / "classifiers" / "mnist.pt").unlink()
    code, out, err = run_in_process(evaluate, [tmp_path / "runs" / "r", "--n", "64", "--device", DEVICE])
    assert (code, err) == (1, f"error: cannot read the feature network {tmp_path / 'classifiers' / 'mnist.pt'} (No"
                              f" such file or directory); {restore}\n")


def test_the_same_images_give_the_same_features_and_fid_with_another_thread_count(tmp_path, data_root):
    """Two processes, one and three threads: the float32 features, and so the FID, are the same bit for bit."""
    test_images, _ = load_split("mnist", data_root, "test")
    rng = np.random.default_rng(0)
    images = np.concatenate([test_images.numpy()] * 4 + [rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)])
    np.save(tmp_path / "images.npy", images)
    runs = [subprocess.run([sys.executable, "-c", FID_IN_A_PROCESS, threads, str(tmp_path / "images.npy")],
                           capture_output=True, text=True, env=subprocess_env(), timeout=120) for threads in "13"]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert runs[0].stdout == runs[1].stdout and float(runs[0].stdout.split()[0]) > 1


def test_predict_runs_the_network_in_float32_without_tf32(monkeypatch):
    seen = []

    def features(self, x):
        seen.append((x.dtype, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic))
        return torch.zeros(len(x), 128)

    monkeypatch.setattr(classifier.Classifier, "features", features)
    model, _ = classifier.load("mnist", torch.device("cpu"))
    classifier.predict(model, torch.zeros(3, 28, 28, dtype=torch.uint8), torch.device("cpu"))
    assert seen == [(torch.float32, False, True)] and torch.backends.cudnn.allow_tf32  # restored after


def test_the_training_command_writes_a_network_that_evaluate_names_by_its_checksum(tmp_path, data_root):
    argv = ["--data-root", data_root, "--epochs", "2", "--no-progress", "--device", DEVICE]
    code, out, err = run_in_process(classifier, [*argv, "--out", tmp_path / "a.pt"])
    assert code == 0, err
    sha = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert out.startswith(f"wrote {tmp_path / 'a.pt'}: mnist, 2 epochs in ") and out.endswith(
        f", SHA-256 {sha} (not the same bytes as the shipped classifiers/mnist.pt)\n")
    assert run_in_process(classifier, [*argv, "--out", tmp_path / "b.pt"])[0] == 0
    if DEVICE == "cpu":  # the same command on the same machine: the same bytes
        assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    code, _, err = run_in_process(classifier, [*argv, "--out", tmp_path / "a.pt"])
    assert code == 2 and "already exists" in err
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "w",
                                       "--max-steps", "2", "--dataset", "mnist", "--no-eval", *SMALL_WGAN])[0] == 0
    evaluated = {}
    for name, extra in (("own", ["--classifier", tmp_path / "a.pt"]), ("shipped", [])):
        code, out, err = run_in_process(evaluate, [tmp_path / "w", "--n", "64", "--no-floor", "--json", *extra,
                                                   "--device", DEVICE])
        assert code == 0, err
        evaluated[name] = json.loads(out)
    assert evaluated["own"]["classifier_sha256"] == sha
    assert evaluated["shipped"]["classifier_sha256"] == classifier.SHIPPED_SHA256["mnist"]
    assert evaluated["own"]["metrics"]["fid"] != evaluated["shipped"]["metrics"]["fid"]
    code, _, err = run_in_process(evaluate, [tmp_path / "w", "--classifier", classifier.SHIPPED_DIR /
                                             "fashion-mnist.pt", "--n", "64"])
    assert (code, err.count("\n")) == (2, 1) and "is the feature network of fashion-mnist, not of mnist" in err
    code, _, err = run_in_process(evaluate, [tmp_path / "w", "--classifier", tmp_path / "w" / "checkpoint.pt"])
    assert (code, err.count("\n")) == (2, 1) and "checkpoint.pt is not a feature network (" in err
