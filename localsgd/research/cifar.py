"""CIFAR-10/100 from the standard python-pickle archive, held as tensors on the device, with
on-device augmentation (random crop with padding 4, horizontal flip) and no torchvision."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from localsgd.core.options import check_choice
from localsgd.research.data import InMemoryDataModule, LabelNoise, Sampling

_CIFAR: dict[str, dict[str, Any]] = {
    "cifar10": {
        "name": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "name": "CIFAR-100",
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "labels": b"fine_labels",
        "num_classes": 100,
    },
}


def _cifar_hint(root: Path, spec: dict[str, Any]) -> str:
    archive = spec["url"].rsplit("/", 1)[1]
    return (
        f"HINT: pass download=True on a machine that is online, or download {spec['url']} by hand and "
        f"extract it into {root} (tar -xzf {archive} -C {root}), which creates {root / spec['folder']}"
    )


def download_cifar(root: str | Path, dataset: Literal["cifar10", "cifar100"] = "cifar10") -> Path:
    """Download and extract the python-pickle archive of ``dataset`` into ``root`` (checking its
    MD5); returns the extracted folder. Does nothing when the folder exists."""
    spec = _CIFAR[check_choice("dataset", dataset, tuple(_CIFAR))]
    root = Path(root)
    folder = root / spec["folder"]
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / (spec["url"].rsplit("/", 1)[1] + ".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=60) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as err:  # URLError, timeouts, refused connections are all OSErrors
        archive.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {spec['name']} from {spec['url']} ({err}); {folder} does not exist. "
            + _cifar_hint(root, spec)
        ) from err
    digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != spec["md5"]:
        archive.unlink()
        raise RuntimeError(f"{spec['url']} downloaded with MD5 {digest}, expected {spec['md5']}; try again")
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of root
            tar.extractall(root, filter="data")
        else:
            tar.extractall(root)
    archive.unlink()
    return folder


def load_cifar(
    root: str | Path, dataset: Literal["cifar10", "cifar100"] = "cifar10"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)`` from the python-pickle archive under ``root``:
    images as uint8 ``(N, 3, 32, 32)``, labels as int64."""
    spec = _CIFAR[check_choice("dataset", dataset, tuple(_CIFAR))]
    root = Path(root)
    folder = root / spec["folder"]
    missing = [name for name in spec["train"] + spec["test"] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec['name']} not found: {folder} is missing {', '.join(missing)} (the python-pickle "
            f"archive's files). " + _cifar_hint(root, spec)
        )

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                # the archive's own format (pickled by Python 2); read only trusted files
                entry = pickle.load(f, encoding="bytes")
            data = torch.as_tensor(entry[b"data"], dtype=torch.uint8)
            if data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"{folder / name}: expected rows of 3072 bytes, got shape {tuple(data.shape)}"
                )
            xs.append(data.view(-1, 3, 32, 32))
            ys.append(torch.as_tensor(entry[spec["labels"]], dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    return *read(spec["train"]), *read(spec["test"])


def random_crop_flip(images: Tensor, *, padding: int, generator: torch.Generator) -> Tensor:
    """Per image: a random ``H x W`` crop of the image zero-padded by ``padding`` on each side,
    then a horizontal flip with probability 1/2; one gather over the whole batch, on its device."""
    n, c, h, w = images.shape
    where = generator.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=where).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=where).to(images.device)
    flip = (torch.rand(n, generator=generator, device=where) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class CIFARDataModule(InMemoryDataModule):
    """CIFAR-10 or CIFAR-100 from the standard python-pickle archive, held as uint8 tensors on
    the device; per-channel normalization (training-set statistics), and for training batches
    a random crop (padding 4) and horizontal flip, done per worker on the whole batch, on the
    device (no torchvision).

    Args:
        root: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``.
        dataset: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        batch_size: local batch per worker.
        eval_batch_size: batch size for validation and test.
        augment: random crop and flip for training batches.
        label_noise: probability of replacing a training label by a uniformly random class,
            redrawn at every step for every worker (:class:`LabelNoise`).
        sampling: see :class:`InMemoryDataModule`.
        noise_seed: see :class:`InMemoryDataModule`.
        device: see :class:`InMemoryDataModule`.
        download: download the archive (163 MB / 161 MB) into ``root`` when it is missing.
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        *,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        augment: bool = True,
        label_noise: float = 0.0,
        sampling: Sampling = "without_replacement",
        noise_seed: int | None = None,
        device: str | None = None,
        download: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            sampling=sampling,
            noise_seed=noise_seed,
            device=device,
        )
        self.root = Path(root)
        self.dataset = check_choice("dataset", dataset, tuple(_CIFAR))
        self.num_classes: int = _CIFAR[dataset]["num_classes"]
        self.augment = augment
        self.download = download
        noise = LabelNoise(p=label_noise, num_classes=self.num_classes)
        self.target_noise = noise if label_noise > 0 else None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, so only one downloads
        if self.download:
            download_cifar(self.root, self.dataset)  # type: ignore[arg-type]

    def _load(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, train_y, test_x, test_y = load_cifar(self.root, self.dataset)  # type: ignore[arg-type]
        # statistics in float64 over chunks: a float copy of the whole set would take 600 MB
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        for chunk in train_x.split(10_000):
            pixels = chunk.double().div_(255).transpose(0, 1).reshape(3, -1)
            total += pixels.sum(1)
            squares += pixels.square().sum(1)
        count = train_x.numel() // 3
        mean = total / count
        self.mean = mean.float().view(1, 3, 1, 1).to(device)
        self.std = (squares / count - mean.square()).sqrt().float().view(1, 3, 1, 1).to(device)
        return train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device)

    def _inputs(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        assert self.mean is not None and self.std is not None
        if generator is not None and self.augment:
            x = random_crop_flip(x, padding=4, generator=generator)  # on uint8: pads with black
        return (x.float().div_(255) - self.mean) / self.std
