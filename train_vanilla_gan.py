"""Vanilla GAN (Goodfellow et al., 2014) with BCE loss: an MLP generator against a sigmoid MLP discriminator.

    python train_vanilla_gan.py                      # MNIST, 50 epochs
    tensorboard --logdir runs

D maximizes log D(x) + log(1 - D(G(z))); G maximizes log D(G(z)) (the non-saturating loss); both with Adam.
"""
import argparse
import sys
import time

import torch
from tqdm import tqdm

import evaluate
import utils
from models import Discriminator, Generator

ALGO = "vanilla_gan"


# The source's settings (simple-GAN tutorial): `--preset source`. The defaults were chosen by measured sample quality
# at 10 epochs (README, Results; every run tried is in docs/tuning.md).
PRESETS = {
    "default": {},
    "source": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "batch_size": 32, "z_dim": 64, "g_hidden": [256],
               "d_hidden": [128], "leaky_slope": 0.1, "d_dropout": 0.0, "ema_decay": 0.0},
}
# Flags that checkpoints written before they existed lack, with the values that code trained with.
# (A run without the average gets one on resume, started as a copy of G.)
LEGACY = {"preset": None, "leaky_slope": 0.1, "d_dropout": 0.0}


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="a set of defaults (flags typed explicitly override it): " + utils.preset_help(PRESETS))
    utils.add_common_args(parser, dataset="mnist", epochs=50, batch_size=32, lr=3e-4, z_dim=64, img_size=28,
                          log_every=100)
    parser.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (0.5 as in DCGAN; the source: 0.9)")
    parser.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    parser.add_argument("--g-hidden", type=utils.positive_int, nargs="+", default=[512, 1024],
                        help="generator hidden widths")
    parser.add_argument("--d-hidden", type=utils.positive_int, nargs="+", default=[1024],
                        help="discriminator hidden widths")
    parser.add_argument("--leaky-slope", type=utils.fraction, default=0.1, help="negative slope of every LeakyReLU")
    parser.add_argument("--d-dropout", type=utils.fraction, default=0.3,
                        help="dropout after each hidden layer of D (0 = none)")
    parser.add_argument("--ema-decay", type=utils.fraction, default=0.999,
                        help="decay of the generator's weight average used for samples and evaluations (0 = off)")
    parser.add_argument("--n-samples", type=utils.positive_int, default=32, help="size of the fixed noise batch")
    return parser


def bce(p, target):
    """F.binary_cross_entropy for 0/1 targets (the log clamped at -100, as there), written out: a NaN in p gives a NaN
    loss that the loop reports as divergence, where F.binary_cross_entropy raises (CPU) or kills the CUDA context."""
    return -torch.where(target > 0.5, p, 1 - p).log().clamp(min=-100).mean()


