"""A fake accelerator, so that CPU-only CI runs the CUDA and MPS code paths.

torch.cuda (or torch.backends.mps and torch.mps) is patched to answer as if the device were there, and a
TorchFunctionMode makes tensors report that device while they compute on the CPU:

- `device=` of factory functions, `.to()` and `.cuda()` put tensors on the fake device (a CPU copy, marked); what is
  computed from a marked tensor is marked (an in-place op keeps its tensor's device); `tensor.device` / `is_cuda` /
  `is_mps` answer for it; `torch.Generator(device=...)` remembers its device.
- Random numbers drawn on the fake device come from the device's own generators (one per fake GPU), which
  `torch.manual_seed`, `torch.cuda.manual_seed_all`, `get_rng_state`, `set_rng_state`... seed, read and set, as on
  real hardware: a stray reseeding of the device changes what a run computes.
- As a real device would, it raises on a torch function that mixes a device tensor with a CPU tensor of one or more
  dimensions (copies and indexing a device tensor excepted), on a CPU tensor indexed by a device tensor, on a
  generator of the other device, on `.numpy()` or `np.asarray` of a device tensor, and, for MPS, on any float64 tensor
  on the device.
- It records, with the file and line in this repository that made them: calls that seed or read/set the device's RNG
  state (`seeding`), calls that initialize the device (`device-init`), host syncs (`sync`: `.item()`, `float()`,
  `bool()`, `.tolist()`, `.cpu()`, `torch.equal`... of a device tensor), and tensors of one or more dimensions made on
  the CPU by a factory while `phase` is set (`cpu-tensor`).

What it cannot see: calls that torch makes inside another torch function (the mode is off there), real kernels and
their rounding, speed and memory.

Use: `with FakeDevice("cuda", count=2) as fake: ...`, then look at `fake.calls` (or `fake.of(kind)`).
"""
import contextlib
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
REAL_GENERATOR = torch.Generator

FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full, torch.randn, torch.rand, torch.randint, torch.randperm,
             torch.arange, torch.linspace, torch.tensor, torch.as_tensor, torch.eye, torch.normal}
RANDOM = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
          torch.randn_like, torch.rand_like, torch.randint_like, F.dropout, torch.dropout, torch.Tensor.normal_,
          torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.exponential_}
SYNCS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__,
         torch.Tensor.__format__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.equal}
TO_HOST = {torch.Tensor.numpy, torch.Tensor.__array__}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
MAY_MIX = {torch.Tensor.copy_, torch.Tensor.to, torch._has_compatible_shallow_copy_type, *INDEXING}
DATA_SET = torch.Tensor.data.__set__
DEVICE_GET, IS_CUDA_GET, IS_MPS_GET = torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__, \
    torch.Tensor.is_mps.__get__


class NotCapturing:
    """The fake GPU's stream: never capturing a CUDA graph (optimizers ask before each step)."""

    def is_capturing(self):
        return False


def our_frame():
    """'file:line' of the innermost frame in this repository's code (not the tests, not torch)."""
    for frame in reversed(traceback.extract_stack(limit=40)[:-2]):
        path = Path(frame.filename).resolve()
        if path.parent == ROOT:
            return f"{path.name}:{frame.lineno}"
    return "outside"


