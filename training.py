"""The plumbing of a training run, the same in both scripts; the scripts keep the algorithm and call in here:

    setup             the configuration (config.resolve), the device, every RNG seeded
    build_networks    the networks, refused up front if training them cannot fit in memory
    Run               the run folder and its lock, resume, the generator's weight average, TensorBoard, epoch means,
                      sample grids, evaluations, checkpoints, when to stop, and the errors that leave a run
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

import config
import utils
from data import EpochOrder, to_model_range
from evaluate import TrainingEval, check_needs
from models import EMA, generate

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None


def setup(parser, argv, presets, algo):
    """The run's configuration (flags, preset, checkpoint: config.resolve), its device, what the evaluations need
    (checked before any work), and every RNG seeded.
    Returns (cfg, the checkpoint to resume or None, device)."""
    cfg, ckpt = config.resolve(parser, argv, presets, algo)
    device = utils.select_device(cfg.device)
    if cfg.eval:
        check_needs(cfg)
    utils.seed_everything(cfg.seed)
    return cfg, ckpt, device


def build_networks(make, cfg, images, device):
    """make(cfg, img_shape) -> the networks, G first. Built on the meta device first (no memory, no random numbers)
    to estimate what training them needs, refused in one line if it cannot fit; then built for real (initialized on
    the CPU, as always) and moved to the device."""
    if cfg.batch_size > len(images):  # no full batch: an epoch would have no step
        raise utils.UserError(f"--batch-size {cfg.batch_size} is larger than the dataset ({len(images)} images);"
                              " use a smaller --batch-size")
    with torch.device("meta"):
        networks = make(cfg, tuple(images.shape[1:]))
    params = [sum(p.numel() for p in net.parameters()) for net in networks]
    units = sum(m.out_features for net in networks for m in net.modules() if isinstance(m, torch.nn.Linear))
    # weights, gradients, two optimizer states, the weight average of G; activations of a real and a fake batch
    need = 4 * (4 * sum(params) + (params[0] if cfg.ema_decay else 0) + 2 * 3 * cfg.batch_size * units)
    fix = "use smaller widths, --z-dim, --img-size or --batch-size"
    utils.check_memory(need, device, f"the networks ({sum(params):,} parameters) and a step of batch {cfg.batch_size}",
                       fix)
    if device.type != "cpu":
        utils.check_memory(4 * sum(params), torch.device("cpu"), "the networks' initialization on the CPU", fix)
    return [net.to(device) for net in make(cfg, tuple(images.shape[1:]))]


class Run:
    """One training run, at fixed points of the script's loop:

        run = Run(algo, cfg, images, ckpt, G=G, D=D, opt_G=opt_G, opt_D=opt_D)  # restores them on --resume
        with run:                                   # SIGINT/SIGTERM: finish the step, save, exit 130/143
            while run.continues():                  # epochs left, --max-steps not reached, no signal
                for step, idx in run.epoch_batches():   # ends early at --max-steps or on a signal
                    ... the algorithm's step(s); run.record({"loss/D": loss_D, ...}) ...
                    run.after_step()                # TensorBoard every --log-every, checkpoint every --checkpoint-every
                run.end_epoch()                     # epoch means, sample grid, evaluation, checkpoint
        run.finish()                                # final evaluation and metrics.json

    An error that leaves the run (a write error, a divergence, memory) is told with the run's folder and the step of
    its last good checkpoint, both known here.
    """

    def __init__(self, algo, cfg, images, ckpt, **parts):
        """images: the training set on the device (data.load_train_images). parts: networks and optimizers by the
        names their checkpoint entries have, the generator as G."""
        self.algo, self.cfg, self.images, self.device = algo, cfg, images, images.device
        self.order = EpochOrder(len(images), cfg.batch_size, cfg.seed)
        self.evaluation = TrainingEval(cfg, self.device)
        self.ema = EMA(parts["G"], cfg.ema_decay) if cfg.ema_decay else None  # the generator's weight average
        self.G_sample = self.ema.model if self.ema else parts["G"]  # what the grids and evaluations draw from
        self.parts = {**parts, "order": self.order, **({"G_ema": self.ema} if self.ema else {})}  # a checkpoint's
        # Made only once data and networks exist (a failed start leaves no run); locked until the run ends.
        self.run_dir, self.lock = make_run_dir(cfg)
        self.step, self.saved_step = 0, None  # steps done over the whole run; the step of the checkpoint on disk
        try:
            self.fixed_noise = torch.randn(cfg.n_samples, cfg.z_dim, device=self.device)  # the grids' noise
            if ckpt:
                for name, part in self.parts.items():
                    part.load_state_dict(ckpt[name])
                utils.set_rng_state(ckpt["rng"], self.device)
                self.fixed_noise, self.step = ckpt["fixed_noise"].to(self.device), ckpt["step"]
                if self.ema:
                    self.ema.updates = ckpt["ema_updates"]
                self.saved_step = self.step
                print(f"resuming {self.run_dir} at step {self.step} (epoch {self.order.epoch + 1}, batch"
                      f" {self.order.position})")
            self.writer = open_writer(self.run_dir, cfg, resume_step=self.step if ckpt else None)
            if not ckpt:
                self.writer.add_image("real", utils.image_grid(to_model_range(images[:cfg.n_samples])), 0)
        except BaseException as e:
            self.leave(e)
            raise
        self.max_steps = cfg.max_steps or float("inf")
        self.signum = None  # the stop signal that arrived, if any
        self.means, self.latest = EpochMeans(), {}
        self.bar, self.epoch_started = None, None

    # -- entering and leaving ------------------------------------------------------------------------------------------

    def __enter__(self):
        """SIGINT/SIGTERM only set a flag, which the loop checks after each step (then it saves and exits)."""
        self.previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, kind, error, traceback):
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        if error is not None:
            self.leave(error)

    def leave(self, error):
        """The run ends with `error`: release the folder's lock, and raise the error told with the run's folder and
        last good checkpoint where it is a write error, a divergence or memory (anything else propagates as is)."""
        self.release()
        if isinstance(error, KeyboardInterrupt) and self.saved_step is not None:
            raise utils.Interrupted(signal.SIGINT, f"interrupted; the last checkpoint (step {self.saved_step}) is kept"
                                                   f" in {self.run_dir}: continue with --resume {self.run_dir}, or"
                                                   f" score it with python evaluate.py {self.run_dir}") from None
        if isinstance(error, utils.Diverged):
            raise error.told(self.saved_step) from None
        if isinstance(error, OSError):
            raise utils.WriteError(error, self.run_dir, self.saved_step) from None
        if isinstance(error, (MemoryError, RuntimeError)) and utils.is_out_of_memory(error):
            raise utils.OutOfMemory(error, self.saved_step) from None

    def release(self):
        """Drop the run folder's lock (the kernel would at exit; this is for a process that goes on)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    # -- the loop ------------------------------------------------------------------------------------------------------

    def continues(self):
        return self.order.epoch < self.cfg.epochs and not self.stopped()

    def stopped(self):
        return self.signum is not None or self.step >= self.max_steps

    def epoch_batches(self):
        """Yield (step, image indices) for each batch left in the current epoch (the rest of it after a resume), step
        counting from 1 over the whole run; under a progress bar. Ends early, before the next batch, once --max-steps
        steps are done or a signal came."""
        self.epoch_started = time.time()
        self.bar = tqdm(total=self.order.steps_per_epoch, initial=self.order.position, disable=not self.cfg.progress,
                        desc=f"epoch {self.order.epoch + 1}/{self.cfg.epochs}", leave=False, dynamic_ncols=True)
        for idx in self.order.batches(self.device):
            self.step += 1
            yield self.step, idx
            self.bar.update()
            if self.stopped():
                return

    def set_learning_rates(self, *optimizers):
        """Each step's learning rate (--lr-decay), a function of the step alone: exact on resume."""
        if not self.cfg.lr_decay:  # constant: the optimizers were built with --lr
            return
        lr = decayed_lr(self.cfg.lr, self.step, self.cfg.epochs * self.order.steps_per_epoch, self.cfg.lr_decay)
        self.latest["lr"] = lr  # to TensorBoard with the losses
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def update_average(self, G):
        """The generator's weight average (--ema-decay), after each generator step."""
        if self.ema:
            self.ema.update(G)

    def record(self, values):
        """Tensors of this step (no host sync): summed for the epoch means, the latest of each logged."""
        self.means.add(values)
        self.latest.update(values)

    def after_step(self):
        if self.step % self.cfg.log_every == 0:  # note: a host sync, once every --log-every steps
            self.bar.set_postfix({name: f"{value:.4g}" for name, value in
                                  log_scalars(self.writer, self.step, self.latest).items()})
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def end_epoch(self):
        """After an epoch, or where the loop stopped mid-epoch: the epoch's means, the sample grid, on a whole epoch
        the next epoch's order and (every --eval-every epochs) an evaluation, and a checkpoint. Returns the means."""
        self.bar.close()
        means = {}
        if self.means.sums:
            means = log_scalars(self.writer, self.step, self.means.result(), tag="epoch_mean/")
            text = "  ".join(f"{name} {value:.4f}" for name, value in means.items())
            print(f"epoch {self.order.epoch + 1}/{self.cfg.epochs}  step {self.step}  {text}"
                  f"  ({time.time() - self.epoch_started:.1f}s)", flush=True)
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
                print(f"warning: the evaluation at step {self.step} failed ({utils.reason(e)}); training goes on",
                      file=sys.stderr)
        return means

    def sample_grid(self, epoch):
        """The fixed noise's samples, to TensorBoard and samples/ (see log_samples)."""
        if self.ema:
            self.ema.calibrate()  # BatchNorm statistics of the averaged weights (saving does it too)
        fakes = generate(self.G_sample, self.fixed_noise)
        log_samples(self.writer, self.run_dir, fakes.view(-1, *self.images.shape[1:]), self.step, epoch)

    def save_checkpoint(self):
        """Every part's state_dict, the step, the fixed noise, the RNG states and the configuration; never a diverged
        state over the last good one."""
        networks = {name: part for name, part in self.parts.items() if isinstance(part, torch.nn.Module)}
        check_finite(self.step, **networks)
        state = {"format": utils.CHECKPOINT_FORMAT, "algo": self.algo, "args": self.cfg.as_dict(), "step": self.step,
                 "fixed_noise": self.fixed_noise.cpu(), "rng": utils.rng_state(self.device),
                 **({"ema_updates": self.ema.updates} if self.ema else {}),
                 **{name: part.state_dict() for name, part in self.parts.items()}}
        utils.save_checkpoint(state, self.run_dir / utils.CHECKPOINT)
        self.saved_step = self.step

    def finish(self):
        """The end: after a signal, exit 128 + signal (the checkpoint is saved); else the final evaluation."""
        try:
            if self.signum:
                close_writer(self.writer)
                raise utils.Interrupted(self.signum)
            try:
                self.evaluation.final(self.G_sample, self.writer, self.step, self.run_dir)
            except KeyboardInterrupt:
                raise utils.Interrupted(signal.SIGINT, f"interrupted during the final evaluation; the run is complete"
                                                       f" and saved in {self.run_dir}: evaluate it with python"
                                                       f" evaluate.py {self.run_dir}") from None
            except Exception as e:  # the checkpoint and grids are on disk already
                close_writer(self.writer)
                raise utils.UserError(f"the final evaluation failed ({utils.reason(e)}); the run is complete and saved"
                                      f" in {self.run_dir}: evaluate it with python evaluate.py {self.run_dir}",
                                      utils.EXIT_DATA)
            close_writer(self.writer)
        except BaseException as e:
            self.leave(e)
            raise
        self.release()
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


