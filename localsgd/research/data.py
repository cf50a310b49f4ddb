"""Datasets for the experiments. No distributed code: Lightning's DistributedSampler
gives each worker its own shard of whatever these loaders hold."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from localsgd.core.options import check_choice
from localsgd.core.schedules import check_positive_int


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download.

    Args:
        batch_size: local batch per worker.
        test_fraction: share of the images held out for testing (and validation).
        split_seed: seed of the fixed train/test split (independent of the training seed).
        label_noise: probability of replacing a training label by a uniformly random class,
            redrawn at every step for every worker (:class:`LabelNoise`, :func:`per_worker`).
        noise_seed: base seed of the label noise; ``None`` uses the run's seed (``seed_everything``).
    """

    num_classes = 10
    in_features = 64

    def __init__(
        self,
        *,
        batch_size: int = 32,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction ({test_fraction!r}) must be in (0, 1)")
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        noise = LabelNoise(p=label_noise, num_classes=self.num_classes)
        self.label_noise = noise if label_noise > 0 else None
        self.noise_seed = noise_seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        num_test = round(self.test_fraction * len(y))
        test, train = order[:num_test], order[num_test:]
        self.train_set = TensorDataset(x[train], y[train])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def clean_train_set(self) -> Dataset:
        """The training images with their true labels (label noise is drawn per batch, later)."""
        if self.train_set is None:
            raise ValueError("DigitsDataModule has no data yet. HINT: call setup() first")
        return self.train_set

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer, noise = self.trainer, self.label_noise
        if noise is None or trainer is None or not trainer.training:
            return batch
        seed = run_seed() if self.noise_seed is None else self.noise_seed

        def noisy(worker_batch: Any, generator: torch.Generator) -> Any:
            x, y = worker_batch
            return x, noise(y, generator)

        return per_worker(trainer, batch, noisy, seed=seed, device=trainer.strategy.root_device)


# ---------------------------------------------------------------------------- per-worker randomness
# Label noise, resampling and augmentation draw from a generator keyed by (seed, worker, draw),
# not from the global RNG: Lightning seeds every process alike (and the simulator starts its
# workers' streams alike), so global draws would repeat the same noise on every worker.

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps): neighbouring keys give unrelated streams."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def keyed_generator(seed: int, worker: int, draw: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from (``seed``, ``worker``, ``draw``)."""
    return torch.Generator(device=device).manual_seed(_mix(seed, worker, draw))


def run_seed() -> int:
    """The run's seed, as ``seed_everything`` recorded it (0 when it was not called)."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def per_worker(
    trainer: pl.Trainer,
    batch: Any,
    fn: Callable[[Any, torch.Generator], Any],
    *,
    seed: int,
    device: torch.device | str,
) -> Any:
    """``fn(worker_batch, generator)`` for each worker's training batch, from an
    ``on_after_batch_transfer`` hook, with a generator keyed by (seed, worker, draw).

    The worker is the global worker index: the process rank, or under simulation
    (``trainer.strategy.replicas`` set, ``batch`` the list of this process's k workers'
    batches) ``rank * k + i``. The draw is the number of training batches taken before this
    one, a count every rank shares and a checkpoint restores, so two steps, two micro-batches
    and two workers all draw apart, and a resumed run draws what an uninterrupted one would.
    """
    draw = trainer.fit_loop.epoch_loop.batch_progress.total.ready
    rank = trainer.global_rank
    if getattr(trainer.strategy, "replicas", None) is not None:
        k = len(batch)
        return [fn(b, keyed_generator(seed, rank * k + i, draw, device)) for i, b in enumerate(batch)]
    return fn(batch, keyed_generator(seed, rank, draw, device))


class LabelNoise:
    """Replace each label, with probability ``p``, by a class drawn uniformly from all
    ``num_classes`` (possibly the same one): the clean label stays with probability
    ``1 - p + p / num_classes``.

    Args:
        p: probability of redrawing a label, in [0, 1].
        num_classes: number of classes.
    """

    def __init__(self, *, p: float, num_classes: int) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"label_noise ({p!r}) must be a probability in [0, 1]")
        self.p = float(p)
        self.num_classes = check_positive_int("num_classes", num_classes)

    def __call__(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        where = generator.device
        redraw = torch.rand(labels.shape, generator=generator, device=where) < self.p
        random = torch.randint(0, self.num_classes, labels.shape, generator=generator, device=where)
        return torch.where(redraw.to(labels.device), random.to(labels.device, labels.dtype), labels)


class TargetNoise:
    """Regression label noise: ``y + std * xi``, with ``xi`` Rademacher (+-1, as in the label-noise
    SGD analyses of diagonal networks) or standard Gaussian.

    Args:
        std: the noise's standard deviation (>= 0).
        distribution: ``"rademacher"`` or ``"gaussian"``.
    """

    def __init__(self, *, std: float, distribution: Literal["rademacher", "gaussian"] = "rademacher") -> None:
        if not std >= 0:
            raise ValueError(f"label_noise ({std!r}) must be a standard deviation >= 0")
        self.std = float(std)
        self.distribution = check_choice("noise_distribution", distribution, ("rademacher", "gaussian"))

    def __call__(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        where = generator.device
        if self.distribution == "rademacher":
            xi = torch.randint(0, 2, targets.shape, generator=generator, device=where) * 2 - 1
        else:
            xi = torch.randn(targets.shape, generator=generator, device=where)
        return targets + self.std * xi.to(targets.device, targets.dtype)


# ---------------------------------------------------------------------------- data held as tensors
Sampling = Literal["without_replacement", "with_replacement"]


class _Indices(Dataset):
    """Sample indices 0..n-1: the loaders deal out indices, the data stays on its device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Samples(Dataset):
    """One split's samples as ``(input, target)``, without augmentation, noise or resampling."""

    def __init__(self, data: InMemoryDataModule, split: Literal["train", "test"]) -> None:
        self.data, self.split = data, split

    def __len__(self) -> int:
        return len(self.data._tensors(self.split)[1])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.data.eval_batch(torch.tensor([i]), split=self.split)
        return x[0], y[0]


