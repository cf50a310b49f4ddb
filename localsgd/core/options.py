"""The algorithm's options, written once, and every rule about which of them combine.

:class:`Options` is the one list of Local SGD's options: every front end (``LocalSGD``,
``LocalSGDStrategy``, ``LocalSGDFabricStrategy``) takes these same keyword arguments and builds
one ``Options`` from them (``tests/test_options.py`` checks that their signatures agree with it).
:data:`RULES` is the one list of the combinations that do not work; each names both options, and
the compatibility table of docs/reference/options.md is rendered from it (:func:`compatibility_table`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import logging
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from localsgd.core.outer import OuterOptimizer, SlowMo
from localsgd.core.schedules import QSR, Constant, Hierarchical, PostLocal, SyncSchedule, as_schedule
from localsgd.core.wire import Wire

log = logging.getLogger(__name__)

_Choice = TypeVar("_Choice", bound=str)
BufferPolicy = Literal["average", "local"]
NonfinitePolicy = Literal["raise", "skip_worker"]
OptimizerStatePolicy = Literal["local", "average", "reset"]
H1Sync = Literal["auto", "gradients", "parameters"]
SyncEvery = int | SyncSchedule | Callable[[int, float], bool]


def check_choice(name: str, value: object, allowed: tuple[_Choice, ...]) -> _Choice:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} ({value!r}) must be one of {choices}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be True or False")
    return value


def check_count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} ({value!r}) must be an integer >= {least}")
    return value


@dataclass(kw_only=True)
class Options:
    """Local SGD's options, as every front end takes them (keyword-only), checked on creation:
    a bad value or a combination in :data:`RULES` raises a ValueError naming it."""

    # ---- when to sync
    sync_every: SyncEvery = 8
    """H, optimizer steps per round (an integer >= 1), a
    :class:`~localsgd.core.schedules.SyncSchedule` (``PostLocal``, ``QSR``, ``Hierarchical``, your
    own) or a function ``(step, lr) -> bool``. One step is one ``optimizer.step()`` call (not one per
    param group, nor per micro-batch under gradient accumulation)."""

    # ---- what a sync averages
    buffers: BufferPolicy = "average"
    """``"average"``: floating-point buffers (BatchNorm statistics) are averaged with the
    parameters; ``"local"``: each worker keeps its own. Integer buffers are never averaged."""
    optimizer_state: OptimizerStatePolicy = "local"
    """At a sync, ``"local"`` keeps each worker's optimizer state, ``"average"`` averages it (with
    ``sync_every=1``: exactly synchronous SGD), ``"reset"`` restarts it as a fresh optimizer's."""
    outer_optimizer: OuterOptimizer | None = None
    """Steps the global model on the pseudo-gradient ``anchor - average`` at each sync
    (:class:`~localsgd.core.outer.SlowMo`, :class:`~localsgd.core.outer.DiLoCo`, any
    :class:`~localsgd.core.outer.OuterOptimizer`); ``None`` is plain averaging (an outer SGD
    step of lr 1)."""
    h1_sync: H1Sync = "auto"
    """How a round of one step (``sync_every=1``, ``PostLocal``'s first phase) makes the workers
    synchronous: ``"gradients"`` all-reduces the gradients before the step (DDP's arithmetic),
    ``"parameters"`` averages parameters and optimizer state after it (the same for SGD, not for
    Adam), ``"auto"``: gradients for every optimizer but SGD."""
    nonfinite: NonfinitePolicy = "raise"
    """Workers holding NaN/Inf at a sync: ``"raise"`` on every rank naming them, or
    ``"skip_worker"`` (left out of the average, restarted from it)."""

    # ---- what travels
    wire: Wire = "fp32"
    """What a sync sends: ``"fp32"`` (exact), or each worker's delta from the global model in
    ``"bf16"`` (half the bytes) or ``"int8"`` (blockwise absmax scales, about a quarter). Without an
    outer optimizer, plain averaging runs as ``SlowMo(lr=1, momentum=0)`` (it keeps the global model
    the deltas start from)."""
    error_feedback: bool = False
    """With a lossy ``wire``, each worker (and each shard of the mean) carries what its encoding
    lost into the next sync."""

    # ---- overlap and streaming
    sync_delay: int = 0
    """tau >= 0: a sync's mean travels while the workers take tau more steps, then lands keeping
    their progress (``theta_new + theta_now - theta_snapshot``); 0 blocks."""
    num_fragments: int = 1
    """F >= 1 dividing a constant H: the model cut into F fragments of near-equal bytes (whole
    FSDP2 units for sharded workers), fragment f syncing every H steps offset by f * H / F (each
    sync sends about 1/F of the model)."""

    # ---- what is measured
    log_divergence: bool = False
    """Measure the workers' mean squared distance to their average before each sync (a model copy
    and one scalar all-reduce per sync)."""

    schedule: SyncSchedule = field(init=False, repr=False)
    """``sync_every`` as a schedule (derived)."""

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.sync_every, "sync_every")
        check_choice("buffers", self.buffers, get_args(BufferPolicy))
        check_choice("optimizer_state", self.optimizer_state, get_args(OptimizerStatePolicy))
        outer = self.outer_optimizer
        if outer is not None and not isinstance(outer, OuterOptimizer):
            hint = ""
            if isinstance(outer, type) and issubclass(outer, OuterOptimizer):  # the class itself
                public = outer.__module__ == OuterOptimizer.__module__  # localsgd re-exports its own
                name = f"localsgd.{outer.__name__}" if public else f"{outer.__module__}.{outer.__qualname__}"
                hint = (
                    f" HINT: pass an instance: outer_optimizer={name}() (in YAML, `outer_optimizer: {name}` "
                    f"or `{{class_path: {name}, init_args: {{...}}}}` is made into one)"
                )
            raise ValueError(
                f"outer_optimizer ({outer!r}) must be None (plain averaging) or a localsgd.OuterOptimizer "
                f"such as localsgd.SlowMo(lr=1.0, momentum=0.5) or localsgd.DiLoCo().{hint}"
            )
        check_choice("h1_sync", self.h1_sync, get_args(H1Sync))
        check_choice("nonfinite", self.nonfinite, get_args(NonfinitePolicy))
        check_choice("wire", self.wire, get_args(Wire))
        _check_bool("error_feedback", self.error_feedback)
        check_count("sync_delay", self.sync_delay, 0)
        check_count("num_fragments", self.num_fragments, 1)
        _check_bool("log_divergence", self.log_divergence)
        check_rules(self)
        if self.wire != "fp32" and self.outer_optimizer is None:
            # deltas from the global model need the global model: plain averaging as an outer step
            self.outer_optimizer = SlowMo(lr=1.0, momentum=0.0)
            log.info(
                "LocalSGD: wire=%r sends deltas from the global model, so plain averaging runs as "
                "outer_optimizer=SlowMo(lr=1.0, momentum=0.0) (the same average)",
                self.wire,
            )

    @classmethod
    def names(cls) -> list[str]:
        """The options' names, in the order the dataclass lists them."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each option's docstring (read from this class's source), one line each."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        docs: dict[str, str] = {}
        for node, after in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                text = getattr(after.value, "value", None)
                if isinstance(text, str) and isinstance(node.target, ast.Name):
                    docs[node.target.id] = " ".join(text.split())
        return {name: docs[name] for name in cls.names()}

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> Options:
        """The options among a front end's ``arguments`` (its ``locals()``), checked."""
        return cls(**{name: arguments[name] for name in cls.names()})


