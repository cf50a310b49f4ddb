"""The sync as one pipeline: one options object whose combination rules every front end applies
alike, composed parts (no stub methods, no front end writing the driver's fields, no import
cycle), and the code review's correctness findings, one test each."""

from __future__ import annotations

import ast
import gc
import inspect
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from common import ToyNet, toy_batches, train_step
from torch import Tensor, nn

import localsgd
from localsgd import InProcessCommunicator, LocalSGD, LocalSGDFabricStrategy, LocalSGDStrategy
from localsgd.core.options import RULES, SHARDED, Options, compatibility_table

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "localsgd"
FRONT_ENDS = {
    "LocalSGD": LocalSGD.__init__,
    "LocalSGDStrategy": LocalSGDStrategy.__init__,
    "LocalSGDFabricStrategy": LocalSGDFabricStrategy.__init__,
}


# ---------------------------------------------------------------------- one options object
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_front_end_takes_the_options_as_the_dataclass_lists_them(front_end: str) -> None:
    params = inspect.signature(FRONT_ENDS[front_end]).parameters
    fields = {f.name: f for f in Options.__dataclass_fields__.values() if f.init}
    for name, f in fields.items():
        assert name in params, f"{front_end} lacks option {name}"
        p = params[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{front_end}({name}) is not keyword-only"
        assert p.default == f.default, f"{front_end}({name}) default {p.default!r} != {f.default!r}"
        assert p.annotation == f.type, f"{front_end}({name}) is typed {p.annotation}, Options {f.type}"


class _Elastic(InProcessCommunicator):
    """An elastic communicator with no peers: what a fault-tolerant run looks like to the driver."""

    elastic = True


def _build(front_end: str, example: dict[str, Any]) -> None:
    kwargs = dict(example)
    fault_tolerant = kwargs.pop("fault_tolerance", False)
    if front_end == "LocalSGD":
        k = kwargs.pop("workers_per_device", 1)
        nets = [ToyNet() for _ in range(k)]
        comm = _Elastic(k) if fault_tolerant else InProcessCommunicator(k)
        if kwargs.pop(SHARDED, 1) > 1:  # a plain loop's sharded workers: a mesh (the rule refuses first)
            kwargs["mesh"] = object()
            comm = _Elastic(k) if fault_tolerant else None
        LocalSGD(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets], comm=comm, **kwargs)
    elif front_end == "LocalSGDStrategy":
        if fault_tolerant:
            kwargs["fault_tolerance"] = localsgd.FaultTolerance(replica_group=0, num_replica_groups=2)
        LocalSGDStrategy(**kwargs)
    else:
        LocalSGDFabricStrategy(**kwargs)


@pytest.mark.parametrize("rule", RULES, ids=["+".join(r.options) for r in RULES])
def test_each_forbidden_combination_gets_the_same_error_from_every_front_end(rule: Any) -> None:
    pytest.importorskip("torchft") if "fault_tolerance" in rule.options else None
    front_ends = list(FRONT_ENDS)
    if "fault_tolerance" in rule.options or "workers_per_device" in rule.options:
        front_ends.remove("LocalSGDFabricStrategy")  # Fabric runs one model per process, no torchft
    messages = set()
    for front_end in front_ends:
        with pytest.raises(ValueError) as err:
            _build(front_end, rule.example)
        messages.add(str(err.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    for option in rule.options:  # both options named (fault tolerance in words or by its argument)
        assert option in message or option.replace("_", " ") in message, (option, message)


def test_options_page_lists_every_option_and_the_compatibility_table_from_the_rules() -> None:
    page = (ROOT / "docs" / "reference" / "options.md").read_text()  # moved there from README
    for name, f in Options.__dataclass_fields__.items():
        if not f.init:
            continue
        row = re.search(rf"^\| `{name}` \| `?([^|`]*)`? \|", page, re.M)
        assert row, f"the options page's argument table has no row for {name}"
        assert row.group(1).strip('"') == str(f.default).strip('"'), (name, row.group(1), f.default)
    assert compatibility_table() in page, "the options page's compatibility table is not the one RULES render"


# ---------------------------------------------------------------------- composed parts
def _trees() -> dict[str, ast.Module]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): ast.parse(p.read_text())
        for p in PACKAGE.rglob("*.py")
    }


