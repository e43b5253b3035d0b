"""Wasserstein GAN with weight clipping (Arjovsky et al., 2017, Algorithm 1): an MLP generator against a linear critic.

    python train_wgan.py                             # FashionMNIST, 50 epochs
    tensorboard --logdir runs

Critic: minimize -mean C(x) + mean C(G(z)), then clip every critic weight to [-c, c] (a crude Lipschitz bound).
Generator: every n_critic critic steps, minimize -mean C(G(z)). Both with RMSprop, as the paper advises.
"""
import argparse
import sys
import time

import torch
from tqdm import tqdm

import evaluate
import utils
from models import Critic, WGANGenerator

ALGO = "wgan"


# Algorithm 1 of the paper: `--preset paper`; the WGAN source's own run: `--preset source`. The defaults were chosen by
# measured sample quality at 10 epochs (README, Results; every run tried is in docs/tuning.md).
PAPER = {"lr": 5e-5, "clip_value": 0.01, "n_critic": 5, "batch_size": 64, "z_dim": 100, "img_size": 28,
         "g_widths": [128, 256, 512, 1024], "critic_widths": [512, 256], "ema_decay": 0.0}
PRESETS = {
    "default": {},
    "paper": PAPER,
    "source": {**PAPER, "clip_value": 0.005, "n_critic": 25, "img_size": 32},
}
LEGACY = {"preset": None}  # flags that checkpoints written before they existed lack (see train_vanilla_gan.py)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="a set of defaults (flags typed explicitly override it): " + utils.preset_help(PRESETS))
    utils.add_common_args(parser, dataset="fashion-mnist", epochs=50, batch_size=64, lr=1e-4, z_dim=100, img_size=28,
                          log_every=100)
    parser.add_argument("--clip-value", type=utils.positive_float, default=0.01,
                        help="critic weights clipped to [-c, c]")
    parser.add_argument("--n-critic", type=utils.positive_int, default=1, help="critic steps per generator step")
    parser.add_argument("--g-widths", type=utils.positive_int, nargs="+", default=[128, 256, 512, 1024],
                        help="generator block widths (BatchNorm1d in all but the first)")
    parser.add_argument("--critic-widths", type=utils.positive_int, nargs="+", default=[512, 256],
                        help="critic hidden widths")
    parser.add_argument("--ema-decay", type=utils.fraction, default=0.998,
                        help="decay of the generator's weight average used for samples and evaluations (0 = off)")
    parser.add_argument("--n-samples", type=utils.positive_int, default=64, help="size of the fixed noise batch")
    return parser


def critic_step(G, C, opt_C, real, z, clip_value):
    """One critic step and the weight clipping after it. Returns the critic loss (detached: no host sync)."""
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
    """One generator step: minimize -mean C(G(z)); gradients go to G only. Returns the loss (detached)."""
    loss_G = -C(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=list(G.parameters()))
    opt_G.step()
    return loss_G.detach()


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

    G = WGANGenerator(args.z_dim, img_shape, args.g_widths).to(device)
    C = Critic(img_shape, args.critic_widths).to(device)
    opt_G = torch.optim.RMSprop(G.parameters(), lr=args.lr, **utils.optimizer_kwargs(device, fused=False))
    opt_C = torch.optim.RMSprop(C.parameters(), lr=args.lr, **utils.optimizer_kwargs(device, fused=False))
    fixed_noise = torch.randn(args.n_samples, args.z_dim, device=device)
    step = 0  # critic steps (one per batch); the generator steps after every n_critic-th
    parts = {"G": G, "C": C, "opt_G": opt_G, "opt_C": opt_C, "order": order}  # all a checkpoint restores
    if ckpt:
        fixed_noise, step = utils.restore_run_state(ckpt, parts, device)
        print(f"resuming {run_dir} at step {step} (epoch {order.epoch + 1}, batch {order.position})")
    ema = utils.make_ema(G, args.ema_decay, ckpt, parts)  # restored, or a copy of G
    G_sample = ema.model if ema else G  # what the grids and evaluations draw from
    writer = utils.open_writer(run_dir, args, resume_step=step if ckpt else None)
    if not ckpt:
        writer.add_image("real", utils.image_grid(utils.to_model_range(images[:args.n_samples])), 0)

    def save_checkpoint():
        utils.check_finite(step, G=G, C=C)  # never write a diverged state over the last good one
        utils.save_checkpoint(utils.run_state(ALGO, args, step, fixed_noise, parts), run_dir / utils.CHECKPOINT)

    run_eval = evaluate.TrainingEval(args, device)
    max_steps = args.max_steps or float("inf")
    loss_G = None
    with utils.StopSignals() as stop:
        while order.epoch < args.epochs and step < max_steps and not stop.signum:
            started, epoch_sums, epoch_steps = time.time(), torch.zeros(2, device=device), [0, 0]
            bar = tqdm(order.batches(device), total=order.steps_per_epoch, initial=order.position,
                       disable=not args.progress, desc=f"epoch {order.epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True)
            for idx in bar:
                real = utils.to_model_range(images[idx])
                z = torch.randn(args.batch_size, args.z_dim, device=device)
                loss_C = critic_step(G, C, opt_C, real, z, args.clip_value)
                step += 1
                epoch_sums[0] += loss_C
                epoch_steps[0] += 1
                if step % args.n_critic == 0:
                    z = torch.randn(args.batch_size, args.z_dim, device=device)
                    loss_G = generator_step(G, C, opt_G, z)
                    if ema:
                        ema.update(G)
                    epoch_sums[1] += loss_G
                    epoch_steps[1] += 1
                if step % args.log_every == 0:
                    values = {"loss/critic": loss_C, "wasserstein_estimate": -loss_C}
                    if loss_G is not None:
                        values["loss/G"] = loss_G
                    bar.set_postfix(utils.log_scalars(writer, step, values))
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    save_checkpoint()
                if stop.signum or step >= max_steps:
                    break
            bar.close()
            if epoch_steps[0]:
                mean_critic = epoch_sums[0] / epoch_steps[0]
                means = {"loss/critic": mean_critic, "wasserstein_estimate": -mean_critic}
                if epoch_steps[1]:
                    means["loss/G"] = epoch_sums[1] / epoch_steps[1]
                means = utils.log_scalars(writer, step, means, tag="epoch_mean/")
                utils.print_epoch(order.epoch + 1, args.epochs, step, means, time.time() - started)
            epoch_done = order.position == order.steps_per_epoch
            if epoch_done or stop.signum or step >= max_steps:  # the grid of each epoch, and of where a run stops
                if ema:
                    ema.calibrate()  # BatchNorm statistics of the averaged weights (saving does it too)
                G_sample.eval()  # sample with BatchNorm's running statistics, not the fixed batch's own
                with torch.no_grad():
                    fakes = G_sample(fixed_noise)
                G.train()
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
