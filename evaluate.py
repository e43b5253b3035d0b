"""Sample quality of a trained generator, offline: FID, precision/recall, class coverage and Inception Score, all on the
features of a small CNN classifier of the dataset itself, shipped with the code (classifier.py): no download, no
training, and the same ruler on every machine.

    python evaluate.py runs/<run>                    # a table
    python evaluate.py runs/<run> --json             # one JSON line
    python evaluate.py runs/<run> --grid grid.png --export samples.npz

Metrics compare N generated images (default 10,000) with the 10,000-image test split; the "real" row compares 10,000
training images with the same test split, the floor a perfect generator would reach. The output names the feature
network by its SHA-256: numbers are comparable when it is the same.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import classifier
import utils
from data import load_split, to_model_range
from models import Generator, WGANGenerator, generate

MIN_COMPARABLE_N = 2000  # below this many samples evaluate.py warns that its FID is not comparable


# ----------------------------------------------------------------------------------------------------------------------
# Metrics on features


def _sqrt_psd(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues below 0 are rounding: 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2: a symmetric
    PSD matrix, so eigh gives real eigenvalues and no complex part can leak out."""
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    return max(float(value), 0.0)  # a distance: below 0 only by rounding


def fid(features1, features2):
    return frechet_distance(features1.mean(0), np.cov(features1, rowvar=False),
                            features2.mean(0), np.cov(features2, rowvar=False))


def _kth_neighbour_radii(x, k, chunk=2048):
    """Distance from each row of x to its k-th nearest other row."""
    x = torch.as_tensor(x)
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself, at distance 0
    return torch.cat(radii)


def _covered(queries, support, radii, chunk=2048):
    """For each query: does it lie within the radius of at least one support point?"""
    queries, support = torch.as_tensor(queries), torch.as_tensor(support)
    inside = []
    for i in range(0, len(queries), chunk):
        inside.append((torch.cdist(queries[i:i + chunk], support) <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. (2019): precision = share of fakes inside the real manifold (union of k-NN balls around
    the reals), recall = share of reals inside the fake manifold."""
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


def class_coverage(probs):
    """(KL of the predicted-class histogram from uniform, number of classes with at least 1% of the samples)."""
    hist = np.bincount(probs.argmax(1), minlength=classifier.NUM_CLASSES) / len(probs)
    nonzero = hist[hist > 0]
    return float((nonzero * np.log(nonzero * classifier.NUM_CLASSES)).sum()), int((hist >= 0.01).sum())


def inception_score(probs, eps=1e-12):
    """exp E_x KL(p(y|x) || p(y)) with the dataset's own classifier."""
    marginal = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + eps) - np.log(marginal + eps))).sum(1)
    return float(np.exp(kl.mean()))


def metrics(feats, probs, test_feats):
    precision, recall = precision_recall(test_feats, feats)
    class_kl, classes = class_coverage(probs)
    return {"fid": fid(feats, test_feats), "precision": precision, "recall": recall, "class_kl": class_kl,
            "classes_1pct": classes, "inception_score": inception_score(probs)}


# ----------------------------------------------------------------------------------------------------------------------
# Generators from checkpoints


def as_image_batch(images):
    """N x C x H x W as is; the vanilla generator's flat N x H*W output as N x 1 x H x W (square images)."""
    if images.dim() == 2:
        side = int(round(images.shape[1] ** 0.5))
        images = images.view(-1, 1, side, side)
    return images


