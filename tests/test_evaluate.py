"""Quality metrics against closed forms and known answers, the shipped feature network, and evaluate.py's outputs."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import evaluate
import train_vanilla_gan
import train_wgan
import utils
from conftest import DEVICE, SMALL_WGAN, run_in_process, subprocess_env


def closed_form_fid(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = random_cov(rng, 6), random_cov(rng, 6)
    assert np.isclose(evaluate.frechet_distance(mu1, s1, mu2, s2), closed_form_fid(mu1, s1, mu2, s2), rtol=1e-9)
    # and from samples: 200,000 draws per Gaussian estimate it to within a percent or so
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert np.isclose(evaluate.fid(x, y), closed_form_fid(mu1, s1, mu2, s2), rtol=0.02)


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 128))  # fewer points than dimensions: a singular covariance
    value = evaluate.fid(x, x)
    assert isinstance(value, float) and 0 <= value < 1e-4  # the traces are ~128: rounding only


def test_precision_recall_on_point_clouds_with_known_answers():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(2000, 2))
    same = rng.normal(size=(2000, 2))
    p, r = evaluate.precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    half_off = np.concatenate([rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2)) + 50])
    p, r = evaluate.precision_recall(real, half_off)
    assert abs(p - 0.5) < 0.05  # half the fakes lie far from every real point
    narrow = rng.normal(size=(2000, 2)) * 0.1  # fakes on a small part of the real support
    p, r = evaluate.precision_recall(real, narrow)
    assert p > 0.95 and r < 0.2


def test_a_collapsed_generator_has_no_recall_and_class_kl_ln10_and_the_test_split_a_perfect_score(data_root):
    model, network, test_feats = evaluate.reference("mnist", data_root, torch.device("cpu"))
    assert network["sha256"] == evaluate.SHIPPED_SHA256["mnist"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    test_images, _ = utils.load_images("mnist", data_root, train=False)
    one = evaluate.metrics(*evaluate.predict(model, test_images[:1].repeat(64, 1, 1), torch.device("cpu")), test_feats)
    assert one["recall"] < 0.05 and np.isclose(one["class_kl"], np.log(10)) and one["classes_1pct"] == 1
    real = evaluate.metrics(*evaluate.predict(model, test_images, torch.device("cpu")), test_feats)
    assert real["fid"] < 1e-6 and real["recall"] == 1.0 and real["precision"] == 1.0
    evaluate.reference.cache_clear()


FID_IN_A_PROCESS = """
import sys, numpy as np, torch
import evaluate
images = torch.from_numpy(np.load(sys.argv[1]))
model, _ = evaluate.load_classifier("mnist", torch.device("cpu"))
feats, _ = evaluate.predict(model, images, torch.device("cpu"))
np.save(sys.argv[2], feats)
print(torch.get_num_threads(), repr(evaluate.fid(feats[:200], feats[200:])))
"""
# An older x86 CPU, as oneDNN, MKL and PyTorch's own kernels can be held to it: SSE4.1, no AVX.
OLDER_CPU = {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"}


def test_the_same_images_give_features_and_fid_within_a_measured_tolerance_on_another_thread_count_and_cpu(
        tmp_path, data_root):
    """Two processes: this one's numeric setup with 2 threads, and 1 thread held to an older CPU's instructions. Their
    float32 convolutions add in another order, so the features differ in their last bits (by up to 1.5e-7 of their
    largest value, measured) and FID in its 7th digit (up to 7e-7 relative): they agree within 1e-5 of the largest
    feature and 1e-5 relative, not bit for bit (docs/evaluation.md)."""
    test_images, _ = utils.load_images("mnist", data_root, train=False)
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


def test_evaluate_py_scores_the_average_or_raw_and_writes_grid_export_and_interpolation(tmp_path, data_root):
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "w",
                                       "--max-steps", 4, "--img-size", 32, "--no-eval", *SMALL_WGAN])[0] == 0
    files = {"--export": tmp_path / "s.npz", "--grid": tmp_path / "g.png", "--interpolate": tmp_path / "i.png"}
    results = {}
    for flags in ([], ["--raw"]):
        code, out, err = run_in_process(evaluate, [tmp_path / "w", "--n", 70, "--json", "--device", DEVICE, *flags,
                                                   *[x for pair in files.items() for x in pair]])
        assert code == 0 and err.endswith("compare FIDs of --n 10000\n"), err
        result = json.loads(out)
        assert result["n"] == 70 and result["step"] == 4 and set(evaluate.LOGGED) <= set(result["metrics"])
        assert result["classifier_sha256"] == evaluate.SHIPPED_SHA256["fashion-mnist"]
        results[result["weights"]] = result["metrics"]["fid"]
    assert set(results) == {"ema", "raw"} and results["ema"] != results["raw"]
    images = np.load(files["--export"])["images"]
    assert images.dtype == np.uint8 and images.shape == (70, 28, 28)  # resized from 32 x 32
    with Image.open(files["--grid"]) as grid, Image.open(files["--interpolate"]) as lines:
        assert grid.size == (8 * 30 + 2, 8 * 30 + 2) and lines.size == (10 * 34 + 2, 8 * 34 + 2)
    code, out, _ = run_in_process(evaluate, [tmp_path / "w", "--n", 64, "--device", DEVICE])
    sha = evaluate.SHIPPED_SHA256["fashion-mnist"]
    assert f"feature network: SHA-256 {sha[:12]}..., test accuracy 0." in out


def test_interpolation_rows_walk_straight_lines_between_two_seeded_points():
    torch.manual_seed(0)
    G = train_vanilla_gan.Generator(8, 784, [16])
    images = evaluate.interpolation(G, torch.device("cpu"), seed=3)
    assert images.shape == (80, 1, 28, 28)
    start, end = torch.randn(2, 8, 1, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, last = G(start[:, 0]).view(8, 1, 28, 28), G(end[:, 0]).view(8, 1, 28, 28)
        middle = G((start + (end - start) * 4 / 9)[:, 0]).view(8, 1, 28, 28)
    rows = images.view(8, 10, 1, 28, 28)
    assert torch.allclose(rows[:, 0], first, atol=1e-6) and torch.allclose(rows[:, -1], last, atol=1e-6)
    assert torch.allclose(rows[:, 4], middle, atol=1e-6)


def test_the_feature_network_command_names_its_checksum_and_compares_with_the_shipped_one(tmp_path, data_root):
    import train_classifier

    argv = ["--data-root", data_root, "--epochs", 1, "--no-progress", "--device", DEVICE, "--out", tmp_path / "a.pt"]
    code, out, err = run_in_process(train_classifier, argv)
    assert code == 0, err
    wrote, compared = out.splitlines()
    sha = __import__("hashlib").sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert wrote.startswith(f"wrote {tmp_path / 'a.pt'}: mnist, 1 epochs in ") and wrote.endswith(f"SHA-256 {sha}")
    assert compared.startswith("its weights are not the same as those of the shipped classifiers/mnist.pt")