class InMemoryDataModule(pl.LightningDataModule):
    """Base for datasets held as tensors on one device. The loaders yield batches of sample
    indices (so Lightning's DistributedSampler, and the simulator, shard indices); after the
    transfer to the device each worker's training batch is built from its own keyed generator
    (:func:`per_worker`): resampled (``sampling="with_replacement"``), gathered, augmented
    (:meth:`_inputs`) and noised (:attr:`target_noise`). Validation and test batches are
    gathered as they are.

    Subclasses implement :meth:`_load`, and may override :meth:`_inputs` and set
    :attr:`target_noise`.

    Args:
        batch_size: local batch per worker.
        eval_batch_size: batch size for validation and test.
        sampling: ``"without_replacement"``: each epoch the workers split the training set
            into disjoint shards (DistributedSampler); ``"with_replacement"``: each worker draws
            every batch i.i.d. uniformly from the whole training set, from its own stream (an
            epoch keeps the same number of steps).
        noise_seed: base seed of the per-worker draws; ``None`` uses the run's seed
            (``seed_everything``), so runs with different seeds draw different noise.
        device: where the data is held; ``None``: the Trainer's device (the CPU without one).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        eval_batch_size: int,
        sampling: Sampling = "without_replacement",
        noise_seed: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_batch_size = check_positive_int("eval_batch_size", eval_batch_size)
        self.sampling = check_choice("sampling", sampling, ("without_replacement", "with_replacement"))
        self.noise_seed = noise_seed
        self.device = device
        self.target_noise: Callable[[Tensor, torch.Generator], Tensor] | None = None
        """Applied to each training batch's targets with the worker's generator."""
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None

    # ------------------------------------------------------------------ to implement
    def _load(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(train_x, train_y, test_x, test_y)`` on ``device``."""
        raise NotImplementedError

    def _inputs(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Stored inputs to model inputs; ``generator`` is given for training batches (augment)."""
        return x

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        device = torch.device(self.device) if self.device is not None else None
        if device is None:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.train_x, self.train_y, self.test_x, self.test_y = self._load(device)

    def train_dataloader(self) -> DataLoader:
        n = len(self._tensors("train")[1])
        return DataLoader(_Indices(n), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Indices(len(self._tensors("test")[1])), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return self.eval_batch(batch)
        seed = run_seed() if self.noise_seed is None else self.noise_seed
        device = self._tensors("train")[1].device
        return per_worker(trainer, batch, self._train_batch, seed=seed, device=device)

    # ------------------------------------------------------------------ batches
    def train_batch(self, indices: Tensor, *, worker: int, draw: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Worker ``worker``'s ``draw``-th training batch from the loader's ``indices`` (what
        ``on_after_batch_transfer`` builds during ``fit``)."""
        device = self._tensors("train")[1].device
        return self._train_batch(indices, keyed_generator(seed, worker, draw, device))

    def _train_batch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self._tensors("train")
        out = indices.device
        if self.sampling == "with_replacement":
            indices = torch.randint(0, len(y), indices.shape, generator=generator, device=generator.device)
        indices = indices.to(y.device)
        inputs, targets = self._inputs(x[indices], generator), y[indices]
        if self.target_noise is not None:
            targets = self.target_noise(targets, generator)
        return inputs.to(out), targets.to(out)

    def eval_batch(
        self, indices: Tensor, *, split: Literal["train", "test"] = "test"
    ) -> tuple[Tensor, Tensor]:
        """The samples at ``indices`` of ``split``, without augmentation, noise or resampling."""
        x, y = self._tensors(split)
        out, indices = indices.device, indices.to(y.device)
        return self._inputs(x[indices], None).to(out), y[indices].to(out)

    def clean_train_set(self) -> Dataset:
        """The training set as ``(input, target)`` samples without augmentation or noise: the
        training loss's data (for example ``SharpnessCallback(dataset=...)``)."""
        self._tensors("train")
        return _Samples(self, "train")

    def _tensors(self, split: str) -> tuple[Tensor, Tensor]:
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if x is None or y is None:
            raise ValueError(f"{type(self).__name__} has no data yet. HINT: call setup() first")
        return x, y


# ---------------------------------------------------------------------------- the theory's toy
class SparseRegressionDataModule(InMemoryDataModule):
    """Sparse linear regression, the synthetic setting of the label-noise analyses: inputs
    x ~ N(0, I_dim), targets y = <x, w*> with w* having ``num_nonzero`` entries equal to 1 (on a
    random support) and the rest 0. Training targets get label noise y + label_noise * xi,
    xi redrawn at every step for every worker (:class:`TargetNoise`); test targets are clean.
    Train it with :class:`localsgd.research.models.DiagonalLinearNet` and
    :class:`localsgd.research.models.Regressor`.

    Args:
        dim: input dimension d.
        num_nonzero: k, the support size of w*.
        num_train: training samples (fewer than ``dim``: many interpolating solutions, so the
            implicit bias decides which one training finds).
        num_test: test samples.
        label_noise: the noise's standard deviation (0 for none).
        noise_distribution: ``"rademacher"`` (+-label_noise) or ``"gaussian"``.
        batch_size: local batch per worker.
        eval_batch_size: batch size for validation and test.
        sampling: see :class:`InMemoryDataModule`.
        data_seed: seed of w* and of the samples (independent of the training seed).
        noise_seed: see :class:`InMemoryDataModule`.
        device: see :class:`InMemoryDataModule`.
    """

    def __init__(
        self,
        *,
        dim: int = 100,
        num_nonzero: int = 5,
        num_train: int = 50,
        num_test: int = 1000,
        label_noise: float = 0.5,
        noise_distribution: Literal["rademacher", "gaussian"] = "rademacher",
        batch_size: int = 4,
        eval_batch_size: int = 1000,
        sampling: Sampling = "without_replacement",
        data_seed: int = 0,
        noise_seed: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            sampling=sampling,
            noise_seed=noise_seed,
            device=device,
        )
        self.dim = check_positive_int("dim", dim)
        self.num_nonzero = check_positive_int("num_nonzero", num_nonzero)
        if num_nonzero > dim:
            raise ValueError(f"num_nonzero ({num_nonzero}) must be <= dim ({dim})")
        self.num_train = check_positive_int("num_train", num_train)
        if num_train < batch_size:
            raise ValueError(f"num_train ({num_train}) must be >= batch_size ({batch_size})")
        self.num_test = check_positive_int("num_test", num_test)
        noise = TargetNoise(std=label_noise, distribution=noise_distribution)
        self.target_noise = noise if label_noise > 0 else None
        self.data_seed = data_seed
        self.w_star: Tensor | None = None
        """The ground truth (set by setup)."""

    def _load(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.data_seed)
        w = torch.zeros(self.dim)
        w[torch.randperm(self.dim, generator=g)[: self.num_nonzero]] = 1.0
        x = torch.randn(self.num_train + self.num_test, self.dim, generator=g)
        y = x @ w
        self.w_star = w.to(device)
        n = self.num_train
        return x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device)
