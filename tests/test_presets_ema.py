"""Presets (`--preset source|paper`), the resolved configuration, the generator's weight average (`--ema-decay`), and
the checkpoint's format version."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import config
import evaluate
import train_vanilla_gan
import train_wgan
import utils
from conftest import DEVICE, SMALL_WGAN, run_in_process, run_script
from models import EMA, Generator, WGANGenerator

def resolve(module, argv):
    """The configuration a script's main() trains with, for a command line (no resume)."""
    cfg, ckpt = config.resolve(module.make_parser(), argv, module.PRESETS, module.ALGO)
    assert ckpt is None
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Presets


def test_vanilla_source_preset_restores_the_tutorials_settings():
    a = resolve(train_vanilla_gan, ["--preset", "source"])
    assert (a.lr, a.beta1, a.beta2, a.batch_size, a.z_dim) == (3e-4, 0.9, 0.999, 32, 64)
    assert (a.g_hidden, a.d_hidden, a.leaky_slope, a.d_dropout, a.ema_decay) == ((256,), (128,), 0.1, 0.0, 0.0)
    default = resolve(train_vanilla_gan, [])
    assert default.preset == "default" and default.ema_decay > 0 and default.beta1 != 0.9


def test_wgan_paper_and_source_presets():
    paper = resolve(train_wgan, ["--preset", "paper"])  # Algorithm 1
    assert (paper.lr, paper.clip_value, paper.n_critic, paper.batch_size, paper.img_size) == (5e-5, 0.01, 5, 64, 28)
    assert paper.ema_decay == 0.0
    source = resolve(train_wgan, ["--preset", "source"])  # the WGAN code's own run
    assert (source.lr, source.clip_value, source.n_critic, source.img_size) == (5e-5, 0.005, 25, 32)
    assert source.g_widths == (128, 256, 512, 1024) and source.critic_widths == (512, 256)


@pytest.mark.parametrize("argv", [["--preset", "source", "--beta1", "0.5", "--g-hidden", "512", "--ema-decay", "0.99"],
                                  ["--beta1=0.5", "--g-hidden=512", "--ema-decay=0.99", "--preset=source"]])
def test_flags_typed_explicitly_override_the_preset(argv):
    a = resolve(train_vanilla_gan, argv)
    assert (a.beta1, a.g_hidden, a.ema_decay) == (0.5, (512,), 0.99)
    assert (a.lr, a.d_hidden, a.d_dropout) == (3e-4, (128,), 0.0)  # the rest from the preset
    w = resolve(train_wgan, ["--preset", "source", "--n-critic", "5"])
    assert (w.n_critic, w.clip_value, w.img_size) == (5, 0.005, 32)


def test_help_shows_the_values_each_preset_sets():
    text = " ".join(train_wgan.make_parser().format_help().split())
    assert "source: --lr 5e-05, --clip-value 0.005, --n-critic 25" in text
    assert "paper: --lr 5e-05, --clip-value 0.01, --n-critic 5" in text
    text = " ".join(train_vanilla_gan.make_parser().format_help().split())
    assert "source: --lr 0.0003, --beta1 0.9" in text and "--g-hidden 256, --d-hidden 128" in text


def test_preset_and_resolved_values_go_to_config_hparams_and_checkpoint(tmp_path, data_root):
    out = run_script("train_vanilla_gan.py", "--preset", "source", "--data-root", data_root, "--runs-dir", tmp_path,
                     "--run-name", "s", "--max-steps", "3", "--batch-size", "16", "--no-eval", "--no-progress")
    assert out.returncode == 0, out.stderr
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
    a = ckpt["args"]
    assert (a["preset"], a["beta1"], a["g_hidden"], a["d_dropout"], a["ema_decay"], a["batch_size"]) == \
        ("source", 0.9, [256], 0.0, 0.0, 16)
    assert "G_ema" not in ckpt  # EMA off in the source preset
    assert list(ckpt["D"]) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]  # the source's network
    acc = EventAccumulator(str(tmp_path / "s"), size_guidance={"tensors": 0})
    acc.Reload()
    logged = json.loads(acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode().strip("`\n"))
    assert logged["preset"] == "source" and logged["beta1"] == 0.9 and logged["g_hidden"] == [256]
    info = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert info.hparams["preset"].string_value == "source" and info.hparams["beta1"].number_value == 0.9


