"""Plain functions the training scripts and evaluate.py share, each readable on its own:

    UserError, run_main                  a failure users meet: one line on stderr and an exit code, no traceback
    add_run_flags, parse_flags           the flags every script has; typed > --preset > a resumed run's > defaults
    positive_int, fraction, seed, ...    argparse types that refuse what cannot train
    pick_device, seed_everything, rng_state, set_rng_state
    load_images, resize, load_data       MNIST / FashionMNIST through torchvision, as uint8 images
    start_run                            a new or resumed run: its folder (locked), states, TensorBoard, step counters
    epoch_batches, end_step, end_epoch, evaluation_due, finish
                                         what a script's loop calls around its own steps and scalars
    save_checkpoint, load_checkpoint     atomic writes, never a NaN over the last good checkpoint, format 4
    finite, save_samples                 scalars as floats (a NaN or inf stops the run), sample grids, the gif
"""
import argparse
import errno
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import torchvision.utils as vutils
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from models import generate

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

CHECKPOINT_FORMAT = 4  # raised whenever what a checkpoint holds changes; another format is refused in one line
EXIT_DATA, EXIT_USAGE, EXIT_DIVERGED, EXIT_WRITE = 1, 2, 3, 4  # data or memory; flags or files; NaN; a full disk
# What a resumed run keeps from its checkpoint: its data, batch order and fixed-noise grid are made of these (a
# network's shape is kept too: its weights would not fit).
KEPT_ON_RESUME = ("dataset", "batch_size", "seed", "n_samples")


class UserError(Exception):
    """A problem the user can fix: run_main prints it as one line and exits with `code`."""

    def __init__(self, message, code=EXIT_USAGE):
        super().__init__(message)
        self.code = code


def reason(error):
    """An exception as a short phrase for a one-line message."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def cannot_write(path, error):
    return UserError(f"cannot write {path} ({error.strerror or reason(error)}); every file written before is kept:"
                     " free space or fix the folder, then run the command again (a training run that saved a"
                     " checkpoint: with --resume)", EXIT_WRITE)


def run_main(main, argv=None):
    """Run a command's main(argv); the failures users meet become one line on stderr and an exit code."""
    # TensorBoard's writer thread dies on a full disk; its next write raises it here: print it once, without the thread
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else threading.__excepthook__(hook)
    try:
        try:
            main(argv)
        except OSError as e:  # TensorBoard's writer on a full or read-only disk (write_atomic names its own files)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise  # any other OSError is a bug to show, a failed read among them
            raise cannot_write(e.filename or "TensorBoard's event file", e) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "can't allocate" not in str(e):
            raise
        print(f"error: out of memory ({reason(e)}); lower --batch-size, the widths or --eval-n", file=sys.stderr)
        sys.exit(EXIT_DATA)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------------
# Flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its commands on their own lines), and each flag's default."""

    def _get_help_string(self, action):  # no "(default: None)": such a flag's help says what stands in for it
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with each flag's default in --help and a bad command line told in one line (not the usage block)."""

    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False, formatter_class=HelpFormatter)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


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
batch_norm_batch = _number(int, lambda v: v >= 2, "2 or more (BatchNorm needs 2 images per batch)")