class FakeDevice(TorchFunctionMode):
    """kind: "cuda" (count GPUs) or "mps". A context manager; see the module's docstring."""

    def __init__(self, kind="cuda", count=1):
        super().__init__()
        self.kind, self.count = kind, count
        self.device = torch.device(kind, 0) if kind == "cuda" else torch.device(kind)
        self.generators = [REAL_GENERATOR() for _ in range(count)]  # the device's default generators
        for g in self.generators:
            g.manual_seed(67280421310721)  # torch's default seed, as on a fresh GPU
        self.calls = []  # (kind, what, where, phase)
        self.phase = None  # set by a test (e.g. "step") to tell calls apart
        self.marked = set()  # ids of the tensors on the fake device
        self.patches = contextlib.ExitStack()

    # -- records and marks -----------------------------------------------------------------------------------------

    def record(self, kind, what):
        self.calls.append((kind, what, our_frame(), self.phase))

    def of(self, kind, phase=Ellipsis):
        return [(what, where) for k, what, where, p in self.calls if k == kind and (phase is Ellipsis or p == phase)]

    def on_device(self, t):
        return isinstance(t, torch.Tensor) and id(t) in self.marked

    def mark(self, t):
        if id(t) not in self.marked:
            self.marked.add(id(t))
            weakref.finalize(t, self.marked.discard, id(t))

    def unmark(self, t):
        self.marked.discard(id(t))

    def is_fake(self, device):
        return isinstance(device, (str, torch.device)) and torch.device(device).type == self.kind

    # -- patches of torch.cuda / torch.mps -------------------------------------------------------------------------

    def recorded(self, kind, name, action=lambda *args, **kwargs: None):
        def call(*args, **kwargs):
            self.record(kind, name)
            return action(*args, **kwargs)
        return call

    def generator(self, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        return self.generators[index]  # an IndexError for a GPU that is not there, as torch

    def __enter__(self):
        patch = self.patches.enter_context(pytest.MonkeyPatch.context())
        seeding = lambda name, action: self.recorded("seeding", name, action)  # noqa: E731
        if self.kind == "cuda":
            cuda = torch.cuda
            patch.setattr(cuda, "is_available", lambda: True)
            patch.setattr(cuda, "device_count", lambda: self.count)
            patch.setattr(cuda, "current_device", lambda: 0)
            patch.setattr(cuda, "_lazy_init", self.recorded("device-init", "_lazy_init"))
            patch.setattr(cuda, "synchronize", self.recorded("sync", "synchronize"))
            patch.setattr(cuda, "manual_seed", seeding("manual_seed",
                                                       lambda seed: self.generators[0].manual_seed(seed)))
            patch.setattr(cuda, "manual_seed_all", seeding("manual_seed_all",
                                                           lambda seed: [g.manual_seed(seed) for g in self.generators]))
            patch.setattr(cuda, "get_rng_state", seeding("get_rng_state",
                                                         lambda device="cuda": self.generator(device).get_state()))
            patch.setattr(cuda, "set_rng_state", seeding("set_rng_state", lambda state, device="cuda":
                                                          self.generator(device).set_state(state)))
            patch.setattr(cuda, "is_current_stream_capturing", lambda: False)  # optimizers ask (older torch)
            if hasattr(torch, "accelerator"):  # ... or this (newer torch)
                patch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: self.device)
                patch.setattr(torch.accelerator, "current_stream", lambda device=None: NotCapturing())
        else:
            patch.setattr(torch.backends.mps, "is_available", lambda: True)
            patch.setattr(torch.mps, "manual_seed", seeding("mps.manual_seed",
                                                            lambda seed: self.generators[0].manual_seed(seed)))
            patch.setattr(torch.mps, "get_rng_state", seeding("mps.get_rng_state",
                                                              lambda device="mps": self.generators[0].get_state()))
            patch.setattr(torch.mps, "set_rng_state", seeding("mps.set_rng_state", lambda state, device="mps":
                                                              self.generators[0].set_state(state)))
            patch.setattr(torch.mps, "synchronize", self.recorded("sync", "synchronize"))
        fake = self

        class Generator(REAL_GENERATOR):
            """A CPU generator (the tensors it fills compute on the CPU) that remembers the device it was made for."""

            def __new__(cls, device="cpu"):
                generator = REAL_GENERATOR.__new__(cls, "cpu")
                generator.on_fake_device = fake.is_fake(device)
                return generator

        patch.setattr(torch, "Generator", Generator)
        deepcopy = torch.nn.Parameter.__deepcopy__

        def deepcopy_on_device(param, memo):  # a copy of a device parameter is on the device (the EMA's copy of G)
            copied = deepcopy(param, memo)
            if self.on_device(param):
                self.mark(copied)
            return copied

        patch.setattr(torch.nn.Parameter, "__deepcopy__", deepcopy_on_device)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.patches.close()

    # -- every torch function --------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == DEVICE_GET:
            return self.device if self.on_device(args[0]) else torch.device("cpu")
        if func == IS_CUDA_GET or func == IS_MPS_GET:
            return self.on_device(args[0]) and (func == IS_CUDA_GET) == (self.kind == "cuda")
        if func == DATA_SET:  # param.data = t: the parameter is where t is
            func(*args)
            (self.mark if self.on_device(args[1]) else self.unmark)(args[0])
            return None
        if func is torch.Tensor.cuda and self.kind == "cuda":
            func, args = torch.Tensor.to, (args[0], self.device)
        if func is torch.Tensor.cpu:
            func, args = torch.Tensor.to, (args[0], "cpu")
        target = None  # where the result goes: "device" or "cpu" (None: where the inputs are)
        if func is torch.Tensor.to:
            args, kwargs, target = self.parse_to(args, kwargs)
        elif self.is_fake(kwargs.get("device")):
            kwargs["device"], target = "cpu", "device"
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if self.on_device(t)]
        if on_device:
            self.check(func, args, tensors, target)
        generator, drawn_on_device = kwargs.get("generator"), target == "device" or bool(on_device)
        if generator is not None and getattr(generator, "on_fake_device", False) != drawn_on_device:
            raise RuntimeError(f"Expected a '{'cpu' if generator.on_fake_device else self.kind}' device type for"
                               " generator (fake device)")
        if func in RANDOM and drawn_on_device and generator is None:
            out = self.with_device_generator(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if target == "device" or (on_device and target is None and not self.keeps_device(func, args)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    if self.kind == "mps" and t.dtype == torch.float64:
                        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't"
                                        " support float64. Please use float32 instead.")
                    self.mark(t)
        elif func in FACTORIES and self.phase is not None and out.dim() > 0:  # 0-d: a scalar, fine on the CPU
            self.record("cpu-tensor", func.__name__)
        return out

    def parse_to(self, args, kwargs):
        """Tensor.to(device | dtype | tensor, ...): the device replaced by the CPU, a copy made where a real transfer
        makes one; returns (args, kwargs, "device" | "cpu" | None)."""
        tensor, rest, target = args[0], list(args[1:]), None
        for i, a in enumerate(rest):
            if isinstance(a, torch.Tensor):  # .to(other): other's device and dtype
                target, rest[i] = ("device" if self.on_device(a) else "cpu"), a.dtype
            elif isinstance(a, (str, torch.device)):
                target, rest[i] = ("device" if self.is_fake(a) else "cpu"), "cpu"
        if kwargs.get("device") is not None:
            target, kwargs["device"] = ("device" if self.is_fake(kwargs["device"]) else "cpu"), "cpu"
        if target is not None and (target == "device") != self.on_device(tensor):
            kwargs["copy"] = True  # a transfer makes a new tensor
        return (tensor, *rest), kwargs, target

    def check(self, func, args, tensors, target):
        """What a real device refuses, for a torch function with a device tensor among its inputs."""
        name = getattr(func, "__name__", str(func))
        if func in TO_HOST:
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the"
                            " tensor to host memory first.")
        if func in SYNCS or target == "cpu" or (func is torch.Tensor.copy_ and not self.on_device(args[0])):
            self.record("sync", name)
        if func in INDEXING and not self.on_device(args[0]):
            raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
        if func not in MAY_MIX and target != "cpu" and any(not self.on_device(t) and t.dim() > 0 for t in tensors):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices,"
                               f" {self.device} and cpu! (fake device: {name})")

    def keeps_device(self, func, args):
        """An in-place method (add_, copy_, ...) returns its own tensor, which stays where it was."""
        return getattr(func, "__name__", "").endswith("_") and isinstance(args[0], torch.Tensor) and \
            not self.on_device(args[0])

    def with_device_generator(self, func, args, kwargs):
        """A random op drawing from the device's generator in place of the CPU's (which is left as it was)."""
        generator = self.generators[0]
        cpu = torch.default_generator.get_state()
        torch.default_generator.set_state(generator.get_state())
        try:
            return func(*args, **kwargs)
        finally:
            generator.set_state(torch.default_generator.get_state())
            torch.default_generator.set_state(cpu)
