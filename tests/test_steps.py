"""The losses a step computes, checked against values computed by hand (numpy), the critic's clipping, the gradient
penalty against closed forms and a loop over samples, and each fast step against its textbook form."""
import numpy as np
import pytest
import torch

import textbook
import train_vanilla_gan
import train_wgan
import train_wgan_gp
from models import Critic, Discriminator, Generator, WGANGenerator


def np_mlp(x, linears, slope, last=None):
    """Forward of Linear/LeakyReLU stacks with numpy, from the modules' weights."""
    h = x
    for i, lin in enumerate(linears):
        h = h @ lin.weight.detach().numpy().astype(np.float64).T + lin.bias.detach().numpy()
        if i < len(linears) - 1:
            h = np.where(h > 0, h, slope * h)
    return 1 / (1 + np.exp(-h)) if last == "sigmoid" else h


def linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_vanilla_losses_match_hand_computation():
    torch.manual_seed(0)
    G, D = Generator(z_dim=8, img_dim=784, widths=[32]), Discriminator(784, widths=[16])
    opt_G, opt_D = torch.optim.Adam(G.parameters(), lr=1e-2), torch.optim.Adam(D.parameters(), lr=1e-2)
    real = torch.rand(6, 1, 28, 28) * 2 - 1
    z = torch.randn(6, 8)
    x = real.flatten(1).numpy().astype(np.float64)
    fake = np.tanh(np_mlp(z.numpy().astype(np.float64), linears(G), 0.1))
    p_real, p_fake = np_mlp(x, linears(D), 0.1, "sigmoid"), np_mlp(fake, linears(D), 0.1, "sigmoid")
    expected_D = 0.5 * (np.mean(-np.log(p_real)) + np.mean(-np.log(1 - p_fake)))

    loss_D, loss_G, d_real, d_fake = train_vanilla_gan.train_step(G, D, opt_G, opt_D, real, z)

    assert np.isclose(loss_D.item(), expected_D, rtol=1e-5)
    assert np.isclose(d_real.item(), p_real.mean(), rtol=1e-5)
    assert np.isclose(d_fake.item(), p_fake.mean(), rtol=1e-5)
    # G's loss is -log D(G(z)) through the discriminator as updated by this step's D step (non-saturating loss)
    p_fake_after = np_mlp(fake, linears(D), 0.1, "sigmoid")
    assert np.isclose(loss_G.item(), np.mean(-np.log(p_fake_after)), rtol=1e-5)
    assert not np.isclose(loss_G.item(), np.mean(-np.log(p_fake)), rtol=1e-3)  # D really moved first


def test_wgan_losses_match_hand_computation_and_clipping_bounds():
    torch.manual_seed(0)
    G, C = WGANGenerator(8, (1, 28, 28), (16, 32)), Critic((1, 28, 28), (32, 16))
    opt_C = torch.optim.RMSprop(C.parameters(), lr=0.05)  # large: many weights hit the clip bounds
    opt_G = torch.optim.RMSprop(G.parameters(), lr=0.05)
    real, z = torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 8)
    with torch.no_grad():
        fake = G(z)  # train-mode BatchNorm, as in the step
    c_real = np_mlp(real.flatten(1).numpy().astype(np.float64), linears(C), 0.2)
    c_fake = np_mlp(fake.flatten(1).numpy().astype(np.float64), linears(C), 0.2)

    loss_C = train_wgan.critic_step(G, C, opt_C, real, z, clip_value=0.01)

    assert np.isclose(loss_C.item(), c_fake.mean() - c_real.mean(), rtol=1e-4, atol=1e-7)
    weights = torch.cat([p.detach().flatten() for p in C.parameters()])
    assert weights.abs().max() <= 0.01
    assert (weights.abs() == 0.01).float().mean() > 0.5  # the clipping did act

    z2 = torch.randn(6, 8)
    G_probe = WGANGenerator(8, (1, 28, 28), (16, 32))
    G_probe.load_state_dict(G.state_dict())
    with torch.no_grad():
        expected_G = -C(G_probe(z2)).mean().item()
    critic_before = [p.detach().clone() for p in C.parameters()]
    loss_G = train_wgan.generator_step(G, C, opt_G, z2)
    assert np.isclose(loss_G.item(), expected_G, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(critic_before, C.parameters()))  # the G step leaves C alone


def _clone_pair(make):
    torch.manual_seed(0)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    return a, b


