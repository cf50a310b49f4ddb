"""Streaming fragments (``num_fragments=F``), alone and with the other two knobs: a serial
reference written from the rule (fragment f syncs every H steps, offset by f * H / F, each with
its own outer state), the bytes of each sync, processes against simulated workers, an exact
resume with a compressed round in flight, and the arguments' rules."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
from common import TIMEOUT, make_optimizer, toy_batches
from common import flat_params as _flat
from common import train_step as _step
from distributed import run
from torch import Tensor, nn

from localsgd import DiLoCo, InProcessCommunicator, LocalSGD, LocalSGDStrategy, ProcessGroupCommunicator
from localsgd.core.buckets import split_fragments
from localsgd.core.schedules import QSR

H, FRAGMENTS, K = 8, 4, 2


def _net() -> nn.Sequential:
    """Four layers of 72 values each: the four fragments are the four layers, a quarter each."""
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(FRAGMENTS)))


def _batches(worker: int, n: int) -> list[tuple[Tensor, Tensor]]:
    return toy_batches(worker, n, classes=8)


def _layer(net: nn.Sequential, f: int) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net[f].parameters()])


def _set_layer(net: nn.Sequential, f: int, value: Tensor) -> None:
    offset = 0
    for p in net[f].parameters():
        p.data.copy_(value[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def test_fragments_are_whole_tensors_of_near_equal_bytes_in_a_fixed_order() -> None:
    tensors = list(_net().parameters())
    parts = split_fragments(tensors, FRAGMENTS)
    assert [[id(t) for t in part] for part in parts] == [
        [id(t) for t in tensors[2 * f : 2 * f + 2]] for f in range(4)
    ]
    uneven = [torch.zeros(100), torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(30)]
    sizes = [sum(t.numel() for t in part) for part in split_fragments(uneven, 2)]
    assert sizes == [120, 130]
    # a tensor bigger than an equal share is a fragment of its own; none is ever empty
    dominant = [torch.zeros(10), torch.zeros(1000), torch.zeros(10), torch.zeros(10)]
    assert [sum(t.numel() for t in part) for part in split_fragments(dominant, 3)] == [10, 1000, 20]
    with pytest.raises(ValueError, match=r"num_fragments \(4\) must be at most the number of the model's"):
        split_fragments([torch.zeros(1000), torch.zeros(1), torch.zeros(1)], 4)


def test_units_stay_whole_in_one_fragment() -> None:
    """With units (an FSDP2-sharded model's), a fragment holds whole units: the cut by tensors
    would put the first tensor of unit 1 beside unit 0."""
    tensors = [torch.zeros(100), torch.zeros(10), torch.zeros(100)]
    by_tensor = [sum(t.numel() for t in part) for part in split_fragments(tensors, 2)]
    assert by_tensor == [110, 100]
    by_unit = split_fragments(tensors, 2, units=[0, 1, 1])
    assert [[id(t) for t in part] for part in by_unit] == [[id(tensors[0])], [id(tensors[1]), id(tensors[2])]]
    # a unit's tensors apart in the order (a root unit's embedding and head) go with its first
    apart = split_fragments(tensors, 2, units=[0, 1, 0])
    assert [[id(t) for t in part] for part in apart] == [[id(tensors[0]), id(tensors[2])], [id(tensors[1])]]
    with pytest.raises(
        ValueError, match=r"num_fragments \(3\) must be at most the number of the model's FSDP units \(2\)"
    ):
        split_fragments(tensors, 3, units=[0, 1, 1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("delay", "diloco"), [(0, False), (0, True), (1, True)], ids=["averaging", "diloco", "diloco-delay1"]
)
def test_four_fragments_equal_a_serial_reference(delay: int, diloco: bool) -> None:
    steps = 4 * H
    nets = [_net() for _ in range(K)]
    opts = [make_optimizer(n.parameters(), 0.1, 0.9, 1e-3) for n in nets]
    ls = LocalSGD(
        nets,
        opts,
        sync_every=H,
        num_fragments=FRAGMENTS,
        sync_delay=delay,
        outer_optimizer=DiLoCo() if diloco else None,
        comm=InProcessCommunicator(K),
    )
    # the reference: fragment f (layer f here) syncs after step s when (s + f * H / F) % H == 0,
    # with its own outer optimizer; a delayed one lands tau steps later keeping local progress
    ref = [_net() for _ in range(K)]
    ref_opts = [make_optimizer(n.parameters(), 0.1, 0.9, 1e-3) for n in ref]
    outers = [DiLoCo() for _ in range(FRAGMENTS)] if diloco else None
    if outers is not None:
        for f, outer in enumerate(outers):
            outer.bind([_layer(ref[0], f)])
    batches = [_batches(k, steps) for k in range(K)]
    pending: tuple[int, list[Tensor], int] | None = None  # (fragment, snapshots, due)

    def land(f: int, snaps: list[Tensor]) -> None:
        mean = torch.stack(snaps).mean(0)
        new = outers[f].step([mean])[0].clone() if outers is not None else mean
        for k in range(K):
            _set_layer(ref[k], f, _layer(ref[k], f) + (new - snaps[k]))

    synced = []
    for s in range(1, steps + 1):
        for k in range(K):
            _step(nets[k], opts[k], batches[k][s - 1])
            _step(ref[k], ref_opts[k], batches[k][s - 1])
        if pending is not None and pending[2] == s:
            land(pending[0], pending[1])
            pending = None
        for f in range(FRAGMENTS):
            if (s + f * H // FRAGMENTS) % H == 0:
                synced.append((s, f))
                snaps = [_layer(n, f).clone() for n in ref]
                if delay:
                    pending = (f, snaps, s + delay)
                else:
                    land(f, snaps)
        for k in range(K):
            for f in range(FRAGMENTS):
                gap = (_layer(nets[k], f) - _layer(ref[k], f)).abs().max().item()
                assert gap <= 1e-6, f"step {s}, worker {k}, fragment {f}: {gap}"
    assert synced[:4] == [(2, 3), (4, 2), (6, 1), (8, 0)], "fragment f first syncs at H - f*H/F"
    assert ls.comm.rounds("sync") == len(synced) == steps // (H // FRAGMENTS)
    assert not torch.equal(_layer(nets[0], 3), _layer(nets[1], 3)), "between its syncs a fragment differs"
    ls.finish()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_each_fragment_sync_sends_a_quarter_of_the_model() -> None:
    nets = [_net() for _ in range(K)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    ls = LocalSGD(nets, opts, sync_every=H, num_fragments=FRAGMENTS, comm=InProcessCommunicator(K))
    batches = [_batches(k, 2 * H) for k in range(K)]
    per_sync, before = [], 0
    for s in range(2 * H):
        for k in range(K):
            _step(nets[k], opts[k], batches[k][s])
        if ls.comm.bytes("sync") != before:
            per_sync.append(ls.comm.bytes("sync") - before)
            before = ls.comm.bytes("sync")
    assert len(per_sync) == 2 * FRAGMENTS
    assert all(b == ls.averager.num_bytes / FRAGMENTS for b in per_sync), (per_sync, ls.averager.num_bytes)
    ls.close()


KNOBS: dict[str, dict[str, Any]] = {
    "every-knob": {"num_fragments": FRAGMENTS, "sync_delay": 3, "wire": "int8", "error_feedback": True},
    "fragments": {"num_fragments": FRAGMENTS},
    "delay": {"sync_delay": 6},
}


def _knobs(name: str = "every-knob") -> dict[str, Any]:
    return {"sync_every": 16, "outer_optimizer": DiLoCo(), **KNOBS[name]}


def _in_process(k: int, knobs: str = "every-knob") -> tuple[LocalSGD, list[nn.Sequential], list[Any]]:
    nets = [_net() for _ in range(k)]
    opts = [make_optimizer(n.parameters(), 0.1, 0.9, 1e-3) for n in nets]
    return LocalSGD(nets, opts, comm=InProcessCommunicator(k), **_knobs(knobs)), nets, opts


def _processes(rank: int, steps: int, knobs: str) -> Tensor:
    dist.init_process_group("gloo", timeout=TIMEOUT)
    net = _net()
    opt = make_optimizer(net.parameters(), 0.1, 0.9, 1e-3)
    ls = LocalSGD(net, opt, comm=ProcessGroupCommunicator(), **_knobs(knobs))
    for batch in _batches(rank, steps):
        _step(net, opt, batch)
    out = _flat(net).clone()
    ls.close()
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("knobs", list(KNOBS))
def test_four_processes_equal_four_simulated_workers(knobs: str) -> None:
    steps = 2 * 16 + 5  # ends with a round in flight, or mid-round
    ls, nets, opts = _in_process(4, knobs)
    batches = [_batches(k, steps) for k in range(4)]
    for s in range(steps):
        for k in range(4):
            _step(nets[k], opts[k], batches[k][s])
    assert (ls.in_flight is not None) == ("sync_delay" in KNOBS[knobs])
    for rank, result in enumerate(run(_processes, 4, steps, knobs)):
        if "wire" in KNOBS[knobs]:  # the wire sums in worker order in one process or many: bitwise
            assert torch.equal(result, _flat(nets[rank])), f"rank {rank} differs from its simulated worker"
        else:  # gloo's ring sums 4 processes in another order than one process does
            gap = (result - _flat(nets[rank])).abs().max().item()
            assert gap <= 1e-6, f"rank {rank} differs from its simulated worker by {gap}"
    ls.close()


@pytest.mark.slow
def test_a_checkpoint_with_a_compressed_fragment_in_flight_resumes_bitwise() -> None:
    steps = 3 * 16
    batches = [_batches(k, steps) for k in range(K)]
    ls, nets, opts = _in_process(K)
    buffer = io.BytesIO()
    for s in range(1, steps + 1):
        for k in range(K):
            _step(nets[k], opts[k], batches[k][s - 1])
        if s == 16 + 5:  # fragment 3's round started at step 20: all-gather at 22, lands at 23
            assert ls.in_flight is not None and ls.in_flight.reduce_at == s + 1, "only its all-to-all started"
            torch.save(ls.state_dict(), buffer)
    ls2, nets2, opts2 = _in_process(K)
    buffer.seek(0)
    ls2.load_state_dict(torch.load(buffer, weights_only=False))
    assert ls2.in_flight is not None and ls2.in_flight.due == 16 + 4 + 3
    for s in range(16 + 6, steps + 1):
        for k in range(K):
            _step(nets2[k], opts2[k], batches[k][s - 1])
    for a, b in zip(nets, nets2):
        assert torch.equal(_flat(a), _flat(b))


def test_an_overlapped_int8_round_lands_within_the_wires_error_of_the_fp32_one() -> None:
    def first_landing(wire: str) -> tuple[list[Tensor], list[Tensor]]:
        nets = [_net() for _ in range(K)]
        opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
        ls = LocalSGD(nets, opts, sync_every=H, sync_delay=2, wire=wire, comm=InProcessCommunicator(K))
        batches = [_batches(k, H + 2) for k in range(K)]
        for s in range(H + 2):
            for k in range(K):
                _step(nets[k], opts[k], batches[k][s])
            if s + 1 == H:
                deltas = [_flat(n) - _flat(_net()) for n in nets]  # what the round carries
        assert ls.in_flight is None and ls.comm.rounds("sync") == 1
        return [_flat(n) for n in nets], deltas

    exact, deltas = first_landing("fp32")
    got, _ = first_landing("int8")
    # per value: each worker's block error (<= its absmax / 254), then the mean's requantization
    bound = sum(d.abs().max() for d in deltas) / 254 / K + torch.stack(deltas).mean(0).abs().max() / 254
    for a, b in zip(exact, got):
        gap = (a - b).abs().max()
        assert 0 < gap <= bound * 1.01, (gap, bound)


def test_the_strategy_streams_fragments_with_simulated_workers() -> None:
    from common import ToyModule, make_trainer

    strategy = LocalSGDStrategy(sync_every=4, num_fragments=2, sync_delay=1, workers_per_device=2)
    make_trainer(strategy, max_steps=10).fit(ToyModule(lr=0.1, momentum=0.9))
    assert strategy.comm is not None and strategy.comm.rounds("sync") == 5  # one fragment every 2 steps
    a, b = (list(r.parameters()) for r in strategy.replicas.replicas)  # type: ignore[union-attr]
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "the final average syncs every fragment"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"num_fragments": 0}, r"num_fragments \(0\) must be an integer >= 1"),
        ({"sync_every": 8, "num_fragments": 3}, r"num_fragments \(3\) must divide H \(8\)"),
        (
            {"sync_every": QSR(base=4, alpha=0.01), "num_fragments": 2},
            r"num_fragments \(2\) > 1 needs a constant H",
        ),
        (
            {"sync_every": 8, "num_fragments": 2, "optimizer_state": "average"},
            r"num_fragments \(2\) > 1 with optimizer_state='average' is not supported",
        ),
        (
            {"sync_every": 8, "num_fragments": 2, "nonfinite": "skip_worker"},
            r"num_fragments \(2\) > 1 with nonfinite='skip_worker' is not supported",
        ),
    ],
)
def test_bad_fragment_arguments_are_named(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalSGDStrategy(**bad)
    with pytest.raises(ValueError, match=message):
        LocalSGD(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), **bad)
