"""The averaging code through the in-process communicator: K workers in one process."""

from __future__ import annotations

import pytest
import torch
from common import ToyNet, max_diff, mean_state, snapshot
from torch import nn

from localsgd import Averager, InProcessCommunicator
from localsgd.core.rounds import average

K = 3


def workers(*, bn: bool = True, frozen: bool = True) -> list[ToyNet]:
    """K models with different parameters and BatchNorm statistics."""
    nets = []
    for k in range(K):
        torch.manual_seed(k)
        net = ToyNet(bn=bn, frozen=frozen)
        net(torch.randn(16, 8))  # train-mode forward: moves the running statistics
        nets.append(net)
    return nets


def test_comm_reduces_and_counts() -> None:
    comm = InProcessCommunicator(3)
    ts = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0]), torch.tensor([6.0, 1.0])]
    with comm.round("sync"):
        comm.all_reduce_(ts, op="mean")
    assert all(torch.equal(t, torch.tensor([3.0, 2.0])) for t in ts)
    ts = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0]), torch.tensor([6.0, 1.0])]
    comm.all_reduce_(ts, op="max")  # outside a round: not counted
    assert all(torch.equal(t, torch.tensor([6.0, 5.0])) for t in ts)
    with comm.round("sync"):
        comm.all_reduce_(ts, op="sum")
        comm.all_reduce_(ts, op="sum", counted=False)
    assert comm.rounds("sync") == 2 and comm.bytes("sync") == 2 * 8
    assert comm.rounds("eval") == 0
    with pytest.raises(ValueError, match="one tensor per local worker"):
        comm.all_reduce_(ts[:2])
    with pytest.raises(ValueError, match="op"):
        comm.all_reduce_(ts, op="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_workers"):
        InProcessCommunicator(0)


def test_parameters_frozen_ones_included_and_buffers_averaged() -> None:
    nets = workers()
    before = [snapshot(n) for n in nets]
    for k, n in enumerate(nets):
        n.scale.data.fill_(float(k))  # frozen: no gradient, still averaged
        n.net[1].num_batches_tracked.fill_(10 * k)
    avg = Averager(nets, InProcessCommunicator(K), buffers="average")
    average(avg)
    expected = mean_state(before)
    for n in nets:
        state = snapshot(n)
        for key in ("net.0.weight", "net.3.weight", "net.3.bias", "net.1.running_mean", "net.1.running_var"):
            torch.testing.assert_close(state[key].double(), expected[key], rtol=0, atol=1e-6)
        assert torch.allclose(n.scale, torch.full((4,), 1.0))
    # integer buffers are counters, never averaged
    assert [int(n.net[1].num_batches_tracked) for n in nets] == [0, 10, 20]
    assert avg.comm.rounds() == 1
    assert (
        avg.comm.bytes()
        == avg.num_bytes
        == 4
        * sum(
            t.numel()
            for t in list(nets[0].parameters()) + [nets[0].net[1].running_mean, nets[0].net[1].running_var]
        )
    )


def test_local_buffers_are_untouched() -> None:
    nets = workers()
    before = [snapshot(n) for n in nets]
    average(Averager(nets, InProcessCommunicator(K), buffers="local"))
    for n, b in zip(nets, before):
        assert torch.equal(n.net[1].running_mean, b["net.1.running_mean"])
        assert torch.equal(n.net[1].running_var, b["net.1.running_var"])
    assert max_diff(snapshot(nets[0]), snapshot(nets[1])) > 0  # running stats still differ
    assert torch.equal(nets[0].net[0].weight, nets[1].net[0].weight)


def test_one_flat_bucket_per_dtype_reused_every_round() -> None:
    nets = workers()
    for n in nets:
        n.extra = nn.Parameter(torch.ones(3, dtype=torch.float64) * len(nets))
    avg = Averager(nets, InProcessCommunicator(K))
    flats = avg.flat_tensors(0)
    assert sorted(str(f.dtype) for f in flats) == ["torch.float32", "torch.float64"]
    ptrs = [f.data_ptr() for f in flats]
    # parameters are views of the bucket: writing the bucket writes the model
    flats[0].zero_()
    assert all(not p.any() for p in nets[0].parameters() if p.dtype == torch.float32)
    for _ in range(3):
        average(avg)
    assert [f.data_ptr() for f in avg.flat_tensors(0)] == ptrs, "a round must not reallocate"


