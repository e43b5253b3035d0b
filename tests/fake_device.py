"""A fake accelerator, so that CPU-only CI runs the CUDA and MPS code paths.

torch.cuda (or torch.backends.mps and torch.mps) is patched to answer as if the device were there, and a
TorchFunctionMode makes tensors report that device while they compute on the CPU:

- `device=` of factory functions, `.to()` and `.cuda()` put tensors on the fake device (a CPU copy, marked); what is
  computed from a marked tensor is marked; `tensor.device` / `is_cuda` / `is_mps` answer for it.
- Random numbers drawn on the fake device come from the device's own generators (one per fake GPU), which
  `torch.manual_seed`, `torch.cuda.manual_seed_all`, `get_rng_state`, `set_rng_state`... seed, read and set, as on
  real hardware: a stray reseeding of the device changes what a run computes.
- As a real device would, it raises on an op that mixes a device tensor with a CPU tensor (other than a 0-d one or a
  copy), on `.numpy()` of a device tensor, and, for MPS, on any float64 tensor on the device.
- It records, with the file and line in this repository that made them: calls that seed or read/set the device's RNG
  state (`seeding`), calls that initialize the device (`device-init`), host syncs (`.item()`, `float()`, `bool()`,
  `.tolist()`, `.cpu()` of a device tensor...: `sync`), and tensors of one or more dimensions made on the CPU by a
  factory while `phase` is set (`cpu-tensor`).

Use: `with FakeDevice("cuda", count=2) as fake: ...`, then look at `fake.calls`.
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
HERE = Path(__file__).resolve()

FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full, torch.randn, torch.rand, torch.randint, torch.randperm,
             torch.arange, torch.linspace, torch.tensor, torch.as_tensor, torch.eye, torch.normal}
RANDOM = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
          torch.randn_like, torch.rand_like, torch.randint_like, F.dropout, torch.dropout, torch.Tensor.normal_,
          torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_, torch.Tensor.exponential_}
SYNCS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.tolist,
         torch.Tensor.__index__, torch.Tensor.nonzero}
MAY_MIX = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
           torch.Tensor.data.__set__, torch._has_compatible_shallow_copy_type}
REAL_GENERATOR = torch.Generator
DATA_SET = torch.Tensor.data.__set__
DEVICE_GET, IS_CUDA_GET = torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__
IS_MPS_GET = torch.Tensor.is_mps.__get__


class NotCapturing:
    """The fake GPU's stream: never capturing a CUDA graph (optimizers ask before each step)."""

    def is_capturing(self):
        return False


