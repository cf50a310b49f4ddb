"""LocalSGDStrategy and SGDBaselineStrategy on 2 gloo processes (CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import (
    TIMEOUT,
    Recorder,
    ToyModule,
    ToyNet,
    make_optimizer,
    make_trainer,
    max_diff,
    mean_state,
    snapshot,
)
from distributed import run

import localsgd
from localsgd import LocalSGDStrategy, SGDBaselineStrategy

pytestmark = pytest.mark.distributed

LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


# ------------------------------------------------------------------ H = 1 equals SGD
def _h1_and_baseline(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    strategies = {
        "local": LocalSGDStrategy(sync_every=1, optimizer_state="average", timeout=TIMEOUT),
        "sgd": SGDBaselineStrategy(timeout=TIMEOUT),
    }
    for name, strategy in strategies.items():
        pl.seed_everything(0, verbose=False)
        module = ToyModule(lr=LR, momentum=MOMENTUM, weight_decay=WD)
        init = snapshot(module)
        trainer = make_trainer(strategy, max_steps=20)
        trainer.fit(module)
        out[name] = snapshot(module)
        out[f"{name}_init"] = init
        out[f"{name}_rounds"] = float(trainer.callback_metrics["comm/rounds"])
    return out


def test_sync_every_1_with_averaged_momentum_equals_sgd_baseline() -> None:
    results = run(_h1_and_baseline, 2)
    for r in results:
        assert max_diff(r["local"], r["sgd"]) <= 1e-5
        assert max_diff(r["local"], r["local_init"]) > 1e-2  # it trained
        assert r["local_rounds"] == 20 and r["sgd_rounds"] == 20
    assert max_diff(results[0]["local"], results[1]["local"]) == 0.0


# ------------------------------------------------------------------ H = 4 against a serial reference
H, ROUNDS = 4, 3


def _local_h4(rank: int) -> dict[str, Any]:
    pl.seed_everything(rank, verbose=False)  # different inits: the broadcast must make them equal
    module = ToyModule(lr=LR, momentum=MOMENTUM, weight_decay=WD)
    recorder = Recorder()
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=H, timeout=TIMEOUT), max_steps=H * ROUNDS, callbacks=[recorder]
    )
    trainer.fit(module)
    return recorder.result()


def test_h4_matches_serial_reference_and_replicas_meet_only_at_syncs() -> None:
    results = run(_local_h4, 2)
    init = results[0]["init"]
    assert max_diff(init, results[1]["init"]) == 0.0, "replicas must start identical"
    # The reference: K models stepped one after another in this process, averaged by hand.
    models = []
    for _ in results:
        net = ToyModule(lr=LR, momentum=MOMENTUM, weight_decay=WD)
        net.load_state_dict(init)
        models.append((net, make_optimizer(net.parameters(), LR, MOMENTUM, WD)))
    for step in range(1, H * ROUNDS + 1):
        for k, (net, opt) in enumerate(models):
            opt.zero_grad()
            net.loss(results[k]["batches"][step - 1]).backward()
            opt.step()
        if step % H == 0:
            avg = mean_state([snapshot(net) for net, _ in models])
            for net, _ in models:
                net.load_state_dict({k: v.float() for k, v in avg.items()})
        for k, (net, _) in enumerate(models):
            assert max_diff(snapshot(net), results[k]["after_step"][step - 1]) <= 1e-5, (step, k)
        gap = max_diff(results[0]["after_step"][step - 1], results[1]["after_step"][step - 1])
        if step % H == 0:
            assert gap == 0.0, f"replicas differ right after the sync at step {step}"
        else:
            assert gap > 1e-4, f"replicas equal between syncs at step {step}"
    # each rank saw its own shard
    assert not torch.equal(results[0]["batches"][0][0], results[1]["batches"][0][0])


# ------------------------------------------------------------------ BatchNorm and frozen parameters
class _RankValue(pl.Callback):
    """After the initial broadcast, make the frozen parameter differ across ranks."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        with torch.no_grad():
            module.model.scale.fill_(1.0 + trainer.global_rank)