def add_run_flags(parser, presets, n_samples, ema_decay):
    """The flags every training script has (its own come first): the preset, data, seed, device, the run folder and
    resume, logging, checkpoints, the grid, the weight average, the evaluation."""
    add = parser.add_argument
    add("--preset", choices=sorted(presets), default="default",
        help="a set of defaults: typed flags override it; with --resume it overrides the run's own flags")
    add("--data-root", default="data", help="holds <MNIST|FashionMNIST>/raw/ (downloaded there when missing)")
    add("--img-size", type=positive_int, default=28, help="train on images resized to this side")
    add("--ema-decay", type=fraction, default=ema_decay,
        help="decay of the generator's weight average, which draws the grids and is evaluated (0 = off); after t"
        f" generator steps the average uses min(this, t / (t + 25)): {ema_decay} from step"
        f" {round(25 * ema_decay / (1 - ema_decay)):,} on")
    add("--seed", type=seed, default=1, help="seeds every random number: weights, data order, noise")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto = cuda, else mps, else cpu")
    add("--runs-dir", default="runs", help="where run folders are made")
    add("--run-name", default=None, help="the run folder's name (default <algorithm>-<dataset>-<date>-<time>)")
    add("--resume", metavar="RUN", help="continue this run folder exactly, with its flags; typed flags override them"
        f" and take effect, except {', '.join('--' + k.replace('_', '-') for k in KEPT_ON_RESUME)} and a network's"
        " shape (refused); a folder without a checkpoint starts from the beginning")
    add("--log-every", type=positive_int, default=100, help="steps between TensorBoard scalars")
    add("--checkpoint-every", type=non_negative_int, default=500,
        help="steps between checkpoints (0 = epoch ends only); one is also saved at the start, at every epoch end"
        " and on Ctrl-C or SIGTERM")
    add("--max-steps", type=non_negative_int, default=0,
        help="stop after this many steps in all (the WGANs: critic steps; 0 = no limit)")
    add("--n-samples", type=positive_int, default=n_samples, help="images in the fixed-noise grid")
    add("--eval", action=argparse.BooleanOptionalAction, default=True,
        help="evaluate at the end, and every --eval-every epochs: metrics.json and eval/*")
    add("--eval-every", type=non_negative_int, default=0, help="epochs between evaluations (0 = at the end only)")
    add("--eval-n", type=eval_n, default=10000, help="generated images per evaluation")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="a progress bar (--no-progress: one line per epoch)")


def parse_flags(parser, presets, script, argv):
    """The run's flags: typed > a typed --preset > (with --resume) the checkpoint's > the defaults. Returns (args, the
    checkpoint to resume or None). A --resume folder without a checkpoint yet is a new run in that folder."""
    defaults, unset = vars(parser.parse_args([])), object()
    typed = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset))))  # unset: not typed
    typed, ckpt = {name: value for name, value in typed.items() if value is not unset}, None
    if "resume" in typed:
        path = Path(typed["resume"])
        if path.is_dir() and not (path / "checkpoint.pt").exists():
            print(f"{path} has no checkpoint yet: starting it from the beginning, with the flags typed now")
        else:
            ckpt = load_checkpoint(path, script)
        run_dir = path if path.is_dir() else path.parent
        run_dir = run_dir if run_dir.name else run_dir.absolute()  # "--resume ." names the folder it stands in
        if Path(typed.get("runs_dir", run_dir.parent)) / typed.get("run_name", run_dir.name) != run_dir:
            raise UserError(f"--runs-dir and --run-name name another folder than --resume {path}; drop them")
        typed.update(runs_dir=str(run_dir.parent), run_name=run_dir.name)
    args = {**defaults, **(ckpt["args"] if ckpt else {}), **presets[typed.get("preset", "default")], **typed}
    for name in KEPT_ON_RESUME if ckpt else ():
        if args[name] != ckpt["args"][name]:
            flag = f"--{name.replace('_', '-')} {args[name]}"
            flag = flag if name in typed else f"--preset {typed['preset']} sets {flag}"
            raise UserError(f"{flag}: {typed['resume']} was trained with {ckpt['args'][name]}, which a resumed run"
                            " keeps; start a new run for another")
    args["run_name"] = args["run_name"] or f"{script.removeprefix('train_')}-{args['dataset']}-" \
                                           f"{time.strftime('%Y%m%d-%H%M%S')}"
    return argparse.Namespace(**args), ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Device and random numbers


def pick_device(name):
    """--device as a torch.device; auto: CUDA, else MPS, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: no {name.upper()} device is available here; use --device cpu")
    return torch.device(name)


def fused(device):
    """An optimizer's one kernel for all weights: fused where torch has it (CPU, CUDA), else foreach (MPS)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


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


def as_images(images):
    """A generator's output as N x C x H x W: a flat N x H*W as N x 1 x H x W (square)."""
    return images.view(len(images), 1, *[round(images.shape[1] ** 0.5)] * 2) if images.dim() == 2 else images


def load_data(args, device):
    """The training split as uint8 N x 1 x S x S, resident on the device (a batch is an index), with --batch-size
    checked against it."""
    images = resize(load_images(args.dataset, args.data_root)[0], args.img_size)[:, None].to(device)
    if len(images) < args.batch_size:
        raise UserError(f"argument --batch-size: must be at most {len(images)}, the training images (see --help)")
    return images


