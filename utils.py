"""What the training scripts (and evaluate.py, bench.py) share, in sections, in this order:

    Errors and exit codes     UserError and its kinds; run_main turns them into one stderr line and an exit code
    Flags                     value types with their ranges, one-line argparse errors, the shared flags, presets
    Device and seeding        select_device, optimizer_kwargs, memory estimates (build_networks), seeds, RNG states
    Data                      IDX files read into one uint8 tensor on the device; EpochOrder (exact mid-epoch resume)
    The training run          setup() and Run: all the loop does besides the algorithm; EpochMeans, generate
    Run folder, checkpoints   the folder and its lock, atomic writes, checkpoints, the EMA, stop signals
    Logging                   TensorBoard scalars, sample grids, progress.gif
"""
import argparse
import contextlib
import datetime
import gzip
import json
import os
import random
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

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


class Diverged(UserError):
    def __init__(self, step, what):
        super().__init__(f"training diverged at step {step}: {what}", EXIT_DIVERGED)

    def advice(self, kept_step):
        if kept_step is None:
            return f"{self}; it diverged before its first checkpoint: lower --lr and start again"
        return f"{self}; the last good checkpoint (step {kept_step}) is kept: lower --lr and start again or resume it"


class WriteError(UserError):
    """Writing the run's files failed; names the error, the file, and the last good checkpoint (kept intact)."""

    def __init__(self, error, run_dir):
        path = error.filename or "a file of the run"
        kept = last_checkpoint_step(Path(run_dir) / CHECKPOINT)
        kept = f"the last good checkpoint (step {kept}) is kept" if kept is not None else "no checkpoint was written"
        super().__init__(f"cannot write {path} ({error.strerror or error}); {kept}: free space or fix the folder, then"
                         f" --resume {run_dir}", EXIT_WRITE)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop saved a checkpoint and exits with 128 + signal number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


def run_main(main, argv=None):
    """Run a script's main(); user errors, write errors and interrupts become one stderr line and an exit code."""
    threading.excepthook = _thread_excepthook
    try:
        main(argv)
    except Diverged as e:
        print(f"error: {e.advice(_kept_checkpoint_step())}", file=sys.stderr)
        sys.exit(e.code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except OSError as e:
        if not _held_locks:  # not writing a run: not ours to explain
            raise
        print(f"error: {WriteError(e, _held_locks[-1][1])}", file=sys.stderr)
        sys.exit(EXIT_WRITE)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        step = _kept_checkpoint_step()
        kept = f"; the last good checkpoint (step {step}) is kept" if step is not None else ""
        print(f"error: out of memory ({_reason(e)}){kept}: lower --batch-size, the widths, --img-size or --eval-n,"
              " or free memory", file=sys.stderr)
        sys.exit(EXIT_DATA)
    except Interrupted as e:
        print(f"interrupted by {e}: checkpoint saved, resume with --resume", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_run_dirs()


def _kept_checkpoint_step():
    """The step of the checkpoint in the run folder this process holds, or None (no folder, or no checkpoint yet)."""
    return last_checkpoint_step(_held_locks[-1][1] / CHECKPOINT) if _held_locks else None


def is_out_of_memory(error):
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        text in str(error) for text in ("not enough memory", "can't allocate memory", "out of memory"))


def _reason(error):
    """An exception as a short phrase for a one-line message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _thread_excepthook(hook_args):
    """TensorBoard's writer thread dies on a write error, which its next write raises again in the main thread (and
    run_main reports in one line): do not also print it with a traceback from the thread."""
    if not issubclass(hook_args.exc_type, OSError):
        threading.__excepthook__(hook_args)


# ----------------------------------------------------------------------------------------------------------------------
# Flags

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # flag value -> torchvision folder/class name
# Flags that may differ on --resume: they change how a run is watched or where it runs, not what it computes.
RUNTIME_FLAGS = {"epochs", "max_steps", "log_every", "checkpoint_every", "eval_every", "eval_n", "eval", "device",
                 "data_root", "runs_dir", "run_name", "resume", "progress"}


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (`error: argument --epochs: must be ...`), exit 2, no usage block
    (run_main prints it); abbreviations of flags are refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def make_parser(description, presets, *, dataset, epochs, batch_size, lr, z_dim, img_size, log_every,
                min_batch=(1, "")):
    """A training script's parser holding --preset and the flags both scripts share, with the script's own defaults;
    the script adds its algorithm's flags. min_batch: (the smallest batch the networks can train on, why)."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--preset", choices=sorted(presets), default="default",
        help="a set of defaults (flags typed explicitly override it): " + preset_help(presets))
    add("--dataset", choices=sorted(DATASETS), default=dataset, help="training data")
    add("--data-root", type=nonempty, default="data",
        help="folder holding <MNIST|FashionMNIST>/raw/ (downloaded there if missing)")
    add("--epochs", type=positive_int, default=epochs, help="passes over the training split")
    add("--batch-size", type=int_range(min_batch[0], why=min_batch[1]), default=batch_size, help="images per step")
    add("--lr", type=positive_float, default=lr, help="learning rate of both networks")
    add("--z-dim", type=width, default=z_dim, help="size of the generator's noise input")
    add("--img-size", type=int_range(1, 10_000), default=img_size,
        help="train on images resized to this side (28 = native)")
    add("--seed", type=seed, default=1, help="seeds every random number (data order, noise, weights)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto = cuda, else mps, else cpu")
    add("--runs-dir", type=nonempty, default="runs", help="TensorBoard and checkpoint root")
    add("--run-name", type=folder_name, default=None,
        help="folder under --runs-dir (default {algo}-{dataset}-{YYYYmmdd-HHMMSS})")
    add("--resume", type=nonempty, default=None, metavar="PATH",
        help="continue the run in this folder (or this checkpoint.pt)")
    add("--log-every", type=positive_int, default=log_every, help="steps between scalar logs and NaN checks")
    add("--checkpoint-every", type=non_negative_int, default=500,
        help="steps between checkpoints (0 = only at epoch ends); also written on SIGINT/SIGTERM")
    add("--max-steps", type=positive_int, default=None, help="stop after this many steps in all (for smoke runs)")
    add("--eval-every", type=non_negative_int, default=0,
        help="epochs between quality evaluations (FID, precision, recall, class KL; see evaluate.py); 0 = at the end")
    add("--eval-n", type=EVAL_N, default=10000, help="generated images per evaluation")
    add("--no-eval", dest="eval", action="store_false", help="skip the quality evaluations (and metrics.json)")
    add("--no-progress", dest="progress", action="store_false", help="no tqdm bar (one line per epoch only)")
    return parser


