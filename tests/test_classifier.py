"""The shipped feature network: its checksum, the same features within a measured tolerance on any thread count and
CPU, its training command."""
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
import sys, numpy as np, torch
import classifier, evaluate
images = torch.from_numpy(np.load(sys.argv[1]))
model, _ = classifier.load("mnist", torch.device("cpu"))
feats, _ = classifier.predict(model, images, torch.device("cpu"))
np.save(sys.argv[2], feats)
print(torch.get_num_threads(), repr(evaluate.fid(feats[:200], feats[200:])))
"""


@pytest.mark.parametrize("dataset", sorted(classifier.SHIPPED_SHA256))
def test_the_shipped_networks_load_as_float32_and_say_they_are_shipped(dataset):
    model, network = classifier.load(dataset, torch.device("cpu"))
    assert network["sha256"] == classifier.SHIPPED_SHA256[dataset] and network["shipped"]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_a_changed_or_missing_shipped_network_is_refused_before_any_work(tmp_path, data_root, monkeypatch):
    saved = torch.load(classifier.SHIPPED_DIR / "mnist.pt", weights_only=True)
    saved["state_dict"]["head.bias"][3] += 1e-3  # one weight, a little
    monkeypatch.setattr(classifier, "SHIPPED_DIR", tmp_path / "classifiers")
    (tmp_path / "classifiers").mkdir()
    torch.save(saved, tmp_path / "classifiers" / "mnist.pt")
    sha, shipped = hashlib.sha256((tmp_path / "classifiers" / "mnist.pt").read_bytes()).hexdigest(), \
        classifier.SHIPPED_SHA256["mnist"]
    restore = f"restore it: git -C {tmp_path} checkout -- classifiers/mnist.pt"  # the folder that holds classifiers/
    argv = ["--data-root", data_root, "--runs-dir", tmp_path / "runs", "--run-name", "r", "--max-steps", "2",
            *SMALL_WGAN, "--dataset", "mnist"]
    code, out, err = run_in_process(train_wgan, argv)
    assert (code, out, err) == (1, "", f"error: {tmp_path / 'classifiers' / 'mnist.pt'} is not the shipped mnist"
                                       f" feature network (SHA-256 {sha[:12]}..., expected {shipped[:12]}...);"
                                       f" {restore}; or pass --no-eval to train without the quality evaluation\n")
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
    assert run_in_process(train_wgan, [*argv, "--no-eval"])[0] == 0
    (tmp_path / "classifiers" / "mnist.pt").unlink()
    code, out, err = run_in_process(evaluate, [tmp_path / "runs" / "r", "--n", "64", "--device", DEVICE])
    assert (code, err) == (1, f"error: cannot read the shipped feature network {tmp_path / 'classifiers' / 'mnist.pt'}"
                              f" (No such file or directory); {restore}\n")


# An older x86 CPU, as oneDNN, MKL and PyTorch's own kernels can be held to it: SSE4.1, no AVX.
OLDER_CPU = {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"}


def test_the_same_images_give_features_and_fid_within_a_measured_tolerance_on_another_thread_count_and_cpu(
        tmp_path, data_root):
    """Two processes: this one's numeric setup with 2 threads, and 1 thread held to an older CPU's instructions. Their
    float32 convolutions add in another order, so the features differ in their last bits (by up to 1.5e-7 of their
    largest value, measured) and FID in its 7th digit (up to 7e-7 relative): they agree within 1e-5 of the largest
    feature and 1e-5 relative, not bit for bit (docs/evaluation.md)."""
    test_images, _ = load_split("mnist", data_root, "test")
    rng = np.random.default_rng(0)
    images = np.concatenate([test_images.numpy()] * 4 + [rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)])
    np.save(tmp_path / "images.npy", images)
    setups = [{"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "1", **OLDER_CPU}]
    runs = [subprocess.run([sys.executable, "-c", FID_IN_A_PROCESS, tmp_path / "images.npy", tmp_path / str(i)],
                           capture_output=True, text=True, env={**subprocess_env(), **setup}, timeout=120)
            for i, setup in enumerate(setups)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    (threads, fid), (threads_older, fid_older) = (r.stdout.split() for r in runs)
    features, features_older = np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy")
    assert (threads, threads_older) == ("2", "1") and float(fid) > 1
    assert np.abs(features - features_older).max() <= 1e-5 * np.abs(features).max()
    assert float(fid_older) == pytest.approx(float(fid), rel=1e-5)


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
    wrote, compared = out.splitlines()
    assert wrote.startswith(f"wrote {tmp_path / 'a.pt'}: mnist, 2 epochs in ") and wrote.endswith(f", SHA-256 {sha}")
    assert compared == ("its weights are not the same as those of the shipped classifiers/mnist.pt (trained with"
                        " other flags, data, or rounding)")
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
    code, out, _ = run_in_process(evaluate, [tmp_path / "w", "--n", "64", "--no-floor", "--device", DEVICE])
    assert f"\nfeature network: shipped, SHA-256 {classifier.SHIPPED_SHA256['mnist'][:12]}..., test accuracy 0." in out
    # a network saved in float64 is evaluated in float32, as the shipped one
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.save({**saved, "state_dict": {k: v.double() for k, v in saved["state_dict"].items()}}, tmp_path / "d.pt")
    model, network = classifier.load("mnist", torch.device("cpu"), tmp_path / "d.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not network["shipped"]
    refused = {"fashion-mnist.pt": "is the feature network of fashion-mnist, not of mnist; pass one trained with"
                                   " --dataset mnist",
               "w/checkpoint.pt": "checkpoint.pt is not a feature network (KeyError: 'state_dict'); pass a file that"
                                  " python classifier.py wrote",
               "missing.pt": "missing.pt: cannot read it (No such file or directory); pass a file that python"
                             " classifier.py wrote"}
    for name, text in refused.items():
        path = classifier.SHIPPED_DIR / name if name.startswith("fashion") else tmp_path / name
        code, _, err = run_in_process(evaluate, [tmp_path / "w", "--classifier", path, "--n", "64"])
        assert (code, err.count("\n")) == (2, 1) and text in err, err
