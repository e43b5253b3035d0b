"""What every command shares, at the bottom of the imports (it imports none of this repository's modules):

    Errors and exit codes     UserError and its kinds; run_main turns them into one stderr line and an exit code
    Flag types                value types with their ranges; an ArgumentParser whose errors are one line
    Device and seeding        select_device, optimizer_kwargs, free memory, seeds and RNG states
    Files                     atomic writes, checkpoints and their format version, sample grids, progress.gif
"""
import argparse
import difflib
import os
import random
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torchvision.utils as vutils
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------------
# Errors and exit codes

EXIT_DATA = 1  # data missing or unreadable, not enough memory, a failed final evaluation
EXIT_USAGE = 2  # bad flags or run folder (argparse uses 2 as well)
EXIT_DIVERGED = 3  # NaN or infinite loss or weight
EXIT_WRITE = 4  # a checkpoint, event file or sample grid could not be written (disk full, read-only, ...)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exits with `code`."""

    def __init__(self, message, code=EXIT_USAGE):
        super().__init__(message)
        self.code = code


class DataError(UserError):
    def __init__(self, message):
        super().__init__(message, EXIT_DATA)


def _kept(step):
    """What a failed run leaves: its last good checkpoint, by step (None: there is none yet)."""
    return f"the last good checkpoint (step {step}) is kept" if step is not None else None


class Diverged(UserError):
    """A NaN or infinite loss or weight, raised where it is found; the run adds its last good checkpoint (told)."""

    def __init__(self, step, what):
        super().__init__(f"training diverged at step {step}: {what}", EXIT_DIVERGED)

    def told(self, kept_step):
        if kept_step is None:
            return UserError(f"{self}; it diverged before its first checkpoint: lower --lr and start again",
                             EXIT_DIVERGED)
        return UserError(f"{self}; {_kept(kept_step)}: lower --lr and start again or resume it", EXIT_DIVERGED)


class WriteError(UserError):
    """Writing a run's files failed: names the error, the file, and the last good checkpoint (kept intact)."""

    def __init__(self, error, run_dir, kept_step):
        kept = _kept(kept_step) or "no checkpoint was written"
        super().__init__(f"cannot write {error.filename or 'a file of the run'} ({error.strerror or error}); {kept}:"
                         f" free space or fix the folder, then --resume {run_dir}", EXIT_WRITE)


class OutOfMemory(UserError):
    def __init__(self, error, kept_step=None):
        kept = f"; {_kept(kept_step)}" if kept_step is not None else ""
        super().__init__(f"out of memory ({reason(error)}){kept}: lower --batch-size, the widths, --img-size or"
                         " --eval-n, or free memory", EXIT_DATA)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: exit with 128 + signal number, saying what was saved and what to do."""

    def __init__(self, signum, message=None):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}: checkpoint saved, resume with"
                                    " --resume")
        self.code = 128 + signum


class Complete(Exception):
    """Nothing to do (a resumed run that is already complete): the message on stdout, exit 0."""


def run_main(main, argv=None):
    """Run a command's main(); user errors, running out of memory and interrupts become one stderr line and an exit
    code. (A training run tells its own errors with its folder and last checkpoint: training.Run.)"""
    threading.excepthook = _thread_excepthook
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: {OutOfMemory(e)}", file=sys.stderr)
        sys.exit(EXIT_DATA)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except Complete as e:
        print(e)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def is_out_of_memory(error):
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        text in str(error) for text in ("not enough memory", "can't allocate memory", "out of memory"))


def reason(error):
    """An exception as a short phrase for a one-line message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _thread_excepthook(hook_args):
    """TensorBoard's writer thread dies on a write error, which its next write raises again in the main thread (and
    the run reports in one line): do not also print it with a traceback from the thread."""
    if not issubclass(hook_args.exc_type, OSError):
        threading.__excepthook__(hook_args)


# ----------------------------------------------------------------------------------------------------------------------
# Flag types

