"""Compressed syncs (``wire="bf16" | "int8"``, ``error_feedback``): their error bounds, their bytes,
simulated workers against processes, and an exact resume with error-feedback residuals."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import TIMEOUT, ToyNet, make_optimizer, snapshot, toy_batches
from distributed import run
from torch import Tensor

from localsgd import InProcessCommunicator, LocalSGD, LocalSGDStrategy, ProcessGroupCommunicator
from localsgd.core.wire import BLOCK, CompressedMean, decode, encode


def _deltas(num_workers: int, round_: int, n: int = 1000) -> list[Tensor]:
    g = torch.Generator().manual_seed(round_)
    return [torch.randn(n, generator=g) * (k + 1) * 1e-2 for k in range(num_workers)]


def test_int8_blocks_lose_at_most_half_a_step_of_their_own_absmax() -> None:
    x = torch.randn(4 * BLOCK) * torch.tensor([1e-4, 1.0, 30.0, 0.0]).repeat_interleave(BLOCK)
    values, scales = encode(x, "int8")
    assert values.dtype == torch.int8 and scales is not None and scales.numel() == 4
    err = (decode(values, scales) - x).view(4, BLOCK).abs().amax(dim=1)
    absmax = x.view(4, BLOCK).abs().amax(dim=1)
    assert torch.all(err <= absmax / 127 / 2 * (1 + 1e-5))  # within the absmax / 127
    assert err[3] == 0.0, "an all-zero block stays zero"


def test_one_round_of_int8_is_within_one_step_per_contribution_and_bf16_is_close() -> None:
    k = 4
    exact = torch.stack(_deltas(k, 0)).mean(0)
    for wire, bound in (("int8", sum(d.abs().max() / 127 for d in _deltas(k, 0)) / k), ("bf16", 1e-3)):
        got = [d.clone() for d in _deltas(k, 0)]
        CompressedMean(InProcessCommunicator(k), wire).mean_(got)
        step = exact.abs().max() / 127 if wire == "int8" else 0.0  # the requantized mean
        assert (got[0] - exact).abs().max() <= bound + step, wire
        assert all(torch.equal(g, got[0]) for g in got)


def test_error_feedback_keeps_20_rounds_within_one_step_of_the_exact_sum() -> None:
    k, rounds = 4, 20
    applied = {True: torch.zeros(1000), False: torch.zeros(1000)}
    exact = torch.zeros(1000)
    means = {ef: CompressedMean(InProcessCommunicator(k), "int8", error_feedback=ef) for ef in applied}
    steps = []
    for r in range(rounds):
        exact += torch.stack(_deltas(k, r)).mean(0)
        steps.append(max(d.abs().max() for d in _deltas(k, r)) / 127)
        for ef, mean in means.items():
            got = _deltas(k, r)
            mean.mean_(got)
            applied[ef] += got[0]
    with_ef = (applied[True] - exact).abs().max()
    without = (applied[False] - exact).abs().max()
    assert with_ef <= max(steps), (with_ef, max(steps))
    assert with_ef < without, "error feedback must beat plain rounding over 20 rounds"


def _net() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet()


def _batches(worker: int, n: int = 12) -> list[tuple[Tensor, Tensor]]:
    return toy_batches(worker, n)


def _train(ls: LocalSGD, nets: list[ToyNet], opts: list[Any], batches: list[list[Any]], steps: range) -> None:
    for i in steps:
        for net, opt, b in zip(nets, opts, batches):
            opt.zero_grad()
            F.cross_entropy(net(b[i][0]), b[i][1]).backward()
            opt.step()


def _in_process(k: int, **kwargs: Any) -> tuple[LocalSGD, list[ToyNet], list[Any]]:
    nets = [_net() for _ in range(k)]
    opts = [make_optimizer(n.parameters(), 0.1, 0.9, 1e-3) for n in nets]
    return LocalSGD(nets, opts, sync_every=4, comm=InProcessCommunicator(k), **kwargs), nets, opts


def test_bf16_halves_the_bytes_and_int8_sends_at_most_027_of_fp32() -> None:
    sent = {}
    for wire in ("fp32", "bf16", "int8"):
        torch.manual_seed(0)  # 14k parameters: the padding to whole blocks is under 2%
        nets = [torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4))]
        nets.append(copy.deepcopy(nets[0]))
        opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
        ls = LocalSGD(nets, opts, sync_every=4, comm=InProcessCommunicator(2), wire=wire)
        _train(ls, nets, opts, [_batches(k) for k in range(2)], range(8))  # type: ignore[arg-type]
        assert ls.comm.rounds("sync") == 2
        sent[wire] = ls.comm.bytes("sync")
    assert sent["bf16"] / sent["fp32"] == pytest.approx(0.5, abs=0.01)
    assert sent["int8"] / sent["fp32"] <= 0.27


def _processes(rank: int, wire: str, per_process: int) -> dict[str, Tensor]:
    dist.init_process_group("gloo", timeout=TIMEOUT)
    nets = [_net() for _ in range(per_process)]
    opts = [make_optimizer(n.parameters(), 0.1, 0.9, 1e-3) for n in nets]
    comm = ProcessGroupCommunicator(workers_per_process=per_process)
    ls = LocalSGD(nets, opts, sync_every=4, wire=wire, error_feedback=wire != "fp32", comm=comm)
    first = rank * per_process
    _train(ls, nets, opts, [_batches(first + k) for k in range(per_process)], range(12))
    return snapshot(nets[0])


@pytest.mark.distributed
@pytest.mark.parametrize("wire", ["bf16", "int8"])
def test_four_simulated_workers_equal_four_processes_and_two_by_two(wire: str) -> None:
    ls, nets, opts = _in_process(4, wire=wire, error_feedback=True)
    _train(ls, nets, opts, [_batches(k) for k in range(4)], range(12))
    simulated = snapshot(nets[0])
    for processes, per_process in ((4, 1), (2, 2)):
        for result in run(_processes, processes, wire, per_process):
            for key, value in simulated.items():
                assert torch.equal(result[key], value), f"{processes}x{per_process}: {key} differs"


def test_a_mid_round_state_dict_with_error_feedback_resumes_bitwise() -> None:
    batches = [_batches(k) for k in range(2)]
    ls, nets, opts = _in_process(2, wire="int8", error_feedback=True)
    _train(ls, nets, opts, batches, range(6))  # step 6: mid-round, residuals from the first sync
    buffer = io.BytesIO()
    torch.save(ls.state_dict(), buffer)
    _train(ls, nets, opts, batches, range(6, 12))
    ls2, nets2, opts2 = _in_process(2, wire="int8", error_feedback=True)
    buffer.seek(0)
    ls2.load_state_dict(torch.load(buffer, weights_only=False))
    assert ls2.wire is not None and ls2.wire.residuals
    _train(ls2, nets2, opts2, batches, range(6, 12))
    for a, b in zip(nets, nets2):
        assert all(torch.equal(x, y) for x, y in zip(snapshot(a).values(), snapshot(b).values()))


def test_a_compressed_wire_trains_under_the_strategy_with_simulated_workers() -> None:
    from common import ToyModule, make_trainer

    strategy = LocalSGDStrategy(sync_every=4, workers_per_device=2, wire="int8", error_feedback=True)
    make_trainer(strategy, max_steps=8).fit(ToyModule(lr=0.1, momentum=0.9))
    assert strategy.comm is not None and strategy.comm.rounds("sync") == 2
    assert strategy.options.outer_optimizer is not None, "plain averaging runs as an outer step of lr 1"
    a, b = (list(r.parameters()) for r in strategy.replicas.replicas)  # type: ignore[union-attr]
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "workers equal after the final sync"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"wire": "fp16"}, r"wire \('fp16'\) must be one of 'fp32', 'bf16', 'int8'"),
        ({"error_feedback": True}, r"error_feedback=True needs a lossy wire"),
        ({"wire": "int8", "error_feedback": 1}, r"error_feedback \(1\) must be True or False"),
    ],
)
def test_bad_wire_arguments_are_named(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalSGDStrategy(**bad)
    with pytest.raises(ValueError, match=message):
        LocalSGD(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), **bad)
