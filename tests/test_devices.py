"""The CUDA and MPS paths, on the CPU: the scripts and evaluate.py run on a fake accelerator (tests/fake_device.py)
that reports a device, draws the device's random numbers from the device's own generators, raises where the device
would, and records seeding, RNG-state calls, host syncs and tensors made on the CPU."""
import json
import shutil

import pytest
import torch

import evaluate
import train_vanilla_gan
import train_wgan
import train_wgan_gp
import utils
from conftest import SMALL_VANILLA, SMALL_WGAN, assert_same_training, load, run_in_process
from fake_device import FakeDevice
from models import Critic, Discriminator, Generator, WGANGenerator

SCRIPTS = {"vanilla": (train_vanilla_gan, SMALL_VANILLA), "wgan": (train_wgan, SMALL_WGAN),
           "wgan_gp": (train_wgan_gp, SMALL_WGAN)}
SEEDING = {"manual_seed", "manual_seed_all", "mps.manual_seed"}


def without_device(flags):
    """The SMALL flags without their --device (the fake device is chosen here)."""
    i = flags.index("--device")
    return flags[:i] + flags[i + 2:]


def train(fake, algo, data_root, runs, name, *flags):
    """A tiny run of `algo` on the fake device; returns (exit code, stdout, stderr). As a process of its own, it
    leaves nothing cached: evaluate.reference's network lives on this fake device, which ends with the run."""
    module, small = SCRIPTS[algo]
    try:
        with fake:
            return run_in_process(module, ["--data-root", data_root, "--runs-dir", runs, "--run-name", name,
                                           *without_device(small), "--device", fake.kind, *flags])
    finally:
        evaluate.reference.cache_clear()


@pytest.mark.parametrize("kind,algo", [("cuda", "vanilla"), ("mps", "wgan"), ("cuda", "wgan"), ("mps", "wgan_gp")])
def test_evaluations_mid_run_never_reseed_the_device_and_leave_the_training_as_it_was(tmp_path, data_root, kind,
                                                                                    algo):
    """The first --eval-every evaluation loads the feature network mid-run: the device's generator is seeded once, at
    setup, and the run ends with the same networks as with --no-eval."""
    with_eval, no_eval = FakeDevice(kind), FakeDevice(kind)
    assert train(with_eval, algo, data_root, tmp_path, "e", "--epochs", "2", "--eval-every", "1")[0] == 0
    assert train(no_eval, algo, data_root, tmp_path, "n", "--epochs", "2", "--no-eval")[0] == 0
    for fake in (with_eval, no_eval):
        seeds = [(what, where) for what, where in fake.of("seeding") if what in SEEDING]
        assert len(seeds) == 1 and seeds[0][1].startswith("utils.py:"), seeds  # seed_everything, at the start
    assert_same_training(load(tmp_path / "e"), load(tmp_path / "n"))


@pytest.mark.parametrize("algo", ["vanilla", "wgan", "wgan_gp"])
def test_a_step_that_neither_logs_nor_checkpoints_makes_no_host_sync_and_no_cpu_tensor(tmp_path, data_root, algo,
                                                                                     monkeypatch):
    fakes = []

    class Batches:  # the loop's tqdm: the phase "step" lasts from a batch's start to the next batch or the loop's end
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            for batch in self.iterable:
                fakes[-1].phase = "step"
                yield batch
            fakes[-1].phase = None

    monkeypatch.setattr(utils, "tqdm", Batches)
    for name, log_every in (("quiet", 1000), ("logging", 2)):
        fakes.append(FakeDevice("cuda"))
        assert train(fakes[-1], algo, data_root, tmp_path, name, "--epochs", "1", "--log-every", log_every,
                     "--checkpoint-every", "0", "--no-eval")[0] == 0
    quiet, logging = fakes
    assert quiet.of("sync", "step") == [] and quiet.of("cpu-tensor", "step") == []
    assert quiet.of("sync")  # the syncs of the epoch's end (means, grid, checkpoint) are seen
    # the recorder sees a step's syncs: logging every 2 steps reads the losses on the host at steps 2, 4, 6, 8
    assert {where.split(":")[0] for _, where in logging.of("sync", "step")} == {"utils.py"}