def _number(text, convert, valid, requirement):
    """An argparse type: text converted by int/float, refused in one line unless valid(value)."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def int_range(low, high=None, why=""):
    """An argparse type for integers in [low, high] (high None: no bound); `why` ends the message."""
    requirement = f"an integer from {low:,} to {high:,}" if high is not None else f"an integer of at least {low:,}"
    requirement += f" ({why})" if why else ""

    def parse(text):
        return _number(text, int, lambda v: low <= v and (high is None or v <= high), requirement)

    parse.__name__ = "int_range"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
MAX_WIDTH = 1_000_000
width = int_range(1, MAX_WIDTH, "a layer or noise vector that wide does not fit in memory")
seed = int_range(-2**63, 2**64 - 1, "the range torch's seeds take")
N_SAMPLES = int_range(1, 1024, "the fixed-noise grid is for looking at")
EVAL_N = int_range(4, 100_000, "precision/recall use each sample's 3rd-nearest neighbour and compare all pairs")


def positive_float(text):
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive finite number")


def fraction(text):
    """A number in [0, 1): a decay, a dropout rate, a LeakyReLU slope, an Adam beta."""
    return _number(text, float, lambda v: 0 <= v < 1, "at least 0 and below 1")


def share(text):
    """A number in [0, 1]: a share of something, both ends included."""
    return _number(text, float, lambda v: 0 <= v <= 1, "from 0 to 1")


def nonempty(text):
    """A path flag: an empty value would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def new_file(text):
    """An output file flag: refused at once if the file exists (never overwritten) or cannot be created there."""
    path = Path(nonempty(text)).absolute()
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text} already exists; choose another path or remove it first")
    folder = path.parent
    while not folder.exists():  # missing folders are created on writing
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {folder} is not a writable folder")
    return text


def folder_name(text):
    """--run-name: one folder name under --runs-dir."""
    if not text.strip() or text in (".", "..") or "/" in text or os.sep in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a plain folder name (no '/', not '.' or '..'), got {text!r}")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its example commands on their own lines) and each value's default; a
    switch (--no-eval, --json), and a flag without a default, says in its own help what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 or action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (`error: argument --epochs: must be ...`), exit 2, no usage block
    (run_main prints it), with the flag meant when one is mistyped; abbreviations of flags are refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message}{self.suggestion(message)} (see --help)")

    def suggestion(self, message):
        """'; did you mean --epochs?' for the unrecognized flags that are close to one of ours ('_' read as '-')."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        meant = [match for word in message.split()[2:] if word.startswith("-")
                 for match in difflib.get_close_matches(word.split("=")[0].replace("_", "-"), flags, n=1, cutoff=0.7)]
        return f"; did you mean {' and '.join(dict.fromkeys(meant))}?" if meant else ""


# ----------------------------------------------------------------------------------------------------------------------
# Device and seeding


def select_device(name):
    """--device as a torch.device (auto: CUDA, else MPS, else the CPU); a missing device, or a GPU that this PyTorch
    build has no kernels for, is refused in one line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        check_cuda_kernels()
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device cpu")
    return torch.device(name)