def our_frame():
    """'file:line' of the innermost frame in this repository's code (not the tests, not torch)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if ROOT in path.parents and path.parent.name != "tests":
            return f"{path.name}:{frame.lineno}"
    return "outside"


class FakeDevice(TorchFunctionMode):
    """kind: "cuda" (count GPUs of the given compute capability) or "mps". A context manager; see the module's
    docstring."""

    def __init__(self, kind="cuda", count=1, capability=(8, 0)):
        super().__init__()
        self.kind, self.count, self.capability = kind, count, capability
        self.device = torch.device(kind, 0) if kind == "cuda" else torch.device(kind)
        self.generators = [torch.Generator() for _ in range(count)]  # the device's default generators
        for g in self.generators:
            g.manual_seed(67280421310721)  # torch's default seed, as on a fresh GPU
        self.calls = []  # (kind, what, where, phase)
        self.phase = None  # set by a test (e.g. "step") to tell calls apart
        self.marked = set()  # ids of the tensors on the fake device
        self.patches = contextlib.ExitStack()

    # -- records ---------------------------------------------------------------------------------------------------

    def record(self, kind, what):
        self.calls.append((kind, what, our_frame(), self.phase))

    def of(self, kind, phase=Ellipsis):
        return [(what, where) for k, what, where, p in self.calls if k == kind and (phase is Ellipsis or p == phase)]

    # -- the fake device's tensors ---------------------------------------------------------------------------------

    def on_device(self, t):
        return isinstance(t, torch.Tensor) and id(t) in self.marked

    def mark(self, t):
        if isinstance(t, torch.Tensor) and id(t) not in self.marked:
            self.marked.add(id(t))
            weakref.finalize(t, self.marked.discard, id(t))

    def is_fake(self, device):
        return isinstance(device, (str, torch.device)) and torch.device(device).type == self.kind

    # -- patches of torch.cuda / torch.mps ------------------------------------------------------------------------

    def __enter__(self):
        patch = self.patches.enter_context(pytest.MonkeyPatch.context())
        fake = self
        if self.kind == "cuda":
            def rng_index(device="cuda"):
                if isinstance(device, int):
                    return device
                device = torch.device(device)
                return 0 if device.index is None else device.index

            def initializing(name, result=None):
                def call(*args, **kwargs):
                    fake.record("device-init", name)
                    return result
                return call

            def seeding(name, action):
                def call(*args, **kwargs):
                    fake.record("seeding", name)
                    return action(*args, **kwargs)
                return call

            def set_all(states):
                for i, state in enumerate(states):
                    fake.generators[i].set_state(state)  # IndexError with more states than GPUs, as torch

            cuda = torch.cuda
            patch.setattr(cuda, "is_available", lambda: True)
            patch.setattr(cuda, "device_count", lambda: fake.count)
            patch.setattr(cuda, "current_device", lambda: 0)
            patch.setattr(cuda, "get_device_capability", lambda device=None: fake.capability)
            patch.setattr(cuda, "get_device_name", lambda device=None: "Fake GPU")
            patch.setattr(cuda, "mem_get_info", lambda device=None: (fake.record("device-init", "mem_get_info"),
                                                                     (64 * 2**30, 80 * 2**30))[1])
            patch.setattr(cuda, "synchronize", lambda device=None: fake.record("sync", "synchronize"))
            patch.setattr(cuda, "_lazy_init", initializing("_lazy_init"))
            patch.setattr(cuda, "manual_seed", seeding("manual_seed", lambda s: fake.generators[0].manual_seed(s)))
            patch.setattr(cuda, "manual_seed_all", seeding("manual_seed_all",
                                                           lambda s: [g.manual_seed(s) for g in fake.generators]))
            patch.setattr(cuda, "get_rng_state", seeding("get_rng_state",
                                                         lambda device="cuda": fake.generators[rng_index(device)]
                                                         .get_state()))
            patch.setattr(cuda, "set_rng_state", seeding("set_rng_state",
                                                         lambda state, device="cuda": fake.generators[rng_index(device)]
                                                         .set_state(state)))
            patch.setattr(cuda, "get_rng_state_all", seeding("get_rng_state_all",
                                                             lambda: [g.get_state() for g in fake.generators]))
            patch.setattr(cuda, "set_rng_state_all", seeding("set_rng_state_all", set_all))
            patch.setattr(cuda, "is_current_stream_capturing", lambda: False)  # optimizers ask (older torch)
            if hasattr(torch, "accelerator"):  # ... or this (newer torch)
                patch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: self.device)
                patch.setattr(torch.accelerator, "current_stream", lambda device=None: NotCapturing())
        else:
            patch.setattr(torch.backends.mps, "is_available", lambda: True)
            patch.setattr(torch.mps, "manual_seed", lambda s: (fake.record("seeding", "mps.manual_seed"),
                                                               fake.generators[0].manual_seed(s)))
            patch.setattr(torch.mps, "get_rng_state", lambda device="mps": (fake.record("seeding", "mps.get_rng_state"),
                                                                            fake.generators[0].get_state())[1])
            patch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": (
                fake.record("seeding", "mps.set_rng_state"), fake.generators[0].set_state(state)))
            patch.setattr(torch.mps, "synchronize", lambda: fake.record("sync", "synchronize"))

        class Generator(REAL_GENERATOR):
            """A generator of the fake device is a CPU generator (the tensors it fills compute on the CPU)."""

            def __new__(cls, device="cpu"):
                return REAL_GENERATOR.__new__(cls, "cpu")

        patch.setattr(torch, "Generator", Generator)
        deepcopy = torch.nn.Parameter.__deepcopy__

        def deepcopy_on_device(param, memo):  # a copy of a device parameter is on the device (the EMA's copy of G)
            copied = deepcopy(param, memo)
            if fake.on_device(param):
                fake.mark(copied)
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
        if func in (IS_CUDA_GET, IS_MPS_GET):
            return self.on_device(args[0]) and (func is IS_CUDA_GET) == (self.kind == "cuda")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if self.on_device(t)]
        to_device = to_cpu = False
        if "device" in kwargs and self.is_fake(kwargs["device"]):
            kwargs["device"], to_device = "cpu", True
        if func is torch.Tensor.to:
            rest = list(args[1:])
            for i, a in enumerate(rest):
                if isinstance(a, (str, torch.device)):
                    if self.is_fake(a):
                        rest[i], to_device = "cpu", True
                    else:
                        to_cpu = True
                elif isinstance(a, torch.Tensor):
                    to_device, to_cpu = self.on_device(a), not self.on_device(a)
                    rest[i] = a.dtype
            if kwargs.get("device") is not None and not to_device:
                to_cpu = True
            if to_device:
                kwargs["copy"] = not self.on_device(args[0])  # a transfer makes a new tensor, as on a real device
            args = (args[0], *rest)
        elif func is torch.Tensor.cuda:
            func, args, to_device = torch.Tensor.to, (args[0], "cpu"), True
            kwargs = {"copy": not self.on_device(args[0])}
        elif func is torch.Tensor.cpu:
            func, args, kwargs, to_cpu = torch.Tensor.to, (args[0], "cpu"), {}, True
        if func is torch.Tensor.to and to_cpu and self.on_device(args[0]):
            kwargs["copy"] = True  # a new CPU tensor, as from a real device
        if on_device and (to_cpu or func in SYNCS):
            self.record("sync", getattr(func, "__name__", str(func)))
        if on_device and func is torch.Tensor.numpy:
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the"
                            " tensor to host memory first.")
        if on_device and func not in MAY_MIX and not to_cpu:
            for t in tensors:
                if not self.on_device(t) and t.dim() > 0:
                    raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices,"
                                       f" {self.device} and cpu! (fake device: {getattr(func, '__name__', func)})")
        rng = None
        if func in RANDOM and (to_device or on_device) and kwargs.get("generator") is None:
            rng = self.generators[0]
        out = self.call_with_rng(func, args, kwargs, rng) if rng else func(*args, **kwargs)
        if func == DATA_SET:
            (self.mark if self.on_device(args[1]) else self.unmark)(args[0])
        elif to_device or (on_device and not to_cpu):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    if self.kind == "mps" and t.dtype == torch.float64:
                        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't"
                                        " support float64. Please use float32 instead.")
                    self.mark(t)
        elif func in FACTORIES and self.phase is not None and out.dim() > 0:  # 0-d: a scalar, fine on the CPU
            self.record("cpu-tensor", func.__name__)
        return out

    def unmark(self, t):
        self.marked.discard(id(t))

    @staticmethod
    def call_with_rng(func, args, kwargs, generator):
        """Run a random op with the device's generator in place of the CPU's (which is left as it was)."""
        cpu = torch.default_generator.get_state()
        torch.default_generator.set_state(generator.get_state())
        try:
            return func(*args, **kwargs)
        finally:
            generator.set_state(torch.default_generator.get_state())
            torch.default_generator.set_state(cpu)
