"""The four networks: an MLP GAN (generator + sigmoid discriminator) and a WGAN (BatchNorm MLP generator + critic)."""
import torch.nn as nn


def init_weights(module):
    """Normal init as in the DCGAN/WGAN sources: weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Vanilla GAN generator: z -> 256 -> LeakyReLU(0.1) -> img_dim -> Tanh."""

    def __init__(self, z_dim=64, img_dim=784, hidden=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, img_dim),
            nn.Tanh(),
        )
        self.apply(init_weights)

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """Vanilla GAN discriminator: img_dim -> 128 -> LeakyReLU(0.1) -> 1 -> Sigmoid, so D(x) is a probability."""

    def __init__(self, img_dim=784, hidden=128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(img_dim, hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, 1),
            nn.Sigmoid(),
        )
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x.flatten(1))


class WGANGenerator(nn.Module):
    """WGAN generator: blocks of 128 (no norm), 256, 512, 1024 units with BatchNorm1d and LeakyReLU(0.2),
    then -> C*H*W -> Tanh.

    BatchNorm1d keeps its default eps (1e-5); the often copied `nn.BatchNorm1d(n, 0.8)` sets eps=0.8 by mistake.
    """

    def __init__(self, z_dim=100, img_shape=(1, 28, 28), widths=(128, 256, 512, 1024)):
        super().__init__()
        self.img_shape = tuple(img_shape)
        layers, width_in = [], z_dim
        for i, width in enumerate(widths):
            layers.append(nn.Linear(width_in, width))
            if i > 0:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.LeakyReLU(0.2))
            width_in = width
        c, h, w = self.img_shape
        layers += [nn.Linear(width_in, c * h * w), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z):
        return self.net(z).view(z.shape[0], *self.img_shape)


class Critic(nn.Module):
    """WGAN critic: C*H*W -> 512 -> 256 -> 1 with LeakyReLU(0.2); a real-valued score, no sigmoid."""

    def __init__(self, img_shape=(1, 28, 28), widths=(512, 256)):
        super().__init__()
        c, h, w = img_shape
        layers, width_in = [], c * h * w
        for width in widths:
            layers += [nn.Linear(width_in, width), nn.LeakyReLU(0.2)]
            width_in = width
        layers.append(nn.Linear(width_in, 1))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x.flatten(1))
