"""Sharpness of the training loss: Hessian trace (Hutchinson) and top Hessian eigenvalue
(power iteration), as functions and as a Lightning callback that measures the averaged model.

Hessian-vector products come from double backward (``torch.autograd.grad`` with
``create_graph=True``), over the trainable parameters only. Communication, lr, H and
worker divergence are logged by the strategies themselves; test accuracy by the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from localsgd.core.schedules import check_positive_int

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar loss``: the training loss on one batch."""


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): no Hessian to measure")
    return params


@contextlib.contextmanager
def _untouched(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Measuring must not change the experiment: BatchNorm statistics that train-mode forward
    passes move are put back, and random ops (dropout) draw from a forked RNG stream."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _draw(
    params: Sequence[Tensor], generator: torch.Generator, kind: str, count: int | None = None
) -> list[Tensor]:
    """One random vector over ``params``, or ``count`` of them stacked along a new first dim."""
    out = []
    for p in params:
        shape = p.shape if count is None else (count, *p.shape)
        if kind == "rademacher":
            t = torch.randint(0, 2, shape, generator=generator, device=generator.device).mul_(2).sub_(1)
        else:
            t = torch.randn(shape, generator=generator, device=generator.device)
        out.append(t.to(device=p.device, dtype=p.dtype))
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(((x * y).sum() for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def _gradient(model: nn.Module, loss_fn: LossFn, batch: Any, params: Sequence[Tensor]) -> list[Tensor | None]:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    return list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def _hvp(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], v: Sequence[Tensor], *, batched: bool = False
) -> list[Tensor]:
    """H v = d(g . v)/d theta (``batched``: for each of the vectors stacked along v's first dim,
    in one vectorized backward pass). Gradients constant in theta (or missing) add nothing."""
    pairs = [(g, u) for g, u in zip(grads, v) if g is not None and g.requires_grad]
    if not pairs:
        return [torch.zeros_like(u) for u in v]
    out = torch.autograd.grad(
        [g for g, _ in pairs],
        params,
        grad_outputs=[u for _, u in pairs],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [torch.zeros_like(u) if h is None else h for h, u in zip(out, v)]


def _check_batches(batches: Sequence[Any]) -> None:
    if len(batches) == 0:
        raise ValueError("batches is empty: pass at least one evaluation batch")


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    num_probes: int,
    generator: torch.Generator,
    probes_per_pass: int = 1,
) -> float:
    """Hutchinson's estimate of tr(H), H the Hessian of the mean of ``loss_fn`` over ``batches``
    with respect to the trainable parameters: the mean of v^T H_b v over ``num_probes``
    Rademacher vectors v per batch (E[v^T H v] = tr(H)).

    The model is used in its current mode (train mode: BatchNorm uses batch statistics, as
    in training); its buffers and the global RNG are left as they were.

    Args:
        model: the network whose parameters the Hessian is taken in.
        loss_fn: ``loss_fn(model, batch)``, a scalar loss.
        batches: the fixed evaluation batches; the loss is their mean.
        num_probes: Rademacher probes per batch (the estimate's variance falls as 1 / probes).
        generator: draws the probes (seed it for a reproducible estimate).
        probes_per_pass: probes whose Hessian-vector products one vectorized backward pass
            computes (``is_grads_batched``): much faster for small models; memory grows with it.
    """
    check_positive_int("num_probes", num_probes)
    check_positive_int("probes_per_pass", probes_per_pass)
    _check_batches(batches)
    params = _trainable(model)
    total = 0.0
    with _untouched(model, params):
        for batch in batches:
            # one first-order graph per batch, reused by every probe
            grads = _gradient(model, loss_fn, batch, params)
            for start in range(0, num_probes, probes_per_pass):
                count = min(probes_per_pass, num_probes - start)
                if count == 1:
                    v = _draw(params, generator, "rademacher")
                    total += float(_dot(v, _hvp(grads, params, v)))
                else:
                    v = _draw(params, generator, "rademacher", count)
                    total += float(_dot(v, _hvp(grads, params, v, batched=True)))
            del grads
    return total / (num_probes * len(batches))


def top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    iters: int,
    tol: float,
    generator: torch.Generator,
) -> float:
    """The largest eigenvalue of H, the Hessian of the mean of ``loss_fn`` over ``batches``
    (trainable parameters), by power iteration with the Rayleigh quotient.

    Power iteration finds the eigenvalue of largest *magnitude*; away from a minimum that can
    be a negative one. Then a second power iteration on H - mu I (mu that negative value, so
    the shifted matrix is positive semi-definite) finds the largest one. Each iteration costs one
    Hessian-vector product per batch (a forward and two backward passes).

    Args:
        model: the network whose parameters the Hessian is taken in.
        loss_fn: ``loss_fn(model, batch)``, a scalar loss.
        batches: the fixed evaluation batches; the loss is their mean.
        iters: the most iterations of each power iteration (convergence is geometric in the
            ratio of the two largest eigenvalues: slow when they are close).
        tol: stop once the residual ``||H v - mu v||`` is at most ``tol * |mu|``; mu is then
            within that distance of an eigenvalue of H.
        generator: draws the starting vector.
    """
    check_positive_int("iters", iters)
    if not tol > 0:
        raise ValueError(f"tol ({tol!r}) must be > 0")
    _check_batches(batches)
    params = _trainable(model)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for batch in batches:
            grads = _gradient(model, loss_fn, batch, params)
            for acc, h in zip(out, _hvp(grads, params, v)):
                acc.add_(h.detach(), alpha=1.0 / len(batches))
            del grads
        return out

    def power(shift: float) -> float:
        v = _draw(params, generator, "gaussian")
        norm = float(_dot(v, v)) ** 0.5
        v = [t / norm for t in v]
        estimate = 0.0
        for _ in range(iters):
            hv = [h - shift * t for h, t in zip(hvp(v), v)]
            estimate = float(_dot(v, hv))  # Rayleigh quotient of the unit vector v
            residual = [h - estimate * t for h, t in zip(hv, v)]
            norm = float(_dot(hv, hv)) ** 0.5
            if norm == 0.0:
                return 0.0  # v lies in the kernel (a zero Hessian)
            v = [t / norm for t in hv]
            if float(_dot(residual, residual)) ** 0.5 <= tol * abs(estimate):
                break
        return estimate

    with _untouched(model, params):
        dominant = power(0.0)
        if dominant >= 0:
            return dominant
        # the dominant eigenvalue is negative: H - dominant * I has eigenvalues >= 0
        return power(dominant) + dominant


