"""Vanilla GAN (Goodfellow et al., 2014) with BCE loss: an MLP generator against a sigmoid MLP discriminator.

    python train_vanilla_gan.py                      # MNIST, 20 epochs
    tensorboard --logdir runs

D maximizes log D(x) + log(1 - D(G(z))); G maximizes log D(G(z)) (the non-saturating loss); both with Adam.
"""
from pathlib import Path

import torch

import evaluate
import utils
from models import EMA, Discriminator, Generator, batch_statistics

SCRIPT = Path(__file__).stem  # names its runs and checkpoints: a copy of this file is a script of its own
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
    add("--dataset", choices=sorted(utils.DATASETS), default="mnist")
    add("--epochs", type=utils.positive_int, default=20, help="passes over the training split")
    add("--batch-size", type=utils.positive_int, default=32)
    add("--lr", type=utils.positive_float, default=3e-4, help="Adam's learning rate (D's too unless --d-lr)")
    add("--d-lr", type=utils.positive_float, default=None,
        help="the discriminator's Adam learning rate, e.g. faster than G's (the two time-scale rule, Heusel et al."
             " 2017) (default: --lr)")
    add("--beta1", type=utils.fraction, default=0.5, help="Adam beta1 (0.5 as in DCGAN; the source: 0.9)")
    add("--beta2", type=utils.fraction, default=0.999, help="Adam beta2")
    add("--z-dim", type=utils.positive_int, default=64, help="size of the generator's noise")
    add("--g-hidden", type=utils.positive_int, nargs="+", default=[512, 1024], help="generator hidden widths")
    add("--d-hidden", type=utils.positive_int, nargs="+", default=[1024], help="discriminator hidden widths")
    add("--leaky-slope", type=utils.fraction, default=0.1, help="negative slope of every LeakyReLU")
    add("--d-dropout", type=utils.fraction, default=0.3, help="dropout after each hidden layer of D (0 = none)")
    utils.add_run_flags(parser, PRESETS, n_samples=32, ema_decay=0.999)
    return parser


def bce(p, target):
    """F.binary_cross_entropy for 0/1 targets, written out: the log clamped at -100 as there, and a zero gradient
    where a probability is exactly 0 (log's would be 0 * inf = NaN). A NaN in p gives a NaN loss, which stops the run in
    one line, where F.binary_cross_entropy raises (CPU) or kills the CUDA context."""
    q = torch.where(target > 0.5, p, 1 - p)
    zero = q == 0
    return -torch.where(zero, -100.0, q.masked_fill(zero, 1.0).log().clamp(min=-100)).mean()


def train_step(G, D, opt_G, opt_D, real, z):
    """One discriminator step, then one generator step on the same fake batch:

    (1) D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize [BCE(D(x), 1) + BCE(D(G(z)), 0)] / 2;
    (2) G: maximize log D(G(z)) (the non-saturating loss), i.e. minimize BCE(D(G(z)), 1), through the D of (1).

    The numbers of the textbook form (tests/textbook.py), with one D forward for real and fake and no retained graph.
    Returns (loss_D, loss_G, mean D(x), mean D(G(z))) as detached tensors: no host sync here.
    """
    assert not batch_statistics(D), "one forward over real and fake is two forwards only for a D without BatchNorm"
    batch = real.shape[0]
    fake = G(z)

    # (1) One forward over real and fake together (the same math as two: D has no batch statistics); the fake detached.
    d_out = D(torch.cat([real.flatten(1), fake.detach().flatten(1)]))
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
    # Flags (typed > --preset > a resumed run's > the defaults), the device, the seed, the data on the device, and
    # what the evaluation needs (checked now rather than after the training).
    args, ckpt = utils.parse_flags(make_parser(), PRESETS, SCRIPT, argv)
    device = utils.pick_device(args.device)
    utils.seed_everything(args.seed)
    images = utils.load_data(args, device)
    evaluate.before_training(args, device)

    # Networks, optimizers, the generator's weight average; then the run: new, or resumed with all of them restored.
    img_dim = args.img_size ** 2
    G = Generator(args.z_dim, img_dim, args.g_hidden, args.leaky_slope).to(device)
    D = Discriminator(img_dim, args.d_hidden, args.leaky_slope, args.d_dropout).to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **utils.fused(device))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.d_lr or args.lr, betas=(args.beta1, args.beta2),
                             **utils.fused(device))
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    run = utils.start_run(args, ckpt, SCRIPT, images, G=G, D=D, opt_G=opt_G, opt_D=opt_D, G_ema=ema)
    if run is None:  # a resumed run with nothing left to do
        return
    evaluate.if_due(run)  # one that a stopped or failed run owes

    while run.step < run.last_step and not run.stop:
        for real in utils.epoch_batches(run, images):
            z = torch.randn(args.batch_size, args.z_dim, device=device)
            # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
            # (2) Update G: maximize log D(G(z))
            loss_D, loss_G, d_real, d_fake = train_step(G, D, opt_G, opt_D, real, z)
            if ema:
                ema.update(G)
            run.step += 1
            values = {"loss/D": loss_D, "loss/G": loss_G, "D(x)": d_real, "D(G(z))": d_fake}
            if run.step % args.log_every == 0:  # the only host sync of a step
                for name, value in utils.finite(run.step, values).items():
                    run.writer.add_scalar(name, value, run.step)
            if utils.end_step(run, values):  # to the epoch means; a checkpoint when due; True after Ctrl-C or SIGTERM
                break
        utils.end_epoch(run)  # its means, the grid, a checkpoint
        evaluate.if_due(run)  # every --eval-every epochs, and at the end
    utils.finish(run)


if __name__ == "__main__":
    utils.run_main(main)