def _bn_policies(rank: int) -> dict[str, Any]:
    out = {}
    for policy in ("average", "local"):
        pl.seed_everything(0, verbose=False)
        module = ToyModule(bn=True, frozen=True, lr=LR)
        recorder = Recorder()
        strategy = LocalSGDStrategy(sync_every=3, buffers=policy, timeout=TIMEOUT)
        make_trainer(strategy, max_steps=6, callbacks=[_RankValue(), recorder]).fit(module)
        out[policy] = recorder.result()
    return out


def test_batchnorm_buffer_policies_and_frozen_parameters() -> None:
    results = run(_bn_policies, 2)
    mean_key, var_key, count_key = (
        "model.net.1.running_mean",
        "model.net.1.running_var",
        "model.net.1.num_batches_tracked",
    )
    for step in (3, 6):
        i = step - 1
        avg = [r["average"] for r in results]
        for key in (mean_key, var_key):
            expected = (avg[0]["before_step"][i][key] + avg[1]["before_step"][i][key]) / 2
            for r in avg:
                torch.testing.assert_close(r["after_step"][i][key], expected, rtol=0, atol=1e-6)
        loc = [r["local"] for r in results]
        for r in loc:
            for key in (mean_key, var_key):
                assert torch.equal(r["after_step"][i][key], r["before_step"][i][key]), (
                    "buffers='local' touched"
                )
        assert not torch.equal(loc[0]["after_step"][i][mean_key], loc[1]["after_step"][i][mean_key])
        for policy in ("average", "local"):
            for r in results:
                # frozen: 1 on rank 0 and 2 on rank 1, averaged to 1.5 at every sync
                assert torch.equal(r[policy]["after_step"][i]["model.scale"], torch.full((4,), 1.5))
                assert int(r[policy]["after_step"][i][count_key]) == step
    # in between syncs the frozen parameter is each rank's own
    assert torch.equal(results[1]["average"]["after_step"][0]["model.scale"], torch.full((4,), 2.0))


# ------------------------------------------------------------------ optimizer-state policies
def _optimizer_policies(rank: int) -> dict[str, Any]:
    out = {}
    for policy in ("average", "reset", "local"):
        pl.seed_everything(0, verbose=False)
        module = ToyModule(lr=LR, momentum=MOMENTUM)
        recorder = Recorder()
        strategy = LocalSGDStrategy(sync_every=2, optimizer_state=policy, timeout=TIMEOUT)
        make_trainer(strategy, max_steps=4, callbacks=[recorder]).fit(module)
        out[policy] = recorder.result()["momenta"]
    return out


def test_optimizer_state_policies() -> None:
    results = run(_optimizer_policies, 2)
    for step in (1, 2, 3, 4):
        m = {policy: [r[policy][step - 1] for r in results] for policy in ("average", "reset", "local")}
        synced = step % 2 == 0
        for policy, (m0, m1) in m.items():
            if synced and policy == "reset":
                # exactly a freshly created optimizer: no momentum until its next step
                assert m0 == m1 == []
                continue
            assert len(m0) == 5  # momentum for every trainable tensor
            same = all(torch.equal(a, b) for a, b in zip(m0, m1))
            zero = all(not a.any() for a in m0 + m1)
            if synced and policy == "average":
                assert same and not zero
            else:
                assert not same and not zero, (step, policy)
    # "local" between and after syncs: the momentum each rank built, identical to the policy-free
    # run up to the first sync (the models only differ by the sync itself)
    for r in results:
        for a, b in zip(r["local"][0], r["average"][0]):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ the registered name, counts, seeds
