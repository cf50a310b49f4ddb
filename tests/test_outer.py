"""Outer optimizers, alone and inside the averaging round (K in-process workers)."""

from __future__ import annotations

import functools

import pytest
import torch
from common import ToyNet, max_diff, mean_state, snapshot

from localsgd import Averager, InProcessCommunicator, LocalSGDStrategy
from localsgd.core.outer import DiLoCo, OuterOptimizer, SlowMo
from localsgd.core.rounds import average as one_round

K = 3


def workers() -> list[ToyNet]:
    torch.manual_seed(0)
    base = ToyNet(bn=True)
    nets = []
    for _ in range(K):
        net = ToyNet(bn=True)
        net.load_state_dict(base.state_dict())
        nets.append(net)
    return nets


def local_round(nets: list[ToyNet], seed: int) -> None:
    """Stand-in for H local steps: each worker moves its parameters and BatchNorm statistics its own way."""
    for k, net in enumerate(nets):
        torch.manual_seed(seed * 10 + k)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        net(torch.randn(8, 8))


def run_rounds(outer: OuterOptimizer | None, rounds: int = 4) -> list[dict[str, torch.Tensor]]:
    nets = workers()
    averager = Averager(nets, InProcessCommunicator(K), outer=outer)
    states = []
    for r in range(rounds):
        local_round(nets, r)
        one_round(averager)
        states.append(snapshot(nets[0]))
        for net in nets[1:]:
            assert max_diff(snapshot(net), states[-1]) == 0.0
    return states


def test_slowmo_with_lr_1_and_no_momentum_is_plain_averaging() -> None:
    plain = run_rounds(None)
    slowmo = run_rounds(SlowMo(lr=1.0, momentum=0.0))
    for a, b in zip(plain, slowmo):
        assert max_diff(a, b) <= 1e-6


def test_diloco_is_a_nesterov_step_on_the_pseudo_gradient() -> None:
    lr, mu = 0.7, 0.9
    nets = workers()
    averager = Averager(nets, InProcessCommunicator(K), outer=DiLoCo())
    params = lambda net: torch.cat([p.detach().reshape(-1) for p in net.parameters()])  # noqa: E731
    anchor = params(nets[0]).double()
    buf = torch.zeros_like(anchor)
    for r in range(3):
        local_round(nets, r)
        average = torch.stack([params(n).double() for n in nets]).mean(0)
        buffers = mean_state([{k: v for k, v in snapshot(n).items() if "running" in k} for n in nets])
        one_round(averager)
        # by hand: g = anchor - average; buf = mu buf + g; anchor -= lr (g + mu buf)
        g = anchor - average
        buf = mu * buf + g
        anchor = anchor - lr * (g + mu * buf)
        for net in nets:
            assert (params(net).double() - anchor).abs().max().item() <= 1e-6
            # buffers are averaged, never stepped
            for key, value in buffers.items():
                assert (snapshot(net)[key].double() - value).abs().max().item() <= 1e-6
    assert not torch.allclose(anchor, average)  # the outer step really differs from averaging


def test_any_torch_optimizer_can_be_the_outer_one() -> None:
    states = run_rounds(OuterOptimizer(functools.partial(torch.optim.Adam, lr=0.01)), rounds=2)
    plain = run_rounds(None, rounds=2)
    assert max_diff(states[-1], plain[-1]) > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: SlowMo(lr=0.8, momentum=0.5),
        lambda: DiLoCo(),
        lambda: OuterOptimizer(functools.partial(torch.optim.Adam, lr=0.05)),
    ],
)
def test_state_round_trip_at_any_round(make) -> None:
    torch.manual_seed(0)
    start = [torch.randn(5), torch.randn(3, 2)]
    averages = [[a + torch.randn_like(a) for a in start] for _ in range(6)]

    def run(outer: OuterOptimizer, rounds: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        for avg in rounds:
            anchors = outer.step(avg)
        return [a.clone() for a in anchors]

    reference = make()
    reference.bind(start)
    expected = run(reference, averages)
    for stop in (1, 3, 5):
        first = make()
        first.bind(start)
        run(first, averages[:stop])
        state = first.state_dict()
        second = make()
        second.bind([torch.zeros(5), torch.zeros(3, 2)])  # whatever it starts from, the state wins
        second.load_state_dict(state)
        got = run(second, averages[stop:])
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=0, atol=1e-7), stop


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SlowMo(lr=0), r"lr \(0\) must be a number > 0"),
        (lambda: SlowMo(lr=-1.0), r"lr \(-1.0\) must be a number > 0"),
        (lambda: SlowMo(momentum=1.0), r"momentum \(1.0\) must be a number in \[0, 1\)"),
        (lambda: DiLoCo(momentum=-0.1), r"momentum \(-0.1\) must be a number in \[0, 1\)"),
        (lambda: DiLoCo(momentum=0.0), r"nesterov=True needs momentum > 0"),
        (lambda: OuterOptimizer("sgd"), r"optimizer \('sgd'\) must build a torch optimizer"),
        (lambda: LocalSGDStrategy(outer_optimizer="diloco"), r"outer_optimizer \('diloco'\) must be None"),
    ],
)
def test_bad_input(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("make", [DiLoCo, lambda: SlowMo(lr=0.8, momentum=0.5)], ids=["diloco", "slowmo"])
def test_evaluation_mid_round_sees_the_sync_it_would_take_without_advancing_it(make) -> None:
    # one definition of "the model": evaluation and checkpoints mid-round hold what a sync at
    # that step produces (outer step included), and the run goes on as if they never happened
    nets = workers()
    outer = make()
    averager = Averager(nets, InProcessCommunicator(K), outer=outer)
    local_round(nets, seed=1)
    one_round(averager)  # a first sync: the outer optimizer now has momentum
    local_round(nets, seed=2)  # mid-round
    own = [snapshot(n) for n in nets]
    state = outer.state_dict()
    with averager.averaged("eval"):
        seen = [snapshot(n) for n in nets]
    assert all(max_diff(snapshot(n), o) == 0.0 for n, o in zip(nets, own))  # workers' own models back
    after = outer.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(after["anchors"], state["anchors"]))
    assert after["optimizer"]["state"][0]["momentum_buffer"].equal(
        state["optimizer"]["state"][0]["momentum_buffer"]
    )
    one_round(averager)  # the sync that evaluation previewed
    for net, view in zip(nets, seen):
        assert max_diff(snapshot(net), view) == 0.0
    assert max_diff(seen[0], mean_state(own)) > 1e-3  # not the plain average
