"""The evaluation's feature network: a small CNN classifier per dataset. Its weights ship with the code
(classifiers/<dataset>.pt, checked by SHA-256 before every use), so that every machine measures FID with the same
ruler; this command trains one again, for checking the shipped weights or to compare with another feature network:

    python classifier.py --dataset mnist --out my-mnist.pt     # 1 to 2.5 minutes on 2 CPU cores
    python evaluate.py runs/<run> --classifier my-mnist.pt     # the same run, measured with it
"""
import hashlib
import io
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import utils
from data import DATASETS, load_split, to_model_range

SHIPPED_DIR = Path(__file__).resolve().parent / "classifiers"
SHIPPED_SHA256 = {  # trained by this command with its defaults (seed 0, 4 epochs) on the CPU
    "mnist": "4b1f4cbdc9a8adf165052b33651bfb68578a95a234c045649933301e328a43d1",
    "fashion-mnist": "72ef7b782ca87bbe6dacbf295fdaf98980d80075ea6ab98f79ad8aa9ffad03a7",
}
NUM_CLASSES = 10


class Classifier(nn.Module):
    """Two conv layers and one hidden linear layer; `features` returns the 128-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 26 -> 13
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 -> 11 -> 5
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.features(x))


def to_input(images_uint8):
    """uint8 N x 28 x 28 (0 = black background) -> the classifier's float input N x 1 x 28 x 28 in [-1, 1]."""
    return to_model_range(images_uint8[:, None])


@torch.no_grad()
def predict(model, images_uint8, device, batch=1000):
    """(features N x 128, class probabilities N x 10) as float64 numpy arrays. The network runs in float32 on the
    device, with cuDNN's TF32 off (on by default for convolutions on recent GPUs, where it rounds their inputs to 10
    bits of mantissa) and its deterministic algorithms; matmuls keep PyTorch's default, full float32. float64 only on
    the CPU (MPS has none)."""
    model.eval()
    feats, probs = [], []
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        for i in range(0, len(images_uint8), batch):
            f = model.features(to_input(images_uint8[i:i + batch].to(device)))
            feats.append(f.cpu().double())
            probs.append(F.softmax(model.head(f), dim=1).cpu().double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def train(dataset, data_root, device, epochs=4, seed=0, progress=True):
    """Train with a fixed seed on the train split (the layers' init from the seeded CPU generator, the batch order
    from a generator of its own); returns (model, test accuracy)."""
    train_x, train_y = load_split(dataset, data_root, "train")
    test_x, test_y = load_split(dataset, data_root, "test")
    utils.seed_everything(seed)
    model = Classifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    batch = min(128, len(train_x))
    steps = epochs * (len(train_x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    x_all, y_all = train_x.to(device), train_y.long().to(device)
    bar = tqdm(total=steps, desc=f"training the {dataset} classifier", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=order).to(device)
        for i in range(len(x_all) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            model.train()
            loss = F.cross_entropy(model(to_input(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    _, probs = predict(model, test_x, device)
    accuracy = float((probs.argmax(1) == test_y.numpy()).mean())
    return model, accuracy


def _read(path, dataset):
    """(path, the file's bytes, their SHA-256) of a feature network's file: the shipped one when path is None, its
    checksum checked; else one line saying what is wrong."""
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise utils.UserError(f"--classifier {path}: cannot read it ({e.strerror}); pass a file that python"
                                  " classifier.py wrote")
        return Path(path), raw, hashlib.sha256(raw).hexdigest()
    path = SHIPPED_DIR / f"{dataset}.pt"
    restore = f"restore it: git -C {SHIPPED_DIR.parent} checkout -- classifiers/{dataset}.pt"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise utils.DataError(f"cannot read the shipped feature network {path} ({e.strerror}); {restore}")
    sha = hashlib.sha256(raw).hexdigest()
    if sha != SHIPPED_SHA256[dataset]:
        raise utils.DataError(f"{path} is not the shipped {dataset} feature network (SHA-256 {sha[:12]}..., expected"
                              f" {SHIPPED_SHA256[dataset][:12]}...); {restore}")
    return path, raw, sha


def check(dataset):
    """The shipped feature network is there and intact (a training run checks this before it trains)."""
    _read(None, dataset)


def load(dataset, device, path=None):
    """The feature network of `dataset` on `device`: the shipped one (its SHA-256 checked), or the file at `path` that
    this command wrote. Returns (model, {"sha256", "test_accuracy", "shipped"}); draws no random numbers."""
    path, raw, sha = _read(path, dataset)
    try:
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        with torch.device("meta"):  # no random init: the weights are assigned from the file
            model = Classifier()
        model.load_state_dict(saved["state_dict"], assign=True)
        trained_on, accuracy = saved["dataset"], float(saved["test_accuracy"])
    except Exception as e:
        raise utils.UserError(f"{path} is not a feature network ({utils.reason(e)}); pass a file that python"
                              " classifier.py wrote")
    if trained_on != dataset:
        raise utils.UserError(f"{path} is the feature network of {trained_on}, not of {dataset}; pass one"
                              f" trained with --dataset {dataset}")
    return model.float().to(device), {"sha256": sha, "test_accuracy": accuracy,
                                      "shipped": sha == SHIPPED_SHA256[dataset]}


def make_parser():
    parser = utils.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="the data to classify")
    parser.add_argument("--out", type=utils.new_file, required=True, metavar="PT",
                        help="the file to write (never overwritten)")
    parser.add_argument("--data-root", type=utils.nonempty, default="data",
                        help="folder of the data (downloaded there if missing)")
    parser.add_argument("--epochs", type=utils.int_range(1, 100), default=4, help="passes over the train split")
    parser.add_argument("--seed", type=utils.seed, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto = cuda, else mps, else cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (shown by default)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    device = utils.select_device(args.device)
    started = time.time()
    model, accuracy = train(args.dataset, args.data_root, device, args.epochs, args.seed, args.progress)
    state = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "dataset": args.dataset,
             "test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        Path(args.out).absolute().parent.mkdir(parents=True, exist_ok=True)
        utils.write_atomic(args.out, lambda f: f.write(buffer.getvalue()))
    except OSError as e:
        raise utils.UserError(f"cannot write {args.out} ({e.strerror}); free space or choose another path",
                              utils.EXIT_WRITE)
    print(f"wrote {args.out}: {args.dataset}, {args.epochs} epochs in {time.time() - started:.0f}s, test accuracy"
          f" {accuracy:.4f}, SHA-256 {hashlib.sha256(buffer.getvalue()).hexdigest()}")
    shipped = load(args.dataset, torch.device("cpu"))[0].state_dict()
    same = all(torch.equal(value, shipped[key]) for key, value in state["state_dict"].items())
    print(f"its weights are {'the same as' if same else 'not the same as'} those of the shipped"
          f" classifiers/{args.dataset}.pt" + ("" if same else " (trained with other flags, data, or rounding)"))


if __name__ == "__main__":
    utils.run_main(main)