def with_option_docs(doc: str | None) -> str | None:
    """``doc`` (a front end's docstring) with its ``{options}`` line replaced by one ``Args:``
    entry per option, from :meth:`Options.field_docs` (so that ``--help`` and ``help()`` show them)."""
    if doc is None:
        return None
    return doc.replace(_INDENT + "{options}", _option_entries())


_INDENT = "        "


@functools.cache
def _option_entries() -> str:
    """The options' ``Args:`` entries, rendered once for every front end (parsing the source)."""
    entries = []
    for name, text in Options.field_docs().items():
        lines = textwrap.wrap(text, 96 - len(_INDENT), initial_indent=f"{name}: ", subsequent_indent="    ")
        entries.append("\n".join(_INDENT + line for line in lines))
    return "\n".join(entries)


# ---------------------------------------------------------------------- combination rules
@dataclass(frozen=True)
class Setting:
    """What a front end adds to the options: whether the run is fault-tolerant (an elastic
    communicator, ``LocalSGDStrategy(fault_tolerance=...)``), the workers each process holds, and
    whether each worker is a group of processes sharding its model (``LocalSGD(mesh=...)``)."""

    fault_tolerance: bool = False
    workers_per_process: int = 1
    sharded: bool = False


@dataclass(frozen=True)
class Rule:
    """A combination of two options that does not work. ``check`` returns the error (naming
    both options, the rule and a HINT) or ``None``; ``example`` is a combination it refuses,
    where ``fault_tolerance``, ``workers_per_device`` and ``shards_per_worker`` stand for the
    :class:`Setting`."""

    options: tuple[str, str]
    check: Callable[[Options, Setting], str | None]
    example: dict[str, Any]

    def split_example(self) -> tuple[dict[str, Any], Setting]:
        """The example as (option values, setting)."""
        values = dict(self.example)
        setting = Setting(
            fault_tolerance=bool(values.pop("fault_tolerance", False)),
            workers_per_process=int(values.pop("workers_per_device", 1)),
            sharded=int(values.pop("shards_per_worker", 1)) > 1,
        )
        return values, setting