def preset_help(presets):
    """--preset's help: the values each preset sets."""
    return "; ".join(f"{name}: " + (", ".join(f"--{k.replace('_', '-')} {_flag_text(v)}" for k, v in values.items())
                                     or "the defaults shown") for name, values in presets.items())


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def apply_preset(args, parser, argv, presets):
    """Set the chosen preset's values on every flag the user did not type (typed flags override a preset)."""
    given = explicit_flags(parser, argv)
    for key, value in presets[args.preset].items():
        if key not in given:
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)


def explicit_flags(parser, argv):
    """The dests of the flags actually typed on the command line (abbreviations are disabled on our parsers)."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(arg == opt or arg.startswith(opt + "=") for arg in argv):
                given.add(action.dest)
    return given


# ----------------------------------------------------------------------------------------------------------------------
# Device and seeding


def select_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available; use --device cpu or auto")
    return torch.device(name)


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


def build_networks(make, args, images, device):
    """make(args, img_shape) -> the networks, G first. Built on the meta device first (no memory, no random numbers)
    to estimate what training them needs, refused in one line if it cannot fit; then built for real (initialized on
    the CPU, as always) and moved to the device."""
    check_batch_size(args.batch_size, len(images))
    with torch.device("meta"):
        networks = make(args, tuple(images.shape[1:]))
    params = [sum(p.numel() for p in net.parameters()) for net in networks]
    units = sum(m.out_features for net in networks for m in net.modules() if isinstance(m, torch.nn.Linear))
    # weights, gradients, two optimizer states, the weight average of G; activations of a real and a fake batch
    need = 4 * (4 * sum(params) + (params[0] if args.ema_decay else 0) + 2 * 3 * args.batch_size * units)
    fix = "use smaller widths, --z-dim, --img-size or --batch-size"
    check_memory(need, device, f"the networks ({sum(params):,} parameters) and a step of batch {args.batch_size}", fix)
    if device.type != "cpu":
        check_memory(4 * sum(params), torch.device("cpu"), "the networks' initialization on the CPU", fix)
    return [net.to(device) for net in make(args, tuple(images.shape[1:]))]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """The torch RNG states (noise comes from them; Python's and NumPy's RNGs are not used while training)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# Data: IDX files read into one uint8 tensor; torchvision downloads them when they are missing.