def test_fast_vanilla_step_equals_the_textbook_step():
    G1, G2 = _clone_pair(lambda: Generator(16, 784, [64]))
    D1, D2 = _clone_pair(lambda: Discriminator(784, [32]))
    fast_opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in (G1, D1)]
    ref_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G2, D2)]
    for i in range(3):
        real, z = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, 16)
        fast = train_vanilla_gan.train_step(G1, D1, *fast_opts, real, z)
        ref = textbook.vanilla_gan_step(G2, D2, *ref_opts, real, z)
        for a, b in zip(fast, ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(list(G1.parameters()) + list(D1.parameters()), list(G2.parameters()) + list(D2.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", ["wgan", "wgan_gp"])
def test_fast_wgan_steps_equal_the_textbook_step(algo):
    G1, G2 = _clone_pair(lambda: WGANGenerator(16, (1, 28, 28), (32, 64)))
    C1, C2 = _clone_pair(lambda: Critic((1, 28, 28), (64, 32)))
    if algo == "wgan":  # RMSprop, clip 0.01
        lr, script = 5e-5, train_wgan
        fast_opts = [torch.optim.RMSprop(m.parameters(), lr=lr, foreach=True) for m in (G1, C1)]
        ref_opts = [torch.optim.RMSprop(m.parameters(), lr=lr, foreach=False) for m in (G2, C2)]

        def fast_critic(real, z, eps):
            return train_wgan.critic_step(G1, C1, fast_opts[1], real, z, 0.01)

        def ref_step(real, z, eps, z_g):
            return textbook.wgan_step(G2, C2, *ref_opts, real, z, z_g, 0.01)
    else:  # Adam, lambda 10
        lr, script = 1e-4, train_wgan_gp
        fast_opts = [torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9), fused=True) for m in (G1, C1)]
        ref_opts = [torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9)) for m in (G2, C2)]

        def fast_critic(real, z, eps):
            return train_wgan_gp.critic_step(G1, C1, fast_opts[1], real, z, eps, 10.0)[0]

        def ref_step(real, z, eps, z_g):
            return textbook.wgan_gp_step(G2, C2, *ref_opts, real, z, eps, z_g, 10.0)
    for step in range(1, 7):
        real, z, eps, z_g = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, 16), torch.rand(8), torch.randn(8, 16)
        do_g = step % 3 == 0
        loss_C = fast_critic(real, z, eps)
        loss_G = script.generator_step(G1, C1, fast_opts[0], z_g) if do_g else None
        ref_C, ref_G = ref_step(real, z, eps, z_g if do_g else None)
        assert torch.allclose(loss_C, ref_C, rtol=1e-4, atol=1e-6), (loss_C - ref_C).item()
        if do_g:
            assert torch.allclose(loss_G, ref_G, rtol=1e-4, atol=1e-6)
    # Compare what G computes, not its raw weights: the biases of the Linear layers before BatchNorm get no true
    # gradient, so the optimizer moves them by rounding noise in both implementations; BatchNorm cancels them.
    z = torch.randn(16, 16)
    assert torch.allclose(G1(z), G2(z), rtol=1e-4, atol=1e-5)
    G1.eval(), G2.eval()
    assert torch.allclose(G1(z), G2(z), rtol=1e-4, atol=1e-5)
    # RMSprop and Adam divide each gradient by its running RMS, so entries whose gradient nearly cancels between the
    # terms carry rounding noise into the update; any real difference in the math moves weights by ~lr.
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(C1.parameters(), C2.parameters())])
    assert diffs.max() < 0.5 * lr and diffs.median() < 1e-9


def test_the_penalty_of_a_linear_critic_is_lambda_times_its_weight_norm_minus_1_squared_and_trains_it():
    """C(x) = w.x + b has gradient w at every point: penalty (||w|| - 1)^2, and the step's gradient on w is
    2 lambda (||w|| - 1) w / ||w|| - (mean x - mean G(z)); on b it is 0. Without create_graph the first term is lost."""
    torch.manual_seed(0)
    G, C = Generator(8, 784, [16]), torch.nn.Linear(784, 1)  # G without BatchNorm: its fakes are the step's
    real, z, eps = torch.rand(6, 1, 28, 28) * 2 - 1, torch.randn(6, 8), torch.rand(6)
    with torch.no_grad():
        fake = G(z).double()
    w, b = C.weight[0].detach().double().clone(), C.bias.detach().clone()
    norm, mean_diff = w.norm(), real.flatten(1).double().mean(0) - fake.mean(0)

    loss, wasserstein, penalty, grad_norm = train_wgan_gp.critic_step(G, C, torch.optim.SGD(C.parameters(), lr=0.1),
                                                                      real, z, eps, gp_weight=10.0)

    assert np.isclose(grad_norm.item(), norm.item(), rtol=1e-5) and 0.2 < abs(norm.item() - 1)  # away from 1
    assert np.isclose(penalty.item(), ((norm - 1) ** 2).item(), rtol=1e-4)
    assert np.isclose(wasserstein.item(), (w @ mean_diff).item(), rtol=1e-4, atol=1e-6)
    assert np.isclose(loss.item(), (10 * (norm - 1) ** 2 - w @ mean_diff).item(), rtol=1e-4)
    expected_w = w - 0.1 * (20 * (norm - 1) * w / norm - mean_diff)
    assert torch.allclose(C.weight[0].double(), expected_w, rtol=1e-4, atol=1e-6)
    assert torch.allclose(C.bias, b, rtol=0, atol=1e-7)  # b cancels in the estimate: no gradient but rounding