class SharpnessCallback(pl.Callback):
    """Logs ``sharpness/hessian_trace`` and ``sharpness/top_eigenvalue`` of the training loss
    every ``every_n_steps`` optimizer steps, on a fixed set of evaluation batches, at the
    averaged model.

    Under :class:`~localsgd.LocalSGDStrategy` the measurement runs inside
    ``strategy.driver.averaged(...)``, which holds the workers' average on every rank (a
    collective: every rank enters it, only global rank 0 measures and logs); with any other
    strategy (the SGD baseline, one device) the model is measured as it is. Simulated workers
    all hold the average inside it, so the module's tensors are the average too.

    The loss is ``loss_fn(module, batch)`` when given, else the LightningModule's own
    ``module.loss(batch)`` method (as :class:`localsgd.research.models.Classifier` and
    :class:`localsgd.research.models.Regressor` have); it must be the data loss without logging
    (weight decay, applied by the optimizer, adds ``weight_decay * num_params`` to the trace).

    The evaluation batches are taken once, at the start of training: ``num_batches`` batches of
    ``batch_size`` random samples of ``dataset`` when given (moved to the device as they are),
    else the first ``num_batches`` batches of the training dataloader, as the training step
    would see them (after the batch-transfer hooks: augmented, with one fixed draw of label
    noise if the data adds any; under simulation, worker 0's). Measuring runs the module in its
    training mode, then puts back its buffers and the RNG state, so it does not change training.

    Metrics are written straight to the Trainer's loggers (not subject to ``log_every_n_steps``),
    in the row of the Trainer's other metrics of that step, and kept in :attr:`history`.

    Args:
        every_n_steps: measure after every this many optimizer steps.
        num_batches: evaluation batches (the loss is their mean).
        num_probes: Rademacher probes per batch for the Hutchinson trace estimate.
        probes_per_pass: probes per vectorized backward pass (see :func:`hessian_trace`).
        power_iters: the most power iterations for the top eigenvalue.
        power_tol: relative residual at which the power iteration stops (see :func:`top_eigenvalue`).
        compute_eigenvalue: ``False`` skips the top eigenvalue (the costlier metric).
        dataset: samples to measure on; ``"train"``: the datamodule's training set without
            augmentation or label noise (its ``clean_train_set()``), the training loss's data;
            ``None`` takes training batches (see above).
        batch_size: batch size when sampling from ``dataset``.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses ``module.loss(batch)``.
        seed: seeds the probes and the starting vectors (with the step count, so a resumed
            run draws what an uninterrupted one would).
    """

    def __init__(
        self,
        *,
        every_n_steps: int,
        num_batches: int = 4,
        num_probes: int = 10,
        probes_per_pass: int = 1,
        power_iters: int = 20,
        power_tol: float = 1e-3,
        compute_eigenvalue: bool = True,
        dataset: Dataset | Literal["train"] | None = None,
        batch_size: int = 256,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.num_batches = check_positive_int("num_batches", num_batches)
        self.num_probes = check_positive_int("num_probes", num_probes)
        self.probes_per_pass = check_positive_int("probes_per_pass", probes_per_pass)
        self.power_iters = check_positive_int("power_iters", power_iters)
        if not power_tol > 0:
            raise ValueError(f"power_tol ({power_tol!r}) must be > 0")
        self.power_tol = power_tol
        if not isinstance(compute_eigenvalue, bool):
            raise ValueError(f"compute_eigenvalue ({compute_eigenvalue!r}) must be True or False")
        self.compute_eigenvalue = compute_eigenvalue
        if isinstance(dataset, str) and dataset != "train":
            raise ValueError(f"dataset ({dataset!r}) must be a Dataset, 'train' or None")
        self.dataset = dataset
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.loss_fn = loss_fn
        self.seed = seed
        self.batches: list[Any] = []
        """The fixed evaluation batches (set at the start of training)."""
        self.history: list[dict[str, float]] = []
        """One entry per measurement: ``step`` (optimizer steps so far) and the metrics."""
        self._last_step = 0

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, "loss", None)):
            raise ValueError(
                f"SharpnessCallback needs the training loss: {type(pl_module).__name__} has no "
                "`loss(batch) -> Tensor` method. HINT: add one (the loss training_step minimizes, "
                "without logging), or pass SharpnessCallback(loss_fn=lambda module, batch: ...)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        # drawing the batches must not move the RNG stream training continues with
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.batches = self._take_batches(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # once per optimizer step (micro-batches under gradient accumulation share one)
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        driver = getattr(trainer.strategy, "driver", None)
        averaged = driver.averaged("sharpness") if driver is not None else contextlib.nullcontext()
        with averaged:  # a collective: every rank enters it
            metrics = self.measure(pl_module, step=step) if trainer.is_global_zero else None
        if metrics is None:
            return
        self.history.append({"step": float(step), **metrics})
        # the row Lightning writes this step's training metrics to
        row = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", step - 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row)

    # ------------------------------------------------------------------ measuring
    def measure(self, module: nn.Module, *, step: int = 0) -> dict[str, float]:
        """Both metrics of ``module`` on :attr:`batches`, with probes seeded by (seed, step)."""
        if not self.batches:
            raise ValueError("no evaluation batches yet: they are taken at the start of training")
        loss_fn = self.loss_fn or _module_loss
        device = next(p.device for p in module.parameters())
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
        metrics = {
            "sharpness/hessian_trace": hessian_trace(
                module,
                loss_fn,
                self.batches,
                num_probes=self.num_probes,
                generator=generator,
                probes_per_pass=self.probes_per_pass,
            )
        }
        if self.compute_eigenvalue:
            metrics["sharpness/top_eigenvalue"] = top_eigenvalue(
                module, loss_fn, self.batches, iters=self.power_iters, tol=self.power_tol, generator=generator
            )
        return metrics

    def _take_batches(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[Any]:
        dataset = self.dataset
        if dataset == "train":
            datamodule = getattr(trainer, "datamodule", None)
            clean = getattr(datamodule, "clean_train_set", None)
            if not callable(clean):
                raise ValueError(
                    "SharpnessCallback(dataset='train') needs a datamodule with a clean_train_set() "
                    f"method; {type(datamodule).__name__} has none. HINT: pass the Dataset itself"
                )
            dataset = clean()
        if dataset is not None:
            n = min(len(dataset), self.num_batches * self.batch_size)  # type: ignore[arg-type]
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))  # type: ignore[arg-type]
            loader = DataLoader(Subset(dataset, order[:n].tolist()), batch_size=self.batch_size)
            return [move_data_to_device(b, module.device) for b in loader]
        simulated = getattr(trainer.strategy, "replicas", None) is not None
        batches = []
        for batch in trainer.train_dataloader:  # type: ignore[union-attr]
            batch = trainer.strategy.batch_to_device(batch)
            batches.append(batch[0] if simulated else batch)  # simulation: one batch per worker
            if len(batches) == self.num_batches:
                break
        return batches


def _module_loss(module: nn.Module, batch: Any) -> Tensor:
    return module.loss(batch)  # type: ignore[operator]
