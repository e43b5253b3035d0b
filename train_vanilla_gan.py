"""Vanilla GAN (Goodfellow et al., 2014) with BCE loss: an MLP generator against a sigmoid MLP discriminator.

    python train_vanilla_gan.py                      # MNIST, 20 epochs
    tensorboard --logdir runs

D maximizes log D(x) + log(1 - D(G(z))); G maximizes log D(G(z)) (the non-saturating loss); both with Adam.
"""
import json
import signal
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import evaluate
import utils
from models import EMA, Discriminator, Generator, generate

SCRIPT = "train_vanilla_gan"
# The source's settings (the simple-GAN tutorial): --preset source. The defaults were chosen by measured sample
# quality, and --epochs where more stop helping (README, Results; every setting tried: docs/tuning.md).
PRESETS = {
    "default": {},
    "source": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "batch_size": 32, "z_dim": 64, "g_hidden": [256],
               "d_hidden": [128], "leaky_slope": 0.1, "d_dropout": 0.0, "ema_decay": 0.0},
}


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default="default", help="a set of defaults; typed flags override it")
    add("--dataset", choices=sorted(utils.DATASETS), default="mnist")
    add("--data-root", default="data", help="holds <MNIST|FashionMNIST>/raw/ (downloaded there when missing)")
    add("--epochs", type=utils.positive_int, default=20, help="passes over the training split")
    add("--batch-size", type=utils.positive_int, default=32)
    add("--lr", type=utils.positive_float, default=3e-4, help="Adam's learning rate, both networks")
    add("--beta1", type=utils.fraction, default=0.5, help="Adam beta1 (0.5 as in DCGAN; the source: 0.9)")
    add("--beta2", type=utils.fraction, default=0.999, help="Adam beta2")
    add("--z-dim", type=utils.positive_int, default=64, help="size of the generator's noise")
    add("--g-hidden", type=utils.positive_int, nargs="+", default=[512, 1024], help="generator hidden widths")
    add("--d-hidden", type=utils.positive_int, nargs="+", default=[1024], help="discriminator hidden widths")
    add("--leaky-slope", type=utils.fraction, default=0.1, help="negative slope of every LeakyReLU")
    add("--d-dropout", type=utils.fraction, default=0.3, help="dropout after each hidden layer of D (0 = none)")
    add("--ema-decay", type=utils.fraction, default=0.999,
        help="decay of the generator's weight average, which draws the samples and is evaluated (0 = off)")
    add("--img-size", type=utils.positive_int, default=28, help="train on images resized to this side")
    add("--seed", type=utils.seed, default=1, help="seeds every random number: weights, data order, noise")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto = cuda, else mps, else cpu")
    add("--runs-dir", default="runs", help="where run folders are made")
    add("--run-name", default=None, help="the run folder's name (default vanilla_gan-<dataset>-<date>-<time>)")
    add("--resume", metavar="RUN", help="continue this run folder exactly, with its flags (typed ones override)")
    add("--log-every", type=utils.positive_int, default=100, help="steps between TensorBoard scalars")
    add("--checkpoint-every", type=utils.non_negative_int, default=500,
        help="steps between checkpoints (0 = epoch ends only); one is also saved at every epoch end and on Ctrl-C")
    add("--max-steps", type=utils.positive_int, default=None, help="stop after this many steps in all")
    add("--n-samples", type=utils.positive_int, default=32, help="images in the fixed-noise grid")
    add("--eval-every", type=utils.non_negative_int, default=0, help="epochs between evaluations (0 = at the end)")
    add("--eval-n", type=utils.eval_n, default=10000, help="generated images per evaluation")
    add("--no-eval", dest="eval", action="store_false", help="no evaluation, no metrics.json")
    add("--no-progress", dest="progress", action="store_false", help="one line per epoch, no progress bar")
    return parser


def bce(p, target):
    """F.binary_cross_entropy for 0/1 targets (the log clamped at -100, as there), written out: a NaN in p gives a NaN
    loss, which stops the run in one line, where F.binary_cross_entropy raises (CPU) or kills the CUDA context."""
    return -torch.where(target > 0.5, p, 1 - p).log().clamp(min=-100).mean()