def test_no_method_is_a_stub_for_a_sibling_mixin() -> None:
    stubs = []
    for module, tree in _trees().items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if not isinstance(fn, ast.FunctionDef) or len(fn.body) != 1:
                    continue
                body = fn.body[0]
                is_ellipsis = isinstance(body, ast.Expr) and getattr(body.value, "value", None) is Ellipsis
                abstract = any("abstractmethod" in ast.unparse(d) for d in fn.decorator_list)
                if is_ellipsis and not abstract:
                    stubs.append(f"{module}.{cls.name}.{fn.name}")
    assert not stubs, f"methods left to a sibling mixin: {stubs}"


def test_no_front_end_assigns_a_driver_attribute() -> None:
    writes = []
    for module, tree in _trees().items():
        if module.startswith("localsgd.core"):
            continue  # the driver and its parts
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                continue
            for target in targets:
                text = ast.unparse(target) if target is not None else ""
                if re.search(r"\bdriver\.\w+", text):
                    writes.append(f"{module}: {text}")
    assert not writes, f"front ends write the driver's fields: {writes}"


def _imports(tree: ast.Module) -> set[str]:
    """The localsgd modules a module imports (under ``if TYPE_CHECKING`` too: a cycle there is
    still two modules that need each other)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("localsgd"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("localsgd"))
    return found


def test_no_import_cycle_in_the_package() -> None:
    trees = {m.removesuffix(".__init__"): t for m, t in _trees().items()}
    graph = {m: {i for i in _imports(t) if i in trees and i != m} for m, t in trees.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle.extend([*path[path.index(n) :], n])
                return True
            if not state.get(n) and visit(n, [*path, n]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if not state.get(m) and visit(m, [m]):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_the_round_pipeline_is_one_short_function_over_one_interface() -> None:
    from localsgd.core import rounds

    lines = inspect.getsource(rounds.run_round).count("\n") + inspect.getsource(rounds.land_round).count("\n")
    assert lines <= 40, f"the pipeline takes {lines} lines"
    # every kind of round implements the one interface
    from localsgd.core.delayed import OverlappedRound
    from localsgd.core.elastic import ElasticRound

    for kind in (rounds.ExactRound, rounds.InnerRound, rounds.CompressedRound, OverlappedRound, ElasticRound):
        assert issubclass(kind, rounds.RoundKind)


# ---------------------------------------------------------------------- the review's findings
class _EMA(nn.Module):
    """A module that re-assigns its buffer every forward (the common EMA idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        y = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)  # a new tensor object each time
        return y