RULES: list[Rule] = []
"""Every combination rule of the library, in the order they are checked."""

_Check = Callable[[Options, Setting], "str | None"]


def _rule(first: str, second: str, **example: Any) -> Callable[[_Check], _Check]:
    def register(check: _Check) -> _Check:
        RULES.append(Rule((first, second), check, example))
        return check

    return register


def check_rules(options: Options, setting: Setting | None = None) -> None:
    """A ValueError for the first rule of :data:`RULES` that ``options`` break in ``setting``."""
    setting = setting or Setting()
    for r in RULES:
        if "fault_tolerance" in r.options and not setting.fault_tolerance:
            continue
        if SHARDED in r.options and not setting.sharded:
            continue
        message = r.check(options, setting)
        if message:
            raise ValueError(message)


def _knob(name: str, value: object) -> str:
    if name == "sync_delay":
        return f"sync_delay ({value}) > 0"
    if name == "num_fragments":
        return f"num_fragments ({value}) > 1"
    return f"{name}={value!r}"


@_rule("error_feedback", "wire", error_feedback=True)
def _feedback_needs_a_lossy_wire(o: Options, s: Setting) -> str | None:
    if o.error_feedback and o.wire == "fp32":
        return "error_feedback=True needs a lossy wire: wire='bf16' or 'int8' (fp32 loses nothing)"
    return None


@_rule("num_fragments", "sync_every", num_fragments=2, sync_every=QSR(base=4, alpha=0.01))
def _fragments_need_a_constant_h(o: Options, s: Setting) -> str | None:
    if o.num_fragments == 1:
        return None
    if not isinstance(o.schedule, Constant):
        return (
            f"num_fragments ({o.num_fragments}) > 1 needs a constant H (sync_every=<int> or Constant), "
            f"not sync_every={o.schedule!r}: fragment f syncs every H steps, offset by f*H/F"
        )
    if o.schedule.period % o.num_fragments:
        return (
            f"num_fragments ({o.num_fragments}) must divide H ({o.schedule.period}): fragment f syncs "
            f"every H steps (sync_every={o.sync_every!r}), offset by f*H/F steps"
        )
    return None


@_rule("sync_delay", "sync_every", sync_delay=4, sync_every=4)
def _delay_below_h(o: Options, s: Setting) -> str | None:
    if not isinstance(o.schedule, Constant):
        return None
    period, gap = o.schedule.period, "the round's H"
    if o.num_fragments > 1:
        period, gap = period // o.num_fragments, "H / num_fragments"
    if o.sync_delay >= period:
        return (
            f"sync_delay ({o.sync_delay}) must be below {gap} ({period}): a round's result must arrive "
            f"before the next round starts (sync_every={o.sync_every!r})"
        )
    return None


def _only_with(knob: str, off: int, other: str, allowed: str, why: str) -> _Check:
    """``knob`` switched on only with ``other`` at ``allowed``."""

    def check(o: Options, s: Setting) -> str | None:
        value, chosen = getattr(o, knob), getattr(o, other)
        if value == off or chosen == allowed:
            return None
        return (
            f"{_knob(knob, value)} with {other}={chosen!r} is not supported: {why}. HINT: {other}={allowed!r}"
        )

    return check


for _knob_name, _off, _why in (
    ("sync_delay", 0, "an overlapped round keeps each worker's own progress"),
    ("num_fragments", 1, "a fragment's round averages only its tensors"),
):
    for _other, _allowed, _refused in (
        ("optimizer_state", "local", "average"),
        ("nonfinite", "raise", "skip_worker"),
    ):
        _rule(_knob_name, _other, **{_knob_name: 2, "sync_every": 8, _other: _refused})(
            _only_with(_knob_name, _off, _other, _allowed, _why)
        )


# ---- fault tolerance: rounds whose workers may be lost, and heal from a peer
def _fault_tolerance_with(name: str, value: object, why: str, hint: str) -> str:
    return f"fault tolerance with {_knob(name, value)} is not supported: {why}. HINT: {hint}"


def _ft_only_at(name: str, allowed: object, why: str) -> _Check:
    def check(o: Options, s: Setting) -> str | None:
        value = getattr(o, name)
        if value == allowed:
            return None
        return _fault_tolerance_with(name, value, why, f"{name}={allowed!r}, or fault_tolerance=None")

    return check


for _name, _allowed_value, _refused_value, _why in (
    ("sync_delay", 0, 2, "a round must start and land in one membership"),
    ("num_fragments", 1, 2, "a healed worker takes the whole global model at once"),
    ("wire", "fp32", "int8", "a healed worker has no delta of its own to send"),
    ("nonfinite", "raise", "skip_worker", "a lost worker's slot is taken by membership instead"),
    ("optimizer_state", "local", "average", "a healed worker starts from a fresh optimizer state"),
    ("h1_sync", "auto", "gradients", "every step would be a round"),
):
    _rule("fault_tolerance", _name, fault_tolerance=True, **{_name: _refused_value})(
        _ft_only_at(_name, _allowed_value, _why)
    )