SYSTEM_DATA_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}  # Debian's dataset-fashion-mnist
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # magic numbers: unsigned bytes, 3 or 1 dimensions


def _find_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _split_files(folder, split):
    paths = [_find_idx(folder, stem) for stem in SPLIT_FILES[split]]
    return paths if all(paths) else None


def read_idx(path, magic):
    """An IDX file (gzip or not) as a uint8 tensor; checks the magic number and that the size matches the header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it ({e}); delete it and let it download again, or replace it")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
        raise DataError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {found!r}, expected {magic:#010x});"
                        " replace it with the original file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but holds {len(body)} bytes;"
                        " the file is truncated or wrong, replace it")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


def _read_split(images_path, labels_path):
    images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]}"
                        " labels; replace the mismatched file")
    return images, labels


def _download(dataset, root, split):
    """torchvision's own download into <root>/<Folder>/raw/ (fails offline; then we look elsewhere)."""
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[dataset])
    raw = Path(root) / DATASETS[dataset] / "raw"
    made = [folder for folder in (raw, raw.parent, Path(root)) if not folder.exists()]
    try:
        cls(root, train=split == "train", download=True)
    except Exception as e:  # URLError, RuntimeError on checksum mismatch, ...
        for folder in made:  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def load_split(dataset, root, split="train"):
    """(images N x H x W uint8, labels N uint8): local IDX files, else torchvision's download, else system folders."""
    raw = Path(root) / DATASETS[dataset] / "raw"
    paths = _split_files(raw, split)
    download_error = None
    if paths is None:
        download_error = _download(dataset, root, split)
        paths = _split_files(raw, split)
    tried = [raw]
    for folder in SYSTEM_DATA_DIRS.get(dataset, []):
        if paths is None:
            tried.append(folder)
            paths = _split_files(folder, split)
    if paths is None:
        raise DataError(f"{dataset} {split} data not found in {', '.join(map(str, tried))} and the download failed"
                        f" ({download_error}); put the IDX files (.gz or not) in <data-root>/{DATASETS[dataset]}/raw/"
                        " and pass --data-root")
    return _read_split(*paths)


def resize_images(images, size):
    """uint8 N x H x W -> uint8 N x size x size, antialiased bilinear (as torchvision's Resize on PIL images)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0]


def load_train_images(dataset, root, img_size, device):
    """The whole training split as one uint8 tensor N x 1 x S x S, resident on the device; batches are index slices."""
    images, _ = load_split(dataset, root, "train")
    n, side = len(images), images.shape[-1]
    resized = n * img_size**2  # bytes, uint8
    resizing = 4 * (n * side**2 + resized) if img_size != side else 0  # the float copies F.interpolate works on
    what = f"the {n:,} training images at --img-size {img_size}"
    check_memory(resized + resizing, torch.device("cpu"), what, "use a smaller --img-size")
    if device.type != "cpu":
        check_memory(resized, device, what, "use a smaller --img-size or --device cpu")
    return resize_images(images, img_size)[:, None].to(device)


def to_model_range(batch_uint8):
    """uint8 [0, 255] -> float [-1, 1]: the same as ToTensor() then Normalize(0.5, 0.5), done on the device."""
    return batch_uint8.float().div_(127.5).sub_(1.0)


def check_batch_size(batch_size, num_images):
    if batch_size > num_images:
        raise UserError(f"--batch-size {batch_size} is larger than the dataset ({num_images} images);"
                        " use a smaller --batch-size")


class EpochOrder:
    """A seeded permutation per epoch and the position in it: everything needed to resume mid-epoch exactly."""

    def __init__(self, num_images, batch_size, seed):
        check_batch_size(batch_size, num_images)
        self.num_images, self.batch_size = num_images, batch_size
        self.steps_per_epoch = num_images // batch_size  # the last partial batch is dropped: all steps see full ones
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position, self.perm = 0, 0, None

    def batches(self, device="cpu"):
        """Yield index tensors (on the device) for the rest of the current epoch; the position counts a batch as
        consumed once yielded."""
        if self.perm is None:
            self.perm = torch.randperm(self.num_images, generator=self.generator)
        perm = self.perm.to(device)  # one copy per epoch, not one per step
        while self.position < self.steps_per_epoch:
            start = self.position * self.batch_size
            self.position += 1
            yield perm[start:start + self.batch_size]

    def next_epoch(self):
        self.epoch, self.position, self.perm = self.epoch + 1, 0, None

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "perm": self.perm,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.epoch, self.position, self.perm = state["epoch"], state["position"], state["perm"]
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------------------
# The training run: what both loops do around their algorithm


def setup(parser, argv, presets, algo, legacy):
    """Parse the flags (a preset fills the ones not typed; a --resume takes the rest from its checkpoint), pick the
    device and seed every RNG. Returns (args, the checkpoint to resume or None, device)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    apply_preset(args, parser, argv, presets)
    ckpt = resume_config(args, parser, argv, algo, legacy) if args.resume else None
    device = select_device(args.device)
    if args.eval:  # found missing only after hours of training, it would cost the run its evaluation
        check_evaluation(args)
    seed_everything(args.seed)
    return args, ckpt, device