def check_cuda_kernels():
    """A GPU that the installed PyTorch has no kernels for (an older card) fails at its first kernel with a traceback;
    refuse it before any work. Kernels built for sm_XY run on compute capability X.y for y >= Y; PTX (compute_XY) is
    compiled for X.Y and up. (ROCm builds name AMD architectures instead: not checked, as torch does not.)"""
    if torch.version.cuda is None:
        return
    arch = torch.cuda.get_arch_list()
    major, minor = torch.cuda.get_device_capability()
    device = 10 * major + minor

    def runs(code):
        kind, version = code.split("_", 1)
        version = int(version.rstrip("af"))
        return device >= version and (kind == "compute" or device // 10 == version // 10)

    if arch and not any(runs(code) for code in arch):
        raise UserError(f"the GPU {torch.cuda.get_device_name()} has compute capability {major}.{minor}, but this"
                        f" PyTorch {torch.__version__} has kernels for {' '.join(arch)} only; use --device cpu, or"
                        " install a PyTorch build for your GPU (https://pytorch.org/get-started/locally/)", EXIT_DATA)


def optimizer_kwargs(device, fused=True):
    """Fused (Adam) or foreach (RMSprop) kernels: one launch for all parameters instead of one per tensor."""
    return {"fused": True} if fused and device.type in ("cpu", "cuda") else {"foreach": True}


def available_memory(device):
    """Bytes free for new tensors on the device: CUDA's own count, else the system's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need, device, what, fix):
    """Refuse up front, in one line with the estimate, what would not fit in 90% of the free memory (an allocation
    that fails later anyway is turned into one line by run_main)."""
    free = available_memory(device)
    if free is not None and need > 0.9 * free:
        raise UserError(f"{what} need about {need / 2**30:,.1f} GiB but {device.type} has {free / 2**30:,.1f} GiB"
                        f" free; {fix}", EXIT_DATA)


def seed_everything(seed):
    """The one place that seeds a command's generators (a training run's; classifier.py's): Python's, NumPy's, and
    torch's on the CPU and every device (torch.manual_seed). A seeded side computation inside a run (EMA calibration,
    sampling for an evaluation) uses a generator of its own and never calls this."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device):
    """The states of the generators a run draws from: the CPU's and its device's, nothing else (not the other GPUs':
    a checkpoint resumes on a machine with fewer; a CPU run touches no GPU). Python's and NumPy's are not drawn from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """Restore rng_state(). A device generator's state is restored on a device of the same type; resumed on another
    type (a CPU checkpoint on a GPU), the device's generator stays as seed_everything left it."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------------------------------
# Files

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # raised whenever what a checkpoint holds changes: a checkpoint of another format is refused


def write_atomic(path, write):
    """Write a file atomically: write(f) into a temporary file, fsync, then rename over the old one; a reader never
    sees half a file. On a write error (disk full, ...) the temporary file is removed, the old file is left as it was,
    and the OSError propagates (run_main reports it in one line, exit 4)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a Ctrl-C here leaves no .tmp either
        tmp.unlink(missing_ok=True)
        error = e if isinstance(e, OSError) else e.__context__ if isinstance(e, RuntimeError) else None
        if isinstance(error, OSError):  # torch.save reports a failed write (ENOSPC, ...) as a RuntimeError
            error.filename = error.filename or str(path)
            raise error from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state, path):
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, flag="--resume"):
    """A run's checkpoint (path: the run folder or the file) on the CPU, and its path; refused in one line when it is
    missing, unreadable, not ours, or of another format."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{flag} {path}: no checkpoint there; give a run folder that holds {CHECKPOINT}, or the file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}); it is corrupt or not ours")
    if not isinstance(ckpt, dict) or not {"algo", "args", "step"} <= set(ckpt):
        raise UserError(f"{flag} {path}: not a checkpoint written by these scripts")
    found = ckpt.get("format", 0)  # 0: written before formats were numbered
    if found != CHECKPOINT_FORMAT:
        raise UserError(f"{flag} {path}: a checkpoint of format {found}, but these scripts read format"
                        f" {CHECKPOINT_FORMAT}; use the version of the scripts that wrote it, or start a new run")
    return ckpt, path


def image_grid(images, nrow=8):
    """[-1, 1] images N x C x H x W -> a [0, 1] grid tensor for TensorBoard and PNGs."""
    return vutils.make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))


def save_grid(grid, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: vutils.save_image(grid, f, format="png"))


def write_progress_gif(samples, frame_ms=300, last_frame_ms=2500):
    """samples/progress.gif: the epoch grids in order, each labelled with its epoch, the last one held longer."""
    frames = []
    for path in sorted(samples.glob("epoch_*.png")):
        with Image.open(path) as grid:
            frame = Image.new("RGB", (grid.width, grid.height + 14))
            frame.paste(grid.convert("RGB"), (0, 14))
        ImageDraw.Draw(frame).text((3, 1), f"epoch {int(path.stem[len('epoch_'):])}", fill=(255, 255, 255))
        frames.append(frame)
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    write_atomic(samples / "progress.gif", lambda f: frames[0].save(f, format="GIF", save_all=True,
                                                                     append_images=frames[1:], duration=durations,
                                                                     loop=0))
