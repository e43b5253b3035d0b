"""Plain functions the training scripts and evaluate.py share, each readable on its own:

    UserError, run_main                      a failure users meet: one line on stderr and an exit code, no traceback
    parse_flags                              typed flags > --preset > the resumed checkpoint's > the defaults
    positive_int, fraction, seed, ...        argparse types that refuse what cannot train
    pick_device, seed_everything, rng_state, set_rng_state, batch_order
    load_images, resize, to_model_range      MNIST / FashionMNIST through torchvision, as uint8 images
    make_run_dir, load_states, stop_on_signals   the run folder (locked), its states, SIGINT/SIGTERM at a step end
    save_checkpoint, load_checkpoint         atomic writes, never a NaN over the last good checkpoint, format 2
    finite, save_samples                     scalars as floats (a NaN or inf stops the run), sample grids, the gif
"""
import argparse
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import torchvision.utils as vutils
from PIL import Image, ImageDraw

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

CHECKPOINT_FORMAT = 2  # raised whenever what a checkpoint holds changes; another format is refused in one line
EXIT_DATA, EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE = 1, 2, 3, 4  # data or memory; flags or files; NaN; a full disk


class UserError(Exception):
    """A problem the user can fix: run_main prints it as one line and exits with `code`."""

    def __init__(self, message, code=EXIT_USAGE):
        super().__init__(message)
        self.code = code


def reason(error):
    """An exception as a short phrase for a one-line message."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_main(main, argv=None):
    """Run a command's main(argv); the failures users meet become one line on stderr and an exit code."""
    # TensorBoard's writer thread dies on a full disk; its next write raises it here: print it once, without the thread
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else threading.__excepthook__(hook)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except OSError as e:  # torch.save, a PNG or TensorBoard: nothing replaced a file it was writing (write_atomic)
        print(f"error: cannot write {e.filename or 'a file of the run'} ({e.strerror or e}); every file written before"
              " is kept: free space or fix the folder, then --resume the run", file=sys.stderr)
        sys.exit(EXIT_WRITE)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "can't allocate" not in str(e):
            raise
        print(f"error: out of memory ({reason(e)}); lower --batch-size, the widths or --eval-n", file=sys.stderr)
        sys.exit(EXIT_DATA)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its commands on their own lines) and each flag's default, but not a
    switch's (--no-eval's default, True, would read as a contradiction)."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with each flag's default in --help and a bad command line told in one line (not the usage block)."""

    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False, formatter_class=HelpFormatter)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_flags(parser, presets, script, argv):
    """The run's flags: typed > --preset > (with --resume) the checkpoint's > the defaults. Returns (args, the
    checkpoint to resume or None)."""
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.resume, script) if args.resume else None
    parser.set_defaults(**(ckpt["args"] if ckpt else presets[args.preset]))
    args = parser.parse_args(argv)
    args.run_name = args.run_name or f"{script.removeprefix('train_')}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args, ckpt


def _number(kind, ok, must):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer of at least 0")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number")
fraction = _number(float, lambda v: 0 <= v < 1, "at least 0 and below 1")  # a decay, a dropout, a slope, a beta
seed = _number(int, lambda v: -2**63 <= v < 2**64, "an integer from -2**63 to 2**64 - 1 (torch's seeds)")
eval_n = _number(int, lambda v: v >= 4, "at least 4 (precision/recall use each sample's 3rd-nearest neighbour)")


# ----------------------------------------------------------------------------------------------------------------------
# Device and random numbers


def pick_device(name):
    """--device as a torch.device; auto: CUDA, else MPS, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: no {name.upper()} device is available here; use --device cpu")
    return torch.device(name)


def seed_everything(seed):
    """The one place a command seeds: Python's generator and torch's on the CPU and every device. A side computation
    (the weight average's calibration, an evaluation's samples) draws from a generator of its own instead."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device):
    """The generators a run draws from: the CPU's and its device's (not the other GPUs': it resumes on fewer)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Restore rng_state(); a run resumed on another kind of device keeps that device's seeded generator."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------------------------------
# Data

DATASETS = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}


def load_images(dataset, root, train=True):
    """(uint8 images N x 28 x 28, labels N) of a split. torchvision reads <root>/<MNIST|FashionMNIST>/raw/ and
    downloads the files there when they are missing; without them and offline: one line naming the folder and files."""
    cls = DATASETS[dataset]
    try:
        split = cls(root, train=train, download=True)
    except Exception as e:  # no network, a checksum mismatch, a broken file
        files = ", ".join(Path(name).stem for name, _ in cls.resources)
        raise UserError(f"{dataset} could not be read from {Path(root) / cls.__name__ / 'raw'} nor downloaded"
                        f" ({reason(e)}); put {files} there (extracted), or pass --data-root", EXIT_DATA) from None
    return split.data, split.targets


def resize(images, size):
    """uint8 N x H x W -> uint8 N x size x size, antialiased bilinear (as torchvision's Resize on PIL images)."""
    if images.shape[-1] == size:
        return images
    x = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0]


def to_model_range(batch_uint8):
    """uint8 [0, 255] -> float [-1, 1]: ToTensor() then Normalize(0.5, 0.5), on the device."""
    return batch_uint8.float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The run folder, signals, checkpoints