def train_step(G, D, opt_G, opt_D, real, z):
    """One discriminator step, then one generator step on the same fake batch.

    Returns (loss_D, loss_G, mean D(x), mean D(G(z))) as detached tensors: no host sync here.
    """
    batch = real.shape[0]
    fake = G(z)

    # D: minimize BCE(D(x), 1) + BCE(D(G(z)), 0), halved. One forward over real and fake together (D has no batch
    # statistics, so this is the same math); the fake is detached so no gradient reaches G.
    d_out = D(torch.cat([real.flatten(1), fake.detach()]))
    targets = torch.cat([torch.ones(batch, 1, device=real.device), torch.zeros(batch, 1, device=real.device)])
    loss_D = bce(d_out, targets)  # the mean over 2B = the average of the two halves' means
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()

    # G: non-saturating loss, minimize BCE(D(G(z)), 1) = -log D(G(z)) through the updated D. Gradients go to G only.
    loss_G = bce(D(fake), targets[:batch])
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()
    return loss_D.detach(), loss_G.detach(), d_out[:batch].mean().detach(), d_out[batch:].mean().detach()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    utils.apply_preset(args, parser, argv, PRESETS)
    ckpt = utils.resume_config(args, parser, argv, ALGO, LEGACY) if args.resume else None
    device = utils.select_device(args.device)
    utils.seed_everything(args.seed)

    images = utils.load_train_images(args.dataset, args.data_root, args.img_size, device)
    order = utils.EpochOrder(len(images), args.batch_size, args.seed)
    run_dir = utils.make_run_dir(args, ALGO)  # only once the data loaded: a failed start leaves no empty run
    img_shape = tuple(images.shape[1:])
    img_dim = images[0].numel()

    G = Generator(args.z_dim, img_dim, args.g_hidden, args.leaky_slope).to(device)
    D = Discriminator(img_dim, args.d_hidden, args.leaky_slope, args.d_dropout).to(device)
    fast = utils.optimizer_kwargs(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fast)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fast)
    fixed_noise = torch.randn(args.n_samples, args.z_dim, device=device)
    step = 0
    parts = {"G": G, "D": D, "opt_G": opt_G, "opt_D": opt_D, "order": order}  # all a checkpoint restores
    if ckpt:
        fixed_noise, step = utils.restore_run_state(ckpt, parts, device)
        print(f"resuming {run_dir} at step {step} (epoch {order.epoch + 1}, batch {order.position})")
    ema = utils.make_ema(G, args.ema_decay, ckpt, parts)  # restored, or a copy of G
    G_sample = ema.model if ema else G  # what the grids and evaluations draw from
    writer = utils.open_writer(run_dir, args, resume_step=step if ckpt else None)
    if not ckpt:
        writer.add_image("real", utils.image_grid(utils.to_model_range(images[:args.n_samples])), 0)

    def save_checkpoint():
        utils.check_finite(step, G=G, D=D)  # never write a diverged state over the last good one
        utils.save_checkpoint(utils.run_state(ALGO, args, step, fixed_noise, parts), run_dir / utils.CHECKPOINT)

    run_eval = evaluate.TrainingEval(args, device)
    names = ("loss/D", "loss/G", "D(x)", "D(G(z))")
    max_steps = args.max_steps or float("inf")
    with utils.StopSignals() as stop:
        while order.epoch < args.epochs and step < max_steps and not stop.signum:
            started, epoch_sums, epoch_steps = time.time(), torch.zeros(len(names), device=device), 0
            bar = tqdm(order.batches(device), total=order.steps_per_epoch, initial=order.position,
                       disable=not args.progress, desc=f"epoch {order.epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True)
            for idx in bar:
                real = utils.to_model_range(images[idx])
                z = torch.randn(args.batch_size, args.z_dim, device=device)
                values = torch.stack(train_step(G, D, opt_G, opt_D, real, z))
                if ema:
                    ema.update(G)
                step += 1
                epoch_sums += values
                epoch_steps += 1
                if step % args.log_every == 0:
                    bar.set_postfix(utils.log_scalars(writer, step, dict(zip(names, values))))
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    save_checkpoint()
                if stop.signum or step >= max_steps:
                    break
            bar.close()
            if epoch_steps:
                means = utils.log_scalars(writer, step, dict(zip(names, epoch_sums / epoch_steps)), tag="epoch_mean/")
                utils.print_epoch(order.epoch + 1, args.epochs, step, means, time.time() - started)
            epoch_done = order.position == order.steps_per_epoch
            if epoch_done or stop.signum or step >= max_steps:  # the grid of each epoch, and of where a run stops
                if ema:
                    ema.calibrate()  # BatchNorm statistics of the averaged weights (saving does it too)
                with torch.no_grad():
                    fakes = G_sample(fixed_noise).view(-1, *img_shape)
                utils.log_samples(writer, run_dir, fakes, step, order.epoch + 1 if epoch_done else None)
            if epoch_done:
                order.next_epoch()
                run_eval.after_epoch(G_sample, writer, step, order.epoch)
            save_checkpoint()
    if stop.signum:
        utils.close_writer(writer)
        raise utils.Interrupted(stop.signum)
    run_eval.final(G_sample, writer, step, run_dir)
    utils.close_writer(writer)
    print(f"done: {run_dir} (step {step})")


if __name__ == "__main__":
    utils.run_main(main)