def test_resume_refuses_another_preset(tmp_path, data_root):
    common = ["--data-root", data_root, "--max-steps", "2", *SMALL_WGAN]
    assert run_script("train_wgan.py", "--runs-dir", tmp_path, "--run-name", "p", *common).returncode == 0
    out = run_script("train_wgan.py", "--resume", tmp_path / "p", "--preset", "paper", "--max-steps", "4")
    assert out.returncode == 2 and "--preset paper (checkpoint: default)" in out.stderr.strip().splitlines()[-1]


def test_resume_resolves_the_checkpoints_configuration_once_and_it_stays_read_only(tmp_path, data_root):
    common = ["--data-root", data_root, "--max-steps", "2", *SMALL_WGAN]
    assert run_script("train_wgan.py", "--runs-dir", tmp_path, "--run-name", "r", "--clip-value", "0.02",
                      *common).returncode == 0
    argv = ["--resume", str(tmp_path / "r"), "--max-steps", "4", "--eval-n", "100"]  # runtime flags given anew
    cfg, ckpt = config.resolve(train_wgan.make_parser(), argv, train_wgan.PRESETS, train_wgan.ALGO)
    assert ckpt["step"] == 2
    assert (cfg.clip_value, cfg.n_critic, cfg.g_widths, cfg.batch_size) == (0.02, 3, (16, 32), 16)  # the checkpoint's
    assert (cfg.max_steps, cfg.eval_n) == (4, 100)  # typed anew
    assert (cfg.run_name, cfg.runs_dir, cfg.resume) == ("r", str(tmp_path), str(tmp_path / "r" / "checkpoint.pt"))
    assert cfg.as_dict()["g_widths"] == [16, 32] and ckpt["args"]["g_widths"] == [16, 32]  # lists, as written
    with pytest.raises(AttributeError, match="read-only"):
        cfg.lr = 1.0


def test_a_checkpoint_of_another_format_is_refused_in_one_line_naming_both(tmp_path, data_root):
    assert run_in_process(train_wgan, ["--data-root", data_root, "--runs-dir", tmp_path, "--run-name", "f",
                                       "--max-steps", "2", "--no-eval", *SMALL_WGAN])[0] == 0
    path = tmp_path / "f" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == utils.CHECKPOINT_FORMAT
    for found in (0, utils.CHECKPOINT_FORMAT + 1):  # 0: written before formats were numbered, without the key
        torch.save({k: v for k, v in ckpt.items() if k != "format"} if found == 0 else {**ckpt, "format": found}, path)
        before = path.read_bytes()
        for module, argv in ((train_wgan, ["--resume", tmp_path / "f", "--max-steps", "4"]),
                             (evaluate, [tmp_path / "f", "--n", "8"])):
            code, _, err = run_in_process(module, argv)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"a checkpoint of format {found}, but these scripts read format {utils.CHECKPOINT_FORMAT}" in err
        assert path.read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------------
# The weight average


