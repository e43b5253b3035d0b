"""Each algorithm's step written the obvious way, as the two sources wrote it: separate real and fake forwards,
F.binary_cross_entropy, `p.data.clamp_` per parameter. The training scripts run faster steps that compute the same
numbers (tests/test_steps.py checks that step for step); tools/bench.py times them against these.

No `.item()` here either: a step returns detached tensors, so neither side pays a host sync per step.
"""
import torch
import torch.nn.functional as F


def vanilla_gan_step(G, D, opt_G, opt_D, real, z):
    """One step of the GAN of Goodfellow et al. (2014), the simple-GAN source's way.

    (1) Update D: maximize log D(x) + log(1 - D(G(z))), i.e. minimize [BCE(D(x), 1) + BCE(D(G(z)), 0)] / 2.
    (2) Update G: maximize log D(G(z)) (the non-saturating loss), i.e. minimize BCE(D(G(z)), 1), through the D that
        (1) just updated. The fake is not detached in (1), so its graph is kept (retain_graph) for (2).

    Returns (loss_D, loss_G, mean D(x), mean D(G(z))), detached.
    """
    real = real.view(real.shape[0], -1)
    fake = G(z)
    disc_real = D(real).view(-1)
    loss_D_real = F.binary_cross_entropy(disc_real, torch.ones_like(disc_real))
    disc_fake = D(fake).view(-1)
    loss_D_fake = F.binary_cross_entropy(disc_fake, torch.zeros_like(disc_fake))
    loss_D = (loss_D_real + loss_D_fake) / 2
    D.zero_grad()
    loss_D.backward(retain_graph=True)
    opt_D.step()

    output = D(fake).view(-1)
    loss_G = F.binary_cross_entropy(output, torch.ones_like(output))
    G.zero_grad()
    loss_G.backward()
    opt_G.step()
    return loss_D.detach(), loss_G.detach(), disc_real.mean().detach(), disc_fake.mean().detach()


def wgan_step(G, C, opt_G, opt_C, real, z, z_g, clip_value):
    """One critic step of WGAN with weight clipping (Arjovsky et al., 2017, Algorithm 1), the WGAN source's way, and a
    generator step when z_g is given (the caller gives it every n_critic critic steps).

    Critic: minimize -mean C(x) + mean C(G(z)) (the fake detached), then clip every weight to [-c, c].
    Generator: minimize -mean C(G(z_g)).

    Returns (loss_C, loss_G or None), detached.
    """
    fake = G(z).detach()
    loss_C = -torch.mean(C(real)) + torch.mean(C(fake))
    opt_C.zero_grad()
    loss_C.backward()
    opt_C.step()
    for p in C.parameters():
        p.data.clamp_(-clip_value, clip_value)
    return loss_C.detach(), wgan_generator_step(G, C, opt_G, z_g)


def wgan_gp_step(G, C, opt_G, opt_C, real, z, eps, z_g, gp_weight):
    """One critic step of WGAN-GP (Gulrajani et al., 2017, Algorithm 1) the way most public code writes it, and a
    generator step when z_g is given: separate forwards of the real, fake and interpolated images, the gradient of
    C(x_hat) by `grad_outputs=ones`, its norm over each sample's flattened pixels.

    Returns (loss_C, loss_G or None), detached.
    """
    fake = G(z).detach()
    alpha = eps.view(-1, 1, 1, 1)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    c_interpolates = C(interpolates)
    gradients = torch.autograd.grad(outputs=c_interpolates, inputs=interpolates,
                                    grad_outputs=torch.ones_like(c_interpolates), create_graph=True,
                                    retain_graph=True)[0]
    gradient_penalty = ((gradients.view(gradients.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()
    loss_C = -torch.mean(C(real)) + torch.mean(C(fake)) + gp_weight * gradient_penalty
    opt_C.zero_grad()
    loss_C.backward()
    opt_C.step()
    return loss_C.detach(), wgan_generator_step(G, C, opt_G, z_g)


def wgan_generator_step(G, C, opt_G, z_g):
    """Both WGANs' generator step, minimize -mean C(G(z_g)); None (no step) when z_g is None."""
    if z_g is None:
        return None
    opt_G.zero_grad()
    loss_G = -torch.mean(C(G(z_g)))
    loss_G.backward()
    opt_G.step()
    return loss_G.detach()