def test_4_1_a_reassigned_buffer_and_a_replaced_parameter_are_still_averaged() -> None:
    torch.manual_seed(0)
    nets = [_EMA() for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    ls = LocalSGD(nets, opts, sync_every=2, comm=InProcessCommunicator(2))
    for step in range(2):
        for k, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            net(torch.randn(3, 4) + k + step).sum().backward()
            opt.step()
    assert ls.num_steps == 2
    assert torch.equal(nets[0].ema, nets[1].ema), "the re-assigned buffer was left out of the average"
    # a parameter replaced between syncs (a new object): averaged from then on too
    for net, opt in zip(nets, opts):
        net.lin.bias = nn.Parameter(torch.randn(4))
        opt.zero_grad()
        net(torch.randn(3, 4)).sum().backward()
        opt.step()
    ls.finish()
    assert torch.equal(nets[0].lin.bias, nets[1].lin.bias), "the replaced parameter was left out"


def test_4_2_an_error_inside_a_sync_keeps_its_type_and_message_with_context_added() -> None:
    class Broken(InProcessCommunicator):
        def _all_reduce(self, tensors: Any, op: Any) -> None:
            if op == "mean":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            super()._all_reduce(tensors, op)

    nets = [ToyNet() for _ in range(2)]
    ls = LocalSGD(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets], sync_every=1, comm=Broken(2))
    with pytest.raises(RuntimeError) as err:
        for net, opt in zip(nets, ls.optimizers):
            train_step(net, opt[0], toy_batches(0, 1)[0])
    assert type(err.value) is RuntimeError and err.value.args == (
        "CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    assert any("LocalSGD sync at optimizer step 1 failed" in note for note in err.value.__notes__)


def test_4_4_a_driver_without_a_process_group_warns_that_it_trains_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from localsgd.core import comm

    monkeypatch.setattr(comm.dist, "is_initialized", lambda: False)  # an earlier test's group aside
    net = ToyNet()
    with pytest.warns(UserWarning, match=r"no torch.distributed process group.*HINT: call torch.distributed"):
        LocalSGD(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # simulated workers, or a communicator given: no warning
        nets = [ToyNet() for _ in range(2)]
        LocalSGD(nets, [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets])


def test_4_5_a_lossy_wire_and_fault_tolerance_say_what_they_switch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="localsgd"):
        Options(wire="int8")
    assert "outer_optimizer=SlowMo(lr=1.0, momentum=0.0)" in caplog.text
    caplog.clear()
    nets = [ToyNet()]
    with caplog.at_level(logging.INFO, logger="localsgd"):
        ls = LocalSGD(nets, [torch.optim.Adam(nets[0].parameters())], comm=_Elastic(1))
    assert not ls.h1_gradients
    assert "fault tolerance: a round of one step averages the parameters" in caplog.text


def test_4_10_a_driver_dropped_without_close_takes_its_hooks_off_the_optimizer() -> None:
    net = ToyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ls = LocalSGD(net, opt, comm=InProcessCommunicator(1))
    assert opt._optimizer_step_post_hooks, "the hooks are on"
    del ls
    gc.collect()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    train_step(net, opt, toy_batches(0, 1)[0])  # the user's optimizer steps on, alone


def test_4_11_a_plain_loop_that_notes_its_batches_gets_the_identical_stream_check() -> None:
    nets = [ToyNet() for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    ls = LocalSGD(nets, opts, sync_every=2, comm=InProcessCommunicator(2))
    batch = toy_batches(0, 1)[0]  # both workers read the same stream
    with pytest.raises(ValueError, match=r"workers \[0, 1\] trained on identical first batches"):
        for _ in range(2):
            for k in range(2):
                ls.note_batch(batch, worker=k)
                train_step(nets[k], opts[k], batch)


_FABRIC_SAME_STREAM = """
import torch, torch.nn.functional as F
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, TensorDataset
from localsgd.fabric import LocalSGDFabricStrategy

torch.set_num_threads(1)
fabric = Fabric(strategy=LocalSGDFabricStrategy(sync_every=2), accelerator="cpu", devices=2)
fabric.launch()
net = torch.nn.Linear(8, 4)
net, opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
# the same batches on both ranks: a loader that ignores the rank
loader = fabric.setup_dataloaders(DataLoader(data, batch_size=8), use_distributed_sampler=False)
try:
    for x, y in loader:
        opt.zero_grad()
        fabric.backward(F.cross_entropy(net(x), y))
        opt.step()
    outcome = "no error"
except ValueError as err:
    outcome = f"refused: {err}"
# one file per rank: the two ranks' stdout writes interleave in a shared pipe
with open(f"outcome_{fabric.global_rank}.txt", "w") as out:
    out.write(outcome)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_4_11_fabric_checks_that_the_ranks_read_different_batches(tmp_path: Path) -> None:
    import subprocess
    import sys

    from common import newcomer_env

    script = tmp_path / "same_stream.py"
    script.write_text(_FABRIC_SAME_STREAM)
    done = subprocess.run(
        [sys.executable, str(script)],
        env=newcomer_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        outcome = (tmp_path / f"outcome_{rank}.txt").read_text()
        assert outcome.startswith("refused: workers [0, 1] trained on identical first batches"), outcome
