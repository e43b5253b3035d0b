import torch
import torch.nn as nn

from models import Critic, Discriminator, Generator, WGANGenerator


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


def test_weights_start_normal_with_std_002_and_zero_biases():
    torch.manual_seed(0)
    G = WGANGenerator()
    big = G.net[-2].weight  # 784 x 1024
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    bn = [m for m in G.net if isinstance(m, nn.BatchNorm1d)][-1]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert all((m.bias == 0).all() for m in G.net if isinstance(m, nn.Linear))