def to_uint8_28(images):
    """[-1, 1] images N x C x H x W (or N x H*W) -> uint8 N x 28 x 28, 0 = black; antialiased resize when H != 28."""
    images = as_image_batch(images)
    if images.shape[-1] != 28:
        images = F.interpolate(images.float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def sample(G, z_dim, n, device, seed=0, batch=1000, img_size=28):
    """n images from G in eval mode with a fixed seed, as uint8 N x 28 x 28 on the CPU; G's mode is restored. Drawn
    `batch` at a time, fewer when G's images (img_size) or noise (z_dim) are so large that a batch would pass
    256 MiB."""
    batch = min(batch, max(1, 2**28 // (4 * max(img_size**2, z_dim))))
    gen = torch.Generator(device=device).manual_seed(seed)
    # to the CPU before resizing: antialiased interpolation is missing on MPS in older torch releases
    out = [to_uint8_28(generate(G, torch.randn(min(batch, n - i), z_dim, device=device, generator=gen)).cpu())
           for i in range(0, n, batch)]
    return torch.cat(out)


@torch.no_grad()
def interpolation(G, z_dim, device, rows=8, steps=10, seed=0):
    """rows x steps images, N x C x H x W in [-1, 1]: row i walks a straight line in z, in `steps` even steps, from
    one seeded noise vector to another (G in eval mode; its mode is restored)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    start, end = torch.randn(2, rows, 1, z_dim, device=device, generator=gen)
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]
    z = (start + t * (end - start)).reshape(rows * steps, z_dim)
    return as_image_batch(generate(G, z))


class Evaluator:
    """The feature network and the test split's features, so repeated evaluations during training cost only
    sampling. `network`: the feature network's SHA-256, test accuracy and whether it is the shipped one."""

    def __init__(self, dataset, data_root, device, classifier_path=None):
        self.device = device
        self.model, self.network = classifier.load(dataset, device, classifier_path)
        self.test_images, _ = load_split(dataset, data_root, "test")
        self.test_feats, _ = classifier.predict(self.model, self.test_images, device)
        self.dataset, self.data_root = dataset, data_root

    def images(self, images_uint8):
        return metrics(*classifier.predict(self.model, images_uint8, self.device), self.test_feats)

    def generator(self, G, z_dim, n, seed=0, img_size=28):
        return self.images(sample(G, z_dim, n, self.device, seed, img_size=img_size))

    def real_floor(self, n=10000):
        train, _ = load_split(self.dataset, self.data_root, "train")
        return self.images(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]])


def check_needs(cfg):
    """What a training run's evaluations need, checked when it starts (found missing only after hours of training, it
    would cost the run its evaluation): the test split, the shipped feature network, and memory for --eval-n samples'
    features and neighbour distances."""
    try:
        classifier.check(cfg.dataset)
        load_split(cfg.dataset, cfg.data_root, "test")
    except utils.DataError as e:
        load_split(cfg.dataset, cfg.data_root, "train")  # no train split either: its message (--no-eval cannot help)
        raise utils.DataError(f"{e}; or pass --no-eval to train without the quality evaluation")
    # per sample: its 28 x 28 image and two feature copies; a batch of samples (at most 256 MiB, sample()); the
    # neighbour distances, computed in chunks of 2048 rows
    need = cfg.eval_n * (784 + 2 * 128 * 8) + 2**28 + 2 * 2048 * max(cfg.eval_n, 10_000) * 8
    utils.check_memory(need, torch.device("cpu"), f"evaluations of --eval-n {cfg.eval_n} samples", "lower --eval-n")


class TrainingEval:
    """Evaluation inside the training scripts: built on first use, logs eval/* to TensorBoard, writes metrics.json."""

    LOGGED = ("fid", "precision", "recall", "class_kl")

    def __init__(self, cfg, device):
        self.cfg, self.device, self.evaluator = cfg, device, None

    def __call__(self, G, writer, step):
        c = self.cfg
        if self.evaluator is None:
            self.evaluator = Evaluator(c.dataset, c.data_root, self.device)
        result = self.evaluator.generator(G, c.z_dim, c.eval_n, img_size=c.img_size)
        for name in self.LOGGED:
            writer.add_scalar(f"eval/{name}", result[name], step)
        print(f"eval at step {step} ({c.eval_n} samples): " + "  ".join(f"{n} {result[n]:.4g}" for n in self.LOGGED),
              flush=True)
        return result

    def after_epoch(self, G, writer, step, epochs_done):
        """Every --eval-every epochs, but not after the last one (final() does that)."""
        c = self.cfg
        if c.eval and c.eval_every and epochs_done % c.eval_every == 0 and epochs_done < c.epochs:
            self(G, writer, step)

    def final(self, G, writer, step, run_dir):
        """At the end of training (unless --no-eval): logged, and saved as metrics.json in the run folder."""
        if not self.cfg.eval:
            return
        result = self(G, writer, step)
        network = self.evaluator.network
        text = json.dumps({"step": step, "n": self.cfg.eval_n, "classifier_sha256": network["sha256"],
                           "classifier_accuracy": network["test_accuracy"], **result}, indent=2)
        utils.write_atomic(Path(run_dir) / "metrics.json", lambda f: f.write(text.encode()))


def generator_from_checkpoint(ckpt, device, raw=False):
    """Rebuild the generator a checkpoint describes: its weight average (EMA) when it holds one, unless raw, else the
    trained weights. Returns (G, z_dim, "ema" or "raw")."""
    a = ckpt["args"]
    if ckpt["algo"] == "wgan":
        G = WGANGenerator(a["z_dim"], (1, a["img_size"], a["img_size"]), a["g_widths"])
    else:
        G = Generator(a["z_dim"], a["img_size"] ** 2, a["g_hidden"], a["leaky_slope"])
    weights = "raw" if raw or "G_ema" not in ckpt else "ema"
    G.load_state_dict(ckpt["G"] if weights == "raw" else ckpt["G_ema"])
    return G.to(device), a["z_dim"], weights


FORMATS = {"fid": "{:.3f}", "precision": "{:.3f}", "recall": "{:.3f}", "class_kl": "{:.4f}", "classes_1pct": "{}",
           "inception_score": "{:.3f}"}


def print_table(rows):
    names = list(FORMATS)
    print(f"{'':10}" + "".join(f"{n:>16}" for n in names))
    for label, m in rows.items():
        print(f"{label:10}" + "".join(f"{FORMATS[n].format(m[n]):>16}" for n in names))


def make_parser():
    parser = utils.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=utils.nonempty, help="a run folder or its checkpoint.pt")
    parser.add_argument("--n", type=utils.EVAL_N, default=10000, help="generated images")
    parser.add_argument("--data-root", type=utils.nonempty, default=None,
                        help="folder of the data (by default the run's own)")
    parser.add_argument("--classifier", type=utils.nonempty, metavar="PT",
                        help="a feature network that python classifier.py wrote (by default the shipped one)")
    parser.add_argument("--seed", type=utils.seed, default=0, help="seed of the sampled noise")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto = cuda, else mps, else cpu")
    parser.add_argument("--raw", action="store_true",
                        help="score the trained generator (by default its weight average, when the checkpoint has one)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the real-versus-real row (shown by default)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (by default a table)")
    parser.add_argument("--grid", type=utils.new_file, metavar="PNG", help="save a grid of the first 64 samples")
    parser.add_argument("--export", type=utils.new_file, metavar="NPZ",
                        help="save the samples as key 'images', uint8 N x 28 x 28")
    parser.add_argument("--interpolate", type=utils.new_file, metavar="PNG",
                        help="save 8 rows of 10 images, each a straight line in z between two seeded noise vectors")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    device = utils.select_device(args.device)
    ckpt, path = utils.load_checkpoint(args.run, flag="run")
    data_root = args.data_root or ckpt["args"]["data_root"]
    dataset = ckpt["args"]["dataset"]

    started = time.time()
    evaluator = Evaluator(dataset, data_root, device, args.classifier)
    G, z_dim, weights = generator_from_checkpoint(ckpt, device, args.raw)
    images = sample(G, z_dim, args.n, device, args.seed, img_size=ckpt["args"]["img_size"])
    rows = {f"step {ckpt['step']}": evaluator.images(images)}
    seconds = time.time() - started
    network = evaluator.network
    if args.floor:
        rows["real"] = evaluator.real_floor()
    told = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON line only
    try:  # the outputs were checked before any work; what fails now is the disk
        if args.grid:
            utils.save_grid(utils.image_grid(to_model_range(images[:64, None])), args.grid)
            print(f"wrote {args.grid} (the first {min(64, args.n)} samples)", file=told)
        if args.export:
            Path(args.export).absolute().parent.mkdir(parents=True, exist_ok=True)
            utils.write_atomic(args.export, lambda f: np.savez_compressed(f, images=images.numpy()))
            print(f"wrote {args.export} ({args.n} samples, key 'images', uint8 N x 28 x 28)", file=told)
        if args.interpolate:
            grid = utils.image_grid(interpolation(G, z_dim, device, seed=args.seed), nrow=10)
            utils.save_grid(grid, args.interpolate)
            print(f"wrote {args.interpolate} (8 rows of 10 images along straight lines in z)", file=told)
    except OSError as e:
        raise utils.UserError(f"cannot write {e.filename} ({e.strerror}); free space or choose another path",
                              utils.EXIT_WRITE)
    if args.n < MIN_COMPARABLE_N:
        print(f"warning: an FID of {args.n} samples is biased upward and noisy; compare numbers of --n 10000 (the"
              " default)", file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "dataset": dataset, "weights": weights, "n": args.n,
                          "step": ckpt["step"], "classifier_sha256": network["sha256"],
                          "classifier_accuracy": network["test_accuracy"], "seconds": round(seconds, 1),
                          "metrics": rows[f"step {ckpt['step']}"], "real": rows.get("real")}))
        return
    print(f"{path} ({dataset}, {weights} weights, {args.n} samples vs the test split; {seconds:.1f}s)")
    print(f"feature network: {'shipped' if network['shipped'] else args.classifier}, SHA-256"
          f" {network['sha256'][:12]}..., test accuracy {network['test_accuracy']:.4f}")
    print_table(rows)


if __name__ == "__main__":
    utils.run_main(main)
