"""Training-step speed of the three scripts against a reference loop in the style of their sources, in one process.

    python tools/bench.py --device cpu            # a table
    python tools/bench.py --device cpu --json     # one JSON line

Reference loop: tests/textbook.py's steps (the sources' own: separate forwards, `retain_graph=True` in the vanilla
D step, a clamp per critic parameter; WGAN-GP's separate forwards of x, G(z) and x_hat), plain optimizers, and a
torchvision-style dataset (PIL image -> ToTensor -> Normalize per image) through a DataLoader. Ours: the very step
functions the training scripts run, on the dataset resident on the device. Same data, device and sizes; warm-up first,
then the two alternated.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the product, and the textbook steps beside its tests
import textbook  # noqa: E402
import train_vanilla_gan  # noqa: E402
import train_wgan  # noqa: E402
import train_wgan_gp  # noqa: E402
import utils  # noqa: E402
from models import Critic, Discriminator, Generator, WGANGenerator  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# The reference loop's data: the sources' torchvision pipeline (its steps are textbook.py's).


class SourceStyleDataset(torch.utils.data.Dataset):
    """What torchvision's MNIST does per item: uint8 array -> PIL image -> transforms."""

    def __init__(self, images, transform):
        self.images, self.transform = images.numpy(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


def reference_batches(images, batch_size, img_size, seed):
    import torchvision.transforms as T

    tf = [T.Resize(img_size)] if img_size != images.shape[-1] else []
    tf = T.Compose(tf + [T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    loader = torch.utils.data.DataLoader(SourceStyleDataset(images, tf), batch_size=batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(seed))
    while True:
        for real, _ in loader:
            yield real


def our_batches(images, batch_size, seed):
    """The training scripts' batches: index slices of one permutation per epoch, the images resident on the device."""
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(images), generator=order).to(images.device)
        for i in range(len(images) // batch_size):
            yield utils.to_model_range(images[perm[i * batch_size:(i + 1) * batch_size]])


# ----------------------------------------------------------------------------------------------------------------------
# The three algorithms, each as (reference step, our step) closures over their own networks.


def vanilla_setup(device, z_dim=64, batch=32, lr=3e-4):
    def nets():
        torch.manual_seed(0)
        return Generator(z_dim).to(device), Discriminator().to(device)

    G1, D1 = nets()
    ref_opts = [torch.optim.Adam(m.parameters(), lr=lr, foreach=False) for m in (G1, D1)]
    G2, D2 = nets()
    fast = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}  # as train_vanilla_gan.py
    our_opts = [torch.optim.Adam(m.parameters(), lr=lr, **fast) for m in (G2, D2)]

    def ref(real):
        textbook.vanilla_gan_step(G1, D1, *ref_opts, real.to(device), torch.randn(batch, z_dim, device=device))

    def ours(real):
        train_vanilla_gan.train_step(G2, D2, *our_opts, real, torch.randn(batch, z_dim, device=device))

    return ref, ours, batch, 28


def wgan_nets(device, z_dim):
    """Both WGANs' networks at the scripts' default sizes, from one seed: each loop gets an identical pair."""
    torch.manual_seed(0)
    return WGANGenerator(z_dim).to(device), Critic().to(device)


def wgan_setup(device, z_dim=100, batch=64, lr=5e-5, n_critic=5, clip=0.01):
    G1, C1 = wgan_nets(device, z_dim)
    ref_opts = [torch.optim.RMSprop(m.parameters(), lr=lr, foreach=False) for m in (G1, C1)]
    G2, C2 = wgan_nets(device, z_dim)
    our_opts = [torch.optim.RMSprop(m.parameters(), lr=lr, foreach=True) for m in (G2, C2)]  # as train_wgan.py
    counts = [0, 0]

    def ref(real):
        counts[0] += 1
        z_g = torch.randn(batch, z_dim, device=device) if counts[0] % n_critic == 0 else None
        textbook.wgan_step(G1, C1, *ref_opts, real.to(device), torch.randn(batch, z_dim, device=device), z_g, clip)

    def ours(real):
        counts[1] += 1
        train_wgan.critic_step(G2, C2, our_opts[1], real, torch.randn(batch, z_dim, device=device), clip)
        if counts[1] % n_critic == 0:
            train_wgan.generator_step(G2, C2, our_opts[0], torch.randn(batch, z_dim, device=device))

    return ref, ours, batch, 28


def wgan_default_setup(device):
    """The clipped WGAN at train_wgan.py's own defaults (its batch, rate and n_critic), read from its parser."""
    d = train_wgan.make_parser().parse_args([])
    return wgan_setup(device, d.z_dim, d.batch_size, d.lr, d.n_critic, d.clip_value)


def wgan_gp_setup(device, z_dim=100, batch=64, lr=1e-3, n_critic=5, gp_weight=10.0):
    """The penalty's critic step (a double backward): textbook.py's separate forwards against the script's one."""
    G1, C1 = wgan_nets(device, z_dim)
    ref_opts = [torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9), foreach=False) for m in (G1, C1)]
    G2, C2 = wgan_nets(device, z_dim)
    fast = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}  # as train_wgan_gp.py
    our_opts = [torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9), **fast) for m in (G2, C2)]
    counts = [0, 0]

    def ref(real):
        counts[0] += 1
        z, eps = torch.randn(batch, z_dim, device=device), torch.rand(batch, device=device)
        z_g = torch.randn(batch, z_dim, device=device) if counts[0] % n_critic == 0 else None
        textbook.wgan_gp_step(G1, C1, *ref_opts, real.to(device), z, eps, z_g, gp_weight)

    def ours(real):
        counts[1] += 1
        z, eps = torch.randn(batch, z_dim, device=device), torch.rand(batch, device=device)
        train_wgan_gp.critic_step(G2, C2, our_opts[1], real, z, eps, gp_weight)
        if counts[1] % n_critic == 0:
            train_wgan_gp.generator_step(G2, C2, our_opts[0], torch.randn(batch, z_dim, device=device))

    return ref, ours, batch, 28


