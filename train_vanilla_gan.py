"""Vanilla GAN (Goodfellow et al., 2014) with BCE loss: an MLP generator against a sigmoid MLP discriminator.

    python train_vanilla_gan.py                      # MNIST, 20 epochs
    tensorboard --logdir runs

D maximizes log D(x) + log(1 - D(G(z))); G maximizes log D(G(z)) (the non-saturating loss); both with Adam.
"""
import torch

import config
import data
import training
import utils
from models import Discriminator, Generator

ALGO = "vanilla_gan"


# The source's settings (simple-GAN tutorial): `--preset source`. The defaults were chosen by measured sample quality
# at 10 epochs, and --epochs where more epochs stop helping: FID levels off by epoch 17-20 (README, "The plain
# commands, to their end"; every run tried is in docs/tuning.md).
PRESETS = {
    "default": {},
    "source": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "batch_size": 32, "z_dim": 64, "g_hidden": [256],
               "d_hidden": [128], "leaky_slope": 0.1, "d_dropout": 0.0, "ema_decay": 0.0},
}


def make_parser():
    parser = config.make_parser(__doc__, PRESETS, dataset="mnist", epochs=20, batch_size=32, lr=3e-4, z_dim=64,
                                img_size=28, log_every=100)
    parser.add_argument("--beta1", type=utils.fraction, default=0.5,
                        help="Adam beta1 (0.5 as in DCGAN; the source: 0.9)")
    parser.add_argument("--beta2", type=utils.fraction, default=0.999, help="Adam beta2")
    parser.add_argument("--g-hidden", type=utils.width, nargs="+", default=[512, 1024],
                        help="generator hidden widths")
    parser.add_argument("--d-hidden", type=utils.width, nargs="+", default=[1024],
                        help="discriminator hidden widths")
    parser.add_argument("--leaky-slope", type=utils.fraction, default=0.1, help="negative slope of every LeakyReLU")
    parser.add_argument("--d-dropout", type=utils.fraction, default=0.3,
                        help="dropout after each hidden layer of D (0 = none)")
    parser.add_argument("--ema-decay", type=utils.fraction, default=0.999,
                        help="decay of the generator's weight average used for samples and evaluations (0 = off)")
    parser.add_argument("--n-samples", type=utils.N_SAMPLES, default=32, help="size of the fixed noise batch")
    return parser


def bce(p, target):
    """F.binary_cross_entropy for 0/1 targets (the log clamped at -100, as there), written out: a NaN in p gives a NaN
    loss that the loop reports as divergence, where F.binary_cross_entropy raises (CPU) or kills the CUDA context."""
    return -torch.where(target > 0.5, p, 1 - p).log().clamp(min=-100).mean()


def train_step(G, D, opt_G, opt_D, real, z):
    """One discriminator step, then one generator step on the same fake batch:

    (1) D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize [BCE(D(x), 1) + BCE(D(G(z)), 0)] / 2;
    (2) G: maximize log D(G(z)) (the non-saturating loss), i.e. minimize BCE(D(G(z)), 1), through the D of (1).

    The same numbers as the textbook form, textbook.vanilla_gan_step (tests/test_steps.py), with one D forward for
    real and fake and no retained graph. Returns (loss_D, loss_G, mean D(x), mean D(G(z))) as detached tensors: no
    host sync here.
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


def make_networks(cfg, img_shape):
    """G and D of this run, from its flags."""
    img_dim = img_shape[0] * img_shape[1] * img_shape[2]
    return (Generator(cfg.z_dim, img_dim, cfg.g_hidden, cfg.leaky_slope),
            Discriminator(img_dim, cfg.d_hidden, cfg.leaky_slope, cfg.d_dropout))


def main(argv=None):
    # Setup (plumbing shared with train_wgan.py, in training.py): configuration, device, seed, data on the device.
    cfg, ckpt, device = training.setup(make_parser(), argv, PRESETS, ALGO)
    images = data.load_train_images(cfg.dataset, cfg.data_root, cfg.img_size, device)
    G, D = training.build_networks(make_networks, cfg, images, device)  # refused up front if they cannot fit
    fast = utils.optimizer_kwargs(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fast)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fast)
    # The run folder (a --resume restores all of these from its checkpoint), TensorBoard, the weight average of G.
    run = training.Run(ALGO, cfg, images, ckpt, G=G, D=D, opt_G=opt_G, opt_D=opt_D)

    with run:  # SIGINT/SIGTERM only set a flag: the step finishes, a checkpoint is saved, then the exit
        while run.continues():  # epochs left, --max-steps not reached, no signal
            for _, idx in run.epoch_batches():  # the epoch's batches; it ends early at --max-steps or on a signal
                run.set_learning_rates(opt_D, opt_G)  # --lr, falling linearly to 0 over the last --lr-decay of the run
                real = data.to_model_range(images[idx])
                z = torch.randn(cfg.batch_size, cfg.z_dim, device=device)
                # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
                # (2) Update G: maximize log D(G(z))
                loss_D, loss_G, d_real, d_fake = train_step(G, D, opt_G, opt_D, real, z)
                run.update_average(G)
                run.record({"loss/D": loss_D, "loss/G": loss_G, "D(x)": d_real, "D(G(z))": d_fake})
                run.after_step()  # TensorBoard every --log-every steps, a checkpoint every --checkpoint-every
            run.end_epoch()  # epoch means; sample grid; every --eval-every epochs an evaluation; checkpoint
    run.finish()  # the final evaluation, metrics.json


if __name__ == "__main__":
    utils.run_main(main)