def test_every_tensor_a_step_makes_is_on_the_device():
    """The step functions on the device: a CPU tensor mixed into a device op raises, as on a GPU; none is made."""
    with FakeDevice("cuda") as fake:
        device = torch.device("cuda")
        G, D = Generator(8, 784, [16]).to(device), Discriminator(784, [16], dropout=0.3).to(device)
        opt_G, opt_D = (torch.optim.Adam(n.parameters(), fused=True) for n in (G, D))
        W, C = WGANGenerator(8, (1, 28, 28), (16, 32)).to(device), Critic((1, 28, 28), (32, 16)).to(device)
        opt_W, opt_C = (torch.optim.RMSprop(n.parameters(), foreach=True) for n in (W, C))
        opt_P = torch.optim.Adam(C.parameters(), fused=True)
        real, z = torch.rand(4, 1, 28, 28, device=device) * 2 - 1, torch.randn(4, 8, device=device)
        eps = torch.rand(4, device=device)
        fake.phase = "step"
        outputs = [*train_vanilla_gan.train_step(G, D, opt_G, opt_D, real, z),
                   train_wgan.critic_step(W, C, opt_C, real, z, 0.01), train_wgan.generator_step(W, C, opt_W, z),
                   *train_wgan_gp.critic_step(W, C, opt_P, real, z, eps, 10.0)]
        fake.phase = None
        assert fake.of("cpu-tensor") == [] and fake.of("sync") == []
        assert all(t.device.type == "cuda" for t in outputs)
        for opt in (opt_G, opt_D, opt_W, opt_C, opt_P):
            assert all(v.device.type == "cuda" for state in opt.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)
        with pytest.raises(RuntimeError, match="same device"):  # the fake device catches a CPU tensor in a step
            D(torch.rand(4, 784))


@pytest.mark.parametrize("algo", ["wgan"])
def test_checkpoints_move_between_machines_with_other_gpu_counts_and_the_cpu(tmp_path, data_root, algo):
    assert train(FakeDevice("cuda", count=2), algo, data_root, tmp_path, "gpus", "--max-steps", "4",
                 "--no-eval")[0] == 0
    shutil.copytree(tmp_path / "gpus", tmp_path / "gpus-again")
    one = FakeDevice("cuda", count=1)
    with one:  # a 2-GPU machine's checkpoint on a 1-GPU machine
        assert run_in_process(SCRIPTS[algo][0], ["--resume", tmp_path / "gpus", "--max-steps", "8",
                                                 "--no-progress"])[0] == 0
    assert [what for what, _ in one.of("seeding") if "rng_state" in what] == ["set_rng_state"] + ["get_rng_state"] * 2
    assert run_in_process(SCRIPTS[algo][0], ["--resume", tmp_path / "gpus-again", "--max-steps", "8", "--device", "cpu",
                                             "--no-progress"])[0] == 0  # ... and on the CPU
    cpu_on_gpu_machine = FakeDevice("cuda", count=2)
    assert train(cpu_on_gpu_machine, algo, data_root, tmp_path, "cpu", "--max-steps", "4", "--no-eval",
                 "--device", "cpu")[0] == 0
    assert cpu_on_gpu_machine.of("device-init") == []  # a CPU run opens no CUDA context, reads no CUDA RNG state
    assert [what for what, _ in cpu_on_gpu_machine.of("seeding") if "rng_state" in what] == []
    with FakeDevice("cuda"):  # a CPU checkpoint on a GPU
        assert run_in_process(SCRIPTS[algo][0], ["--resume", tmp_path / "cpu", "--max-steps", "8", "--device", "cuda",
                                                 "--no-progress"])[0] == 0
    for name in ("gpus", "gpus-again", "cpu"):
        assert torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["step"] == 8


@pytest.mark.parametrize("algo", ["vanilla"])
def test_a_whole_run_and_evaluate_py_on_a_mac(tmp_path, data_root, algo):
    """MPS has no float64 (the fake raises on any); the run, its evaluations and evaluate.py stay in float32 there."""
    assert train(FakeDevice("mps"), algo, data_root, tmp_path, "m", "--epochs", "2", "--eval-every", "1",
                 "--img-size", "32")[0] == 0
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["step"] == 16
    with FakeDevice("mps"):
        code, out, _ = run_in_process(evaluate, [tmp_path / "m", "--n", "64", "--json", "--device", "mps"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["metrics"]["fid"] > 0


def test_a_cpu_runs_fused_adam_resumed_on_a_mac_keeps_its_step_counts_on_the_cpu():
    """A CPU checkpoint's fused Adam loaded into the foreach Adam of a Mac run: the step counts stay on the CPU, where
    foreach Adam keeps them (on the device, every step would read each back to the host), the moments go to the
    device, and a step makes no host sync."""
    cpu = torch.nn.Linear(3, 1)
    saved = torch.optim.Adam(cpu.parameters(), fused=True)
    cpu(torch.randn(2, 3)).sum().backward()
    saved.step()
    with FakeDevice("mps") as fake:
        device = torch.device("mps")
        mac = torch.nn.Linear(3, 1).to(device)
        resumed = torch.optim.Adam(mac.parameters(), **utils.fused(device))
        utils.load_states({"opt": saved.state_dict()}, "run", opt=resumed)
        for state in resumed.state.values():
            assert not fake.on_device(state["step"]) and fake.on_device(state["exp_avg"])
        mac(torch.randn(2, 3, device=device)).sum().backward()
        fake.phase = "step"
        resumed.step()
        fake.phase = None
        assert fake.of("sync", "step") == [] and resumed.param_groups[0]["foreach"]
