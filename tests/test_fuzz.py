"""Command lines drawn at random from every flag's whole domain: each either works, or is refused in one line.

For each command (both training scripts, evaluate.py, classifier.py, bench.py, plot.py) the flags and their kinds are
read from its own parser, so a flag added later is fuzzed too. Values come from the edges of each kind: 0, 1,
negative, huge, not a number, empty, NaN and infinity for numbers; wrong names for choices; missing, empty, a file, a
folder, a read-only folder for paths; and a flag whose value is missing. Each command line runs in this process on
tiny data with a short --max-steps, and must end in one of two ways:
  - exit 0, with the run's checkpoint (or the command's output) written;
  - exit 1, 2, 3 or 4 with exactly one line on stderr, no traceback, and no file or folder created or changed (exit 3,
    a divergence, keeps the run folder it made: its events show the divergence, its checkpoint is the last good one).
Hypothesis runs derandomized, with a fixed number of examples, so the test is the same on every run. Command lines it
found failing are kept as plain regression tests at the bottom. To search further: FUZZ_RANDOM=1 draws other command
lines on each run, FUZZ_TIMES=6 draws six times as many, FUZZ_VERBOSE=1 prints each with its outcome.
"""
import hashlib
import os
import re
import stat
import urllib.error
from pathlib import Path

import pytest
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench
import classifier
import evaluate
import plot
import train_vanilla_gan
import train_wgan
import training
import utils
from conftest import SMALL_VANILLA, SMALL_WGAN, make_dataset, run_in_process

INT_EDGES = ["0", "1", "-1", "2", "3", "16", "-7", "1000000", "1000000000000", "99999999999999999999999", "1e3",
             "2.5", "x", "", "nan", " 5"]
FLOAT_EDGES = ["0", "1", "-1", "0.5", "0.3", "1e-4", "0.999", "1e30", "-0", "inf", "-inf", "nan", "x", "", "1e-320",
               "2"]
MODULES = {"train_vanilla_gan": train_vanilla_gan, "train_wgan": train_wgan, "evaluate": evaluate,
           "classifier": classifier, "bench": bench, "plot": plot}