def check_evaluation(args):
    """The evaluations need the test split and memory for --eval-n samples' features and neighbour distances."""
    try:
        load_split(args.dataset, args.data_root, "test")
    except DataError as e:
        raise DataError(f"{e}; or pass --no-eval to train without the quality evaluation")
    # per sample: its 28 x 28 image and two feature copies; a batch of samples (at most 256 MiB, evaluate.sample);
    # the neighbour distances, computed in chunks of 2048 rows
    need = args.eval_n * (784 + 2 * 128 * 8) + 2**28 + 2 * 2048 * max(args.eval_n, 10_000) * 8
    check_memory(need, torch.device("cpu"), f"evaluations of --eval-n {args.eval_n} samples", "lower --eval-n")


class Run:
    """The plumbing of one training run, the same in both scripts: run folder, resume, the generator's weight average,
    TensorBoard, epoch means, sample grids, evaluations, checkpoints and when to stop. The scripts keep the algorithm
    (the step functions and their order) and call in here at fixed points of their loop:

        run = Run(algo, args, images, ckpt, G=G, D=D, opt_G=opt_G, opt_D=opt_D)  # restores them on --resume
        with run.signals:                           # SIGINT/SIGTERM: finish the step, save, exit 130/143
            while run.continues():                  # epochs left, --max-steps not reached, no signal
                for step, idx in run.epoch_batches():   # ends early at --max-steps or on a signal
                    ... the algorithm's step(s); run.record({"loss/D": loss_D, ...}) ...
                    run.after_step()                # TensorBoard every --log-every, checkpoint every --checkpoint-every
                run.end_epoch()                     # epoch means, sample grid, evaluation, checkpoint
        run.finish()                                # final evaluation and metrics.json
    """

    def __init__(self, algo, args, images, ckpt, **parts):
        """images: the training set on the device (load_train_images). parts: networks and optimizers by the names
        their checkpoint entries have, the generator as G."""
        import evaluate  # here, not at the top: evaluate.py imports this module

        self.algo, self.args, self.images, self.device = algo, args, images, images.device
        self.order = EpochOrder(len(images), args.batch_size, args.seed)
        self.parts = {**parts, "order": self.order}  # all a checkpoint restores
        self.run_dir = make_run_dir(args, algo)  # only once data and networks exist: a failed start leaves no run
        self.fixed_noise = torch.randn(args.n_samples, args.z_dim, device=self.device)  # the grids' noise
        self.step = 0  # steps done, over the whole run
        if ckpt:
            self.fixed_noise, self.step = restore_run_state(ckpt, self.parts, self.device)
            print(f"resuming {self.run_dir} at step {self.step} (epoch {self.order.epoch + 1}, batch"
                  f" {self.order.position})")
        self.ema = make_ema(parts["G"], args.ema_decay, ckpt, self.parts)  # restored, or a copy of G
        self.G_sample = self.ema.model if self.ema else parts["G"]  # what the grids and evaluations draw from
        self.writer = open_writer(self.run_dir, args, resume_step=self.step if ckpt else None)
        if not ckpt:
            self.writer.add_image("real", image_grid(to_model_range(images[:args.n_samples])), 0)
        self.evaluation = evaluate.TrainingEval(args, self.device)
        self.max_steps = args.max_steps or float("inf")
        self.signals = StopSignals()
        self.means, self.latest = EpochMeans(), {}
        self.bar, self.epoch_started = None, None

    def continues(self):
        return self.order.epoch < self.args.epochs and not self.stopped()

    def stopped(self):
        return self.signals.signum is not None or self.step >= self.max_steps

    def epoch_batches(self):
        """Yield (step, image indices) for each batch left in the current epoch (the rest of it after a resume), step
        counting from 1 over the whole run; under a progress bar. Ends early, before the next batch, once --max-steps
        steps are done or a signal came."""
        self.epoch_started = time.time()
        self.bar = tqdm(total=self.order.steps_per_epoch, initial=self.order.position, disable=not self.args.progress,
                        desc=f"epoch {self.order.epoch + 1}/{self.args.epochs}", leave=False, dynamic_ncols=True)
        for idx in self.order.batches(self.device):
            self.step += 1
            yield self.step, idx
            self.bar.update()
            if self.stopped():
                return

    def update_average(self, G):
        """The generator's weight average (--ema-decay), after each generator step."""
        if self.ema:
            self.ema.update(G)

    def record(self, values):
        """Tensors of this step (no host sync): summed for the epoch means, the latest of each logged."""
        self.means.add(values)
        self.latest.update(values)

    def after_step(self):
        if self.step % self.args.log_every == 0:  # note: a host sync, once every --log-every steps
            self.bar.set_postfix(log_scalars(self.writer, self.step, self.latest))
        if self.args.checkpoint_every and self.step % self.args.checkpoint_every == 0:
            self.save_checkpoint()

    def end_epoch(self):
        """After an epoch, or where the loop stopped mid-epoch: the epoch's means, the sample grid, on a whole epoch
        the next epoch's order and (every --eval-every epochs) an evaluation, and a checkpoint."""
        self.bar.close()
        if self.means.sums:
            means = log_scalars(self.writer, self.step, self.means.result(), tag="epoch_mean/")
            print_epoch(self.order.epoch + 1, self.args.epochs, self.step, means, time.time() - self.epoch_started)
        self.means = EpochMeans()
        epoch_done = self.order.position == self.order.steps_per_epoch
        if epoch_done or self.stopped():
            self.sample_grid(self.order.epoch + 1 if epoch_done else None)
        if epoch_done:
            self.order.next_epoch()
        self.save_checkpoint()  # before the evaluation: whatever happens there, the epoch is kept
        if epoch_done:
            try:
                self.evaluation.after_epoch(self.G_sample, self.writer, self.step, self.order.epoch)
            except Exception as e:  # training goes on; evaluate.py can score any checkpoint later
                print(f"warning: the evaluation at step {self.step} failed ({_reason(e)}); training goes on",
                      file=sys.stderr)

    def sample_grid(self, epoch):
        """The fixed noise's samples, to TensorBoard and samples/ (see log_samples)."""
        if self.ema:
            self.ema.calibrate()  # BatchNorm statistics of the averaged weights (saving does it too)
        fakes = generate(self.G_sample, self.fixed_noise)
        log_samples(self.writer, self.run_dir, fakes.view(-1, *self.images.shape[1:]), self.step, epoch)

    def save_checkpoint(self):
        networks = {name: part for name, part in self.parts.items() if isinstance(part, torch.nn.Module)}
        check_finite(self.step, **networks)  # never write a diverged state over the last good one
        state = run_state(self.algo, self.args, self.step, self.fixed_noise, self.parts)
        save_checkpoint(state, self.run_dir / CHECKPOINT)

    def finish(self):
        """The end: after a signal, exit 128 + signal (the checkpoint is saved); else the final evaluation."""
        if self.signals.signum:
            close_writer(self.writer)
            raise Interrupted(self.signals.signum)
        try:
            self.evaluation.final(self.G_sample, self.writer, self.step, self.run_dir)
        except Exception as e:  # the checkpoint and grids are on disk already
            close_writer(self.writer)
            raise UserError(f"the final evaluation failed ({_reason(e)}); the run is complete and saved in"
                            f" {self.run_dir}: evaluate it with python evaluate.py {self.run_dir}", EXIT_DATA)
        close_writer(self.writer)
        print(f"done: {self.run_dir} (step {self.step})")