def make_run_dir(args, resuming):
    """The run's folder: a new one under --runs-dir (an existing one is refused, so two runs never mix), or the one
    resumed; locked for this process until it ends (the kernel drops the lock however it ends, kill -9 too)."""
    run_dir = Path(args.resume) if resuming else Path(args.runs_dir) / args.run_name
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if not resuming:
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            raise UserError(f"{run_dir} exists; continue it with --resume {run_dir}, or choose another --run-name")
    lock = open(run_dir / ".lock", "w")
    if fcntl:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{run_dir} is in use by another training process; wait for it to end or stop it")
    return run_dir, lock


def batch_order(seed, n, epochs_done):
    """The generator of the batch order: one torch.randperm(n) per epoch, drawn in turn from the seed, advanced past
    the epochs a resumed run has done (so the order needs no state of its own in the checkpoint)."""
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs_done):
        torch.randperm(n, generator=order)
    return order


def load_states(ckpt, run_dir, **parts):
    """Each part (a network, an optimizer, the weight average; None: absent in this run) from its checkpoint entry;
    refused in one line when they do not fit (a flag typed with --resume changed a network)."""
    try:
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir}: its checkpoint does not fit these flags ({reason(e)}); resume without the flags"
                        " that change the networks") from None


def stop_on_signals():
    """SIGINT and SIGTERM set stop["signal"], which the loop checks after each step (then it saves and exits);
    a second one stops at once."""
    stop = {}

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def write_atomic(path, write):
    """write(f) into path.tmp, fsync, rename over path: a reader never sees half a file, and on a write error (a full
    disk) the old file stays as it was and the OSError propagates, naming the file."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = e.__context__ if isinstance(e, RuntimeError) else e  # torch.save wraps a failed write's OSError
        if isinstance(error, OSError):
            error.filename = error.filename or str(path)
            raise error from None
        raise


def save_checkpoint(state, path):
    """torch.save(state) atomically; refused, keeping the last good one, if any tensor in it holds a NaN or inf."""
    def tensors(part, name):
        if isinstance(part, dict):
            for key, value in part.items():
                yield from tensors(value, f"{name}.{key}" if name else str(key))
        elif torch.is_tensor(part) and part.is_floating_point():
            yield name, part

    for name, tensor in tensors(state, ""):
        if not torch.isfinite(tensor).all():
            raise diverged(state["step"], f"{name} is not finite")
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, script=None):
    """A checkpoint (a run folder or its checkpoint.pt) on the CPU, read without running any code it holds
    (weights_only); refused in one line when it is missing, not ours, of another format or (script) another script's."""
    path = Path(path)
    path = path / "checkpoint.pt" if path.is_dir() else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; give a run folder that holds checkpoint.pt") from None
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint these scripts can read safely ({reason(e)})") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of these scripts; give a run folder they wrote")
    found = ckpt.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a checkpoint of format {found}, but these scripts read format {CHECKPOINT_FORMAT};"
                        " use the version of the scripts that wrote it, or start a new run")
    if script and ckpt["script"] != script:
        raise UserError(f"{path} is a checkpoint of {ckpt['script']}.py; resume it with that script")
    return ckpt


def diverged(step, what):
    return UserError(f"training diverged at step {step}: {what}; the last good checkpoint is kept: lower --lr and"
                     " start again, or --resume the run", EXIT_DIVERGED)


# ----------------------------------------------------------------------------------------------------------------------
# TensorBoard and sample grids


def finite(step, values):
    """Tensors (or floats) as floats: the host sync of a logging step. A NaN or inf stops the run in one line."""
    floats = {name: float(value) for name, value in values.items()}
    for name, value in floats.items():
        if not math.isfinite(value):
            raise diverged(step, f"{name} is {value}")
    return floats


def image_grid(images, nrow=8):
    """[-1, 1] images N x C x H x W -> a [0, 1] grid C x H' x W' on the CPU, for TensorBoard and PNGs."""
    return vutils.make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))


def save_grid(grid, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: vutils.save_image(grid, f, format="png"))


def save_samples(writer, run_dir, images, step, epoch=None):
    """The fixed noise's samples: TensorBoard's `fake` and samples/epoch_NNN.png after an epoch, then progress.gif
    made again from every epoch's grid; samples/step_NNNNNNN.png where a run stops mid-epoch."""
    grid = image_grid(images)
    writer.add_image("fake", grid, step)
    samples = Path(run_dir) / "samples"
    save_grid(grid, samples / (f"epoch_{epoch:03d}.png" if epoch else f"step_{step:07d}.png"))
    if epoch:
        frames = []
        for path in sorted(samples.glob("epoch_*.png")):
            with Image.open(path) as png:
                frame = Image.new("RGB", (png.width, png.height + 14))
                frame.paste(png.convert("RGB"), (0, 14))
            ImageDraw.Draw(frame).text((3, 1), f"epoch {int(path.stem[6:])}", fill=(255, 255, 255))
            frames.append(frame)
        write_atomic(samples / "progress.gif", lambda f: frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], duration=[300] * (len(frames) - 1) + [2500],
            loop=0))