def offline_download(*args, **kwargs):
    raise urllib.error.URLError("no network in the tests")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, one finished run of each script, and paths of every kind."""
    patch = pytest.MonkeyPatch()  # torchvision's own download, failing as it does offline (it makes folders first)
    patch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline_download)
    root = tmp_path_factory.mktemp("fuzz")
    data = make_dataset(root / "data", "MNIST")
    make_dataset(root / "data", "FashionMNIST", seed=1)
    runs = root / "runs"
    for module, small in ((train_vanilla_gan, SMALL_VANILLA), (train_wgan, SMALL_WGAN)):
        run_in_process(module, ["--data-root", data, "--runs-dir", runs, "--run-name", module.ALGO, *small,
                             "--epochs", "1", "--max-steps", "3"])
    (root / "a-file").write_text("not a folder, not a checkpoint")
    (root / "empty").mkdir()
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
    (root / "cwd").mkdir()
    paths = ["", str(data), str(runs), str(runs / "vanilla_gan"), str(runs / "wgan"),
             str(runs / "wgan" / utils.CHECKPOINT), str(root / "a-file"), str(root / "empty"), str(read_only),
             str(root / "missing"), str(root / "a-file" / "below"), "."]
    outputs = ["", str(root / "out.png"), str(root / "a-file"), str(root / "empty"), str(read_only / "x.png"),
               str(root / "missing" / "x.png"), str(root / "a-file" / "x.png")]
    yield {"root": root, "data": data, "runs": runs, "paths": paths, "outputs": outputs}
    read_only.chmod(stat.S_IRWXU)
    patch.undo()


def flag_kind(action):
    """What values a flag takes, read from its argparse action."""
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return "choice"
    value = None
    for probe in ("1", "0", "0.5", "5"):  # the first value the flag's type accepts tells its kind
        try:
            value = (action.type or str)(probe)
            break
        except Exception:
            continue
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "output" if action.metavar in ("PNG", "NPZ") or action.dest == "out" else "path"


def values(kind, action, world):
    if kind == "switch":
        return st.just([])
    if kind == "int":
        one = st.sampled_from(INT_EDGES) | st.integers(-3, 70).map(str)
    elif kind == "float":
        one = st.sampled_from(FLOAT_EDGES) | st.floats(-1, 2, allow_nan=False).map(repr)
    elif kind == "choice":
        one = st.sampled_from(sorted(map(str, action.choices)) + ["", "nonsense"])
    else:
        one = st.sampled_from(world["outputs" if kind == "output" else "paths"])
    if action.nargs == "+":
        return st.lists(one, min_size=1, max_size=3)
    return one.map(lambda v: [v])


def baseline(name, world):
    """A quick, valid command line that the drawn flags are appended to (the last value of a flag wins)."""
    data, runs = str(world["data"]), str(world["runs"])
    world["count"] = world.get("count", 0) + 1
    short = ["--epochs", "1", "--max-steps", "3", "--run-name", f"r{world['count']}"]  # one new folder per example
    return {"train_vanilla_gan": ["--data-root", data, "--runs-dir", runs, *SMALL_VANILLA, *short],
            "train_wgan": ["--data-root", data, "--runs-dir", runs, *SMALL_WGAN, *short],
            "evaluate": [str(world["runs"] / "vanilla_gan"), "--n", "64", "--data-root", data, "--no-floor", "--json"],
            "classifier": ["--data-root", data, "--out", str(world["root"] / "c.pt"), "--epochs", "1", "--no-progress"],
            "bench": ["--data-root", data, "--steps", "2", "--repeats", "1", "--warmup", "1", "--json"],
            "plot": [str(world["runs"] / "wgan"), "--out", str(world["root"] / "curves.png")]}[name]


@st.composite
def command_lines(draw, name, world):
    parser = MODULES[name].make_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    chosen = draw(st.lists(st.sampled_from(actions), min_size=1, max_size=3, unique_by=lambda a: a.dest))
    if {"epochs", "max_steps"} <= {a.dest for a in chosen}:  # both huge would train for ever: keep one
        chosen = [a for a in chosen if a.dest != "epochs"]
    argv = baseline(name, world)
    for action in chosen:
        kind = flag_kind(action)
        drawn = draw(values(kind, action, world))
        if not action.option_strings:  # the positional: replace the baseline's
            argv[0] = drawn[0]
            continue
        argv += [action.option_strings[-1], *drawn]
    if draw(st.integers(0, 19)) == 0:  # one time in 20: a flag whose value is missing, at the end
        argv.append(draw(st.sampled_from([a.option_strings[-1] for a in actions if a.option_strings and a.nargs != 0])))
    return argv


def snapshot(root):
    """{path: content hash} of every file under root, and "folder" for every folder."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            for path in Path(root).rglob("*")}


def remove_new(before, after):
    """Undo what a command that worked created, so every example meets the same paths ("missing" stays missing)."""
    for path in sorted(set(after) - set(before), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


def check(name, argv, world):
    """Run argv; assert it either worked or failed in one line having written nothing."""
    root = world["root"]
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root / "cwd")  # relative paths land in the temporary folder
    try:
        code, out, err = run_in_process(MODULES[name], argv)
    finally:
        os.chdir(cwd)
    after = snapshot(root)
    shown = f"{name} {' '.join(map(repr, argv))}\nexit {code}\nstderr:\n{err}"
    assert "Traceback" not in err, shown
    if os.environ.get("FUZZ_VERBOSE"):
        print(code, argv[-6:], err.strip()[-150:])
    if code == 0:
        done = re.search(r"^done: (.+) \(step \d+\)$", out, re.M)
        if name.startswith("train") and " is complete: " not in out:  # a resumed run with nothing left writes nothing
            assert done and (Path(root / "cwd", done.group(1)) / utils.CHECKPOINT).is_file(), shown
        remove_new(before, after)
        return code, err
    assert code in (1, 2, 3, 4), shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    if code == 3:  # a divergence keeps the run folder it made; nothing else may change
        new_runs = {p.parent for p in after if p not in before and p.name == training.LOCK}
        changed = {p for p in changed if p not in new_runs and not any(run in p.parents for run in new_runs)}
    assert not changed, f"{shown}\nchanged: {sorted(map(str, changed))}"
    remove_new(before, after)  # a diverged run's folder
    return code, err