# ----------------------------------------------------------------------------------------------------------------------
# A run: start or resume it, then what the loop calls around each step and each epoch


@dataclass
class Run:
    """The state of a run that a script's loop reads and the functions below keep: no method, no loop of its own."""
    args: argparse.Namespace
    script: str
    dir: Path
    lock: object  # the open .lock file: the run folder is ours while it stays open
    parts: dict  # {"G": G, "D" or "C": ..., "opt_G": ..., ..., "G_ema": EMA or None}: what the checkpoint holds
    steps_per_epoch: int
    last_step: int
    fixed_noise: torch.Tensor  # the grids' noise
    step: int = 0  # steps done over the whole run (the WGANs: critic steps)
    sums: dict = field(default_factory=dict)  # this epoch's sums of each logged value (tensors: no host sync)...
    counts: dict = field(default_factory=dict)  # ... and how many steps logged it
    order: torch.Generator = None  # the batch order (batch_order)
    sampler: torch.nn.Module = None  # what draws the grids and is evaluated: the weight average if there is one, else G
    writer: SummaryWriter = None
    stop: dict = field(default_factory=dict)  # {"signal": n} once Ctrl-C or SIGTERM asks the run to stop
    epoch_started: float = 0.0  # train_seconds at this epoch's (or this resume's) first batch, for the epoch's line
    train_seconds: float = 0.0  # the train loop's seconds over the whole run and its resumes; no evaluation counts
    clock: float = 0.0  # time.perf_counter() when train_seconds was last brought up to date


