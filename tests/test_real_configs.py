"""The configurations real users run, on 2 gloo processes unless said: resumes from the checkpoints
real runs write (at the end of an epoch, ModelCheckpoint's default; mid-epoch; at an epoch's last
batch; at validation end; through a last.ckpt link; on a remote filesystem), switching between SGD
and Local SGD through a checkpoint, evaluating a checkpoint, data streams that are not sharded, and
synchronous phases with Adam. A resumed run must end where the uninterrupted one ends: same step,
same parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from common import TIMEOUT, StopAt, ToyModule, make_trainer, max_diff, momenta, snapshot, toy_dataset
from distributed import run

from localsgd import LocalSGDStrategy, PostLocal, SGDBaselineStrategy

pytestmark = pytest.mark.distributed

EPOCHS, STEPS_PER_EPOCH = 4, 16  # 256 samples / (2 ranks x batch 8)
EPOCH_STEPS = STEPS_PER_EPOCH


def _strategy(name: str) -> Any:
    if name == "sgd":
        return SGDBaselineStrategy(timeout=TIMEOUT)
    return LocalSGDStrategy(sync_every=3, timeout=TIMEOUT)


def _fit(strategy: str, ckpt_dir: str | None, callbacks: list[pl.Callback], ckpt_path: str | None, **kw: Any):
    pl.seed_everything(0, verbose=False)
    module = ToyModule(lr=0.1, momentum=0.9, weight_decay=1e-3, **kw.pop("module", {}))
    trainer = make_trainer(
        _strategy(strategy),
        max_steps=kw.pop("max_steps", -1),
        max_epochs=kw.pop("max_epochs", EPOCHS),
        callbacks=callbacks,
        enable_checkpointing=bool(callbacks),
        default_root_dir=ckpt_dir,
        **kw,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


def _epoch_boundaries(rank: int, ckpt_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy in ("local", "sgd"):
        trainer, module = _fit(strategy, None, [], None)
        out[strategy, "full"] = (trainer.global_step, snapshot(module))
        cases = {
            # ModelCheckpoint's default: saved at the end of every epoch; stopped after 2 epochs
            "epoch_end": (dict(save_last=True), 2 * STEPS_PER_EPOCH, "last.ckpt"),
            # saved mid-epoch (and mid-round: H = 3)
            "mid_epoch": (dict(every_n_train_steps=21, filename="s"), 21, "s.ckpt"),
            # saved after an epoch's last batch, in on_train_batch_end
            "last_batch": (dict(every_n_train_steps=EPOCH_STEPS, filename="s"), EPOCH_STEPS, "s.ckpt"),
        }
        for case, (ckpt_kwargs, stop, filename) in cases.items():
            folder = f"{ckpt_dir}/{strategy}-{case}"
            saver = pl.callbacks.ModelCheckpoint(dirpath=folder, **ckpt_kwargs)
            trainer, _ = _fit(strategy, folder, [saver, StopAt(stop)], None)
            assert trainer.global_step == stop
            trainer, module = _fit(strategy, folder, [], f"{folder}/{filename}")
            out[strategy, case] = (trainer.global_step, snapshot(module))
    return out


def test_resumes_at_epoch_end_mid_epoch_and_last_batch_equal_the_uninterrupted_run(tmp_path: Path) -> None:
    for r in run(_epoch_boundaries, 2, str(tmp_path)):
        full_steps, full = r["local", "full"]
        assert full_steps == EPOCHS * STEPS_PER_EPOCH
        for case in ("epoch_end", "mid_epoch", "last_batch"):
            steps, params = r["local", case]
            assert steps == full_steps, (case, steps)
            assert max_diff(params, full) == 0.0, case
            # the baseline resumed the same way ends at the same step
            assert r["sgd", case][0] == r["sgd", "full"][0] == full_steps, case


class _StopAtValidationEnd(pl.Callback):
    """Ends the run at the validation after global step ``step`` (after its checkpoint is saved:
    Lightning runs checkpoint callbacks after the others, in the same hook)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _validation_end(rank: int, ckpt_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    val = dict(val_check_interval=5, limit_val_batches=1, max_epochs=2, module={"val": True})
    for run_name in ("full", "first", "resumed"):
        callbacks: list[pl.Callback] = []
        if run_name == "first":
            # the most common Lightning set-up: keep the best checkpoints by a validation metric
            saver = pl.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, monitor="val/loss", save_top_k=-1, filename="{step}"
            )
            callbacks = [saver, _StopAtValidationEnd(10)]
        ckpt = f"{ckpt_dir}/step=10.ckpt" if run_name == "resumed" else None
        trainer, module = _fit("local", ckpt_dir, callbacks, ckpt, **dict(val, module=dict(val["module"])))
        out[run_name] = (trainer.global_step, snapshot(module))
    return out


