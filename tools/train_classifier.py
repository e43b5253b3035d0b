"""Train the evaluation's feature network again (evaluate.Classifier), to check the shipped weights in classifiers/:

    python tools/train_classifier.py --dataset mnist --out my-mnist.pt   # 1 to 2.5 minutes on 2 CPU cores

It says whether the weights it trained are those of the shipped file (they are, on the CPU that trained them).
"""
import hashlib
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402 (the product, one folder up)
import utils  # noqa: E402


def train(dataset, data_root, device, epochs=4, seed=0, progress=True):
    """Seeded training on the train split (init from the seeded CPU generator, the batch order from one of its own);
    returns (model, test accuracy)."""
    train_x, train_y = utils.load_images(dataset, data_root)
    test_x, test_y = utils.load_images(dataset, data_root, train=False)
    utils.seed_everything(seed)
    model = evaluate.Classifier().to(device)
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
            loss = F.cross_entropy(model(utils.to_model_range(x_all[idx][:, None])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    _, probs = evaluate.predict(model, test_x, device)
    return model, float((probs.argmax(1) == test_y.numpy()).mean())


def main(argv=None):
    parser = utils.ArgumentParser(__doc__)
    parser.add_argument("--dataset", choices=sorted(utils.DATASETS), default="mnist")
    parser.add_argument("--out", required=True, metavar="PT", help="the file to write")
    parser.add_argument("--data-root", default="data", help="folder of the data (downloaded there if missing)")
    parser.add_argument("--epochs", type=utils.positive_int, default=4, help="passes over the train split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    device = utils.pick_device(args.device)
    started = time.time()
    model, accuracy = train(args.dataset, args.data_root, device, args.epochs, args.seed, args.progress)
    state = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "dataset": args.dataset,
             "test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    Path(args.out).absolute().parent.mkdir(parents=True, exist_ok=True)
    utils.write_atomic(args.out, lambda f: f.write(buffer.getvalue()))
    print(f"wrote {args.out}: {args.dataset}, {args.epochs} epochs in {time.time() - started:.0f}s, test accuracy"
          f" {accuracy:.4f}, SHA-256 {hashlib.sha256(buffer.getvalue()).hexdigest()}")
    if args.dataset not in evaluate.SHIPPED_SHA256:
        print(f"no {args.dataset} feature network ships to compare it with: to evaluate on this one, put it in"
              f" classifiers/{args.dataset}.pt and add its SHA-256 to evaluate.SHIPPED_SHA256")
        return
    shipped = evaluate.load_classifier(args.dataset, torch.device("cpu"))[0].state_dict()
    same = all(torch.equal(value, shipped[key]) for key, value in state["state_dict"].items())
    print(f"its weights are {'the same as' if same else 'not the same as'} those of the shipped"
          f" classifiers/{args.dataset}.pt" + ("" if same else " (trained with other flags, data, or rounding)"))


if __name__ == "__main__":
    utils.run_main(main)
