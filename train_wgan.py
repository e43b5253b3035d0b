"""Wasserstein GAN with weight clipping (Arjovsky et al., 2017, Algorithm 1): an MLP generator against an MLP critic.

    python train_wgan.py                             # FashionMNIST, 24 epochs
    tensorboard --logdir runs

Critic: minimize -mean C(x) + mean C(G(z)), then clip every critic weight to [-c, c] (a crude Lipschitz bound).
Generator: every n_critic critic steps, minimize -mean C(G(z)). Both with RMSprop, as the paper advises.
"""
import sys
from pathlib import Path

import torch

import evaluate
import utils
from models import EMA, Critic, WGANGenerator, batch_statistics

SCRIPT = Path(__file__).stem  # names its runs and checkpoints: a copy of this file is a script of its own
# Algorithm 1 of the paper: --preset paper; the WGAN source's own run: --preset source. The defaults were chosen by
# measured sample quality per second of training (batch 128, the rate scaled by the square root of the batch), and
# --epochs before the clipped critic stops measuring: its Wasserstein estimate is near 0 by epoch 24 (at batch 64 it
# reached 0 near epoch 30, and FID climbed after it; README, Results; every setting tried: docs/tuning.md).
PAPER = {"lr": 5e-5, "clip_value": 0.01, "n_critic": 5, "batch_size": 64, "epochs": 20, "z_dim": 100, "img_size": 28,
         "g_widths": [128, 256, 512, 1024], "critic_widths": [512, 256], "ema_decay": 0.0}
PRESETS = {"default": {}, "paper": PAPER, "source": {**PAPER, "clip_value": 0.005, "n_critic": 25, "img_size": 32}}


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    add = parser.add_argument
    add("--dataset", choices=sorted(utils.DATASETS), default="fashion-mnist")
    add("--epochs", type=utils.positive_int, default=24, help="passes over the training split")
    add("--batch-size", type=utils.batch_norm_batch, default=128, help="images per critic step")
    add("--lr", type=utils.positive_float, default=1.4e-4, help="RMSprop's learning rate, both networks")
    add("--clip-value", type=utils.positive_float, default=0.01, help="critic weights clipped to [-c, c]")
    add("--n-critic", type=utils.positive_int, default=1, help="critic steps per generator step")
    add("--z-dim", type=utils.positive_int, default=100, help="size of the generator's noise")
    add("--g-widths", type=utils.positive_int, nargs="+", default=[128, 256, 512, 1024],
        help="generator block widths (BatchNorm1d in all but the first)")
    add("--critic-widths", type=utils.positive_int, nargs="+", default=[512, 256], help="critic hidden widths")
    utils.add_run_flags(parser, PRESETS, n_samples=64, ema_decay=0.998)
    return parser


def critic_step(G, C, opt_C, real, z, clip_value):
    """One critic step, minimize -mean C(x) + mean C(G(z)), then clip every critic weight to [-c, c].

    The numbers of the textbook form (tests/textbook.py), with one critic forward for real and fake and one clamp
    kernel for all weights. Returns the critic loss (detached: no host sync).
    """
    assert not batch_statistics(C), "one forward over real and fake is two forwards only for a critic without BatchNorm"
    with torch.no_grad():  # the fake is a constant here: no graph through G
        fake = G(z)
    batch = real.shape[0]
    scores = C(torch.cat([real.flatten(1), fake.flatten(1)]))  # the same math as two forwards: no batch statistics
    loss_C = scores[batch:].mean() - scores[:batch].mean()
    opt_C.zero_grad(set_to_none=True)
    loss_C.backward()
    opt_C.step()
    with torch.no_grad():
        params = list(C.parameters())
        torch._foreach_clamp_min_(params, -clip_value)
        torch._foreach_clamp_max_(params, clip_value)
    return loss_C.detach()


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
    C = Critic(img_shape, args.critic_widths).to(device)
    opt_G = torch.optim.RMSprop(G.parameters(), lr=args.lr, foreach=True)  # one kernel for all weights
    opt_C = torch.optim.RMSprop(C.parameters(), lr=args.lr, foreach=True)
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    run = utils.start_run(args, ckpt, SCRIPT, images, G=G, C=C, opt_G=opt_G, opt_C=opt_C, G_ema=ema)
    if run is None:  # a resumed run with nothing left to do
        return
    evaluate.if_due(run)  # one that a stopped or failed run owes

    critic_warned = False
    while run.step < run.last_step and not run.stop:
        for real in utils.epoch_batches(run, images):
            run.step += 1
            # (1) Update the critic: maximize mean C(x) - mean C(G(z)), then clip its weights to [-c, c]
            z = torch.randn(args.batch_size, args.z_dim, device=device)
            loss_C = critic_step(G, C, opt_C, real, z, args.clip_value)
            values = {"loss/critic": loss_C, "wasserstein_estimate": -loss_C}
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
        means = utils.end_epoch(run)  # its means, the grid, a checkpoint
        if means.get("wasserstein_estimate", 1) <= 0 and not critic_warned:  # said once: it tends to stay near 0
            critic_warned = True
            print(f"warning: the Wasserstein estimate is {means['wasserstein_estimate']:.2e} at step {run.step}: the"
                  " critic no longer tells real from fake and samples tend to get worse; stop (Ctrl-C keeps the"
                  " checkpoint) or train fewer --epochs", file=sys.stderr)
        evaluate.if_due(run)  # every --eval-every epochs, and at the end
    utils.finish(run)


if __name__ == "__main__":
    utils.run_main(main)