def test_a_checkpoint_saved_at_validation_end_resumes_bitwise(tmp_path: Path) -> None:
    for r in run(_validation_end, 2, str(tmp_path)):
        assert r["first"][0] == 10 and r["full"][0] == r["resumed"][0] == 2 * STEPS_PER_EPOCH
        assert max_diff(r["first"][1], r["full"][1]) > 1e-4  # the stop was real
        assert max_diff(r["resumed"][1], r["full"][1]) == 0.0


class _AtStart(pl.Callback):
    """Records the model and the optimizer's momentum when training (re)starts."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.model = snapshot(module)
        self.momenta = momenta(trainer.optimizers[0])


def _switch(rank: int, ckpt_dir: str) -> dict[str, Any]:
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(handler)
    out: dict[str, Any] = {}
    for first, then in (("sgd", "local"), ("local", "sgd")):
        trainer, module = _fit(first, ckpt_dir, [], None, max_epochs=-1, max_steps=10)
        path = f"{ckpt_dir}/{first}.ckpt"
        trainer.save_checkpoint(path)
        saved = snapshot(module)
        start = _AtStart()
        trainer, module = _fit(then, ckpt_dir, [start], path, max_epochs=-1, max_steps=18)
        saved_optimizer = torch.load(path, weights_only=False)["optimizer_states"][0]
        out[first, then] = {
            "saved": saved,
            "start": start.model,
            "start_momenta": start.momenta,
            "saved_momenta": [s["momentum_buffer"] for s in saved_optimizer["state"].values()],
            "global_step": trainer.global_step,
            "num_steps": trainer.strategy.num_steps,
            "rounds": float(trainer.callback_metrics["comm/rounds"]),
            "final": snapshot(module),
        }
    out["messages"] = messages
    return out


def test_local_sgd_starts_from_an_sgd_checkpoint_and_back(tmp_path: Path) -> None:
    results = run(_switch, 2, str(tmp_path))
    for r in results:
        for pair in (("sgd", "local"), ("local", "sgd")):
            x = r[pair]
            assert max_diff(x["start"], x["saved"]) == 0.0, pair  # the checkpoint's model
            for a, b in zip(x["start_momenta"], x["saved_momenta"], strict=True):
                assert torch.equal(a, b), pair  # and its optimizer state
            assert x["global_step"] == x["num_steps"] == 18, pair
            assert max_diff(x["final"], x["start"]) > 1e-4, pair  # it trained on
        # a fresh schedule and counters from step 10 (H = 3): syncs at steps 12, 15 and 18
        assert r["sgd", "local"]["rounds"] == 18 // 3 - 10 // 3
        assert r["local", "sgd"]["rounds"] == 18  # the baseline counts one round per step
    text = "\n".join(results[0]["messages"])
    assert "LocalSGD: starting from a sgd_baseline checkpoint at optimizer step 10" in text
    assert "SGD baseline: resuming from a localsgd checkpoint at optimizer step 10" in text
    assert not any("checkpoint at optimizer step" in m for m in results[1]["messages"])  # rank zero only


def _link_and_evaluate(rank: int, ckpt_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run_name in ("full", "first", "resumed"):
        callbacks: list[pl.Callback] = []
        if run_name == "first":
            # last.ckpt is a symlink to the newest checkpoint; the rank files sit beside that one
            saver = pl.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, every_n_train_steps=7, save_top_k=-1, save_last="link", filename="{step}"
            )
            callbacks = [saver, StopAt(14)]
        ckpt = f"{ckpt_dir}/last.ckpt" if run_name == "resumed" else None
        trainer, module = _fit("local", ckpt_dir, callbacks, ckpt, max_epochs=2)
        out[run_name] = (trainer.global_step, snapshot(module))
    return out


class _Seen(pl.Callback):
    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.model = snapshot(module)

    def on_test_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.model = snapshot(module)

    def on_predict_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.model = snapshot(module)


def test_last_ckpt_link_resumes_and_any_world_size_evaluates_the_average(tmp_path: Path) -> None:
    import warnings

    for r in run(_link_and_evaluate, 2, str(tmp_path)):
        assert (tmp_path / "last.ckpt").is_symlink()
        assert r["first"][0] == 14 and r["resumed"][0] == r["full"][0] == 2 * STEPS_PER_EPOCH
        assert max_diff(r["resumed"][1], r["full"][1]) == 0.0
    # one process evaluates the 2-process checkpoint: its averaged model, without a warning about
    # workers restarting, and with or without the rank files
    ckpt = tmp_path / "step=14.ckpt"
    average = torch.load(ckpt, weights_only=False)["state_dict"]
    strategy = LocalSGDStrategy(sync_every=3)
    seen = _Seen()
    trainer = make_trainer(strategy, max_steps=4, callbacks=[seen], limit_val_batches=1, limit_test_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(ToyModule(val=True), ckpt_path=str(ckpt), verbose=False)
        assert max_diff(seen.model, average) == 0.0
        import shutil

        shutil.rmtree(f"{ckpt}.ranks")
        trainer.test(_Testable(), ckpt_path=str(ckpt), verbose=False)
        assert max_diff(seen.model, average) == 0.0
        seen.model = {}
        trainer.predict(_Testable(), ckpt_path=str(ckpt))
        assert max_diff(seen.model, average) == 0.0
    assert not [w for w in caught if "restarts" in str(w.message)], [str(w.message) for w in caught]
    # nothing of the evaluated checkpoint is left for a later fit: it starts at step 0
    assert strategy._pending_state is None and strategy._pending_local is None
    module = ToyModule()
    init = snapshot(module)
    start = _AtStart()
    trainer.callbacks.append(start)
    trainer.fit(module)
    assert strategy.num_steps == 4 and max_diff(start.model, init) == 0.0


class _Testable(ToyModule):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", self.loss(batch))

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch[0])

    def predict_dataloader(self) -> Any:
        return self.val_dataloader()


def test_a_remote_checkpoint_keeps_its_rank_files_and_resumes_bitwise() -> None:
    # fsspec's in-memory filesystem stands in for s3:// (one process: it lives in this process)
    import fsspec

    folder = "memory://bucket/run"
    runs = {}
    for run_name in ("full", "first", "resumed"):
        callbacks: list[pl.Callback] = []
        if run_name == "first":
            callbacks = [
                pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=5, filename="s"),
                StopAt(5),
            ]
        pl.seed_everything(0, verbose=False)
        module = ToyModule(lr=0.1, momentum=0.9)
        strategy = LocalSGDStrategy(sync_every=3, workers_per_device=2)  # 2 workers with their own state
        trainer = make_trainer(
            strategy, max_steps=12, callbacks=callbacks, enable_checkpointing=bool(callbacks)
        )
        trainer.fit(module, ckpt_path=f"{folder}/s.ckpt" if run_name == "resumed" else None)
        runs[run_name] = snapshot(module)
    assert fsspec.filesystem("memory").glob("bucket/run/s.ckpt.ranks/step*/rank0.pt")
    assert max_diff(runs["first"], runs["full"]) > 1e-4
    assert max_diff(runs["resumed"], runs["full"]) == 0.0


class _Stream(torch.utils.data.IterableDataset):
    """A stream of toy batches; ``sharded`` reads this rank's part, otherwise every rank reads all."""

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded

    def __iter__(self) -> Any:
        x, y = toy_dataset().tensors
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for i in range(0, 128, 8):
            if not self.sharded or (i // 8) % world == rank:
                yield x[i : i + 8], y[i : i + 8]


class _StreamModule(ToyModule):
    def __init__(self, data: str) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> Any:
        if self.data == "map_unshuffled":  # with use_distributed_sampler=False: the same order everywhere
            return torch.utils.data.DataLoader(toy_dataset(), batch_size=8)
        return torch.utils.data.DataLoader(_Stream(sharded=self.data == "sharded"), batch_size=None)


def _streams(rank: int, data: str) -> str | None:
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(
        LocalSGDStrategy(sync_every=2, timeout=TIMEOUT),
        max_steps=6,
        use_distributed_sampler=data != "map_unshuffled",
    )
    try:
        trainer.fit(_StreamModule(data))
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("data", ["iterable", "map_unshuffled", "sharded"])
def test_workers_reading_the_same_stream_fail_at_the_first_sync(data: str) -> None:
    errors = run(_streams, 2, data)
    if data == "sharded":  # each rank its own part: trains
        assert errors == [None, None]
        return
    for err in errors:  # every rank says it, at the first sync
        assert err is not None and "workers [0, 1] trained on identical first batches" in err
        assert "optimizer step 2" in err and "HINT: shard the stream by rank" in err


class _AdamW(ToyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


def _synchronous_adam(rank: int, variant: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    if variant == "sgd":
        strategy: Any = SGDBaselineStrategy(timeout=TIMEOUT)
    else:
        kwargs: dict[str, Any] = {"h1_sync": "parameters"} if variant == "parameters" else {}
        if variant in ("sequential", "batched"):  # 1 process x 2 simulated workers
            kwargs.update(workers_per_device=2, simulation=variant)
        strategy = LocalSGDStrategy(sync_every=PostLocal(4, switch_step=10), timeout=TIMEOUT, **kwargs)
    module = _AdamW()
    trainer = make_trainer(strategy, max_steps=10)
    trainer.fit(module)
    return {"final": snapshot(module), "rounds": float(trainer.callback_metrics["comm/rounds"])}


def test_post_local_first_phase_with_adamw_is_synchronous_adamw() -> None:
    baseline = run(_synchronous_adam, 2, "sgd")[0]
    for variant in ("auto", "parameters"):
        r = run(_synchronous_adam, 2, variant)
        assert max_diff(r[0]["final"], r[1]["final"]) == 0.0  # the workers stay equal
        assert r[0]["rounds"] == 10
        if variant == "auto":  # AdamW: the gradients are all-reduced before each step, as DDP does
            assert max_diff(r[0]["final"], baseline["final"]) <= 1e-6
        else:  # averaging AdamW's updates after each step is another algorithm
            assert max_diff(r[0]["final"], baseline["final"]) > 1e-4
    for path in ("sequential", "batched"):  # the simulated workers of one process do the same
        (r,) = run(_synchronous_adam, 1, path)
        assert max_diff(r["final"], baseline["final"]) <= 1e-6, path


class _Precision(ToyModule):
    """Records, per training_step call, whether autocast is on and the dtype of a matmul's output."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.autocast: list[bool] = []
        self.dtypes: list[torch.dtype] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        self.dtypes.append(self.model.net(x).dtype)  # a matmul: bf16 under autocast
        return torch.nn.functional.cross_entropy(logits.float(), y)


class _BackwardHooks(pl.Callback):
    def __init__(self) -> None:
        self.before = self.after = 0

    def on_before_backward(self, *args: Any) -> None:
        self.before += 1

    def on_after_backward(self, *args: Any) -> None:
        self.after += 1


def _mixed(rank: int, variant: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    kwargs: dict[str, Any] = {}
    if variant in ("sequential", "batched"):
        kwargs = {"workers_per_device": 2, "simulation": variant}
    module, hooks = _Precision(), _BackwardHooks()
    strategy = LocalSGDStrategy(sync_every=2, timeout=TIMEOUT, **kwargs)
    trainer = make_trainer(strategy, max_steps=4, precision="bf16-mixed", callbacks=[hooks])
    trainer.fit(module)
    return {
        "autocast": module.autocast,
        "dtypes": module.dtypes,
        "hooks": (hooks.before, hooks.after),
        "final": snapshot(module),
    }


@pytest.mark.parametrize("variant", ["processes", "sequential", "batched"])
def test_bf16_mixed_autocasts_training_step_and_runs_the_backward_hooks(variant: str) -> None:
    results = run(_mixed, 2 if variant == "processes" else 1, variant)
    for r in results:
        assert r["autocast"] and all(r["autocast"]), variant  # the batched path trained in fp32 before
        assert set(r["dtypes"]) == {torch.bfloat16}
        calls = 4 * (2 if variant == "sequential" else 1)  # once per worker and step; batched: once per step
        assert r["hooks"] == (calls, calls)
        assert all(v.dtype == torch.float32 for v in r["final"].values() if v.is_floating_point())


def _true_precision(rank: int, precision: str) -> dict[str, Any]:
    pl.seed_everything(rank, verbose=False)
    module = ToyModule(lr=0.1)
    init = snapshot(module)
    strategy = LocalSGDStrategy(sync_every=2, timeout=TIMEOUT)
    trainer = make_trainer(strategy, max_steps=4, precision=precision)
    trainer.fit(module)
    dtypes = sorted({str(b.flat.dtype) for b in strategy.driver.averager._buckets[0]})
    return {
        "init": init,
        "final": snapshot(module),
        "dtypes": dtypes,
        "bytes": strategy.driver.averager.num_bytes,
    }


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_models_average_in_their_dtype(precision: str) -> None:
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    results = run(_true_precision, 2, precision)
    numel = sum(v.numel() for v in results[0]["final"].values() if v.is_floating_point())
    for r in results:
        assert r["dtypes"] == [str(dtype)] and r["bytes"] == 2 * numel  # buckets in that dtype
        assert all(v.dtype == dtype for v in r["final"].values() if v.is_floating_point())
        assert max_diff(r["final"], r["init"]) > 1e-3  # it trained
    assert max_diff(results[0]["final"], results[1]["final"]) == 0.0  # and ended on one average


def test_loss_scaling_with_simulated_workers_is_refused() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(LocalSGDStrategy(workers_per_device=2), max_steps=2, plugins=[plugin])
    with pytest.raises(ValueError, match=r"would need one GradScaler per simulated worker"):
        trainer.fit(ToyModule())
