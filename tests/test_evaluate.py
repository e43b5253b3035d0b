"""Quality metrics against known answers, and evaluate.py's outputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import evaluate
import train_wgan
import utils
from conftest import DEVICE, SMALL_WGAN


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


@pytest.fixture
def evaluator(data_root):
    return evaluate.Evaluator("mnist", data_root, torch.device("cpu"))


def test_collapsed_generator_has_no_recall_and_class_kl_ln10(evaluator, data_root):
    one_image = evaluator.test_images[:1].repeat(64, 1, 1)
    m = evaluator.images(one_image)
    assert m["recall"] < 0.05
    assert np.isclose(m["class_kl"], np.log(10)) and m["classes_1pct"] == 1
    assert np.isclose(m["inception_score"], 1.0, atol=1e-6)
    real = evaluator.images(evaluator.test_images)
    assert real["fid"] < 1e-6 and real["recall"] == 1.0 and real["precision"] == 1.0


def test_evaluate_cli_exports_grid_and_json(tmp_path, data_root, capsys):
    utils.run_main(train_wgan.main, ["--data-root", str(data_root), "--runs-dir", str(tmp_path), "--run-name", "w",
                                     "--max-steps", "4", "--img-size", "32", "--no-eval", *SMALL_WGAN])
    capsys.readouterr()
    out_npz, grid = tmp_path / "s.npz", tmp_path / "g.png"
    utils.run_main(evaluate.main, [str(tmp_path / "w"), "--n", "70", "--json", "--export", str(out_npz),
                                   "--grid", str(grid), "--device", DEVICE])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 70 and result["step"] == 4 and set(evaluate.FORMATS) <= set(result["metrics"])
    assert result["real"]["fid"] < result["metrics"]["fid"]
    images = np.load(out_npz)["images"]
    assert images.dtype == np.uint8 and images.shape == (70, 28, 28)  # resized from 32 x 32
    assert grid.is_file()
    # refuses to overwrite an existing export
    with pytest.raises(SystemExit) as e:
        utils.run_main(evaluate.main, [str(tmp_path / "w"), "--n", "8", "--export", str(out_npz)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_export_scale_black_background():
    x = torch.full((2, 1, 28, 28), -1.0)
    x[:, :, 10:12, 10:12] = 1.0
    out = evaluate.to_uint8_28(x)
    assert out.dtype == torch.uint8 and out[0, 0, 0] == 0 and out[0, 10, 10] == 255


def test_interpolation_rows_walk_between_the_generators_outputs_at_two_seeded_points(tmp_path, data_root, capsys):
    utils.run_main(train_wgan.main, ["--data-root", str(data_root), "--runs-dir", str(tmp_path), "--run-name", "w",
                                     "--max-steps", "4", "--no-eval", *SMALL_WGAN])
    capsys.readouterr()
    ckpt, _ = utils.load_checkpoint(tmp_path / "w")
    G, z_dim, _ = evaluate.generator_from_checkpoint(ckpt, torch.device("cpu"))
    images = evaluate.interpolation(G, z_dim, torch.device("cpu"), seed=3)
    assert images.shape == (80, 1, 28, 28)
    gen = torch.Generator().manual_seed(3)
    start, end = torch.randn(2, 8, 1, z_dim, generator=gen)
    G.eval()
    with torch.no_grad():
        first, last = G(start[:, 0]), G(end[:, 0])
    rows = images.view(8, 10, 1, 28, 28)
    assert torch.allclose(rows[:, 0], first, atol=1e-6) and torch.allclose(rows[:, -1], last, atol=1e-6)
    assert not torch.equal(rows[:, 4], first) and not torch.equal(rows[:, 4], last)  # the middle: neither end
    out = tmp_path / "interp.png"
    utils.run_main(evaluate.main, [str(tmp_path / "w"), "--n", "40", "--no-floor", "--interpolate", str(out),
                                   "--device", DEVICE])
    with Image.open(out) as png:
        assert png.size == (10 * 30 + 2, 8 * 30 + 2)