# The sources' sizes (vanilla: also the default's), and the clipped WGAN's default batch beside its sources' 64.
ALGOS = {"vanilla": vanilla_setup, "wgan": wgan_setup, "wgan_default": wgan_default_setup, "wgan_gp": wgan_gp_setup}


# ----------------------------------------------------------------------------------------------------------------------
# Measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device):
    """Peak tensor memory of the segment on CUDA; on the CPU no per-loop figure is reliable (see process_peak_rss)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def process_peak_rss_mib():
    """The whole process's peak resident memory (Linux), both loops and the data included."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def time_steps(step, batches, n, device):
    """Seconds for n steps, data fetching included (that is part of what the reference pays)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step(next(batches))
    sync(device)
    return time.perf_counter() - start


def matmul_gflops(device, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_step(step, batches, n=10):
    """Average FLOPs of one step, counted by PyTorch's FlopCounterMode over n steps (the WGAN's G step included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(n):
            step(next(batches))
    return counter.get_total_flops() / n


def bench_algo(setup, images, device, steps, repeats, warmup):
    ref, ours, batch, size = setup(device)
    ref_data = reference_batches(images.cpu(), batch, size, seed=0)
    our_data = our_batches(images[:, None].to(device), batch, seed=0)  # N x 1 x H x W, as the scripts hold it
    time_steps(ref, ref_data, warmup, device)
    time_steps(ours, our_data, warmup, device)
    ref_rates, our_rates, ref_peak, our_peak = [], [], [], []
    for _ in range(repeats):  # alternated, so drifts in machine speed hit both
        reset_peak(device)
        ref_rates.append(steps / time_steps(ref, ref_data, steps, device))
        ref_peak.append(peak_mib(device))
        reset_peak(device)
        our_rates.append(steps / time_steps(ours, our_data, steps, device))
        our_peak.append(peak_mib(device))
    flops = flops_per_step(ours, our_data)
    ref_sps, sps = statistics.median(ref_rates), statistics.median(our_rates)
    return {"ref_steps_per_s": round(ref_sps, 1), "steps_per_s": round(sps, 1), "ratio": round(sps / ref_sps, 2),
            "ref_images_per_s": round(ref_sps * batch, 0), "images_per_s": round(sps * batch, 0),
            "gflop_per_step": round(flops / 1e9, 4), "achieved_gflops": round(sps * flops / 1e9, 1),
            "ref_spread": [round(min(ref_rates), 1), round(max(ref_rates), 1)],
            "spread": [round(min(our_rates), 1), round(max(our_rates), 1)],
            "ref_peak_mib": None if None in ref_peak else round(max(ref_peak)),
            "peak_mib": None if None in our_peak else round(max(our_peak)), "batch": batch}


def make_parser():
    parser = utils.ArgumentParser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-root", default="data", help="as in the training scripts; random images if missing")
    parser.add_argument("--steps", type=utils.positive_int, default=200, help="steps per timed segment")
    parser.add_argument("--repeats", type=utils.positive_int, default=3, help="alternated segments per loop")
    parser.add_argument("--warmup", type=utils.positive_int, default=30, help="untimed steps first")
    parser.add_argument("--json", action="store_true", help="print one JSON line (by default a table)")
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    device = utils.pick_device(args.device)
    try:
        images, _ = utils.load_images("mnist", args.data_root)
        data = f"MNIST from {args.data_root}"
    except utils.UserError:
        images, data = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8), "random uint8 images"
    matmul = matmul_gflops(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": device_name, "torch": torch.__version__, "data": data, "matmul_gflops": round(matmul, 1)}
    for name, setup in ALGOS.items():
        r = bench_algo(setup, images, device, args.steps, args.repeats, args.warmup)
        r["flop_fraction"] = round(r["achieved_gflops"] / matmul, 3)
        result[name] = r
    result["matmul_gflops_after"] = round(matmul_gflops(device), 1)  # the limit again, to show drift
    rss = process_peak_rss_mib()
    result["process_peak_rss_mib"] = None if rss is None else round(rss)
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}, torch {result['torch']}, data: {data}")
    print(f"matmul limit: {result['matmul_gflops']} GFLOP/s (after: {result['matmul_gflops_after']});"
          f" process peak RSS {result['process_peak_rss_mib']} MiB")
    print(f"{'':12} {'ref steps/s':>12} {'steps/s':>9} {'ratio':>6} {'images/s':>9} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'% limit':>8} {'GPU peak MiB ref/ours':>22}")
    for name in ALGOS:
        r = result[name]
        print(f"{name:12} {r['ref_steps_per_s']:>12} {r['steps_per_s']:>9} {r['ratio']:>6} {r['images_per_s']:>9} "
              f"{r['gflop_per_step']:>11} {r['achieved_gflops']:>8} {100 * r['flop_fraction']:>7.1f}% "
              f"{str(r['ref_peak_mib']) + '/' + str(r['peak_mib']):>22}")


if __name__ == "__main__":
    utils.run_main(main, sys.argv[1:])