def test_the_penalty_takes_one_eps_and_one_gradient_norm_per_sample():
    """Against a loop over samples on an MLP critic, on a batch where the per-pixel forms (|grad| per pixel, or the
    norm over the channel only) give another number."""
    torch.manual_seed(0)
    G, C = Generator(8, 784, [16]), Critic((1, 28, 28), (32, 16))
    with torch.no_grad():  # gradient norms of 2.3 to 3.2 (at the init's scale they are about 0.003)
        for linear in linears(C):
            linear.weight.mul_(10)
    real, z, eps = torch.rand(5, 1, 28, 28) * 2 - 1, torch.randn(5, 8), torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    with torch.no_grad():
        fake = G(z)
    grads = []
    for i in range(5):
        x_hat = (eps[i] * real[i].flatten() + (1 - eps[i]) * fake[i]).requires_grad_(True)
        grads.append(torch.autograd.grad(C(x_hat[None]).sum(), x_hat)[0])
    grads = torch.stack(grads)
    expected = ((grads.norm(dim=1) - 1) ** 2).mean()
    per_pixel = ((grads.abs() - 1) ** 2).mean()  # also the norm over dim 1 of an N x 1 x 28 x 28 gradient
    assert expected > 2.5 and per_pixel < 0.9

    _, _, penalty, grad_norm = train_wgan_gp.critic_step(G, C, torch.optim.SGD(C.parameters(), lr=0.0), real, z, eps,
                                                         gp_weight=10.0)

    assert np.isclose(penalty.item(), expected.item(), rtol=1e-5)
    assert np.isclose(grad_norm.item(), grads.norm(dim=1).mean().item(), rtol=1e-5)


def test_the_vanilla_loss_gives_the_gradients_of_binary_cross_entropy_where_probabilities_saturate():
    """sigmoid(20) rounds to 1 and sigmoid(-120) to 0 in float32: there the log's gradient is 0 * inf; the loss's
    value and its gradient at the logits are F.binary_cross_entropy's (finite), and a NaN still gives a NaN loss."""
    targets = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0]])
    logits = [torch.tensor([[20.0], [-120.0], [-20.0], [0.3], [-0.7]], requires_grad=True) for _ in range(2)]
    ours = train_vanilla_gan.bce(torch.sigmoid(logits[0]), targets)
    reference = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits[1]), targets)
    ours.backward()
    reference.backward()
    # the log clamped at -100, as there; two kernels (torch.log and the BCE kernel's own log and mean), so within a few
    # float32 roundings rather than bit for bit (they were equal on the machine that wrote this test)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=0) and ours > 40
    assert torch.isfinite(logits[0].grad).all() and torch.allclose(logits[0].grad, logits[1].grad, atol=1e-7)
    assert torch.isnan(train_vanilla_gan.bce(torch.tensor([[float("nan")], [0.5]]), targets[:2]))


def test_the_steps_that_forward_real_and_fake_together_refuse_a_network_with_batch_statistics():
    """One forward over a batch of real and fake images is the two forwards of the algorithm only without BatchNorm
    (and a per-sample penalty needs per-sample scores): a fork that adds it to D or the critic is stopped."""
    torch.manual_seed(0)
    with_batch_norm = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.BatchNorm1d(16),
                                          torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))
    G, W = Generator(8, 784, [16]), WGANGenerator(8, (1, 28, 28), (16, 32))
    real, z, eps = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 8), torch.rand(4)
    opt = torch.optim.SGD(with_batch_norm.parameters())
    with pytest.raises(AssertionError, match="BatchNorm"):
        train_vanilla_gan.train_step(G, torch.nn.Sequential(with_batch_norm, torch.nn.Sigmoid()),
                                     torch.optim.SGD(G.parameters()), opt, real, z)
    with pytest.raises(AssertionError, match="BatchNorm"):
        train_wgan.critic_step(W, with_batch_norm, opt, real, z, 0.01)
    with pytest.raises(AssertionError, match="BatchNorm"):
        train_wgan_gp.critic_step(W, with_batch_norm, opt, real, z, eps, 10.0)


def test_the_vanilla_step_takes_a_generator_of_images_as_the_readme_says():
    """A conv generator (N x 1 x 28 x 28 out, tests/test_models.py) in place of the MLP one: the same numbers as the
    textbook step."""
    from test_models import ConvGenerator

    G1, G2 = _clone_pair(lambda: ConvGenerator(8))
    D1, D2 = _clone_pair(lambda: Discriminator(784, [32]))
    fast_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G1, D1)]
    ref_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G2, D2)]
    real, z = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, 8)
    fast = train_vanilla_gan.train_step(G1, D1, *fast_opts, real, z)
    ref = textbook.vanilla_gan_step(G2, D2, *ref_opts, real, z)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