class EpochMeans:
    """Sums of step values on the device (no host sync per step). Values recorded together are counted together, so
    the WGAN's generator loss is a mean over generator steps, its critic loss over critic steps."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, values):
        names = tuple(values)
        if names not in self.sums:
            self.sums[names] = torch.zeros(len(names), device=next(iter(values.values())).device)
            self.counts[names] = 0
        self.sums[names] += torch.stack(list(values.values()))
        self.counts[names] += 1

    def result(self):
        return {name: mean for names, sums in self.sums.items() for name, mean in zip(names, sums / self.counts[names])}


@torch.no_grad()
def generate(G, z):
    """G(z) in eval mode (BatchNorm uses its running statistics, not the batch's own), G's mode restored after."""
    was_training = G.training
    G.eval()
    try:
        return G(z)
    finally:
        G.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# Run folder, checkpoints

CHECKPOINT = "checkpoint.pt"


def default_run_name(algo, dataset):
    return f"{algo}-{dataset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def load_checkpoint(path, flag="--resume"):
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
    return ckpt, path


def resume_config(args, parser, argv, algo, legacy=None):
    """On --resume: load the checkpoint and adopt its configuration; explicit flags that differ from it are an error.

    legacy: values of flags that older checkpoints lack, as the code that wrote them behaved (a new flag's default may
    differ from what the run was trained with)."""
    ckpt, path = load_checkpoint(args.resume)
    if ckpt["algo"] != algo:
        raise UserError(f"--resume {path}: it is a {ckpt['algo']} checkpoint; resume it with train_{ckpt['algo']}.py")
    saved = {**(legacy or {}), **ckpt["args"]}
    given = explicit_flags(parser, argv)
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {saved[k]})"
                 for k in sorted(given - RUNTIME_FLAGS) if k in saved and saved[k] != getattr(args, k)]
    if conflicts:
        raise UserError(f"--resume {path}: flags conflict with the checkpoint's configuration: {'; '.join(conflicts)};"
                        " drop them or start a new run")
    for key, value in saved.items():
        if key not in given:  # the checkpoint's value, unless a runtime flag was given anew
            setattr(args, key, value)
    args.run_name, args.runs_dir, args.resume = path.parent.name, str(path.parent.parent), str(path)
    return ckpt


def make_run_dir(args, algo):
    """runs/<run-name>, created new (an existing one is refused unless resuming, so two runs never mix) and locked for
    this process: a second process on the same folder is refused while this one lives."""
    if args.resume:
        run_dir = Path(args.runs_dir) / args.run_name
        try:
            lock_run_dir(run_dir)
        except OSError as e:
            raise UserError(f"cannot write in run folder {run_dir} ({e.strerror}); make it writable, then --resume")
        return run_dir
    name = args.run_name or default_run_name(algo, args.dataset)
    run_dir = Path(args.runs_dir) / name
    try:
        Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()  # fails if it exists, also when another process made it a moment ago
    except FileExistsError:
        holder = lock_holder(run_dir)
        if holder:
            raise UserError(f"run folder {run_dir} is in use by process {holder}; choose another --run-name")
        raise UserError(f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it,"
                        " or another --run-name")
    except OSError as e:
        raise UserError(f"cannot create run folder {run_dir} ({e.strerror}); choose a writable --runs-dir")
    try:
        lock_run_dir(run_dir)
    except OSError as e:
        raise UserError(f"cannot write in run folder {run_dir} ({e.strerror}); choose a writable --runs-dir")
    args.run_name = name
    return run_dir


LOCK = ".lock"
_held_locks = []  # open lock files, held until the process ends; the kernel drops them however it ends (SIGKILL too)


def lock_run_dir(run_dir):
    """An exclusive flock on <run>/.lock holding our PID, kept for the life of the process. Raises UserError naming
    the holder if another process has it. (No fcntl on Windows: no lock there.)"""
    try:
        import fcntl
    except ImportError:
        return
    fd = os.open(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_pid(fd)
        os.close(fd)
        raise UserError(f"run folder {run_dir} is in use by process {holder} (another training writes it); wait for it"
                        " to end or stop it, then --resume")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks.append((fd, Path(run_dir)))


def release_run_dirs():
    """Drop this process's run-folder locks (at the end of main; the kernel would at exit anyway)."""
    while _held_locks:
        os.close(_held_locks.pop()[0])


def lock_holder(run_dir):
    """The PID (as text) of the process holding the folder's lock, or None when it is free."""
    try:
        import fcntl

        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only to probe: released at once
        return None
    except OSError:
        return _lock_pid(fd)
    finally:
        os.close(fd)


def _lock_pid(fd):
    """The PID the holder wrote into the lock file (it may not have written it yet)."""
    return os.read(fd, 32).decode(errors="replace").strip() or "unknown"


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


def last_checkpoint_step(path):
    """The step of the checkpoint at path, or None if there is none readable (used in error messages only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return None


def run_state(algo, args, step, fixed_noise, parts):
    """What a checkpoint holds: the state_dict of every part (networks, optimizers, epoch order), the step, the fixed
    noise, the RNG states and the arguments."""
    return {"algo": algo, "args": vars(args), "step": step, "fixed_noise": fixed_noise.cpu(), "rng": rng_state(),
            **{name: part.state_dict() for name, part in parts.items()}}


def restore_run_state(ckpt, parts, device):
    """Load a checkpoint into the parts and the RNGs; returns (fixed noise, step)."""
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    return ckpt["fixed_noise"].to(device), ckpt["step"]


def make_ema(G, decay, ckpt, parts):
    """The generator's weight average (None when decay is 0), restored from the checkpoint when it holds one, else a
    copy of G (also for checkpoints written before the average existed); added to the parts a checkpoint saves."""
    if not decay:
        return None
    from models import EMA

    ema = EMA(G, decay)
    if ckpt and "G_ema" in ckpt:
        ema.load_state_dict(ckpt["G_ema"])
    parts["G_ema"] = ema
    return ema


def check_finite(step, **values):
    """Raise Diverged naming the first NaN/inf among named tensors (losses, or modules' parameters and buffers)."""
    for name, value in values.items():
        tensors = value.state_dict().items() if isinstance(value, torch.nn.Module) else [("", value)]
        for key, tensor in tensors:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                what = f"{name}.{key}" if key else name
                raise Diverged(step, f"{what} is not finite (NaN or inf)")


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step (then it saves and exits)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------------------------------
# Logging


def open_writer(run_dir, args, resume_step=None):
    """TensorBoard writer; on resume, purge points the crashed run logged after its checkpoint, so none are doubled."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    if resume_step is not None:
        return SummaryWriter(run_dir, purge_step=resume_step + 1)
    writer = SummaryWriter(run_dir)
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    for summary in hparams(config, {"loss/G": 0.0}):
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```\n" + json.dumps(vars(args), indent=2, default=str) + "\n```", 0)
    return writer


def close_writer(writer):
    """Flush, then close: flush raises a write error of the writer's thread, which close() alone would drop."""
    writer.flush()
    writer.close()


def image_grid(images, nrow=8):
    """[-1, 1] images N x C x H x W -> a [0, 1] grid tensor for TensorBoard and PNGs."""
    import torchvision.utils as vutils

    return vutils.make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))