@_rule("fault_tolerance", "workers_per_device", fault_tolerance=True, workers_per_device=2)
def _ft_one_worker_per_process(o: Options, s: Setting) -> str | None:
    if s.workers_per_process == 1:
        return None
    return _fault_tolerance_with(
        "workers_per_device",
        s.workers_per_process,
        "a worker is a replica group of processes",
        "workers_per_device=1, or fault_tolerance=None",
    )


@_rule("fault_tolerance", "sync_every", fault_tolerance=True, sync_every=PostLocal(8, switch_step=16))
def _ft_schedules(o: Options, s: Setting) -> str | None:
    if isinstance(o.schedule, PostLocal):
        why = (
            "a PostLocal schedule's synchronous phase averages the optimizer state, which a healed "
            "worker starts without"
        )
    elif isinstance(o.schedule, Hierarchical):
        why = (
            "a Hierarchical schedule's inner rounds: inside a replica group the gradients are "
            "all-reduced every step already"
        )
    else:
        return None
    return _fault_tolerance_with("sync_every", o.schedule, why, "sync_every=<int> or QSR")


# ---- sharded workers: each worker a group of processes sharding its model with FSDP2
SHARDED = "shards_per_worker"
"""The name rules give a sharded setting (``LocalSGD(mesh=...)``, a strategy's ``shards_per_worker``)."""


def _sharded_with(name: str, value: object, why: str, hint: str) -> str:
    what = f"sharded workers (mesh=, {SHARDED}) with {_knob(name, value)}"
    return f"{what} are not supported: {why}. HINT: {hint}"


def _sharded_only_at(name: str, allowed: tuple[object, ...], why: str) -> _Check:
    def check(o: Options, s: Setting) -> str | None:
        value = getattr(o, name)
        if value in allowed:
            return None
        return _sharded_with(name, value, why, " or ".join(f"{name}={a!r}" for a in allowed))

    return check


for _name, _allowed_values, _refused_value, _why in (
    ("nonfinite", ("raise",), "skip_worker", "a worker's shards would be left out one process at a time"),
    (
        "h1_sync",
        ("auto", "parameters"),
        "gradients",
        "inside a worker FSDP2 reduces the gradients; across workers a round of one step averages "
        "the parameters",
    ),
):
    _rule(SHARDED, _name, **{SHARDED: 2, _name: _refused_value})(
        _sharded_only_at(_name, _allowed_values, _why)
    )


@_rule(SHARDED, "sync_every", **{SHARDED: 2, "sync_every": Hierarchical(inner=2, outer=8)})
def _sharded_schedules(o: Options, s: Setting) -> str | None:
    if not isinstance(o.schedule, Hierarchical):
        return None
    why = "a Hierarchical schedule's inner rounds average whole workers inside a node"
    return _sharded_with("sync_every", o.schedule, why, "sync_every=<int>, PostLocal or QSR")


@_rule(SHARDED, "workers_per_device", **{SHARDED: 2, "workers_per_device": 2})
def _sharded_one_worker_per_process(o: Options, s: Setting) -> str | None:
    if s.workers_per_process == 1:
        return None
    why = "a simulated worker is a whole model in one process"
    return _sharded_with("workers_per_device", s.workers_per_process, why, "workers_per_device=1")


@_rule(SHARDED, "fault_tolerance", **{SHARDED: 2, "fault_tolerance": True})
def _sharded_fault_tolerance(o: Options, s: Setting) -> str | None:
    if not s.fault_tolerance:
        return None
    why = (
        "torchft 0.2 heals a replica group from one peer process's whole state dict, and has no way "
        "to send each of a sharded worker's processes its own shards"
    )
    return _sharded_with("fault_tolerance", True, why, "fault_tolerance=None, or one process per worker")


def compatibility_table() -> str:
    """The table of the combinations that do not work (docs/reference/options.md shows it),
    rendered from :data:`RULES`."""
    lines = ["| options | refused, for example | why |", "|---|---|---|"]
    for r in RULES:
        values, setting = r.split_example()
        options = Options()
        for name, value in values.items():  # the example as it is, without the rules that refuse it
            setattr(options, name, value)
        options.schedule = as_schedule(options.sync_every, "sync_every")
        message = r.check(options, setting)
        assert message, f"rule {r.options} does not refuse its own example {r.example}"
        example = ", ".join(f"`{k}={v!r}`" for k, v in r.example.items())
        lines.append(f"| `{r.options[0]}` + `{r.options[1]}` | {example} | {message.replace('|', '/')} |")
    return "\n".join(lines)
