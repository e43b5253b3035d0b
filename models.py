"""The networks (an MLP GAN: generator + sigmoid discriminator; a WGAN: BatchNorm MLP generator + critic) and the
generator's weight average. A generator keeps its constructor arguments in `model_args` and its noise size in
`z_dim`: a checkpoint stores both, so evaluate.py rebuilds any generator defined here (as nanoGPT's model_args)."""
import copy

import torch
import torch.nn as nn


def init_weights(module):
    """As the DCGAN and WGAN sources: Linear and Conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):  # _ConvNd: every Conv and ConvTranspose
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def mlp(widths, slope, norm=None, norm_from=1, dropout=0.0):
    """Linear layers of widths[0] -> ... -> widths[-1], a LeakyReLU after each hidden one; norm(width) (a BatchNorm1d
    or LayerNorm) before it from hidden layer norm_from on (0: the first); Dropout after it (dropout > 0: absent
    otherwise, so layer names stay)."""
    layers = []
    for i, (width_in, width) in enumerate(zip(widths[:-2], widths[1:-1])):
        layers += [nn.Linear(width_in, width), *([norm(width)] if norm and i >= norm_from else []),
                   nn.LeakyReLU(slope), *([nn.Dropout(dropout)] if dropout > 0 else [])]
    return layers + [nn.Linear(widths[-2], widths[-1])]


class Generator(nn.Module):
    """Vanilla GAN generator: z -> [Linear -> LeakyReLU] per hidden width -> img_dim -> Tanh.
    The source's: Generator(64, 784, [256], 0.1)."""

    def __init__(self, z_dim=64, img_dim=784, widths=(256,), slope=0.1):
        super().__init__()
        self.model_args, self.z_dim = dict(z_dim=z_dim, img_dim=img_dim, widths=list(widths), slope=slope), z_dim
        self.net = nn.Sequential(*mlp([z_dim, *widths, img_dim], slope), nn.Tanh())
        self.apply(init_weights)

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """Vanilla GAN discriminator: img_dim -> [Linear -> LeakyReLU (-> Dropout)] per hidden width -> 1 -> Sigmoid, so
    D(x) is a probability. The source's: Discriminator(784, [128], 0.1), no dropout."""

    def __init__(self, img_dim=784, widths=(128,), slope=0.1, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(*mlp([img_dim, *widths, 1], slope, dropout=dropout), nn.Sigmoid())
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x.flatten(1))


class WGANGenerator(nn.Module):
    """WGAN generator: blocks of 128 (no norm), 256, 512, 1024 units with BatchNorm1d and LeakyReLU(0.2), then
    -> C*H*W -> Tanh. BatchNorm1d keeps its default eps (1e-5); the often copied `nn.BatchNorm1d(n, 0.8)` sets
    eps=0.8 by mistake."""

    def __init__(self, z_dim=100, img_shape=(1, 28, 28), widths=(128, 256, 512, 1024)):
        super().__init__()
        self.model_args, self.z_dim = dict(z_dim=z_dim, img_shape=list(img_shape), widths=list(widths)), z_dim
        self.img_shape = tuple(img_shape)
        dims = [z_dim, *widths, img_shape[0] * img_shape[1] * img_shape[2]]
        self.net = nn.Sequential(*mlp(dims, 0.2, nn.BatchNorm1d), nn.Tanh())
        self.apply(init_weights)

    def forward(self, z):
        return self.net(z).view(z.shape[0], *self.img_shape)


class Critic(nn.Module):
    """WGAN critic: C*H*W -> 512 -> 256 -> 1 with LeakyReLU(0.2); a real-valued score, no sigmoid. layer_norm: a
    LayerNorm before each LeakyReLU (WGAN-GP: a per-sample norm, where BatchNorm would mix the batch's samples)."""

    def __init__(self, img_shape=(1, 28, 28), widths=(512, 256), layer_norm=False):
        super().__init__()
        self.net = nn.Sequential(*mlp([img_shape[0] * img_shape[1] * img_shape[2], *widths, 1], 0.2,
                                      nn.LayerNorm if layer_norm else None, norm_from=0))
        self.apply(init_weights)

    def forward(self, x):
        return self.net(x.flatten(1))


@torch.no_grad()
def generate(G, z):
    """G(z) in eval mode (BatchNorm uses its running statistics, not the batch's own); G's mode restored after."""
    was_training = G.training
    G.eval()
    try:
        return G(z)
    finally:
        G.train(was_training)


class EMA:
    """An exponential moving average of a generator's weights, for sampling; the raw generator is what trains.

    After the t-th generator step: ema <- d * ema + (1 - d) * G, with d = min(decay, t / (t + 25)): an average over
    about the last t / 25 steps, so it follows G closely while G moves fast (TensorFlow's (1 + t) / (10 + t) lagged
    it at one epoch: docs/tuning.md). BatchNorm statistics are G's until calibrate() measures the averaged weights'
    own (they belong to G's weights: FID 44 -> 36 on the WGAN, docs/tuning.md).
    """

    def __init__(self, G, decay):
        self.model = copy.deepcopy(G).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0  # t: generator steps averaged so far (saved in the checkpoint beside the weights)
        self.calibrated = False

    def current_decay(self):
        return min(self.decay, self.updates / (self.updates + 25))

    @torch.no_grad()
    def update(self, G):
        self.updates += 1
        # lerp: ema + (1 - d) * (G - ema), one kernel for all tensors; exactly G at d = 0
        torch._foreach_lerp_(list(self.model.parameters()), list(G.parameters()), 1.0 - self.current_decay())
        for ema_buffer, buffer in zip(self.model.buffers(), G.buffers()):
            ema_buffer.copy_(buffer)
        self.calibrated = False

    @torch.no_grad()
    def calibrate(self, batches=10, batch_size=256, seed=0):
        """BatchNorm running statistics of the averaged weights: the plain mean of the batch statistics of `batches`
        noise batches from a generator of its own (deterministic; the training's RNG is left alone). Does nothing
        without BatchNorm, or when nothing changed since the last call."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.calibrated or not norms:
            return
        device = next(self.model.parameters()).device
        noise = torch.Generator(device=device).manual_seed(seed)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        self.model.train()
        for _ in range(batches):
            self.model(torch.randn(batch_size, self.model.z_dim, device=device, generator=noise))
        self.model.eval()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.calibrated = True

    def state_dict(self):
        self.calibrate()  # a saved average carries the statistics of its own weights (evaluate.py samples it)
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def batch_statistics(net):
    """Whether a network mixes a batch's samples (BatchNorm in training): then one forward over real and fake
    together differs from two, and a per-sample gradient penalty is wrong."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())