def test_rebuilds_when_a_tensor_is_repointed() -> None:
    nets = workers(bn=False)
    avg = Averager(nets, InProcessCommunicator(K))
    before = [snapshot(n) for n in nets]
    for n in nets:
        n.double()  # every parameter now lives in new float64 storage
    average(avg)
    expected = mean_state(before)
    for n in nets:
        assert n.net[0].weight.dtype == torch.float64
        assert max_diff(snapshot(n), expected) <= 1e-6
    assert [str(f.dtype) for f in avg.flat_tensors(0)] == ["torch.float64"]


def test_averaged_context_restores_each_worker() -> None:
    nets = workers()
    before = [snapshot(n) for n in nets]
    avg = Averager(nets, InProcessCommunicator(K))
    with avg.averaged("eval"):
        for n in nets:
            assert max_diff(snapshot(n), mean_state(before)) <= 1e-6
    for n, b in zip(nets, before):
        assert max_diff(snapshot(n), b) == 0.0
    assert avg.comm.rounds("eval") == 1 and avg.comm.rounds("sync") == 0


def test_broadcast_copies_worker_zero_including_all_buffers() -> None:
    nets = workers()
    for k, n in enumerate(nets):
        n.net[1].num_batches_tracked.fill_(k)
    Averager(nets, InProcessCommunicator(K), buffers="local").broadcast(0)
    for n in nets[1:]:
        assert max_diff(snapshot(n), snapshot(nets[0])) == 0.0


def _stepped(
    opt_cls: type[torch.optim.Optimizer], **kwargs: float
) -> tuple[list[ToyNet], list[torch.optim.Optimizer]]:
    nets = workers(bn=False, frozen=False)
    opts = [opt_cls(n.parameters(), lr=0.1, **kwargs) for n in nets]
    for k, (n, o) in enumerate(zip(nets, opts)):
        torch.manual_seed(100 + k)
        n(torch.randn(4, 8)).square().mean().backward()
        o.step()
    return nets, opts


def _state(opts: list[torch.optim.Optimizer], key: str) -> list[list[torch.Tensor]]:
    return [[o.state[p][key].clone() for p in o.param_groups[0]["params"]] for o in opts]


def test_optimizer_state_average() -> None:
    nets, opts = _stepped(torch.optim.Adam)
    m_before, v_before = _state(opts, "exp_avg"), _state(opts, "exp_avg_sq")
    average(
        Averager(nets, InProcessCommunicator(K), optimizer_state="average", optimizers=[[o] for o in opts])
    )
    for key, before in (("exp_avg", m_before), ("exp_avg_sq", v_before)):
        after = _state(opts, key)
        for i in range(len(after[0])):
            expected = torch.stack([b[i] for b in before]).mean(0)
            for a in after:
                torch.testing.assert_close(a[i], expected, rtol=1e-6, atol=1e-8)
    assert all(float(o.state[p]["step"]) == 1 for o in opts for p in o.param_groups[0]["params"])


def test_optimizer_state_reset_and_local() -> None:
    nets, opts = _stepped(torch.optim.Adam)
    average(Averager(nets, InProcessCommunicator(K), optimizer_state="reset", optimizers=[[o] for o in opts]))
    for o in opts:
        for p in o.param_groups[0]["params"]:
            assert all(not t.any() for t in o.state[p].values())  # moments and step: a fresh optimizer

    nets, opts = _stepped(torch.optim.SGD, momentum=0.9)
    before = _state(opts, "momentum_buffer")
    average(Averager(nets, InProcessCommunicator(K), optimizer_state="local", optimizers=[[o] for o in opts]))
    after = _state(opts, "momentum_buffer")
    assert all(torch.equal(a, b) for wa, wb in zip(after, before) for a, b in zip(wa, wb))