def perturbed(module, seed):
    """module with every parameter and buffer moved by seeded noise (as a few training steps would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g))
    return module


def test_ema_update_matches_the_hand_computation():
    torch.manual_seed(0)
    G = WGANGenerator(4, (1, 4, 4), (3, 5))  # with BatchNorm buffers
    ema = EMA(G, 0.9)
    history = [{k: v.double().clone() for k, v in G.state_dict().items()}]
    for seed in range(3):
        perturbed(G, seed)
        ema.update(G)
        history.append({k: v.double().clone() for k, v in G.state_dict().items()})
    params = {name for name, _ in G.named_parameters()}
    d = [2 / 11, 3 / 12, 4 / 13]  # the warm-up: min(0.9, (1 + t) / (10 + t)) at t = 1, 2, 3
    for name, value in ema.model.state_dict().items():
        if name in params:  # ema_t = d_t ema_(t-1) + (1 - d_t) G_t, from ema_0 = G_0
            h = [step[name] for step in history]
            expected = h[0]
            for t in range(3):
                expected = d[t] * expected + (1 - d[t]) * h[t + 1]
            assert torch.allclose(value.double(), expected, rtol=0, atol=1e-5), name
        else:  # BatchNorm statistics: copied from G, not averaged
            assert torch.equal(value, G.state_dict()[name]), name


def test_ema_warms_up_then_follows_its_decay():
    ema = EMA(Generator(3, 10, [6]), 0.999)
    decays = {}
    for t in range(1, 9001):
        ema.updates = t
        decays[t] = ema.current_decay()
    assert decays[1] == 2 / 11 and decays[10] == 11 / 20 and round(decays[100], 3) == 0.918  # close to G at first
    assert decays[8989] < 0.999 and decays[8991] == decays[9000] == 0.999  # then the decay set


def test_ema_decay_0_is_a_copy_and_a_few_steps_in_the_average_is_close_to_g():
    torch.manual_seed(0)
    G = Generator(3, 10, [6])
    start = [p.clone() for p in G.parameters()]
    copy, average = EMA(G, 0.0), EMA(G, 0.999)
    for seed in range(5):
        perturbed(G, seed)
        copy.update(G), average.update(G)
    assert all(torch.equal(a, b) for a, b in zip(copy.model.parameters(), G.parameters()))
    # after 5 steps, without the warm-up, 99.5% of the average would still be the initial weights
    moved = [(a - s).norm() / (g - s).norm() for a, g, s in zip(average.model.parameters(), G.parameters(), start)]
    assert all(m > 0.5 for m in moved), moved
    assert not any(p.requires_grad for p in copy.model.parameters())  # never trained, never in an optimizer


def test_calibrate_gives_batchnorm_the_statistics_of_the_averaged_weights():
    torch.manual_seed(0)
    G = WGANGenerator(4, (1, 4, 4), (3, 5))  # Linear(4, 3) -> LeakyReLU -> Linear(3, 5) -> BatchNorm1d(5) -> ...
    ema = EMA(perturbed(G, 0), 0.9)
    perturbed(G, 1)
    ema.update(G)
    assert torch.equal(ema.model.net[3].running_mean, G.net[3].running_mean)  # copied by the update
    ema.calibrate(batches=3, batch_size=50, seed=7)
    noise = torch.Generator().manual_seed(7)
    lin1, lin2 = ema.model.net[0], ema.model.net[2]
    means, variances = [], []
    for _ in range(3):  # by hand: the pre-BatchNorm activations of each noise batch
        with torch.no_grad():
            h = lin2(torch.nn.functional.leaky_relu(lin1(torch.randn(50, 4, generator=noise)), 0.2))
        means.append(h.mean(0))
        variances.append(h.var(0, unbiased=True))
    bn = ema.model.net[3]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), atol=1e-6)
    assert bn.momentum == 0.1 and not ema.model.training
    assert not torch.equal(bn.running_mean, G.net[3].running_mean)


def checkpoint_with_ema(path):
    """A checkpoint whose G_ema differs from G."""
    torch.manual_seed(0)
    G = Generator(4, 784, [8])
    ema = EMA(G, 0.5)
    perturbed(G, 1)
    args = {"z_dim": 4, "img_size": 28, "g_hidden": [8], "leaky_slope": 0.1, "dataset": "mnist"}
    torch.save({"format": utils.CHECKPOINT_FORMAT, "algo": "vanilla_gan", "args": args, "step": 1, "G": G.state_dict(),
                "G_ema": ema.state_dict()}, path)
    return G, ema


def test_evaluate_scores_the_ema_weights_and_raw_the_trained_ones(tmp_path, data_root, capsys):
    G, ema = checkpoint_with_ema(tmp_path / "c.pt")
    ckpt, _ = utils.load_checkpoint(tmp_path / "c.pt")
    cpu = torch.device("cpu")
    picked, _, weights = evaluate.generator_from_checkpoint(ckpt, cpu)
    assert weights == "ema" and torch.equal(picked.net[0].weight, ema.model.net[0].weight)
    picked, _, weights = evaluate.generator_from_checkpoint(ckpt, cpu, raw=True)
    assert weights == "raw" and torch.equal(picked.net[0].weight, G.net[0].weight)
    results = {}
    for flags in ([], ["--raw"]):
        utils.run_main(evaluate.main, [str(tmp_path / "c.pt"), "--data-root", str(data_root), "--n", "40", "--json",
                                       "--no-floor", "--device", DEVICE, *flags])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        results[result["weights"]] = result["metrics"]["fid"]
    assert set(results) == {"ema", "raw"} and results["ema"] != results["raw"]
