"""Sample quality of a trained generator, offline: FID, precision/recall and class coverage, on the features of a small
CNN classifier of the dataset itself whose weights ship with the code (classifiers/, checked by SHA-256): no download,
and the same ruler on every machine.

    python evaluate.py runs/<run>                    # the metrics in one line
    python evaluate.py runs/<run> --json             # one JSON line
    python evaluate.py runs/<run> --grid grid.png --export samples.npz --interpolate lines.png

N generated images (default 10,000) against the 10,000-image test split. The output names the feature network by its
SHA-256: two numbers compare when it is the same. The training scripts call before_training() and if_due().
"""
import functools
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import utils

SHIPPED_DIR = Path(__file__).resolve().parent / "classifiers"
SHIPPED_SHA256 = {  # tools/train_classifier.py with its defaults (seed 0, 4 epochs) on the CPU
    "mnist": "4b1f4cbdc9a8adf165052b33651bfb68578a95a234c045649933301e328a43d1",
    "fashion-mnist": "72ef7b782ca87bbe6dacbf295fdaf98980d80075ea6ab98f79ad8aa9ffad03a7",
}
LOGGED = ("fid", "precision", "recall", "class_kl")  # what the training scripts log as eval/*


class Classifier(nn.Module):
    """The feature network: two conv layers and one hidden linear layer; `features` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 26 -> 13
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 -> 11 -> 5
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.features(x))


def no_feature_network(dataset):
    return (f"no feature network ships for {dataset}: make one with python tools/train_classifier.py --dataset"
            f" {dataset} --out classifiers/{dataset}.pt, and add the SHA-256 it prints to evaluate.SHIPPED_SHA256")


def load_classifier(dataset, device):
    """The shipped feature network of `dataset`, its SHA-256 checked (so the weights are the shipped ones, and FIDs
    compare). Returns (model in float32 on device, {"sha256", "test_accuracy"})."""
    if dataset not in SHIPPED_SHA256:
        raise utils.UserError(no_feature_network(dataset), utils.EXIT_DATA)
    path = SHIPPED_DIR / f"{dataset}.pt"
    restore = f"restore it: git -C {SHIPPED_DIR.parent} checkout -- classifiers/{dataset}.pt"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise utils.UserError(f"cannot read the feature network {path} ({e.strerror}); {restore}",
                              utils.EXIT_DATA) from None
    sha = hashlib.sha256(raw).hexdigest()
    if sha != SHIPPED_SHA256[dataset]:
        raise utils.UserError(f"{path} is not the shipped {dataset} feature network (SHA-256 {sha[:12]}...,"
                              f" expected {SHIPPED_SHA256[dataset][:12]}...); {restore}", utils.EXIT_DATA)
    saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    with torch.device("meta"):  # no random init (it would move the training's RNG): the weights are the file's
        model = Classifier()
    model.load_state_dict(saved["state_dict"], assign=True)
    return model.float().to(device), {"sha256": sha, "test_accuracy": float(saved["test_accuracy"])}


@torch.no_grad()
def predict(model, images_uint8, device, batch=1000):
    """(features N x 128, class probabilities N x 10), float64 numpy on the CPU (MPS has no float64). The network
    runs in float32 with cuDNN's TF32 off (it rounds convolution inputs to 10 bits on recent GPUs)."""
    model.eval()
    feats, probs = [], []
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        for i in range(0, len(images_uint8), batch):
            f = model.features(utils.to_model_range(images_uint8[i:i + batch, None].to(device)))
            feats.append(f.cpu().double())
            probs.append(F.softmax(model.head(f), dim=1).cpu().double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


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


def _covered(queries, support, k, chunk=2048):
    """For each query: does it lie within the distance from some support point to that point's k-th nearest other
    support point?"""
    support = torch.as_tensor(support)
    radii = torch.cat([torch.cdist(support[i:i + chunk], support).kthvalue(k + 1, dim=1).values  # +1: itself
                       for i in range(0, len(support), chunk)])
    queries = torch.as_tensor(queries)
    return torch.cat([(torch.cdist(queries[i:i + chunk], support) <= radii[None]).any(dim=1)
                      for i in range(0, len(queries), chunk)])


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. (2019): precision = share of fakes inside the real manifold (the union of k-NN balls around
    the reals), recall = share of reals inside the fake manifold."""
    return _covered(fake, real, k).double().mean().item(), _covered(real, fake, k).double().mean().item()


def metrics(feats, probs, test_feats):
    """FID, precision, recall, and the class coverage: the KL of the predicted-class histogram from uniform (0 =
    balanced, ln 10 = one class) and the number of classes with at least 1% of the samples."""
    precision, recall = precision_recall(test_feats, feats)
    hist = np.bincount(probs.argmax(1), minlength=10) / len(probs)
    nonzero = hist[hist > 0]
    return {"fid": fid(feats, test_feats), "precision": precision, "recall": recall,
            "class_kl": float((nonzero * np.log(nonzero * 10)).sum()), "classes_1pct": int((hist >= 0.01).sum())}


@functools.lru_cache(maxsize=2)
def reference(dataset, data_root, device):
    """(feature network, its description, the test split's features), loaded once per process."""
    model, network = load_classifier(dataset, device)
    test_images, _ = utils.load_images(dataset, data_root, train=False)
    return model, network, predict(model, test_images, device)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Samples


def to_uint8_28(images):
    """[-1, 1] images N x C x H x W, or N x H*W (square) -> uint8 N x 28 x 28 (antialiased resize when H != 28)."""
    images = utils.as_images(images)
    if images.shape[-1] != 28:
        images = F.interpolate(images.float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample(G, n, device, seed=0, batch=1000):
    """n images from G in eval mode, with noise from a seeded generator of its own, as uint8 N x 28 x 28 on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # to the CPU before resizing: antialiased interpolation is missing on MPS in older torch releases
    return torch.cat([to_uint8_28(models.generate(G, torch.randn(min(batch, n - i), G.z_dim, device=device,
                                                                 generator=gen)).cpu()) for i in range(0, n, batch)])


def score(G, n, dataset, data_root, device, seed=0):
    """metrics() of n samples of G against the test split (the training scripts' evaluation)."""
    model, _, test_feats = reference(dataset, data_root, device)
    return metrics(*predict(model, sample(G, n, device, seed), device), test_feats)


def before_training(args, device):
    """What a run's evaluation needs (the feature network, the test split's features), loaded now rather than failing
    after the training. A dataset with no shipped feature network trains without evaluation (args.eval set off, so
    the run records it), saying so in one line."""
    if args.eval and args.dataset not in SHIPPED_SHA256:
        print(f"warning: {no_feature_network(args.dataset)}; this run trains without evaluation", file=sys.stderr)
        args.eval = False
    if args.eval:
        reference(args.dataset, args.data_root, device)


def if_due(run):
    """A training run's evaluation, when one is due at its step (utils.evaluation_due: the final one, one every
    --eval-every epochs, or one a stopped or failed run owes): metrics.json (this evaluation and its step, first), the
    eval/* scalars and a line."""
    if run.stop or not utils.evaluation_due(run):  # Ctrl-C or SIGTERM: a resume makes it
        return
    args, device = run.args, run.fixed_noise.device
    result = score(run.sampler, args.eval_n, args.dataset, args.data_root, device)
    metrics = {"step": run.step, "n": args.eval_n, **result,
               "classifier_sha256": reference(args.dataset, args.data_root, device)[1]["sha256"]}
    utils.write_atomic(run.dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    for name in LOGGED:
        run.writer.add_scalar(f"eval/{name}", result[name], run.step)
    print(f"eval at step {run.step} ({args.eval_n} samples): " + "  ".join(f"{n} {result[n]:.4g}" for n in LOGGED),
          flush=True)


def generator_from_checkpoint(ckpt, device, raw=False):
    """The generator a checkpoint describes, rebuilt from its class name and constructor arguments: its weight
    average when it holds one (unless raw), else the trained weights. Returns (G, "ema" or "raw")."""
    weights = "raw" if raw or ckpt.get("G_ema") is None else "ema"
    try:
        G = getattr(models, ckpt["G_class"])(**ckpt["G_args"])
        G.load_state_dict(ckpt["G"] if weights == "raw" else ckpt["G_ema"]["model"])
    except (AttributeError, TypeError, KeyError, RuntimeError) as e:
        raise utils.UserError(f"its generator cannot be rebuilt from models.py ({utils.reason(e)}); use the version"
                              " of models.py that wrote it") from None
    return G.to(device), weights


@torch.no_grad()
def interpolation(G, device, rows=8, steps=10, seed=0):
    """rows x steps images in [-1, 1]: row i walks a straight line in z, in even steps, between two seeded vectors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    start, end = torch.randn(2, rows, 1, G.z_dim, device=device, generator=gen)
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]
    return utils.as_images(models.generate(G, (start + t * (end - start)).reshape(rows * steps, G.z_dim)))


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    parser.add_argument("run", help="a run folder or its checkpoint.pt")
    parser.add_argument("--n", type=utils.eval_n, default=10000, help="generated images")
    parser.add_argument("--seed", type=utils.seed, default=0, help="seed of the sampled noise")
    parser.add_argument("--raw", action="store_true",
                        help="score the trained generator, not its weight average (when the checkpoint has one)")
    parser.add_argument("--data-root", default=None, help="folder of the data (default: the run's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto = cuda, else mps, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--grid", metavar="PNG", help="save a grid of the first 64 samples")
    parser.add_argument("--export", metavar="NPZ", help="save the samples as key 'images', uint8 N x 28 x 28")
    parser.add_argument("--interpolate", metavar="PNG",
                        help="save 8 rows of 10 images, each a straight line in z between two seeded noise vectors")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    device = utils.pick_device(args.device)
    ckpt = utils.load_checkpoint(args.run)
    dataset, data_root = ckpt["args"]["dataset"], args.data_root or ckpt["args"]["data_root"]
    model, network, test_feats = reference(dataset, data_root, device)
    G, weights = generator_from_checkpoint(ckpt, device, args.raw)
    images = sample(G, args.n, device, args.seed)
    result = metrics(*predict(model, images, device), test_feats)
    told = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON line only
    if args.grid:
        utils.save_grid(utils.image_grid(utils.to_model_range(images[:64, None])), args.grid)
        print(f"wrote {args.grid} (the first {min(64, args.n)} samples)", file=told)
    if args.export:
        utils.write_atomic(args.export, lambda f: np.savez_compressed(f, images=images.numpy()))
        print(f"wrote {args.export} ({args.n} samples, key 'images', uint8 N x 28 x 28)", file=told)
    if args.interpolate:
        utils.save_grid(utils.image_grid(interpolation(G, device, seed=args.seed), nrow=10), args.interpolate)
        print(f"wrote {args.interpolate} (8 rows of 10 images along straight lines in z)", file=told)
    if args.n < 2000:
        print(f"warning: an FID of {args.n} samples is biased upward and noisy; compare FIDs of --n 10000",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoint": args.run, "dataset": dataset, "weights": weights, "n": args.n,
                          "step": ckpt["step"], "classifier_sha256": network["sha256"], "metrics": result}))
        return
    print(f"{args.run}: step {ckpt['step']}, {dataset}, {weights} weights, {args.n} samples against the test split")
    print(f"feature network: SHA-256 {network['sha256'][:12]}..., test accuracy {network['test_accuracy']:.4f}")
    print("  ".join(f"{name} {value:.4g}" for name, value in result.items()))


if __name__ == "__main__":
    utils.run_main(main)