def test_optimizer_state_layout_mismatch_is_an_error() -> None:
    nets, opts = _stepped(torch.optim.SGD, momentum=0.9)
    opts[1].state.clear()  # as if worker 1 had not stepped yet
    avg = Averager(nets, InProcessCommunicator(K), optimizer_state="average", optimizers=[[o] for o in opts])
    with pytest.raises(RuntimeError, match="optimizer state of local worker 1"):
        average(avg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffers": "avg"}, r"buffers \('avg'\) must be one of 'average', 'local'"),
        (
            {"optimizer_state": "keep"},
            r"optimizer_state \('keep'\) must be one of 'local', 'average', 'reset'",
        ),
        ({"optimizer_state": None}, r"optimizer_state \(None\) must be one of"),
    ],
)
def test_averager_bad_policies(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Averager(workers(), InProcessCommunicator(K), **kwargs)


def test_averager_needs_one_model_per_worker() -> None:
    with pytest.raises(ValueError, match=r"modules \(2\) must hold one model per local worker \(3\)"):
        Averager(workers()[:2], InProcessCommunicator(K))


def test_divergence_is_the_mean_squared_distance_to_the_average_and_zero_after_a_sync() -> None:
    nets = workers()
    params = [torch.cat([p.detach().reshape(-1) for p in n.parameters()]).double() for n in nets]
    mean = torch.stack(params).mean(0)
    expected = float(torch.stack([(p - mean).pow(2).sum() for p in params]).mean())
    avg = Averager(nets, InProcessCommunicator(K))
    got = average(avg, divergence=True)
    assert got == pytest.approx(expected, rel=1e-5)
    assert average(avg, divergence=True) == 0.0  # right after a sync every worker is the average
    assert average(avg) is None
    assert avg.comm.bytes() == 3 * avg.num_bytes  # the divergence scalar is not model traffic


def test_nonfinite_raise_names_the_worker_and_step() -> None:
    nets = workers()
    with torch.no_grad():
        nets[1].net[0].weight[0, 0] = float("nan")
    avg = Averager(nets, InProcessCommunicator(K))
    with pytest.raises(FloatingPointError, match=r"NaN/Inf\) on worker\(s\) \[1\] of 3 at optimizer step 7"):
        average(avg, step=7, nonfinite="raise")
    assert avg.comm.rounds() == 0  # nothing was averaged


def test_nonfinite_skip_worker_averages_the_healthy_ones_and_resets_the_sick_one() -> None:
    nets, opts = _stepped(torch.optim.SGD, momentum=0.9)
    with torch.no_grad():
        nets[2].net[3].bias[0] = float("inf")
    healthy = mean_state([snapshot(n) for n in nets[:2]])
    avg = Averager(nets, InProcessCommunicator(K), optimizers=[[o] for o in opts])
    average(avg, step=3, nonfinite="skip_worker")
    for n in nets:
        state = snapshot(n)
        assert all(torch.isfinite(v).all() for v in state.values())
        assert max_diff(state, healthy) <= 1e-6
    # the sick worker restarts as with a new optimizer: no momentum until its next step
    assert all(not opts[2].state[p] for p in opts[2].param_groups[0]["params"])
    assert all(m.any() for m in _state(opts[:1], "momentum_buffer")[0])
    nets[0].net[0].weight.data.fill_(float("nan"))
    nets[1].net[0].weight.data.fill_(float("nan"))
    nets[2].net[0].weight.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="every worker holds NaN/Inf"):
        average(avg, step=4, nonfinite="skip_worker")


FRESH_CASES = [
    (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.5, "weight_decay": 1e-2}),
    (torch.optim.Adam, {}),
    (torch.optim.AdamW, {"amsgrad": True}),
    (torch.optim.NAdam, {}),
    (torch.optim.RAdam, {}),
    (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
    (torch.optim.Adagrad, {"initial_accumulator_value": 0.1}),
]