def train_step(G, D, opt_G, opt_D, real, z):
    """One discriminator step, then one generator step on the same fake batch:

    (1) D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize [BCE(D(x), 1) + BCE(D(G(z)), 0)] / 2;
    (2) G: maximize log D(G(z)) (the non-saturating loss), i.e. minimize BCE(D(G(z)), 1), through the D of (1).

    The numbers of the textbook form (tests/textbook.py), with one D forward for real and fake and no retained graph.
    Returns (loss_D, loss_G, mean D(x), mean D(G(z))) as detached tensors: no host sync here.
    """
    batch = real.shape[0]
    fake = G(z)

    # (1) One forward over real and fake together (D has no batch statistics: the same math); the fake is detached.
    d_out = D(torch.cat([real.flatten(1), fake.detach()]))
    targets = torch.cat([torch.ones(batch, 1, device=real.device), torch.zeros(batch, 1, device=real.device)])
    loss_D = bce(d_out, targets)  # the mean over 2B = the average of the two halves' means
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()

    # (2) -log D(G(z)) through the updated D; gradients go to G only.
    loss_G = bce(D(fake), targets[:batch])
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()
    return loss_D.detach(), loss_G.detach(), d_out[:batch].mean().detach(), d_out[batch:].mean().detach()


def main(argv=None):
    # Flags: typed > --preset > (with --resume) the checkpoint's > the defaults.
    parser = make_parser()
    args, ckpt = utils.parse_flags(parser, PRESETS, SCRIPT, argv)
    device = utils.pick_device(args.device)
    utils.seed_everything(args.seed)

    # Data (the training split, resident on the device as uint8: a batch is an index), what the evaluation needs
    # (checked now rather than after the training), networks, optimizers, the generator's weight average.
    images = utils.resize(utils.load_images(args.dataset, args.data_root)[0], args.img_size)[:, None].to(device)
    steps_per_epoch = len(images) // args.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        parser.error(f"argument --batch-size: must be at most {len(images)}, the training images")
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or float("inf"))
    if args.eval:
        evaluate.reference(args.dataset, args.data_root, device)
    img_dim = args.img_size ** 2
    G = Generator(args.z_dim, img_dim, args.g_hidden, args.leaky_slope).to(device)
    D = Discriminator(img_dim, args.d_hidden, args.leaky_slope, args.d_dropout).to(device)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}  # one kernel for all weights
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fused)
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    G_sample = ema.model if ema else G  # what draws the grids and is evaluated

    # The run folder (new, or the one resumed: every state restored from its checkpoint) and TensorBoard.
    run_dir, lock = utils.make_run_dir(args, resuming=ckpt is not None)  # the lock is held while this process lives
    fixed_noise = torch.randn(args.n_samples, args.z_dim, device=device)  # the grids' noise
    step = 0  # steps done, over the whole run
    if ckpt:
        utils.load_states(ckpt, run_dir, G=G, D=D, opt_G=opt_G, opt_D=opt_D, G_ema=ema)
        step, fixed_noise = ckpt["step"], ckpt["fixed_noise"].to(device)
        utils.set_rng_state(ckpt["rng"], device)
        if step >= last_step:  # nothing to train: nothing is written
            print(f"{run_dir} is complete at step {step}: to train further, --resume it with more --epochs or"
                  " --max-steps")
            return
        print(f"resuming {run_dir} at step {step}")
    writer = SummaryWriter(run_dir, purge_step=step + 1 if ckpt else None)  # purge: no point logged twice
    if not ckpt:
        writer.add_text("config", f"```\n{json.dumps(vars(args), indent=2)}\n```", 0)
        writer.add_image("real", utils.image_grid(utils.to_model_range(images[:args.n_samples])), 0)

    def save_checkpoint():  # everything a resume needs, written atomically
        utils.save_checkpoint({
            "format": utils.CHECKPOINT_FORMAT, "script": SCRIPT, "args": vars(args), "step": step,
            "G_class": type(G).__name__, "G_args": G.model_args, "G": G.state_dict(), "D": D.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "G_ema": ema.state_dict() if ema else None,
            "fixed_noise": fixed_noise.cpu(), "rng": utils.rng_state(device)}, run_dir / "checkpoint.pt")

    def evaluation():  # on the features of the shipped classifier: evaluate.py
        result = evaluate.score(G_sample, args.eval_n, args.dataset, args.data_root, device)
        for name in evaluate.LOGGED:
            writer.add_scalar(f"eval/{name}", result[name], step)
        print(f"eval at step {step} ({args.eval_n} samples): " + "  ".join(f"{n} {result[n]:.4g}"
                                                                           for n in evaluate.LOGGED), flush=True)
        return result

    order = utils.batch_order(args.seed, len(images), step // steps_per_epoch)
    stop = utils.stop_on_signals()  # SIGINT/SIGTERM: the step finishes, a checkpoint is saved, then the exit
    while step < last_step and not stop:
        epoch, started = step // steps_per_epoch + 1, time.time()
        perm = torch.randperm(len(images), generator=order).to(device)
        sums, count = {}, 0  # the sums of this epoch's values (tensors: no host sync per step), over count steps
        first, end = step % steps_per_epoch, min(steps_per_epoch, step % steps_per_epoch + last_step - step)
        batches = tqdm(range(first, end), initial=first,
                       total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not args.progress)
        for batch in batches:
            real = utils.to_model_range(images[perm[batch * args.batch_size:(batch + 1) * args.batch_size]])
            z = torch.randn(args.batch_size, args.z_dim, device=device)
            # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
            # (2) Update G: maximize log D(G(z))
            loss_D, loss_G, d_real, d_fake = train_step(G, D, opt_G, opt_D, real, z)
            if ema:
                ema.update(G)
            step, count = step + 1, count + 1
            values = {"loss/D": loss_D, "loss/G": loss_G, "D(x)": d_real, "D(G(z))": d_fake}
            sums = {name: sums.get(name, 0) + value for name, value in values.items()}
            if step % args.log_every == 0:  # the only host sync of a step
                floats = utils.finite(step, values)
                for name, value in floats.items():
                    writer.add_scalar(name, value, step)
                batches.set_postfix({name: f"{value:.4g}" for name, value in floats.items()})
            if args.checkpoint_every and step % args.checkpoint_every == 0 and batch + 1 < end:  # (else: below)
                save_checkpoint()
            if stop:
                break

        # The epoch's end, or where the run stops inside it: means, the grid, a checkpoint, an evaluation.
        means = utils.finite(step, {k: v / count for k, v in sums.items()})
        for name, value in means.items():
            writer.add_scalar(f"epoch_mean/{name}", value, step)
        print(f"epoch {epoch}/{args.epochs}  step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  ({time.time() - started:.1f}s)", flush=True)
        whole = step % steps_per_epoch == 0
        if ema:
            ema.calibrate()  # BatchNorm statistics of the averaged weights (none in this generator: a no-op)
        utils.save_samples(writer, run_dir, generate(G_sample, fixed_noise).view(-1, *images.shape[1:]), step,
                           epoch if whole else None)
        save_checkpoint()
        if args.eval and args.eval_every and whole and epoch % args.eval_every == 0 and step < last_step and not stop:
            evaluation()

    if stop:
        writer.close()
        raise utils.UserError(f"stopped by {signal.Signals(stop['signal']).name}: the checkpoint of step {step}"
                              f" is saved; continue with --resume {run_dir}", 128 + stop["signal"])
    if args.eval:
        metrics = {"step": step, "n": args.eval_n, **evaluation(),
                   "classifier_sha256": evaluate.reference(args.dataset, args.data_root, device)[1]["sha256"]}
        utils.write_atomic(run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    writer.close()
    print(f"done: {run_dir} (step {step})")


if __name__ == "__main__":
    utils.run_main(main)