def save_grid(grid, path):
    import torchvision.utils as vutils

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: vutils.save_image(grid, f, format="png"))


def log_scalars(writer, step, values, tag=""):
    """Write tensors as scalars (the only host sync of a step) and stop on NaN/inf; returns them as floats."""
    floats = {name: float(value) for name, value in values.items()}
    for name, value in floats.items():
        if not np.isfinite(value):
            raise Diverged(step, f"{tag}{name} is {value}")
        writer.add_scalar(tag + name, value, step)
    return {name: round(value, 4) for name, value in floats.items()}


def print_epoch(epoch, epochs, step, means, seconds):
    text = "  ".join(f"{name} {value:.4f}" for name, value in means.items())
    print(f"epoch {epoch}/{epochs}  step {step}  {text}  ({seconds:.1f}s)", flush=True)


def log_samples(writer, run_dir, fakes, step, epoch=None):
    """The fixed-noise grid, to TensorBoard and to samples/: epoch_NNN.png after an epoch (then progress.gif is made
    anew from every epoch's grid, so it spans the whole run, resumes included), step_NNNNNNN.png when a run stops
    mid-epoch (--max-steps, SIGINT/SIGTERM)."""
    grid = image_grid(fakes)
    writer.add_image("fake", grid, step)
    samples = Path(run_dir) / "samples"
    if epoch is None:
        save_grid(grid, samples / f"step_{step:07d}.png")
        return
    save_grid(grid, samples / f"epoch_{epoch:03d}.png")
    write_progress_gif(samples)


def write_progress_gif(samples, frame_ms=300, last_frame_ms=2500):
    """samples/progress.gif: the epoch grids in order, each labelled with its epoch, the last one held longer."""
    from PIL import Image, ImageDraw

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