@pytest.mark.parametrize(("opt_cls", "kwargs"), FRESH_CASES, ids=[c.__name__ for c, _ in FRESH_CASES])
@pytest.mark.parametrize("how", ["reset", "skip_worker"])
def test_reset_and_skip_worker_leave_exactly_a_freshly_created_optimizer(opt_cls, kwargs, how) -> None:
    # three steps of state (step counts, moments), then reset: the next step from the same
    # parameters and gradient must equal that of an optimizer created just now
    nets = workers(bn=False, frozen=False)
    opts = [opt_cls(n.parameters(), lr=0.01, **kwargs) for n in nets]
    for step in range(3):
        for k, (n, o) in enumerate(zip(nets, opts)):
            torch.manual_seed(100 * step + k)
            o.zero_grad()
            n(torch.randn(4, 8)).square().mean().backward()
            o.step()
    avg = Averager(nets, InProcessCommunicator(K), optimizers=[[o] for o in opts])
    if how == "reset":
        average(avg, optimizer_state="reset")
        restarted = range(K)
    else:
        with torch.no_grad():
            nets[1].net[0].weight[0, 0] = float("nan")
        average(avg, step=3, nonfinite="skip_worker")
        restarted = [1]
    for k in restarted:
        twin = ToyNet()
        twin.load_state_dict(nets[k].state_dict())
        fresh = opt_cls(twin.parameters(), lr=0.01, **kwargs)
        for model, opt in ((nets[k], opts[k]), (twin, fresh)):
            torch.manual_seed(7)
            opt.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
        assert max_diff(snapshot(nets[k]), snapshot(twin)) == 0.0


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_channels_last_parameters_keep_their_memory_format_and_average_right() -> None:
    nets = []
    for k in range(K):
        torch.manual_seed(k)
        nets.append(_Conv().to(memory_format=torch.channels_last))
    expected = mean_state([snapshot(n) for n in nets])
    avg = Averager(nets, InProcessCommunicator(K))
    for n in nets:
        assert n.conv.weight.is_contiguous(memory_format=torch.channels_last)
    average(avg)
    for n in nets:
        assert max_diff(snapshot(n), expected) <= 1e-6
        assert n.conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the batched path's stacked views see each worker's tensor in its own layout
    for k, n in enumerate(nets):
        n.conv.weight.data.add_(k)
    view = avg.stacked_views()[id(nets[0].conv.weight)]
    for k, n in enumerate(nets):
        assert torch.equal(view[k], n.conv.weight)


def test_lazy_parameters_at_setup_are_a_clear_error() -> None:
    nets = [nn.Sequential(nn.LazyLinear(4)) for _ in range(K)]
    with pytest.raises(
        ValueError, match=r"uninitialized \(lazy\) parameters or buffers \['0.weight', '0.bias'\]"
    ):
        Averager(nets, InProcessCommunicator(K))


def test_a_parameter_added_after_setup_is_averaged_from_then_on() -> None:
    nets = workers()
    avg = Averager(nets, InProcessCommunicator(K))
    for k, n in enumerate(nets):
        n.extra = nn.Parameter(torch.full((3,), float(k)))
    average(avg)
    for n in nets:
        assert torch.equal(n.extra.detach(), torch.full((3,), 1.0))  # mean of 0, 1, 2
    assert avg.num_bytes == sum(t.numel() * 4 for t in snapshot(nets[0]).values() if t.is_floating_point())


def test_rounds_count_the_models_tensors_only_after_a_module_registered_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nets = workers()
    avg = Averager(nets, InProcessCommunicator(K))
    counted = []
    real = Averager._structure
    monkeypatch.setattr(Averager, "_structure", lambda self: counted.append(1) or real(self))
    average(avg)
    average(avg)
    assert not counted, "nothing was registered: the rounds must not recount the tensors"
    nn.Linear(2, 2)  # any module built anywhere registers tensors: the next round recounts
    average(avg)
    assert len(counted) == 1, "the count is how a round sees a tensor added to the model"


def test_a_rebuild_keeps_the_outer_optimizers_anchor() -> None:
    from localsgd.core.outer import DiLoCo

    nets = workers()
    avg = Averager(nets, InProcessCommunicator(K), outer=DiLoCo())
    anchor = [a.clone() for a in avg.outer.anchors]
    for k, n in enumerate(nets):  # mid-round: every worker moved its own way
        with torch.no_grad():
            for p in n.parameters():
                p.add_(0.1 * (k + 1))
        n.double()  # re-points every tensor into a new dtype: the buckets are rebuilt
    average(avg, outer=False)
    # the anchor is still the global model of the last sync (on every rank alike), not a worker's model
    assert [a.dtype for a in avg.outer.anchors] == [torch.float64]
    assert torch.equal(avg.outer.anchors[0], anchor[0].double())
