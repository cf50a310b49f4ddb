"""Schedules and outer optimizers inside LocalSGDStrategy, on gloo processes (CPU)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import TIMEOUT, Recorder, ToyModule, make_trainer, max_diff, snapshot
from distributed import run

from localsgd import LocalSGDStrategy, SGDBaselineStrategy
from localsgd.core.outer import DiLoCo, SlowMo
from localsgd.core.schedules import QSR, Hierarchical, PostLocal


def _hierarchical(rank: int) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    recorder = Recorder()
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=Hierarchical(2, 4), timeout=TIMEOUT), max_steps=8, callbacks=[recorder]
    )
    trainer.fit(ToyModule(lr=0.1, momentum=0.9))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")}
    return {
        "after_step": recorder.after_step,
        "metrics": metrics,
        "node": trainer.node_rank,
        "num_bytes": trainer.strategy.driver.averager.num_bytes,
    }


@pytest.mark.distributed
def test_hierarchical_on_two_nodes_of_two() -> None:
    results = run(_hierarchical, 4, nodes=2)
    assert [r["node"] for r in results] == [0, 0, 1, 1]
    for step in range(1, 9):
        s = [r["after_step"][step - 1] for r in results]
        same_node = max_diff(s[0], s[1]) == 0.0 and max_diff(s[2], s[3]) == 0.0
        across = max_diff(s[0], s[2])
        if step % 4 == 0:  # outer: everyone equal
            assert same_node and across == 0.0, step
        elif step % 2 == 0:  # inner: node-mates equal, nodes differ
            assert same_node and across > 1e-4, step
        else:
            assert max_diff(s[0], s[1]) > 1e-4 and max_diff(s[2], s[3]) > 1e-4, step
    for r in results:
        assert r["metrics"]["comm/inner_rounds"] == 2
        assert r["metrics"]["comm/outer_rounds"] == 2
        assert r["metrics"]["comm/rounds"] == 4
        assert r["metrics"]["comm/bytes"] == 4 * r["num_bytes"]  # each round moves the whole model


def _post_local_and_outer(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = {
        "sgd": (SGDBaselineStrategy(timeout=TIMEOUT), 6),
        "post_local": (LocalSGDStrategy(sync_every=PostLocal(3, switch_step=6), timeout=TIMEOUT), 6),
        "post_local_later": (LocalSGDStrategy(sync_every=PostLocal(3, switch_step=6), timeout=TIMEOUT), 8),
        "plain": (LocalSGDStrategy(sync_every=2, timeout=TIMEOUT), 6),
        "slowmo_1_0": (
            LocalSGDStrategy(sync_every=2, outer_optimizer=SlowMo(lr=1.0, momentum=0.0), timeout=TIMEOUT),
            6,
        ),
        "diloco": (LocalSGDStrategy(sync_every=2, outer_optimizer=DiLoCo(), timeout=TIMEOUT), 6),
    }
    for name, (strategy, steps) in runs.items():
        pl.seed_everything(0, verbose=False)
        module = ToyModule(lr=0.1, momentum=0.9, weight_decay=1e-3)
        recorder = Recorder()
        trainer = make_trainer(strategy, max_steps=steps, callbacks=[recorder])
        trainer.fit(module)
        out[name] = {"final": snapshot(module), "after_step": recorder.after_step}
        if name == "diloco":
            out[name]["outer_state"] = trainer.strategy.state_dict()["outer"]
    return out


@pytest.mark.distributed
def test_post_local_is_sgd_before_the_switch_and_outer_optimizers_in_the_strategy() -> None:
    results = run(_post_local_and_outer, 2)
    for r in results:
        # before the switch: synchronous SGD with averaged momentum, step by step
        for a, b in zip(r["post_local"]["after_step"], r["sgd"]["after_step"]):
            assert max_diff(a, b) <= 1e-5
        assert max_diff(r["slowmo_1_0"]["final"], r["plain"]["final"]) <= 1e-6
        assert max_diff(r["diloco"]["final"], r["plain"]["final"]) > 1e-3
        anchors = r["diloco"]["outer_state"]["anchors"]
        flat = torch.cat([t.reshape(-1) for t in anchors])
        params = torch.cat([v.reshape(-1) for k, v in r["diloco"]["final"].items() if "running" not in k])
        assert torch.allclose(flat, params)  # the model after the last sync is the anchor
    # after the switch the workers drift apart (step 7), then meet at 6 + 3 = 9 (beyond this run)
    a, b = (r["post_local_later"]["after_step"] for r in results)
    assert max_diff(a[5], b[5]) == 0.0 and max_diff(a[6], b[6]) > 1e-4
    for name in ("diloco", "slowmo_1_0"):
        assert max_diff(results[0][name]["after_step"][1], results[1][name]["after_step"][1]) == 0.0


class _Cosine(ToyModule):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60, eta_min=0.002)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_qsr_in_the_strategy_follows_the_lr_and_logs_each_step(tmp_path: Path) -> None:
    schedule = QSR(2, 0.02)
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=schedule),
        max_steps=60,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
    )
    trainer.fit(_Cosine())
    assert schedule.total_steps == 60  # filled in from the trainer
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    rows = [r for r in rows if r.get("comm/rounds")]
    assert len(rows) == 60
    lrs = [float(r["lr"]) for r in rows]
    rounds = [int(float(r["comm/rounds"])) for r in rows]
    # replay the rule on the logged learning rates
    expected, start, syncs = [], 0, 0
    period = None
    for step, lr in enumerate(lrs, start=1):
        if period is None:
            period = min(max(2, int((0.02 / lr) ** 2)), 60 - start)
        if step - start == period:
            syncs, start, period = syncs + 1, step, None
        expected.append(syncs)
    assert rounds == expected and rounds[-1] >= 5
    assert float(rows[-1]["intrinsic_lr"]) == pytest.approx(lrs[-1] * 5e-4)
    assert [int(float(r["localsgd/round"])) for r in rows] == rounds
