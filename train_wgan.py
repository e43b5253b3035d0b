"""Wasserstein GAN with weight clipping (Arjovsky et al., 2017, Algorithm 1): an MLP generator against a linear critic.

    python train_wgan.py                             # FashionMNIST, 20 epochs
    tensorboard --logdir runs

Critic: minimize -mean C(x) + mean C(G(z)), then clip every critic weight to [-c, c] (a crude Lipschitz bound).
Generator: every n_critic critic steps, minimize -mean C(G(z)). Both with RMSprop, as the paper advises.
"""
import sys

import torch

import config
import data
import training
import utils
from models import Critic, WGANGenerator

ALGO = "wgan"


# Algorithm 1 of the paper: `--preset paper`; the WGAN source's own run: `--preset source`. The defaults were chosen by
# measured sample quality at 10 epochs, and --epochs before the clipped critic stops measuring: its Wasserstein estimate
# reaches 0 near epoch 30 and FID rises after it (README, "The plain commands, to their end"; every run tried
# is in docs/tuning.md).
PAPER = {"lr": 5e-5, "clip_value": 0.01, "n_critic": 5, "batch_size": 64, "z_dim": 100, "img_size": 28,
         "g_widths": [128, 256, 512, 1024], "critic_widths": [512, 256], "ema_decay": 0.0}
PRESETS = {
    "default": {},
    "paper": PAPER,
    "source": {**PAPER, "clip_value": 0.005, "n_critic": 25, "img_size": 32},
}


def make_parser():
    parser = config.make_parser(__doc__, PRESETS, dataset="fashion-mnist", epochs=20, batch_size=64, lr=1e-4,
                                z_dim=100, img_size=28, log_every=100,
                                min_batch=(2, "BatchNorm needs 2 or more images per batch"))
    parser.add_argument("--clip-value", type=utils.positive_float, default=0.01,
                        help="critic weights clipped to [-c, c]")
    parser.add_argument("--n-critic", type=utils.positive_int, default=1, help="critic steps per generator step")
    parser.add_argument("--g-widths", type=utils.width, nargs="+", default=[128, 256, 512, 1024],
                        help="generator block widths (BatchNorm1d in all but the first)")
    parser.add_argument("--critic-widths", type=utils.width, nargs="+", default=[512, 256],
                        help="critic hidden widths")
    parser.add_argument("--ema-decay", type=utils.fraction, default=0.998,
                        help="decay of the generator's weight average used for samples and evaluations (0 = off)")
    parser.add_argument("--n-samples", type=utils.N_SAMPLES, default=64, help="size of the fixed noise batch")
    return parser


def critic_step(G, C, opt_C, real, z, clip_value):
    """One critic step, minimize -mean C(x) + mean C(G(z)), then clip every critic weight to [-c, c].

    The same numbers as the textbook form, textbook.wgan_step (tests/test_steps.py), with one critic forward for real
    and fake and one clamp kernel for all weights. Returns the critic loss (detached: no host sync).
    """
    with torch.no_grad():  # the fake is a constant here: no graph through G
        fake = G(z)
    batch = real.shape[0]
    # One forward over both: the critic has no batch statistics, so this is the same math as two.
    scores = C(torch.cat([real.flatten(1), fake.flatten(1)]))
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
    """One generator step: minimize -mean C(G(z)); gradients go to G only (textbook.wgan_step with z_g). Returns the
    loss (detached)."""
    loss_G = -C(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()
    return loss_G.detach()


def make_networks(cfg, img_shape):
    """G and the critic of this run, from its flags."""
    return WGANGenerator(cfg.z_dim, img_shape, cfg.g_widths), Critic(img_shape, cfg.critic_widths)


def main(argv=None):
    # Setup (plumbing shared with train_vanilla_gan.py, in training.py): configuration, device, seed, data.
    cfg, ckpt, device = training.setup(make_parser(), argv, PRESETS, ALGO)
    images = data.load_train_images(cfg.dataset, cfg.data_root, cfg.img_size, device)
    G, C = training.build_networks(make_networks, cfg, images, device)  # refused up front if they cannot fit
    opt_G = torch.optim.RMSprop(G.parameters(), lr=cfg.lr, **utils.optimizer_kwargs(device, fused=False))
    opt_C = torch.optim.RMSprop(C.parameters(), lr=cfg.lr, **utils.optimizer_kwargs(device, fused=False))
    # The run folder (a --resume restores all of these from its checkpoint), TensorBoard, the weight average of G.
    run = training.Run(ALGO, cfg, images, ckpt, G=G, C=C, opt_G=opt_G, opt_C=opt_C)

    critic_warned = False  # said once per process: the estimate tends to stay near 0 once there
    with run:  # SIGINT/SIGTERM only set a flag: the step finishes, a checkpoint is saved, then the exit
        while run.continues():  # epochs left, --max-steps not reached, no signal
            for step, idx in run.epoch_batches():  # step counts critic steps; ends early at --max-steps or on a signal
                run.set_learning_rates(opt_C, opt_G)  # --lr, falling linearly to 0 over the last --lr-decay of the run
                # (1) Update the critic: maximize mean C(x) - mean C(G(z)), then clip its weights to [-c, c]
                real = data.to_model_range(images[idx])
                z = torch.randn(cfg.batch_size, cfg.z_dim, device=device)
                loss_C = critic_step(G, C, opt_C, real, z, cfg.clip_value)
                run.record({"loss/critic": loss_C, "wasserstein_estimate": -loss_C})
                # (2) Update G every n_critic critic steps: maximize mean C(G(z))
                if step % cfg.n_critic == 0:
                    loss_G = generator_step(G, C, opt_G, torch.randn(cfg.batch_size, cfg.z_dim, device=device))
                    run.update_average(G)
                    run.record({"loss/G": loss_G})
                run.after_step()  # TensorBoard every --log-every steps, a checkpoint every --checkpoint-every
            means = run.end_epoch()  # epoch means; sample grid; every --eval-every epochs an evaluation; checkpoint
            if means.get("wasserstein_estimate", 1.0) <= 0 and not critic_warned:  # the critic stopped measuring
                critic_warned = True
                print(f"warning: the Wasserstein estimate of the epoch ending at step {run.step} is"
                      f" {means['wasserstein_estimate']:.2e}, at or below 0: the critic no longer tells real images"
                      " from generated ones, and samples tend to get worse from here on: stop the run (Ctrl-C keeps"
                      " its checkpoint) and score it with evaluate.py, or train with fewer --epochs", file=sys.stderr)
    run.finish()  # the final evaluation, metrics.json


if __name__ == "__main__":
    utils.run_main(main)
