"""Compressed syncs: the mean of the workers' deltas through a bf16 or int8 wire.

What travels is each worker's delta ``theta_worker - theta_last_global`` (the pseudo-gradient),
never its parameters: a low-precision delta loses its precision on a small number (DESIGN
pitfall 13). The mean is computed like a reduce-scatter followed by an all-gather, so that no
sum is ever taken in low precision: every worker encodes its delta (int8: one fp32 scale per
block of :data:`BLOCK` values, ``absmax / 127``), each process receives every worker's encoded
chunk of its own shard (all-to-all), decodes and sums them in fp32 in worker order, encodes the
mean of its shard again, and an all-gather returns the whole mean, decoded on every worker.

With ``error_feedback``, each worker keeps what its encoding lost and adds it to its next delta,
and each process does the same for the shard mean it encodes, so that over many rounds what was
applied stays within one quantization step of the exact sum. Simulated workers in one process
(:class:`~localsgd.core.comm.InProcessCommunicator`) run the same encoding, block by block on
the same boundaries, and sum in the same order: the same numbers as that many processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from localsgd.core.comm import Communicator

Wire = Literal["fp32", "bf16", "int8"]
BLOCK = 256
"""Values per int8 scale: 4 bytes of scale per 256 bytes of payload (1.6%)."""


def encode(x: Tensor, wire: Wire) -> tuple[Tensor, Tensor | None]:
    """``x`` (fp32, a multiple of :data:`BLOCK` long for int8) as the wire carries it: the values,
    and for int8 one scale per block."""
    if wire == "bf16":
        return x.to(torch.bfloat16), None
    blocks = x.view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1), scales


def decode(values: Tensor, scales: Tensor | None) -> Tensor:
    """The fp32 values an encoded tensor stands for."""
    if scales is None:
        return values.float()
    return (values.view(-1, BLOCK).float() * scales[:, None]).view(-1)


class CompressedMean:
    """The mean over all workers of each local worker's delta, through ``wire``.

    Args:
        comm: the communicator over all workers.
        wire: ``"bf16"`` or ``"int8"``.
        error_feedback: keep what each encoding lost and add it to the next round's.
    """

    def __init__(self, comm: Communicator, wire: Wire, *, error_feedback: bool = False) -> None:
        if wire not in ("bf16", "int8"):
            raise ValueError(f"wire ({wire!r}) must be 'bf16' or 'int8' for a compressed mean")
        self.comm, self.wire, self.error_feedback = comm, wire, error_feedback
        self.residuals: dict[int, list[Tensor]] = {}
        """Per tensor index: each local worker's encoding loss (error feedback)."""
        self.shard_residuals: dict[int, Tensor] = {}
        """Per tensor index: this process's loss when it encodes its shard of the mean."""

    def _padded(self, numel: int) -> tuple[int, int]:
        processes = self.comm.num_workers // self.comm.num_local_workers
        unit = processes * (BLOCK if self.wire == "int8" else 1)
        padded = -(-numel // unit) * unit
        return padded, padded // processes

    @torch.no_grad()
    def mean_(self, deltas: Sequence[Tensor], key: int = 0) -> None:
        """Replace every local worker's ``deltas[w]`` (fp32, flat) with the workers' mean; ``key``
        names the tensor for its error-feedback state."""
        mean = self.start(deltas, key).result()
        for delta in deltas:
            delta.copy_(mean)

    def start(self, deltas: Sequence[Tensor], key: int = 0) -> StagedMean:
        """The mean of ``deltas`` in stages (:class:`StagedMean`): encoded and sent now."""
        return StagedMean(self, deltas, key)

    def _encoded(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` (padded) plus the residual carried in, encoded; the residual becomes what was lost."""
        if residual is not None:
            x[: residual.numel()] += residual
        values, scales = encode(x, self.wire)
        if residual is not None:
            residual.copy_(x[: residual.numel()] - decode(values, scales)[: residual.numel()])
        return values, scales

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": {k: [t.clone() for t in v] for k, v in self.residuals.items()},
            "shard_residuals": {k: t.clone() for k, t in self.shard_residuals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {int(k): [t.clone() for t in v] for k, v in state["residuals"].items()}
        self.shard_residuals = {int(k): t.clone() for k, t in state["shard_residuals"].items()}


class StagedMean:
    """One compressed mean in its three stages, so that an overlapped round can let each travel in
    the background: built, every worker's delta is encoded and the all-to-all starts;
    :meth:`reduce` sums this process's shard and starts the all-gather; :meth:`result` waits for
    it and decodes the whole mean."""

    @torch.no_grad()
    def __init__(self, mean: CompressedMean, deltas: Sequence[Tensor], key: int) -> None:
        comm, k = mean.comm, len(deltas)
        self.mean, self.key, self.numel = mean, key, deltas[0].numel()
        processes = comm.num_workers // k
        padded, shard = mean._padded(self.numel)
        residuals: list[Tensor | None] = [None] * k
        if mean.error_feedback:
            residuals = list(
                mean.residuals.setdefault(
                    key, [torch.zeros(self.numel, device=deltas[0].device) for _ in deltas]
                )
            )
        sent_values, sent_scales = [], []
        for delta, residual in zip(deltas, residuals):
            x = torch.zeros(padded, device=delta.device)
            x[: self.numel] = delta
            values, scales = mean._encoded(x, residual)
            sent_values.append(values.view(processes, shard))
            if scales is not None:
                sent_scales.append(scales.view(processes, shard // BLOCK))
        # [to process p][local worker w]: after the exchange, [from process p][its worker w]
        self._values, pending_values = comm.exchange_start_(torch.stack(sent_values, dim=1).contiguous())
        self._pending = [pending_values]
        self._scales: Tensor | None = None
        if sent_scales:
            self._scales, pending_scales = comm.exchange_start_(torch.stack(sent_scales, dim=1).contiguous())
            self._pending.append(pending_scales)
        comm.count_(
            sum(t.numel() * t.element_size() for t in (self._values, self._scales) if t is not None) // k
        )
        self._gathered: tuple[Tensor, Tensor | None] | None = None
        self._mean: Tensor | None = None

    def _wait(self) -> None:
        for p in self._pending:
            p.wait()
        self._pending = []

    @torch.no_grad()
    def reduce(self) -> None:
        """Decode and sum this process's shard in fp32, in global worker order (the same sum in one
        process or many), encode its mean, start the all-gather. Once; later calls do nothing."""
        if self._gathered is not None or self._mean is not None:
            return
        self._wait()
        mean, comm = self.mean, self.mean.comm
        values, scales = self._values, self._scales
        processes, k = values.shape[0], values.shape[1]
        received = [
            decode(values[p, w], None if scales is None else scales[p, w])
            for p in range(processes)
            for w in range(k)
        ]
        total = received[0].clone()
        for r in received[1:]:
            total += r
        total /= comm.num_workers
        residual = (
            mean.shard_residuals.setdefault(self.key, torch.zeros_like(total))
            if mean.error_feedback
            else None
        )
        mine_values, mine_scales = mean._encoded(total, residual)
        full_values, pending_values = comm.gather_start_(mine_values)
        self._pending = [pending_values]
        full_scales = None
        if mine_scales is not None:
            full_scales, pending_scales = comm.gather_start_(mine_scales)
            self._pending.append(pending_scales)
        self._gathered = (full_values, full_scales)

    @torch.no_grad()
    def result(self) -> Tensor:
        """The workers' mean delta (fp32, flat), waiting for whatever is still travelling."""
        if self._mean is None:
            self.reduce()
            self._wait()
            assert self._gathered is not None
            full_values, full_scales = self._gathered
            scales = None if full_scales is None else full_scales.view(-1)
            self._mean = decode(full_values.view(-1), scales)[: self.numel]
            self._gathered = None
        return self._mean