def _registered_name_and_counts(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer("localsgd", max_steps=20)  # default H = 8
    trainer.fit(ToyModule())
    out["string"] = (
        type(trainer.strategy).__name__,
        float(trainer.callback_metrics["comm/rounds"]),
        float(trainer.callback_metrics["comm/bytes"]),
        float(trainer.callback_metrics["localsgd/sync_every"]),
    )
    out["num_bytes"] = trainer.strategy.driver.averager.num_bytes
    trainer = make_trainer(LocalSGDStrategy(sync_every=3, timeout=TIMEOUT), max_steps=10)
    trainer.fit(ToyModule())
    out["h3"] = float(trainer.callback_metrics["comm/rounds"])
    trainer = make_trainer("sgd_baseline", max_steps=10)
    trainer.fit(ToyModule())
    out["baseline"] = (
        type(trainer.strategy).__name__,
        float(trainer.callback_metrics["comm/rounds"]),
        float(trainer.callback_metrics["comm/bytes"]),
    )
    # without Lightning's sampler each rank must still draw its own randomness
    draws: list[float] = []

    class Draw(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            draws.append(torch.rand(()).item())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            LocalSGDStrategy(sync_every=2, timeout=TIMEOUT),
            max_steps=2,
            callbacks=[Draw()],
            use_distributed_sampler=False,
        )
        trainer.fit(ToyModule())
    out["draw"] = draws[0]
    out["warned"] = any("use_distributed_sampler=False" in str(w.message) for w in caught)
    return out


def test_registered_name_comm_rounds_and_seeds() -> None:
    assert localsgd.LocalSGDStrategy.strategy_name == "localsgd"
    results = run(_registered_name_and_counts, 2)
    for r in results:
        name, rounds, nbytes, h = r["string"]
        assert name == "LocalSGDStrategy" and h == 8
        assert rounds == 20 // 8
        assert nbytes == rounds * r["num_bytes"]
        assert r["h3"] == 10 // 3
        name, rounds, nbytes = r["baseline"]
        assert name == "SGDBaselineStrategy" and rounds == 10
        grad_bytes = sum(p.numel() * 4 for p in ToyNet().parameters())
        assert nbytes == 10 * grad_bytes
    assert results[0]["warned"]
    assert results[0]["draw"] != results[1]["draw"]


# ------------------------------------------------------------ evaluation and checkpoints see the average
def _eval_and_checkpoint(rank: int, ckpt_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kwargs in (
        ("plain", {}),
        ("with_val", {"val_check_interval": 3, "check_val_every_n_epoch": None, "limit_val_batches": 1}),
    ):
        pl.seed_everything(0, verbose=False)
        module = ToyModule(lr=LR, momentum=MOMENTUM, val=True)
        recorder = Recorder()
        callbacks: list[pl.Callback] = [recorder]
        if name == "with_val":
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1, filename="{step}"
                )
            )
        trainer = make_trainer(
            LocalSGDStrategy(sync_every=4, timeout=TIMEOUT),
            max_steps=10,
            callbacks=callbacks,
            enable_checkpointing=name == "with_val",
            **kwargs,
        )
        trainer.fit(module)
        out[name] = {
            "final": snapshot(module),
            "after_step": recorder.after_step,
            "val": module.val_snapshots,
            "final_rounds": trainer.strategy.comm.rounds("final"),
        }
    return out


def test_validation_and_checkpoints_see_the_average_and_training_is_unperturbed(tmp_path: Path) -> None:
    results = run(_eval_and_checkpoint, 2, str(tmp_path))
    for r in results:
        # validating mid-round swaps the average in and back out: training is bitwise unchanged
        for a, b in zip(r["plain"]["after_step"], r["with_val"]["after_step"]):
            assert max_diff(a, b) == 0.0
        # the fit ends on step 10, mid-round: its result is the average
        assert r["with_val"]["final_rounds"] == 1
    final_avg = mean_state([r["with_val"]["after_step"][9] for r in results])
    for r in results:
        assert max_diff(r["with_val"]["final"], final_avg) <= 1e-6
    # validation at steps 3, 6, 9: every rank evaluates the average of that step's models
    vals = results[0]["with_val"]["val"]
    assert len(vals) == 3
    for i, step in enumerate((3, 6, 9)):
        expected = mean_state([r["with_val"]["after_step"][step - 1] for r in results])
        assert max_diff(vals[i], expected) <= 1e-6
        assert max_diff(vals[i], results[1]["with_val"]["val"][i]) == 0.0
    # the checkpoint at step 5 (mid-round) holds the average of the workers' step-5 models
    ckpt = torch.load(tmp_path / "step=5.ckpt", weights_only=False)
    expected = mean_state([r["with_val"]["after_step"][4] for r in results])
    assert max_diff(ckpt["state_dict"], expected) <= 1e-6
    assert ckpt["localsgd"]["num_steps"] == 5 and ckpt["localsgd"]["comm"]["sync"]["rounds"] == 1