FUZZ = settings(derandomize=not os.environ.get("FUZZ_RANDOM"), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("name,examples", [("train_vanilla_gan", 80), ("train_wgan", 80), ("evaluate", 40),
                                           ("classifier", 15), ("plot", 25), ("bench", 5)])
def test_every_command_line_works_or_is_refused_in_one_line(world, name, examples):
    @settings(FUZZ, max_examples=examples * int(os.environ.get("FUZZ_TIMES", "1")))
    @given(st.data())
    def fuzz(data):
        code, err = check(name, data.draw(command_lines(name, world)), world)
        outcomes[code] = outcomes.get(code, 0) + 1

    outcomes = {}
    fuzz()
    print(name, "exit codes:", outcomes)  # the share that ran (exit 0) against the refused ones


# ----------------------------------------------------------------------------------------------------------------------
# Command lines that ended in a traceback (or a half-made run folder) before, each kept as a plain test. The first was
# found by the fuzz test; the others by trying each flag's edges while writing it (each failed on commit 7236673).

FOUND = [
    ("train_vanilla_gan", ["--beta1", "1"], 2, "argument --beta1: must be at least 0 and below 1"),  # Adam's ValueError
    ("train_wgan", ["--batch-size", "1"], 2, "BatchNorm needs 2 or more images per batch"),  # BatchNorm's ValueError
    ("train_vanilla_gan", ["--eval-n", "2"], 2, "3rd-nearest neighbour"),  # kthvalue() after the whole run
    ("train_vanilla_gan", ["--seed", "99999999999999999999999"], 2, "the range torch's seeds take"),  # overflow
    ("train_vanilla_gan", ["--run-name", "x/y"], 2, "must be a plain folder name"),
    ("train_vanilla_gan", ["--runs-dir", ""], 2, "argument --runs-dir: must not be empty"),  # ran in the cwd
    ("train_vanilla_gan", ["--g-hidden", "1000000", "1000000"], 1, "parameters) and a step of batch 16 need about"),
    ("train_vanilla_gan", ["--img-size", "10000"], 1, "the 128 training images at --img-size 10000 need about"),
    ("train_vanilla_gan", ["--epochs", "0"], 2, "argument --epochs: must be an integer of at least 1, got '0'"),
    ("train_vanilla_gan", ["--lr", "1"], 3, "it diverged before its first checkpoint"),  # said a checkpoint was kept
    ("train_vanilla_gan", ["--data-root", "missing"], 1, "download failed"),  # the failed download left empty folders
    ("evaluate", ["--grid", "a-file/x.png"], 2, "a-file is not a writable folder"),  # FileExistsError after the work
    ("evaluate", ["--n", "2"], 2, "argument --n: must be an integer from 4 to 100,000"),  # kthvalue()
    ("plot", ["--out", ""], 2, "--out .: not a file path"),  # PosixPath('.') has an empty name
    ("bench", ["--steps", "0"], 2, "argument --steps: must be an integer from 1 to 100,000, got '0'"),
]


@pytest.mark.parametrize("name,extra,code,text", FOUND, ids=[f"{n} {' '.join(e)}" for n, e, _, _ in FOUND])
def test_command_lines_that_failed_before_are_refused_in_one_line(world, monkeypatch, name, extra, code, text):
    monkeypatch.setattr(utils, "available_memory", lambda device: 8 * 2**30)  # the same answer on every machine
    extra = [str(world["root"] / e) if e in ("missing", "a-file/x.png") else e for e in extra]
    got, err = check(name, baseline(name, world) + extra, world)
    assert got == code and text in err, err
