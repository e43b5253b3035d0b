"""The networks, their initialization, the generator's weight average, and a new generator evaluate.py rebuilds."""
import torch
import torch.nn as nn

import evaluate
import models
from models import EMA, Critic, Discriminator, Generator, WGANGenerator


def test_vanilla_g_draws_images_in_minus1_1_and_d_gives_probabilities():
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    fake = G(torch.randn(5, 64) * 10)  # large inputs still land in tanh's range
    assert fake.shape == (5, 784)
    assert fake.min() >= -1 and fake.max() <= 1
    p = D(torch.randn(5, 1, 28, 28) * 10)
    assert p.shape == (5, 1)
    assert (p > 0).all() and (p < 1).all()
    assert [m.out_features for m in G.net if isinstance(m, nn.Linear)] == [256, 784]
    assert [m.out_features for m in D.net if isinstance(m, nn.Linear)] == [128, 1]
    assert [m.negative_slope for m in G.net if isinstance(m, nn.LeakyReLU)] == [0.1]


def test_wgan_g_has_batchnorm_after_the_first_block_and_the_critic_an_unbounded_score():
    torch.manual_seed(0)
    G = WGANGenerator(100, (1, 32, 32))
    fake = G(torch.randn(7, 100))
    assert fake.shape == (7, 1, 32, 32)
    assert fake.min() >= -1 and fake.max() <= 1
    widths = [m.out_features for m in G.net if isinstance(m, nn.Linear)]
    assert widths == [128, 256, 512, 1024, 1024]
    norms = [m for m in G.net if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [256, 512, 1024]  # none after the first block
    assert all(m.eps == 1e-5 for m in norms)  # not the widely copied eps=0.8
    C = Critic((1, 28, 28))
    assert [m.out_features for m in C.net if isinstance(m, nn.Linear)] == [512, 256, 1]
    assert not any(isinstance(m, nn.Sigmoid) for m in C.modules())
    with torch.no_grad():
        for p in C.parameters():
            p.fill_(0.5)
    assert C(torch.ones(2, 1, 28, 28)).abs().min() > 1  # a score, not a probability


def test_the_layer_norm_critic_normalizes_each_hidden_layer_and_scores_each_sample_on_its_own():
    torch.manual_seed(0)
    C = Critic((1, 28, 28), (32, 16), layer_norm=True)
    assert [type(m) for m in C.net] == [nn.Linear, nn.LayerNorm, nn.LeakyReLU] * 2 + [nn.Linear]
    assert {id(p) for p in C.net[1].parameters()} <= {id(p) for p in C.parameters()}  # they train too
    with torch.no_grad():
        C.net[1].bias.fill_(0.3)
    x = torch.randn(5, 1, 28, 28)
    # a per-sample norm: a sample's score (and so its penalty gradient) does not depend on the rest of the batch
    assert torch.allclose(C(x), torch.cat([C(x[i:i + 1]) for i in range(5)]), atol=1e-6)
    hidden = C.net[:2](x.flatten(1))
    assert torch.allclose(hidden.mean(1), torch.full((5,), 0.3), atol=1e-5)  # normalized per sample, then shifted


def test_weights_start_normal_with_std_002_and_zero_biases():
    torch.manual_seed(0)
    G = WGANGenerator()
    big = G.net[-2].weight  # 784 x 1024
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    bn = [m for m in G.net if isinstance(m, nn.BatchNorm1d)][-1]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert all((m.bias == 0).all() for m in G.net if isinstance(m, nn.Linear))


def perturbed(module, seed):
    """module with every parameter and buffer moved by seeded noise (as a few training steps would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g))
    return module


def test_ema_update_matches_the_hand_computation_with_its_warm_up():
    torch.manual_seed(0)
    G = WGANGenerator(4, (1, 4, 4), (3, 5))  # with BatchNorm buffers
    ema = EMA(G, 0.9)
    history = [{k: v.double().clone() for k, v in G.state_dict().items()}]
    for seed in range(3):
        perturbed(G, seed)
        ema.update(G)
        history.append({k: v.double().clone() for k, v in G.state_dict().items()})
    params = {name for name, _ in G.named_parameters()}
    d = [1 / 26, 2 / 27, 3 / 28]  # the warm-up: min(0.9, t / (t + 25)) at t = 1, 2, 3
    for name, value in ema.model.state_dict().items():
        if name in params:  # ema_t = d_t ema_(t-1) + (1 - d_t) G_t, from ema_0 = G_0
            expected = history[0][name]
            for t in range(3):
                expected = d[t] * expected + (1 - d[t]) * history[t + 1][name]
            assert torch.allclose(value.double(), expected, rtol=0, atol=1e-5), name
        else:  # BatchNorm statistics: copied from G, not averaged
            assert torch.equal(value, G.state_dict()[name]), name
    assert not any(p.requires_grad for p in ema.model.parameters())  # never trained
    slow = EMA(G, 0.999)
    decays = {t: (setattr(slow, "updates", t), slow.current_decay())[1] for t in (1, 10, 100, 24974, 24975)}
    assert decays[1] == 1 / 26 and decays[10] == 10 / 35 and decays[100] == 0.8  # close to G while it moves fast
    assert decays[24974] < 0.999 and decays[24975] == 0.999  # then the decay set


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
            h = lin2(nn.functional.leaky_relu(lin1(torch.randn(50, 4, generator=noise)), 0.2))
        means.append(h.mean(0))
        variances.append(h.var(0, unbiased=True))
    bn = ema.model.net[3]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), atol=1e-6)
    assert bn.momentum == 0.1 and not ema.model.training


class ConvGenerator(nn.Module):
    """A generator of another shape, as a student would add one to models.py: init, the average's calibration and
    evaluate.py must cover it with no change elsewhere."""

    def __init__(self, z_dim=8, channels=4):
        super().__init__()
        self.model_args, self.z_dim = dict(z_dim=z_dim, channels=channels), z_dim
        self.net = nn.Sequential(nn.Unflatten(1, (z_dim, 1, 1)), nn.ConvTranspose2d(z_dim, channels, 7),
                                 nn.BatchNorm2d(channels), nn.ReLU(), nn.Upsample(scale_factor=4),
                                 nn.Conv2d(channels, 1, 3, padding=1), nn.Tanh())
        self.apply(models.init_weights)

    def forward(self, z):
        return self.net(z)


def test_a_new_conv_generator_is_initialized_calibrated_and_rebuilt_from_its_checkpoint(monkeypatch):
    torch.manual_seed(0)
    G = ConvGenerator()
    conv, norm = G.net[5], G.net[2]
    assert abs(conv.weight.std().item() - 0.02) < 0.01 and (conv.bias == 0).all()
    assert abs(norm.weight.mean().item() - 1) < 0.05 and 0 < norm.weight.std().item() < 0.05
    ema = EMA(G, 0.9)
    ema.calibrate()
    assert ema.calibrated and not torch.equal(ema.model.net[2].running_var, torch.ones(4))
    monkeypatch.setattr(models, "ConvGenerator", ConvGenerator, raising=False)
    ckpt = {"G_class": "ConvGenerator", "G_args": G.model_args, "G": G.state_dict(), "G_ema": ema.state_dict()}
    rebuilt, weights = evaluate.generator_from_checkpoint(ckpt, torch.device("cpu"))
    assert weights == "ema" and torch.equal(rebuilt.net[5].weight, ema.model.net[5].weight)
    assert evaluate.sample(rebuilt, 5, torch.device("cpu")).shape == (5, 28, 28)
