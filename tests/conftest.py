"""Tiny extracted IDX datasets in a temporary folder, and helpers to run the commands. No network, no ../shared."""
import contextlib
import io
import os
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import utils  # noqa: E402 (importable once ROOT is on the path)

torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): runs in and out of this process compare exactly
DEVICE = os.environ.get("TEST_DEVICE", "cpu")  # the end-to-end runs' device (TEST_DEVICE=cuda python -m pytest -q)
SMALL_VANILLA = ["--batch-size", "16", "--g-hidden", "32", "--d-hidden", "16", "--z-dim", "8", "--no-progress",
                 "--eval-n", "64", "--device", DEVICE]
SMALL_WGAN = ["--batch-size", "16", "--g-widths", "16", "32", "--critic-widths", "32", "16", "--z-dim", "8",
              "--n-critic", "3", "--no-progress", "--eval-n", "64", "--device", DEVICE]


def write_idx(path, array):
    """A uint8 array as an extracted IDX file (magic 0x0800 | ndim), as torchvision leaves them in raw/."""
    array = np.asarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.tobytes())


def make_dataset(root, folder="MNIST", n_train=128, n_test=64, seed=0):
    """Blobby digit-like images so the networks see structure: each class a bright square at its own place."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 30, (n, 28, 28))
        for i, label in enumerate(labels):
            r, c = 2 + (label // 5) * 12, 2 + (label % 5) * 5
            images[i, r:r + 10, c:c + 5] = 255
        write_idx(Path(root) / folder / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(Path(root) / folder / "raw" / f"{split}-labels-idx1-ubyte", labels)
    return Path(root)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """torchvision's download fails at once, as it does without a network (a test never reaches one)."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)


@pytest.fixture
def data_root(tmp_path):
    make_dataset(tmp_path / "data", "MNIST")
    return make_dataset(tmp_path / "data", "FashionMNIST", seed=1)


def run_in_process(module, argv):
    """A command's main() in this process, as its command line runs it; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.run_main(module.main, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def subprocess_env():
    """One thread per process (the tests run two at a time on two cores), and the repository importable."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_hooked(script, at, action, *args, wait=True):
    """A training script in a subprocess, faulted by tests/step_hook.py at its step `at`: CompletedProcess (text), or
    with wait=False the Popen."""
    command = [sys.executable, str(ROOT / "tests" / "step_hook.py"), script, str(at), action, *map(str, args)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env())
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env())


def load(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def assert_same(a, b, what=""):
    """Two runs of the same program: bit-identical on the CPU. On a GPU or a Mac the same program may round
    differently from one run to the next (kernels picked by timing, atomics summed in any order): there they agree
    within float32 rounding grown over a short run."""
    if DEVICE == "cpu":
        assert torch.equal(a, b), what
    else:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), what


def assert_same_training(a, b):
    """Two checkpoints hold the same networks, weight average and optimizer states."""
    for name in ("G", "D", "C"):
        for key in a.get(name) or {}:
            assert_same(a[name][key], b[name][key], f"{name}.{key}")
    for key in (a["G_ema"] or {"model": {}})["model"]:
        assert_same(a["G_ema"]["model"][key], b["G_ema"]["model"][key], f"G_ema.{key}")
    for opt in [k for k in a if k.startswith("opt_")]:
        for pid, state in a[opt]["state"].items():
            for key, value in state.items():
                assert_same(value, b[opt]["state"][pid][key], f"{opt}.{pid}.{key}")
