"""A run's configuration: the flags both training scripts share, their presets, and resolve(), which makes the flags
typed, the preset and (on --resume) the checkpoint into one read-only Config, once, before anything else happens."""
import argparse
import datetime
import sys
from pathlib import Path

import utils
from data import DATASETS

# Flags that may differ on --resume: they change how a run is watched or where it runs, not what it computes.
RUNTIME_FLAGS = {"epochs", "max_steps", "log_every", "checkpoint_every", "eval_every", "eval_n", "eval", "device",
                 "data_root", "runs_dir", "run_name", "resume", "progress"}


class Config(argparse.Namespace):
    """The resolved flags of a run, read as attributes (cfg.lr) and never changed: lists are stored as tuples, and
    setting an attribute raises. as_dict() is what a checkpoint and TensorBoard's config record."""

    def __init__(self, values):
        for key, value in values.items():
            object.__setattr__(self, key, tuple(value) if isinstance(value, list) else value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the configuration is read-only (tried to set {name})")

    def as_dict(self):
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}


def resolve(parser, argv, presets, algo):
    """The run's configuration: each flag as typed, else the chosen preset's value, else (on --resume) the
    checkpoint's, else its default. A resumed run keeps its checkpoint's configuration: a typed flag that changes what
    the run computes must agree with it (RUNTIME_FLAGS may differ). Returns (Config, the checkpoint or None)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    values = vars(parser.parse_args(argv))
    typed = typed_flags(parser, argv)
    values.update({key: value for key, value in presets[values["preset"]].items() if key not in typed})
    if not values["resume"]:
        now = datetime.datetime.now()
        values["run_name"] = values["run_name"] or f"{algo}-{values['dataset']}-{now:%Y%m%d-%H%M%S}"
        return Config(values), None
    resume, named = Path(values["resume"]), Path(values["runs_dir"]) / values["resume"]
    if not resume.exists() and named.is_dir():  # a run's name, not its folder
        raise utils.UserError(f"--resume {resume}: no such folder; did you mean --resume {named}?")
    ckpt, path = utils.load_checkpoint(resume)
    if ckpt["algo"] != algo:
        raise utils.UserError(f"--resume {path}: it is a {ckpt['algo']} checkpoint; resume it with"
                              f" train_{ckpt['algo']}.py")
    saved = ckpt["args"]
    conflicts = [f"--{key.replace('_', '-')} {values[key]} (checkpoint: {saved[key]})"
                 for key in sorted(typed - RUNTIME_FLAGS) if key in saved and saved[key] != values[key]]
    if conflicts:
        raise utils.UserError(f"--resume {path}: flags conflict with the checkpoint's configuration:"
                              f" {'; '.join(conflicts)}; drop them or start a new run")
    values.update({key: value for key, value in saved.items() if key not in typed})
    values.update(run_name=path.parent.name, runs_dir=str(path.parent.parent), resume=str(path))
    check_not_complete(values, ckpt, path.parent)
    return Config(values), ckpt


def check_not_complete(values, ckpt, run_dir):
    """A resume of a run that has nothing left to do (its --epochs or --max-steps reached) changes nothing: it says so
    and how to go on."""
    step, epochs_done = ckpt["step"], ckpt["order"]["epoch"]
    if epochs_done >= values["epochs"]:
        raise utils.Complete(f"{run_dir} is complete: {epochs_done} of --epochs {values['epochs']} done (step {step});"
                             f" to train further, --resume {run_dir} --epochs {epochs_done + 10}; to score it,"
                             f" python evaluate.py {run_dir}")
    if values["max_steps"] and step >= values["max_steps"]:
        raise utils.Complete(f"{run_dir} is complete: --max-steps {values['max_steps']} reached (step {step}); to train"
                             f" further, --resume {run_dir} --max-steps {step + 1000}; to score it, python evaluate.py"
                             f" {run_dir}")


def typed_flags(parser, argv):
    """The dests of the flags actually typed on the command line (abbreviations are disabled on our parsers)."""
    return {action.dest for action in parser._actions for opt in action.option_strings
            if any(arg == opt or arg.startswith(opt + "=") for arg in argv)}


def make_parser(description, presets, *, dataset, epochs, batch_size, lr, z_dim, img_size, log_every,
                min_batch=(1, "")):
    """A training script's parser holding --preset and the flags both scripts share, with the script's own defaults;
    the script adds its algorithm's flags. min_batch: (the smallest batch the networks can train on, why)."""
    parser = utils.ArgumentParser(description=description)
    add = parser.add_argument
    add("--preset", choices=sorted(presets), default="default",
        help="a set of defaults (flags typed explicitly override it): " + preset_help(presets))
    add("--dataset", choices=sorted(DATASETS), default=dataset, help="training data")
    add("--data-root", type=utils.nonempty, default="data",
        help="folder holding <MNIST|FashionMNIST>/raw/ (downloaded there if missing)")
    add("--epochs", type=utils.positive_int, default=epochs, help="passes over the training split")
    add("--batch-size", type=utils.int_range(min_batch[0], why=min_batch[1]), default=batch_size,
        help="images per step")
    add("--lr", type=utils.positive_float, default=lr, help="learning rate of both networks")
    add("--lr-decay", type=utils.share, default=0.0,
        help="the last share of the run's steps over which both learning rates fall linearly to 0 (0 = constant)")
    add("--z-dim", type=utils.width, default=z_dim, help="size of the generator's noise input")
    add("--img-size", type=utils.int_range(1, 10_000), default=img_size,
        help="train on images resized to this side (28 = native)")
    add("--seed", type=utils.seed, default=1, help="seeds every random number (data order, noise, weights)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto = cuda, else mps, else cpu")
    add("--runs-dir", type=utils.nonempty, default="runs", help="TensorBoard and checkpoint root")
    add("--run-name", type=utils.folder_name, default=None,
        help="folder under --runs-dir (default {algo}-{dataset}-{YYYYmmdd-HHMMSS})")
    add("--resume", type=utils.nonempty, default=None, metavar="PATH",
        help="continue the run in this folder (or this checkpoint.pt)")
    add("--log-every", type=utils.positive_int, default=log_every, help="steps between scalar logs and NaN checks")
    add("--checkpoint-every", type=utils.non_negative_int, default=500,
        help="steps between checkpoints (0 = only at epoch ends); also written on SIGINT/SIGTERM")
    add("--max-steps", type=utils.positive_int, default=None, help="stop after this many steps in all (for smoke runs)")
    add("--eval-every", type=utils.non_negative_int, default=0,
        help="epochs between quality evaluations (FID, precision, recall, class KL; see evaluate.py); 0 = at the end")
    add("--eval-n", type=utils.EVAL_N, default=10000, help="generated images per evaluation")
    add("--no-eval", dest="eval", action="store_false",
        help="skip the quality evaluations and metrics.json (by default the run is evaluated at its end, and every"
             " --eval-every epochs)")
    add("--no-progress", dest="progress", action="store_false",
        help="one line per epoch, no progress bar (by default a tqdm bar shows the current losses)")
    return parser


def preset_help(presets):
    """--preset's help: the values each preset sets."""
    return "; ".join(f"{name}: " + (", ".join(f"--{k.replace('_', '-')} {_flag_text(v)}" for k, v in values.items())
                                     or "the defaults shown") for name, values in presets.items())


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
