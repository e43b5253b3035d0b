"""WGAN with a gradient penalty (Gulrajani et al., 2017, Algorithm 1): an MLP generator against an MLP critic.

    python train_wgan_gp.py                          # FashionMNIST, 50 epochs
    tensorboard --logdir runs

Critic: minimize mean C(G(z)) - mean C(x) + lambda * mean_i (||grad C(x_hat_i)||_2 - 1)^2, x_hat_i = eps_i x_i +
(1 - eps_i) G(z_i), eps_i ~ U[0, 1] one per sample: a soft 1-Lipschitz bound where clipping was a crude one.
Generator: every n_critic critic steps, minimize -mean C(G(z)). Both with Adam, as the paper advises.
"""
import argparse
import json
import signal
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import evaluate
import utils
from models import EMA, Critic, WGANGenerator, generate

SCRIPT = "train_wgan_gp"
# Algorithm 1 of the paper: --preset paper. The defaults differ where they measured better (docs/tuning.md, "WGAN-GP"):
# Adam 1e-3 (not 1e-4) with the official MNIST code's betas (0.5, 0.9), and a weight average of G for the samples.
PAPER = {"lr": 1e-4, "beta1": 0.0, "beta2": 0.9, "gp_weight": 10.0, "n_critic": 5, "batch_size": 64, "ema_decay": 0.0,
         "z_dim": 100, "img_size": 28, "g_widths": [128, 256, 512, 1024], "critic_widths": [512, 256],
         "layer_norm": False}
PRESETS = {"default": {}, "paper": PAPER}


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default="default", help="a set of defaults; typed flags override it")
    add("--dataset", choices=sorted(utils.DATASETS), default="fashion-mnist")
    add("--data-root", default="data", help="holds <MNIST|FashionMNIST>/raw/ (downloaded there when missing)")
    add("--epochs", type=utils.positive_int, default=50, help="passes over the training split")
    add("--batch-size", type=utils.positive_int, default=64, help="images per critic step (BatchNorm needs 2 or more)")
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
    add("--ema-decay", type=utils.fraction, default=0.998,
        help="decay of the generator's weight average, which draws the samples and is evaluated (0 = off)")
    add("--img-size", type=utils.positive_int, default=28, help="train on images resized to this side")
    add("--seed", type=utils.seed, default=1, help="seeds every random number: weights, data order, noise")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto = cuda, else mps, else cpu")
    add("--runs-dir", default="runs", help="where run folders are made")
    add("--run-name", default=None, help="the run folder's name (default wgan_gp-<dataset>-<date>-<time>)")
    add("--resume", metavar="RUN", help="continue this run folder exactly, with its flags (typed ones override)")
    add("--log-every", type=utils.positive_int, default=100, help="steps between TensorBoard scalars")
    add("--checkpoint-every", type=utils.non_negative_int, default=500,
        help="steps between checkpoints (0 = epoch ends only); one is also saved at every epoch end and on Ctrl-C")
    add("--max-steps", type=utils.positive_int, default=None, help="stop after this many critic steps in all")
    add("--n-samples", type=utils.positive_int, default=64, help="images in the fixed-noise grid")
    add("--eval-every", type=utils.non_negative_int, default=0, help="epochs between evaluations (0 = at the end)")
    add("--eval-n", type=utils.eval_n, default=10000, help="generated images per evaluation")
    add("--no-eval", dest="eval", action="store_false", help="no evaluation, no metrics.json")
    add("--no-progress", dest="progress", action="store_false", help="one line per epoch, no progress bar")
    return parser