def decayed_lr(lr, step, total, decay):
    """The learning rate of step `step` (from 1) of `total`: lr, then over the last `decay` share of the steps falling
    linearly, to lr / (decay * total) at the last step (0 would waste it)."""
    decay_steps = decay * total
    return lr * min(1.0, (total - step + 1) / decay_steps) if decay_steps > 0 else lr


def check_finite(step, **networks):
    """Raise Diverged naming the first NaN/inf among the networks' parameters and buffers."""
    for name, network in networks.items():
        for key, tensor in network.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise utils.Diverged(step, f"{name}.{key} is not finite (NaN or inf)")


# ----------------------------------------------------------------------------------------------------------------------
# The run folder and its lock

LOCK = ".lock"


def make_run_dir(cfg):
    """<runs-dir>/<run-name>, created new (an existing one is refused unless resuming, so two runs never mix) and
    locked for this process: a second process on the same folder is refused while this one lives. Returns (the
    folder, the lock's file descriptor)."""
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    if not cfg.resume:
        try:
            Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
            run_dir.mkdir()  # fails if it exists, also when another process made it a moment ago
        except FileExistsError:
            holder = lock_holder(run_dir)
            if holder:
                raise utils.UserError(f"run folder {run_dir} is in use by process {holder}; choose another --run-name")
            raise utils.UserError(f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it,"
                                  " or another --run-name")
        except OSError as e:
            raise utils.UserError(f"cannot create run folder {run_dir} ({e.strerror}); choose a writable --runs-dir")
    try:
        return run_dir, lock_run_dir(run_dir)
    except OSError as e:
        fix = "make it writable, then --resume" if cfg.resume else "choose a writable --runs-dir"
        raise utils.UserError(f"cannot write in run folder {run_dir} ({e.strerror}); {fix}")