def start_run(args, ckpt, script, images, **parts):
    """A new run (its folder made) or the one resumed (every part restored from its checkpoint); TensorBoard; a
    checkpoint of the flags in force at once; SIGINT and SIGTERM caught. None when a resumed run has nothing to do.
    parts: the networks, optimizers and weight average by checkpoint name ("G", and "G_ema": what is drawn)."""
    run_dir, lock = make_run_dir(args)
    steps_per_epoch = len(images) // args.batch_size  # the last partial batch is dropped
    run = Run(args, script, run_dir, lock, parts, steps_per_epoch,
              last_step=min(args.epochs * steps_per_epoch, args.max_steps or math.inf),
              fixed_noise=torch.randn(args.n_samples, parts["G"].z_dim, device=images.device),
              sampler=parts["G_ema"].model if parts.get("G_ema") else parts["G"])
    if ckpt:
        load_states(ckpt, run_dir, **parts)
        run.step, run.fixed_noise = ckpt["step"], ckpt["fixed_noise"].to(images.device)
        run.sums = {name: value.to(images.device) for name, value in ckpt["epoch_sums"].items()}
        run.counts, run.train_seconds = ckpt["epoch_counts"], ckpt["train_seconds"]
        set_rng_state(ckpt["rng"], images.device)
        if parts.get("G_ema") and ckpt["G_ema"] is None:  # --ema-decay typed on a run without one: it starts at G
            parts["G_ema"].model.load_state_dict(parts["G"].state_dict())
    run.order = batch_order(args.seed, len(images), run.step // steps_per_epoch)
    if run.step >= run.last_step and not evaluation_due(run):  # nothing to do: nothing is written
        print(f"{run_dir} is complete at step {run.step}: to train further, --resume it with more --epochs or"
              " --max-steps")
        return None
    # TensorBoard reads a run's event files in name order, and a name starts with the second it was made: a file made
    # in the same second as the one before it (a resume right after a kill) may sort first, and lose its points.
    newest = max((int(f.name.split(".")[3]) for f in run_dir.glob("events.out.tfevents.*")), default=0)
    if 0 < (wait := newest + 1 - time.time()) <= 1:
        time.sleep(wait)
    run.writer = SummaryWriter(run_dir, purge_step=run.step + 1 if ckpt else 0)  # purge: no point logged twice
    run.writer.add_text("config", f"```\n{json.dumps(vars(args), indent=2)}\n```", run.step)
    if ckpt:
        print(f"resuming {run_dir} at step {run.step}")
    else:
        run.writer.add_image("real", image_grid(to_model_range(images[:args.n_samples])), 0)
    save_checkpoint(run)  # the flags in force, from the start: a run resumes with them from its first step
    run.stop = stop_on_signals()
    return run


def make_run_dir(args):
    """The run's folder, --runs-dir/--run-name: one that holds a checkpoint is refused unless resumed (so two runs
    never mix); one without is started (a run that died before its first checkpoint). Locked for this process until
    it ends (the kernel drops the lock however it ends, kill -9 too)."""
    run_dir = Path(args.runs_dir) / args.run_name
    if not args.resume and (run_dir / "checkpoint.pt").exists():
        raise UserError(f"{run_dir} exists; continue it with --resume {run_dir}, or choose another --run-name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "w")
    except OSError as e:
        raise cannot_write(run_dir, e) from None
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
    """Each part (a network, an optimizer, the weight average; None: absent in this run or in the checkpoint) from
    its checkpoint entry. An optimizer takes its state (moments, step counts) from the checkpoint and keeps the
    hyperparameters it was built with, the flags in force (a typed --lr takes effect), its fused or foreach kernels
    too (they decide where its step counts live: a CPU run resumed on a Mac). Refused in one line when a part does not
    fit (a flag typed with --resume changed a network)."""
    try:
        for name, part in parts.items():
            state = ckpt[name]
            if part is None or state is None:
                continue
            if isinstance(part, torch.optim.Optimizer):
                state = {**state, "param_groups": [{**saved, **{k: v for k, v in built.items() if k != "params"}}
                                                   for saved, built in zip(state["param_groups"], part.param_groups)]}
            part.load_state_dict(state)
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


def epoch_batches(run, images):
    """This epoch's batches from where the run stands, as [-1, 1] floats on the device: index slices of one
    permutation of the images (from the batch-order generator), up to the epoch's or the run's end; a progress bar."""
    perm = torch.randperm(len(images), generator=run.order).to(images.device)
    first, size = run.step % run.steps_per_epoch, run.args.batch_size
    end = min(run.steps_per_epoch, first + run.last_step - run.step)
    run.epoch_started, run.clock = run.train_seconds, time.perf_counter()
    for batch in tqdm(range(first, end), initial=first, total=run.steps_per_epoch, leave=False,
                      desc=f"epoch {run.step // run.steps_per_epoch + 1}", disable=not run.args.progress):
        yield to_model_range(images[perm[batch * size:(batch + 1) * size]])


def end_step(run, values):
    """After a step: its values (tensors: no host sync) into this epoch's sums, each averaged over the steps that gave
    it; inside an epoch, a checkpoint every --checkpoint-every steps, and one where Ctrl-C or SIGTERM stops the run
    (end_epoch saves the others). Returns True when the run is to stop."""
    for name, value in values.items():
        run.sums[name] = run.sums.get(name, 0) + value
        run.counts[name] = run.counts.get(name, 0) + 1
    every = run.args.checkpoint_every
    if run.step % run.steps_per_epoch and run.step < run.last_step and (run.stop or every and run.step % every == 0):
        count_train_time(run)
        save_checkpoint(run)
        run.clock = time.perf_counter()  # the save is not the train loop's time (as at an epoch's end)
    return bool(run.stop)


def end_epoch(run):
    """After the batch loop. At an epoch's end: train_seconds, its means (epoch_mean/* and a line), the fixed noise's
    grid and a checkpoint; where --max-steps ends a run inside an epoch: train_seconds, the grid
    (samples/step_NNNNNNN.png) and a checkpoint; after a stop inside an epoch: nothing (end_step saved it). Returns
    the epoch's means ({} when it is not whole)."""
    step, whole, means = run.step, run.step % run.steps_per_epoch == 0, {}
    if not whole and step < run.last_step:
        return means
    epoch = step // run.steps_per_epoch
    count_train_time(run)
    run.writer.add_scalar("train_seconds", run.train_seconds, step)
    if whole:
        means = finite(step, {name: value / run.counts[name] for name, value in run.sums.items()})
        for name, value in means.items():
            run.writer.add_scalar(f"epoch_mean/{name}", value, step)
        print(f"epoch {epoch}/{run.args.epochs}  step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  ({run.train_seconds - run.epoch_started:.1f}s)", flush=True)
        run.sums, run.counts = {}, {}
    if run.parts.get("G_ema"):
        run.parts["G_ema"].calibrate()  # BatchNorm statistics of the averaged weights (saving does it too)
    save_samples(run.writer, run.dir, as_images(generate(run.sampler, run.fixed_noise)), step, epoch if whole else None)
    save_checkpoint(run)
    return means


def count_train_time(run):
    """The seconds since the clock was last read, added to the run's train_seconds (kept in the checkpoint); on an
    accelerator after its queued kernels have run (at a checkpoint only: no sync in a step)."""
    device = run.fixed_noise.device
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()
    now = time.perf_counter()
    run.train_seconds, run.clock = run.train_seconds + now - run.clock, now


def evaluation_due(run):
    """An evaluation at this step: the final one, or one every --eval-every epochs, unless metrics.json holds this
    step's already (so a resumed run makes the one that a stopped or failed run owes)."""
    args, epoch = run.args, run.step // run.steps_per_epoch
    scheduled = run.step >= run.last_step or (args.eval_every and run.step % run.steps_per_epoch == 0
                                              and epoch % args.eval_every == 0)
    if not (args.eval and run.step > 0 and scheduled):
        return False
    try:
        return json.loads((run.dir / "metrics.json").read_text())["step"] != run.step
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not ours
        return True


def finish(run):
    """The run's end: TensorBoard closed; a run that a signal stopped before its end (or its final evaluation) exits
    with one line saying how to continue."""
    run.writer.close()
    if run.stop and (run.step < run.last_step or evaluation_due(run)):
        raise UserError(f"stopped by {signal.Signals(run.stop['signal']).name}: the checkpoint of step {run.step} is"
                        f" saved; continue with --resume {run.dir}", 128 + run.stop["signal"])
    print(f"done: {run.dir} (step {run.step})")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and atomic writes


def write_atomic(path, write):
    """write(f) into path.tmp (its folder made if missing), fsync, rename over path: a reader never sees half a file,
    and on a write error (a full disk, a read-only folder) the old file stays as it was, and the error is one line
    naming the file."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = e.__context__ if isinstance(e, RuntimeError) else e  # torch.save wraps a failed write's OSError
        if isinstance(error, OSError):
            raise cannot_write(path, error) from None
        raise


def save_checkpoint(run):
    """Everything a resume needs (the parts, the fixed noise, the RNG states, this epoch's sums), and the generator's
    class and constructor arguments for evaluate.py, written atomically; refused, keeping the last good one, if any
    tensor in it holds a NaN or inf."""
    G = run.parts["G"]
    state = {"format": CHECKPOINT_FORMAT, "script": run.script, "args": vars(run.args), "step": run.step,
             "G_class": type(G).__name__, "G_args": G.model_args,
             **{name: part.state_dict() if part is not None else None for name, part in run.parts.items()},
             "fixed_noise": run.fixed_noise.cpu(), "rng": rng_state(run.fixed_noise.device),
             "epoch_sums": run.sums, "epoch_counts": run.counts, "train_seconds": run.train_seconds}

    def tensors(part, name):
        if isinstance(part, dict):
            for key, value in part.items():
                yield from tensors(value, f"{name}.{key}" if name else str(key))
        elif torch.is_tensor(part) and part.is_floating_point():
            yield name, part

    for name, tensor in tensors(state, ""):
        if not torch.isfinite(tensor).all():
            raise diverged(run.step, f"{name} is not finite")
    write_atomic(run.dir / "checkpoint.pt", lambda f: torch.save(state, f))


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
    return UserError(f"training diverged at step {step}: {what}; the last good checkpoint is kept: --resume the run"
                     " with a lower --lr", EXIT_DIVERGED)


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
    write_atomic(path, lambda f: vutils.save_image(grid, f, format="png"))


def save_samples(writer, run_dir, images, step, epoch=None):
    """The fixed noise's samples: TensorBoard's `fake` and samples/epoch_NNN.png after an epoch, then progress.gif
    made again from every epoch's grid; samples/step_NNNNNNN.png where a run ends mid-epoch."""
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