def critic_step(G, C, opt_C, real, z, eps, gp_weight):
    """One critic step: minimize mean C(G(z)) - mean C(x) + gp_weight * mean_i (||grad_x C(x_hat_i)||_2 - 1)^2.

    eps: one U[0, 1] weight per sample (not per pixel), so x_hat_i lies on the line from G(z_i) to x_i; the norm is
    per sample over all its pixels; create_graph=True so that the penalty's own gradient reaches the critic. The
    numbers of the textbook form (tests/textbook.py), with one critic forward for the three batches (the critic has no
    batch statistics: a per-sample penalty would be wrong with them). Returns (loss, Wasserstein estimate mean C(x) -
    mean C(G(z)), penalty, mean gradient norm), detached: no host sync.
    """
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
    # Flags: typed > --preset > (with --resume) the checkpoint's > the defaults.
    parser = make_parser()
    args, ckpt = utils.parse_flags(parser, PRESETS, SCRIPT, argv)
    if args.batch_size < 2:
        parser.error("argument --batch-size: must be 2 or more (BatchNorm needs 2 images per batch)")
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
    img_shape = tuple(images.shape[1:])
    G = WGANGenerator(args.z_dim, img_shape, args.g_widths).to(device)
    C = Critic(img_shape, args.critic_widths, args.layer_norm).to(device)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}  # one kernel for all weights
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fused)
    opt_C = torch.optim.Adam(C.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), **fused)
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    G_sample = ema.model if ema else G  # what draws the grids and is evaluated

    # The run folder (new, or the one resumed: every state restored from its checkpoint) and TensorBoard.
    run_dir, lock = utils.make_run_dir(args, resuming=ckpt is not None)  # the lock is held while this process lives
    fixed_noise = torch.randn(args.n_samples, args.z_dim, device=device)  # the grids' noise
    step = 0  # critic steps done, over the whole run
    if ckpt:
        utils.load_states(ckpt, run_dir, G=G, C=C, opt_G=opt_G, opt_C=opt_C, G_ema=ema)
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
            "G_class": type(G).__name__, "G_args": G.model_args, "G": G.state_dict(), "C": C.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_C": opt_C.state_dict(), "G_ema": ema.state_dict() if ema else None,
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
    latest = {}  # the latest value of each scalar (the generator's loss is from the last generator step)
    while step < last_step and not stop:
        epoch, started = step // steps_per_epoch + 1, time.time()
        perm = torch.randperm(len(images), generator=order).to(device)
        sums, counts = {}, {}  # the sums of this epoch's values (tensors: no host sync per step), and their counts
        first, end = step % steps_per_epoch, min(steps_per_epoch, step % steps_per_epoch + last_step - step)
        batches = tqdm(range(first, end), initial=first,
                       total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not args.progress)
        for batch in batches:
            step += 1
            # (1) Update the critic: maximize mean C(x) - mean C(G(z)) - lambda * (||grad C(x_hat)|| - 1)^2
            real = utils.to_model_range(images[perm[batch * args.batch_size:(batch + 1) * args.batch_size]])
            z = torch.randn(args.batch_size, args.z_dim, device=device)
            eps = torch.rand(args.batch_size, device=device)
            loss_C, wasserstein, penalty, grad_norm = critic_step(G, C, opt_C, real, z, eps, args.gp_weight)
            values = {"loss/critic": loss_C, "wasserstein_estimate": wasserstein, "gradient_penalty": penalty,
                      "grad_norm": grad_norm}
            # (2) Update G every n_critic critic steps: maximize mean C(G(z))
            if step % args.n_critic == 0:
                values["loss/G"] = generator_step(G, C, opt_G, torch.randn(args.batch_size, args.z_dim, device=device))
                if ema:
                    ema.update(G)
            latest.update(values)
            for name, value in values.items():
                sums[name], counts[name] = sums.get(name, 0) + value, counts.get(name, 0) + 1
            if step % args.log_every == 0:  # the only host sync of a step
                floats = utils.finite(step, latest)
                for name, value in floats.items():
                    writer.add_scalar(name, value, step)
                batches.set_postfix({name: f"{value:.4g}" for name, value in floats.items()})
            if args.checkpoint_every and step % args.checkpoint_every == 0 and batch + 1 < end:  # (else: below)
                save_checkpoint()
            if stop:
                break

        # The epoch's end, or where the run stops inside it: means, the grid, a checkpoint, an evaluation.
        means = utils.finite(step, {k: v / counts[k] for k, v in sums.items()})
        for name, value in means.items():
            writer.add_scalar(f"epoch_mean/{name}", value, step)
        print(f"epoch {epoch}/{args.epochs}  step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
              + f"  ({time.time() - started:.1f}s)", flush=True)
        whole = step % steps_per_epoch == 0
        if ema:
            ema.calibrate()  # BatchNorm statistics of the averaged weights, for the grid (saving does it too)
        utils.save_samples(writer, run_dir, generate(G_sample, fixed_noise), step, epoch if whole else None)
        save_checkpoint()
        if args.eval and args.eval_every and whole and epoch % args.eval_every == 0 and step < last_step and not stop:
            evaluation()

    if stop:
        writer.close()
        raise utils.UserError(f"stopped by {signal.Signals(stop['signal']).name}: the checkpoint of step {step} is"
                              f" saved; continue with --resume {run_dir}", 128 + stop["signal"])
    if args.eval:
        metrics = {"step": step, "n": args.eval_n, **evaluation(),
                   "classifier_sha256": evaluate.reference(args.dataset, args.data_root, device)[1]["sha256"]}
        utils.write_atomic(run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    writer.close()
    print(f"done: {run_dir} (step {step})")


if __name__ == "__main__":
    utils.run_main(main)
