"""Curves of a run: the per-epoch loss means and the sample quality (eval/fid), read from the run's TensorBoard events.

    python plot.py runs/<run>                      # writes runs/<run>/curves.png, prints Spearman's rho
    python plot.py runs/<run> --out curves.png

The WGAN paper's practical claim (its Figures 3 and 4): the critic's Wasserstein estimate falls as the samples get
better, while the vanilla GAN's discriminator loss says nothing about their quality. Spearman's rank correlation
between the per-epoch Wasserstein estimate (vanilla: loss/D) and eval/fid tests that claim on your own run; train with
--eval-every 1 for one FID point per epoch. Works on a run that is still being written.
"""
import argparse
import os
import sys
from pathlib import Path

# Not `import utils`: it imports torch, which alone costs about as much as the whole plot (plotting a 50-epoch run
# must take under 5 s). Errors are one line and exit 2, as in the training scripts.


class PlotError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """A bad command line is one line too (as utils.ArgumentParser)."""

    def error(self, message):
        raise PlotError(f"{message} (see --help)")


CURVES = {"wgan": ["wasserstein_estimate", "loss/G"], "vanilla_gan": ["loss/D", "loss/G", "D(x)", "D(G(z))"]}
QUALITY_LOSS = {"wgan": "wasserstein_estimate", "vanilla_gan": "loss/D"}  # the loss set against eval/fid


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} of every scalar in the run's event files (the tensorboard package's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir() or not list(run_dir.glob("events.out.tfevents.*")):
        raise PlotError(f"{run_dir}: no TensorBoard event files there; give a run folder the training scripts wrote"
                        " (runs/<run>)")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def spearman(pairs):
    """Spearman's rank correlation of (x, y) pairs, or None with fewer than 3 or a constant side."""
    from scipy.stats import spearmanr

    if len(pairs) < 3:
        return None
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def make_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("run", type=Path, help="a run folder (runs/<run>) or its checkpoint.pt")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: <run>/curves.png)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.run.name == "checkpoint.pt" and args.run.is_file():  # as evaluate.py takes it
        args.run = args.run.parent
    out = args.out or args.run / "curves.png"
    if not str(out).strip() or out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        raise PlotError(f"--out {args.out or out}: not a file path; give the PNG to write, e.g. curves.png")
    scalars = read_scalars(args.run)
    algo = "wgan" if "epoch_mean/wasserstein_estimate" in scalars else "vanilla_gan"
    curves = {name: scalars.get("epoch_mean/" + name, []) for name in CURVES[algo]}
    if not any(curves.values()):
        raise PlotError(f"{args.run}: no finished epoch logged yet; plot again after the first epoch")
    fid = scalars.get("eval/fid", [])

    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    loss = QUALITY_LOSS[algo]
    # top: the loss that should track quality, against eval/fid; bottom: every per-epoch mean on one scale
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
    top.plot(*zip(*curves[loss]), marker=".", color="tab:blue", label=f"{loss} (per-epoch mean)")
    top.set_ylabel(loss)
    handles, labels = top.get_legend_handles_labels()
    if fid:
        fid_ax = top.twinx()
        fid_ax.plot(*zip(*fid), color="black", linestyle="--", marker="o", label="eval/fid")
        fid_ax.set_ylabel("eval/fid (lower is better)")
        fid_ax.set_yscale("log")
        more = fid_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    top.legend(handles, labels, loc="upper right", fontsize="small")
    top.set_title(f"{args.run.name} ({algo})")
    for name, points in curves.items():
        if points:
            bottom.plot(*zip(*points), marker=".", label=name)
    bottom.set_xlabel("step")
    bottom.set_ylabel("per-epoch mean")
    bottom.legend(loc="best", fontsize="small")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp")
    try:  # a temporary file renamed over the old one: a half-written PNG never replaces a good one
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
        plt.close(fig)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"cannot write {out} ({e.strerror}); choose another --out")
    print(f"wrote {out}")

    by_step = dict(curves[loss])
    pairs = [(by_step[step], value) for step, value in fid if step in by_step]
    if not fid:
        print(f"no eval/fid points in {args.run}: curves only (train with --eval-every 1 for one FID per epoch)")
        return
    rho = spearman(pairs)
    rho_text = f"{rho:.3f}" if rho is not None else "undefined (fewer than 3 points, or a constant)"
    print(f"Spearman rho({loss}, eval/fid) = {rho_text} over {len(pairs)} epochs")


def run_main(argv=None):
    try:
        main(argv)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main()
