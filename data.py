"""The data: MNIST and FashionMNIST as IDX files, read into one uint8 tensor (torchvision downloads them when they are
missing), and EpochOrder, the seeded batch order that a run resumes mid-epoch exactly."""
import contextlib
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from utils import DataError, check_memory

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # flag value -> torchvision folder/class name
SYSTEM_DATA_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}  # Debian's dataset-fashion-mnist
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # magic numbers: unsigned bytes, 3 or 1 dimensions


def _find_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _split_files(folder, split):
    paths = [_find_idx(folder, stem) for stem in SPLIT_FILES[split]]
    return paths if all(paths) else None


def read_idx(path, magic):
    """An IDX file (gzip or not) as a uint8 tensor; checks the magic number and that the size matches the header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it ({e}); delete it and let it download again, or replace it")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != magic:
        found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
        raise DataError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {found!r}, expected {magic:#010x});"
                        " replace it with the original file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but holds {len(body)} bytes;"
                        " the file is truncated or wrong, replace it")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


def _read_split(images_path, labels_path):
    images, labels = read_idx(images_path, IDX_IMAGES), read_idx(labels_path, IDX_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]}"
                        " labels; replace the mismatched file")
    return images, labels


def _download(dataset, root, split):
    """torchvision's own download into <root>/<Folder>/raw/ (fails offline; then we look elsewhere)."""
    cls = getattr(torchvision.datasets, DATASETS[dataset])
    raw = Path(root) / DATASETS[dataset] / "raw"
    made = [folder for folder in (raw, raw.parent, Path(root)) if not folder.exists()]
    try:
        cls(root, train=split == "train", download=True)
    except Exception as e:  # URLError, RuntimeError on checksum mismatch, ...
        for folder in made:  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]  # torchvision's reason spans lines
    return None


def load_split(dataset, root, split="train"):
    """(images N x H x W uint8, labels N uint8): local IDX files, else torchvision's download, else system folders."""
    raw = Path(root) / DATASETS[dataset] / "raw"
    paths = _split_files(raw, split)
    download_error = None
    if paths is None:
        download_error = _download(dataset, root, split)
        paths = _split_files(raw, split)
    tried = [raw]
    for folder in SYSTEM_DATA_DIRS.get(dataset, []):
        if paths is None:
            tried.append(folder)
            paths = _split_files(folder, split)
    if paths is None:
        raise DataError(f"{dataset} {split} data not found in {', '.join(map(str, tried))} and the download failed"
                        f" ({download_error}); put the IDX files (.gz or not) in <data-root>/{DATASETS[dataset]}/raw/"
                        " and pass --data-root")
    return _read_split(*paths)


def resize_images(images, size):
    """uint8 N x H x W -> uint8 N x size x size, antialiased bilinear (as torchvision's Resize on PIL images)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0]


def load_train_images(dataset, root, img_size, device):
    """The whole training split as one uint8 tensor N x 1 x S x S, resident on the device; batches are index slices."""
    images, _ = load_split(dataset, root, "train")
    n, side = len(images), images.shape[-1]
    resized = n * img_size**2  # bytes, uint8
    resizing = 4 * (n * side**2 + resized) if img_size != side else 0  # the float copies F.interpolate works on
    what = f"the {n:,} training images at --img-size {img_size}"
    check_memory(resized + resizing, torch.device("cpu"), what, "use a smaller --img-size")
    if device.type != "cpu":
        check_memory(resized, device, what, "use a smaller --img-size or --device cpu")
    return resize_images(images, img_size)[:, None].to(device)


def to_model_range(batch_uint8):
    """uint8 [0, 255] -> float [-1, 1]: the same as ToTensor() then Normalize(0.5, 0.5), done on the device."""
    return batch_uint8.float().div_(127.5).sub_(1.0)


class EpochOrder:
    """A seeded permutation per epoch and the position in it: everything needed to resume mid-epoch exactly."""

    def __init__(self, num_images, batch_size, seed):
        self.num_images, self.batch_size = num_images, batch_size
        self.steps_per_epoch = num_images // batch_size  # the last partial batch is dropped: all steps see full ones
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position, self.perm = 0, 0, None

    def batches(self, device="cpu"):
        """Yield index tensors (on the device) for the rest of the current epoch; the position counts a batch as
        consumed once yielded."""
        if self.perm is None:
            self.perm = torch.randperm(self.num_images, generator=self.generator)
        perm = self.perm.to(device)  # one copy per epoch, not one per step
        while self.position < self.steps_per_epoch:
            start = self.position * self.batch_size
            self.position += 1
            yield perm[start:start + self.batch_size]

    def next_epoch(self):
        self.epoch, self.position, self.perm = self.epoch + 1, 0, None

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "perm": self.perm,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.epoch, self.position, self.perm = state["epoch"], state["position"], state["perm"]
        self.generator.set_state(state["generator"])

