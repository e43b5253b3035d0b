"""Tiny IDX datasets written to a temporary folder, and helpers to run the scripts. No network, no ../shared."""
import contextlib
import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402 (importable once ROOT is on the path)


def write_idx(path, array, compress=True):
    """Write a uint8 array as an IDX file (magic 0x0800 | ndim), gzip-compressed when compress."""
    array = np.asarray(array, dtype=np.uint8)
    data = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_dataset(root, folder="MNIST", n_train=128, n_test=64, compress=True, seed=0):
    """Blobby digit-like images so the networks see structure: each class a bright square at its own place."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 30, (n, 28, 28))
        for i, label in enumerate(labels):
            r, c = 2 + (label // 5) * 12, 2 + (label % 5) * 5
            images[i, r:r + 10, c:c + 5] = 255
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return Path(root)


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, "MNIST")
    make_dataset(root, "FashionMNIST", seed=1)
    return root


def run_in_process(module, argv):
    """A command's main() in-process, as its command line runs it (plot.py has a run_main of its own); returns (exit
    code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if module.__name__ == "plot":
                module.run_main([str(a) for a in argv])
            else:
                utils.run_main(module.main, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def subprocess_env():
    """One thread per process (the tests run two at a time on two cores), and the repository importable."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_script(script, *args, cwd=None, timeout=240, env_extra=None):
    """Run a training script as a subprocess; returns CompletedProcess with text output."""
    env = subprocess_env()
    env.update(env_extra or {})
    if script != "plot.py" and "--device" not in args:
        args = (*args, "--device", DEVICE)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def hooked_command(script, at, action, *args):
    """The command line of tests/step_hook.py: `script` (train_vanilla_gan or train_wgan) faulted at step `at`."""
    return [sys.executable, str(ROOT / "tests" / "step_hook.py"), script, str(at), action, *map(str, args)]


def run_hooked(script, at, action, *args, timeout=240):
    """Run a script faulted by tests/step_hook.py; returns CompletedProcess with text output."""
    env = subprocess_env()
    return subprocess.run(hooked_command(script, at, action, *args), capture_output=True, text=True, timeout=timeout,
                          env=env)


def start_hooked(script, at, action, *args):
    """Start a faulted script without waiting (stdout piped, text)."""
    env = subprocess_env()
    return subprocess.Popen(hooked_command(script, at, action, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


# The device of the end-to-end runs: the CPU, unless TEST_DEVICE names another (TEST_DEVICE=cuda python -m pytest -q).
DEVICE = os.environ.get("TEST_DEVICE", "cpu")
SMALL_VANILLA = ["--batch-size", "16", "--g-hidden", "32", "--d-hidden", "16", "--z-dim", "8", "--no-progress",
                 "--eval-n", "64", "--device", DEVICE]
SMALL_WGAN = ["--batch-size", "16", "--g-widths", "16", "32", "--critic-widths", "32", "16", "--z-dim", "8",
              "--n-critic", "3", "--no-progress", "--eval-n", "64", "--device", DEVICE]


def assert_same(a, b, what=""):
    """Two runs of the same computation: bit-identical on the CPU. On a GPU or a Mac the same program may round
    differently from one run to the next (cuBLAS and cuDNN pick kernels by timing, atomics sum in any order), so
    there they agree within float32 rounding grown over a short run."""
    if DEVICE == "cpu":
        assert torch.equal(a, b), what
    else:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), what
