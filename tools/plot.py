"""Curves of a run: the per-epoch loss means and the sample quality (eval/fid), read from the run's TensorBoard events.

    python tools/plot.py runs/<run>                      # writes runs/<run>/curves.png, prints Spearman's rho
    python tools/plot.py runs/<run> --out curves.png
    python tools/plot.py runs/<a> runs/<b> --out fid.png # several runs: eval/fid (and eval/recall) against epochs
    python tools/plot.py runs/<a> runs/<b> --out fid.png --x seconds  # ... against the train loop's seconds

The WGAN paper's practical claim (its Figures 3 and 4): the critic's Wasserstein estimate falls as the samples get
better, while the vanilla GAN's discriminator loss says nothing about their quality. Spearman's rank correlation
between the per-epoch Wasserstein estimate (vanilla: loss/D) and eval/fid tests that claim on your own run; train with
--eval-every 1 for one FID point per epoch. Works on a run that is still being written. Given several runs, it draws
their evaluations against epochs (or the train loop's seconds, evaluations not counted), one line each, and prints
each run's best and last FID (where a run stops paying) and when its FID first fell below 100, 50, 30 and 20.
"""
import argparse
import os
import re
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


CURVES = {"wgan": ["wasserstein_estimate", "loss/G"], "vanilla_gan": ["loss/D", "loss/G", "D(x)", "D(G(z))"],
          "wgan_gp": ["wasserstein_estimate", "loss/G", "gradient_penalty", "grad_norm"]}
QUALITY_LOSS = {"wgan": "wasserstein_estimate", "vanilla_gan": "loss/D", "wgan_gp": "wasserstein_estimate"}  # vs FID


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
    parser.add_argument("run", type=Path, nargs="+",
                        help="a run folder (runs/<run>) or its checkpoint.pt; several: compare their evaluations")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG to write (one run: <run>/curves.png; several: required)")
    parser.add_argument("--x", choices=["epoch", "seconds"], default="epoch",
                        help="several runs: their evaluations against epochs or the train loop's seconds")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    # a run's checkpoint.pt stands for its folder, as evaluate.py takes it
    runs = [run.parent if run.name == "checkpoint.pt" and run.is_file() else run for run in args.run]
    if len(runs) > 1 and args.out is None:
        raise PlotError("several runs make one comparison: give --out, the PNG to write, e.g. --out fid.png")
    out = args.out or runs[0] / "curves.png"
    if not str(out).strip() or out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        raise PlotError(f"--out {args.out or out}: not a file path; give the PNG to write, e.g. curves.png")
    if len(runs) > 1:
        return compare(runs, out, args.x)
    run = runs[0]
    scalars = read_scalars(run)
    algo = ("wgan_gp" if "epoch_mean/gradient_penalty" in scalars else "wgan"
            if "epoch_mean/wasserstein_estimate" in scalars else "vanilla_gan")
    curves = {name: scalars.get("epoch_mean/" + name, []) for name in CURVES[algo]}
    if not any(curves.values()):
        raise PlotError(f"{run}: no finished epoch logged yet; plot again after the first epoch")
    fid = scalars.get("eval/fid", [])

    plt = pyplot()
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
    top.set_title(f"{run.name} ({algo})")
    for name, points in curves.items():
        if points:
            bottom.plot(*zip(*points), marker=".", label=name)
    bottom.set_xlabel("step")
    bottom.set_ylabel("per-epoch mean")
    bottom.legend(loc="best", fontsize="small")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    save(fig, out)

    by_step = dict(curves[loss])
    pairs = [(by_step[step], value) for step, value in fid if step in by_step]
    if not fid:
        print(f"no eval/fid points in {run}: curves only (train with --eval-every 1 for one FID per epoch)")
        return
    rho = spearman(pairs)
    rho_text = f"{rho:.3f}" if rho is not None else "undefined (fewer than 3 points, or a constant)"
    print(f"Spearman rho({loss}, eval/fid) = {rho_text} over {len(pairs)} epochs")


THRESHOLDS = (100, 50, 30, 20)  # the README's time-to-FID table


def compare(runs, out, x="epoch"):
    """eval/fid (and eval/recall, where logged) of several runs against epochs or the train loop's seconds (the
    train_seconds scalar at the evaluation's step), one line per run (the seeds of a setting, named alike but for a
    trailing seed, in one colour); each run's best and last FID printed, and where it first fell below each of
    THRESHOLDS."""
    series = {}
    names = [run.name for run in runs]
    for run in runs:
        scalars = read_scalars(run)
        # steps per epoch: the commonest gap between the epoch means' steps (a run stopped mid-epoch logs a shorter one)
        ends = sorted({step for tag, points in scalars.items() if tag.startswith("epoch_mean/") for step, _ in points})
        gaps = [b - a for a, b in zip([0] + ends, ends)]
        per_epoch = max(set(gaps), key=lambda gap: (gaps.count(gap), gap)) if gaps else None
        label = run.name if names.count(run.name) == 1 else str(run)
        if not scalars.get("eval/fid") or x == "epoch" and not per_epoch:
            raise PlotError(f"{run}: no eval/fid points to compare; train with --eval-every K (or let the run end)")
        seconds = dict(scalars.get("train_seconds", []))
        if x == "seconds" and not all(step in seconds for step, _ in scalars["eval/fid"]):
            raise PlotError(f"{run}: no train_seconds at its evaluations (a run of older scripts); use --x epoch")
        at = (lambda step: seconds[step]) if x == "seconds" else (lambda step: step / per_epoch)
        series[label] = {name: [(at(step), value) for step, value in scalars.get(f"eval/{name}", [])]
                         for name in ("fid", "recall")}

    plt = pyplot()
    fig, (fid_ax, recall_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
    colours = {}  # runs named alike but for a trailing seed (wgan-s1, wgan-seed2) share a colour and a legend entry
    for label, points in series.items():
        group = re.sub(r"[-_ ](s|seed)[-_ ]?\d+$", "", label) or label
        first = group not in colours
        colour = colours.setdefault(group, f"C{len(colours)}")
        style = {"marker": "o", "color": colour, "label": group if first else None}  # one legend entry a setting
        fid_ax.plot(*zip(*points["fid"]), **style)
        if points["recall"]:
            recall_ax.plot(*zip(*points["recall"]), **style)
    fid_ax.set_yscale("log")
    fid_ax.set_ylabel("eval/fid (lower is better)")
    recall_ax.set_ylabel("eval/recall (higher is better)")
    recall_ax.set_xlabel("epoch" if x == "epoch" else "train loop seconds (evaluations not counted)")
    if x == "epoch":
        recall_ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (fid_ax, recall_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    save(fig, out)
    where = (lambda at: f"epoch {at:.3g}") if x == "epoch" else (lambda at: f"{at:.0f} s")
    for label, points in series.items():
        best = min(points["fid"], key=lambda point: point[1])
        last = points["fid"][-1]
        below = [next((where(at) for at, fid in points["fid"] if fid < limit), "-") for limit in THRESHOLDS]
        print(f"{label}: eval/fid {best[1]:.4g} at {where(best[0])} (best), {last[1]:.4g} at {where(last[0])} (last);"
              f" first below {', '.join(map(str, THRESHOLDS))}: {', '.join(below)}")


def pyplot():
    """matplotlib's pyplot, drawing into files (no screen needed); imported only once a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out):
    """A temporary file renamed over the old one: a half-written PNG never replaces a good one."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
        pyplot().close(fig)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PlotError(f"cannot write {out} ({e.strerror}); choose another --out")
    print(f"wrote {out}")


def run_main(argv=None):
    try:
        main(argv)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main()
