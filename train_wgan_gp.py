"""WGAN with a gradient penalty (Gulrajani et al., 2017, Algorithm 1): an MLP generator against an MLP critic.

    python train_wgan_gp.py                          # FashionMNIST, 50 epochs
    tensorboard --logdir runs

Critic: minimize mean C(G(z)) - mean C(x) + lambda * mean_i (||grad C(x_hat_i)||_2 - 1)^2, x_hat_i = eps_i x_i +
(1 - eps_i) G(z_i), eps_i ~ U[0, 1] one per sample: a soft 1-Lipschitz bound where clipping was a crude one.
Generator: every n_critic critic steps, minimize -mean C(G(z)). Both with Adam, as the paper advises.
"""
import argparse
from pathlib import Path

import torch

import evaluate
import utils
from models import EMA, Critic, WGANGenerator, batch_statistics

SCRIPT = Path(__file__).stem  # names its runs and checkpoints: a copy of this file is a script of its own
# Algorithm 1 of the paper: --preset paper. The defaults differ where they measured better (docs/tuning.md, "WGAN-GP"):
# Adam 1e-3 (not 1e-4) with the official MNIST code's betas (0.5, 0.9), and a weight average of G for the samples.
PAPER = {"lr": 1e-4, "beta1": 0.0, "beta2": 0.9, "gp_weight": 10.0, "n_critic": 5, "batch_size": 64, "ema_decay": 0.0,
         "z_dim": 100, "img_size": 28, "g_widths": [128, 256, 512, 1024], "critic_widths": [512, 256],
         "layer_norm": False}
PRESETS = {"default": {}, "paper": PAPER}


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    add = parser.add_argument
    add("--dataset", choices=sorted(utils.DATASETS), default="fashion-mnist")
    add("--epochs", type=utils.positive_int, default=50, help="passes over the training split")
    add("--batch-size", type=utils.batch_norm_batch, default=64, help="images per critic step")
    add("--lr", type=utils.positive_float, default=1e-3, help="Adam's learning rate, both networks (Algorithm 1: 1e-4)")
    add("--beta1", type=utils.fraction, default=0.5, help="Adam beta1 (Algorithm 1: 0)")
    add("--beta2", type=utils.fraction, default=0.9, help="Adam beta2")
    add("--gp-weight", type=utils.positive_float, default=10.0, help="lambda, the gradient penalty's weight")
    add("--n-critic", type=utils.positive_int, default=5, help="critic steps per generator step")
    add("--z-dim", type=utils.positive_int, default=100, help="size of the generator's noise")
    add("--g-widths", type=utils.positive_int, nargs="+", default=[128, 256, 512, 1024],
        help="generator block widths (BatchNorm1d in all but the first)")
    add("--critic-widths", type=utils.positive_int, nargs="+", default=[512, 256], help="critic hidden widths")
    add("--layer-norm", action=argparse.BooleanOptionalAction, default=False,
        help="a LayerNorm after each hidden Linear of the critic; off by default (per sample: BatchNorm would break"
        " the per-sample penalty)")
    utils.add_run_flags(parser, PRESETS, n_samples=64, ema_decay=0.998)
    return parser


def critic_step(G, C, opt_C, real, z, eps, gp_weight):
    """One critic step: minimize mean C(G(z)) - mean C(x) + gp_weight * mean_i (||grad_x C(x_hat_i)||_2 - 1)^2.

    eps: one U[0, 1] weight per sample (not per pixel), so x_hat_i lies on the line from G(z_i) to x_i; the norm is
    per sample over all its pixels; create_graph=True so that the penalty's own gradient reaches the critic. The
    numbers of the textbook form (tests/textbook.py), with one critic forward for the three batches (the critic has no
    batch statistics: a per-sample penalty would be wrong with them). Returns (loss, Wasserstein estimate mean C(x) -
    mean C(G(z)), penalty, mean gradient norm), detached: no host sync.
    """
    assert not batch_statistics(C), "a per-sample penalty (and one forward for three batches) needs a critic without BatchNorm"
    with torch.no_grad():  # the fake is a constant here: no graph through G
        fake = G(z).flatten(1)
    real, batch = real.flatten(1), real.shape[0]
    x_hat = torch.lerp(fake, real, eps.view(batch, 1)).requires_grad_(True)  # eps_i x_i + (1 - eps_i) G(z_i)
    scores = C(torch.cat([real, fake, x_hat]))
    grad, = torch.autograd.grad(scores[2 * batch:].sum(), x_hat, create_graph=True)  # row i: grad of C at x_hat_i
    grad_norm = grad.norm(2, dim=1)
    penalty = ((grad_norm - 1) ** 2).mean()
    wasserstein = scores[:batch].mean() - scores[batch:2 * batch].mean()
    loss_C = gp_weight * penalty - wasserstein
    opt_C.zero_grad(set_to_none=True)
    loss_C.backward(inputs=list(C.parameters()))  # not into x_hat: nothing reads that gradient
    opt_C.step()
    return loss_C.detach(), wasserstein.detach(), penalty.detach(), grad_norm.mean().detach()


def generator_step(G, C, opt_G, z):
    """One generator step: minimize -mean C(G(z)); gradients go to G only. Returns the loss (detached)."""
    loss_G = -C(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()
    return loss_G.detach()


def main(argv=None):
    # Flags (typed > --preset > a resumed run's > the defaults), the device, the seed, the data on the device, and
    # what the evaluation needs (checked now rather than after the training).
    args, ckpt = utils.parse_flags(make_parser(), PRESETS, SCRIPT, argv)
    device = utils.pick_device(args.device)
    utils.seed_everything(args.seed)
    images = utils.load_data(args, device)
    evaluate.before_training(args, device)

    # Networks, optimizers, the generator's weight average; then the run: new, or resumed with all of them restored.
    img_shape = tuple(images.shape[1:])
    G = WGANGenerator(args.z_dim, img_shape, args.g_widths).to(device)
    C = Critic(img_shape, args.critic_widths, args.layer_norm).to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **utils.fused(device))
    opt_C = torch.optim.Adam(C.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **utils.fused(device))
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    run = utils.start_run(args, ckpt, SCRIPT, images, G=G, C=C, opt_G=opt_G, opt_C=opt_C, G_ema=ema)
    if run is None:  # a resumed run with nothing left to do
        return
    evaluate.if_due(run)  # one that a stopped or failed run owes

    while run.step < run.last_step and not run.stop:
        for real in utils.epoch_batches(run, images):
            run.step += 1
            # (1) Update the critic: maximize mean C(x) - mean C(G(z)) - lambda * (||grad C(x_hat)|| - 1)^2
            z = torch.randn(args.batch_size, args.z_dim, device=device)
            eps = torch.rand(args.batch_size, device=device)
            loss_C, wasserstein, penalty, grad_norm = critic_step(G, C, opt_C, real, z, eps, args.gp_weight)
            values = {"loss/critic": loss_C, "wasserstein_estimate": wasserstein, "gradient_penalty": penalty,
                      "grad_norm": grad_norm}
            # (2) Update G every n_critic critic steps: maximize mean C(G(z))
            if run.step % args.n_critic == 0:
                values["loss/G"] = generator_step(G, C, opt_G, torch.randn(args.batch_size, args.z_dim, device=device))
                if ema:
                    ema.update(G)
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