def lock_run_dir(run_dir):
    """An exclusive flock on <run>/.lock holding our PID; returns its file descriptor (None without fcntl). The
    kernel drops the lock however the process ends (SIGKILL too). Raises UserError naming the holder if another
    process has it."""
    if fcntl is None:
        return None
    fd = os.open(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_pid(fd)
        os.close(fd)
        raise utils.UserError(f"run folder {run_dir} is in use by process {holder} (another training writes it); wait"
                              " for it to end or stop it, then --resume")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def lock_holder(run_dir):
    """The PID (as text) of the process holding the folder's lock, or None when it is free."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
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


# ----------------------------------------------------------------------------------------------------------------------
# TensorBoard and the sample grids


def open_writer(run_dir, cfg, resume_step=None):
    """TensorBoard writer; on resume, purge points the crashed run logged after its checkpoint, so none are doubled."""
    if resume_step is not None:
        return SummaryWriter(run_dir, purge_step=resume_step + 1)
    writer = SummaryWriter(run_dir)
    values = cfg.as_dict()
    for summary in hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()},
                           {"loss/G": 0.0}):
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```\n" + json.dumps(values, indent=2, default=str) + "\n```", 0)
    return writer


def close_writer(writer):
    """Flush, then close: flush raises a write error of the writer's thread, which close() alone would drop."""
    writer.flush()
    writer.close()


def log_scalars(writer, step, values, tag=""):
    """Write tensors as scalars (the only host sync of a step) and stop on NaN/inf; returns them as floats."""
    floats = {name: float(value) for name, value in values.items()}
    for name, value in floats.items():
        if not math.isfinite(value):
            raise utils.Diverged(step, f"{tag}{name} is {value}")
        writer.add_scalar(tag + name, value, step)
    return floats


def log_samples(writer, run_dir, fakes, step, epoch=None):
    """The fixed-noise grid, to TensorBoard and to samples/: epoch_NNN.png after an epoch (then progress.gif is made
    anew from every epoch's grid, so it spans the whole run, resumes included), step_NNNNNNN.png when a run stops
    mid-epoch (--max-steps, SIGINT/SIGTERM)."""
    grid = utils.image_grid(fakes)
    writer.add_image("fake", grid, step)
    samples = Path(run_dir) / "samples"
    if epoch is None:
        utils.save_grid(grid, samples / f"step_{step:07d}.png")
        return
    utils.save_grid(grid, samples / f"epoch_{epoch:03d}.png")
    utils.write_progress_gif(samples)
