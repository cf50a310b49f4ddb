"""The language-model workload (localsgd.research.lm): the byte tokenizer, the GPT's causality and
initial loss, the lr schedule, the text data module on local files and on the embedded corpus,
and bad input named."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from common import TIMEOUT, max_diff
from distributed import run

from localsgd.research.lm import GPT, ByteTokenizer, LanguageModel, TextDataModule

needs_corpus = pytest.mark.skipif(
    shutil.which("bible") is None,
    reason="Debian's bible-kjv is not installed (scripts/setup.sh installs it as root)",
)


def test_bytes_round_trip_through_256_tokens() -> None:
    tok = ByteTokenizer()
    for text in ("", "In the beginning", "héllo wörld ✓ 🙂\nline\ttab", "\x00\xff"):
        tokens = tok.encode(text)
        assert tokens.dtype == torch.long and (
            tokens.numel() == 0 or 0 <= int(tokens.min()) <= int(tokens.max()) < 256
        )
        assert tokens.numel() == len(text.encode("utf-8")) and tok.decode(tokens) == text


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_initial_loss_is_about_ln_256_per_byte(positions: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(GPT.sized("micro", positions=positions))
    tokens = torch.randint(0, 256, (8, 128))
    with torch.no_grad():
        loss = model.loss((tokens, torch.randint(0, 256, (8, 128))))
    assert abs(float(loss) - math.log(256)) < 0.05, float(loss)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_position_sees_only_the_bytes_before_it(positions: str) -> None:
    torch.manual_seed(0)
    net = GPT.sized("nano", positions=positions)
    tokens = torch.randint(0, 256, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    a, b = net(tokens), net(changed)
    assert torch.equal(a[:, :20], b[:, :20])  # causal: the past does not see byte 20
    assert not torch.allclose(a[:, 20:], b[:, 20:])  # and byte 20 and after do


def test_the_schedule_warms_up_linearly_then_decays_along_a_cosine() -> None:
    model = LanguageModel(GPT.sized("nano"), lr=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert model.lr_factor(0) == pytest.approx(0.1) and model.lr_factor(9) == pytest.approx(1.0)
    assert model.lr_factor(60) == pytest.approx(0.55)  # halfway: the mean of 1 and 0.1
    assert model.lr_factor(110) == pytest.approx(0.1) and model.lr_factor(500) == pytest.approx(0.1)
    assert LanguageModel(GPT.sized("nano"), warmup_steps=4).lr_factor(100) == 1.0


def test_local_text_files_are_cut_into_next_byte_sequences(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij" * 20)
    (tmp_path / "b.txt").write_text("0123456789" * 20)
    data = TextDataModule(
        path=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], context=16, val_fraction=0.1
    )
    data.setup()
    assert data.train_x is not None and data.train_y is not None and data.test_x is not None
    assert data.train_x.shape[1] == 16 and torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    assert torch.equal(data.train_x[1, :1], data.train_y[0, -1:])  # the windows follow each other
    text = ByteTokenizer().decode(torch.cat([data.train_x.flatten(), data.test_x.flatten()]))
    assert text.startswith("abcdefghij") and "0123456789" in text  # both files, in order
    assert len(data.test_x) == (401 - 361) // 16  # the last tenth of the 401 bytes


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: GPT.sized("huge"), r"size \('huge'\) must be one of"),
        (lambda p: GPT(width=100, heads=3), r"width \(100\) must be a multiple of heads \(3\)"),
        (lambda p: GPT(positions="absolute"), r"positions"),
        (
            lambda p: GPT.sized("nano")(torch.zeros(1, 65, dtype=torch.long)),
            r"longer than the model's context \(64\)",
        ),
        (lambda p: LanguageModel(GPT.sized("nano"), warmup_steps=10, decay_steps=5), r"warmup_steps \(10\)"),
        (
            lambda p: TextDataModule(path=str(p / "missing.txt")).setup(),
            r"path: .*missing.txt.* is not a file",
        ),
        (lambda p: TextDataModule(val_fraction=1.0), r"val_fraction \(1.0\) must be in \(0, 1\)"),
        (
            lambda p: TextDataModule(path=str(p / "short.txt"), context=64).setup(),
            r"shorter than one sequence",
        ),
    ],
)
def test_bad_input_is_named(tmp_path: Path, build: object, message: str) -> None:
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match=message):
        build(tmp_path)  # type: ignore[operator]


@needs_corpus
def test_a_few_hundred_steps_on_the_embedded_corpus_learn_it() -> None:
    """The King James Bible, 300 AdamW steps of the nano model: well below 8 bits per byte (a
    uniform guess) and below 4.5 (3.65 measured)."""
    torch.manual_seed(0)
    data = TextDataModule(context=64, batch_size=16)
    data.setup()
    assert data.train_x is not None and data.train_y is not None
    assert len(data.train_x) * 64 > 3_500_000  # the whole book, not a stub
    model = LanguageModel(GPT.sized("nano"), lr=3e-3)
    optimizer = model.configure_optimizers()["optimizer"]
    for _ in range(300):
        i = torch.randint(0, len(data.train_x), (16,))
        loss = model.loss((data.train_x[i], data.train_y[i]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        bpb = float(model.loss(data.eval_batch(torch.arange(256)))) / math.log(2)
    assert bpb < 4.5, bpb


# ---------------------------------------------------------------------------- through the strategies
def _fit(rank: int, text: str, workers_per_device: int, baseline: bool, path: str = "auto") -> dict[str, Any]:
    import lightning.pytorch as pl
    from common import make_trainer, snapshot

    from localsgd import LocalSGDStrategy, SGDBaselineStrategy

    pl.seed_everything(0, verbose=False)
    model = LanguageModel(GPT.sized("nano", context=32), lr=3e-3, warmup_steps=2)
    data = TextDataModule(path=text, context=32, batch_size=4, eval_batch_size=16)
    if baseline:
        strategy: Any = SGDBaselineStrategy(timeout=TIMEOUT)
    else:
        strategy = LocalSGDStrategy(
            sync_every=4, workers_per_device=workers_per_device, simulation=path, timeout=TIMEOUT
        )
    trainer = make_trainer(strategy, max_steps=12, limit_val_batches=None, val_check_interval=12)
    trainer.fit(model, data)
    return {"final": snapshot(model), "val/bpb": float(trainer.callback_metrics["val/bpb"])}


@pytest.mark.distributed
def test_the_lm_trains_through_processes_simulated_workers_and_the_baseline(tmp_path: Path) -> None:
    """2 gloo processes and 2 simulated workers in one process, on both simulation paths: the
    same Local SGD (<= 1e-6); the synchronous AdamW baseline runs on the same data too."""
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    processes = run(_fit, 2, str(path), 1, False)
    simulated = run(_fit, 1, str(path), 2, False, "sequential")[0]
    batched = run(_fit, 1, str(path), 2, False, "batched")[0]  # the default on a GPU
    assert max_diff(processes[0]["final"], processes[1]["final"]) == 0.0  # averaged at the end
    assert max_diff(simulated["final"], processes[0]["final"]) <= 1e-6
    assert max_diff(batched["final"], processes[0]["final"]) <= 1e-6
    # (the validation metric is not compared: 2 processes each read half the validation set,
    # padded to equal halves by the DistributedSampler)
    assert simulated["val/bpb"] < 8.0 and processes[0]["val/bpb"] < 8.0
    baseline = run(_fit, 2, str(path), 1, True)
    assert baseline[0]["val/bpb"] < 8.0 and max_diff(baseline[0]["final"], baseline[1]["final"]) == 0.0


def _plain_loop(rank: int, path: str) -> dict[str, Any]:
    import torch.distributed as dist

    from localsgd import DiLoCo, LocalSGD

    dist.init_process_group("gloo")  # a plain loop's group is the user's
    torch.manual_seed(rank)  # different starts: the driver gives every rank rank 0's model
    data = TextDataModule(path=path, context=32, batch_size=4)
    data.setup("fit")
    lm = LanguageModel(GPT.sized("nano", context=32), lr=3e-3)
    optimizer = lm.configure_optimizers()["optimizer"]
    draws = torch.Generator().manual_seed(rank)  # each rank its own batches
    losses = []
    with LocalSGD(lm, optimizer, sync_every=4, outer_optimizer=DiLoCo()) as driver:
        for _ in range(24):
            assert data.train_x is not None
            batch = data.eval_batch(torch.randint(0, len(data.train_x), (4,), generator=draws), split="train")
            driver.note_batch(batch[0])
            optimizer.zero_grad()
            loss = lm.loss(batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        rounds = driver.metrics()["comm/rounds"]
    final = [p.detach().clone() for p in lm.parameters()]
    dist.barrier()
    return {"final": final, "first": sum(losses[:4]) / 4, "last": sum(losses[-4:]) / 4, "rounds": rounds}


@pytest.mark.distributed
def test_the_lm_trains_in_a_plain_loop_with_the_driver(tmp_path: Path) -> None:
    """The plain-loop front end (``LocalSGD`` around a hand-written loop) with DiLoCo on 2 gloo
    processes: 6 rounds, every rank ends with the same global model, and the loss falls."""
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    results = run(_plain_loop, 2, str(path))
    assert all(r["rounds"] == 6 for r in results)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["final"], results[1]["final"]))
    assert all(r["last"] < r["first"] - 0.5 for r in results), [(r["first"], r["last"]) for r in results]


def test_a_hub_dataset_by_name_is_read_without_a_download(tmp_path: Path, monkeypatch: Any) -> None:
    """dataset= goes through datasets.load_dataset (here a tiny dataset built locally in its
    place): its text column, joined by newlines, cut at max_bytes."""
    datasets = pytest.importorskip("datasets", reason="the lm extra (pip install -e '.[lm]')")
    local = datasets.Dataset.from_dict(
        {"text": [f"story {i}: once upon a time." for i in range(50)], "id": list(range(50))}
    )
    calls = []

    def load_dataset(name: str, config: str | None, split: str, streaming: bool) -> Any:
        calls.append((name, config, split, streaming))
        return local.to_iterable_dataset() if streaming else local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = TextDataModule(dataset="someone/stories", dataset_split="train", context=8, max_bytes=300)
    assert data.text() == ("\n".join(local["text"]))[:300]
    assert calls == [("someone/stories", None, "train", True)]  # streamed: read up to max_bytes only
    data.setup()
    assert data.train_x is not None and data.train_x.shape[1] == 8
    with pytest.raises(ValueError, match=r"text_field \('body'\) is not a column of 'someone/stories'"):
        TextDataModule(dataset="someone/stories", text_field="body").text()
    whole = TextDataModule(dataset="someone/stories", dataset_config="v1", context=8)
    assert whole.text() == "\n".join(local["text"]) and calls[-1] == ("someone/stories", "v1", "train", False)
    with pytest.raises(ValueError, match=r"pass path .* or dataset .*, not both"):
        TextDataModule(dataset="someone/stories", path=str(tmp_path / "a.txt"))


def _stream_check(rank: int, text: str) -> str:
    import lightning.pytorch as pl
    from common import make_trainer

    from localsgd import LocalSGDStrategy

    pl.seed_everything(0, verbose=False)
    model = LanguageModel(GPT.sized("nano", context=16), lr=3e-3)
    data = TextDataModule(path=text, context=16, batch_size=2)
    try:
        make_trainer(LocalSGDStrategy(sync_every=2, workers_per_device=2, timeout=TIMEOUT), max_steps=2).fit(
            model, data
        )
    except ValueError as err:
        return str(err)
    return "trained"


def test_simulated_workers_read_their_own_shards_of_the_stream(tmp_path: Path) -> None:
    """The identical-stream check at the first sync passes on a real text (each simulated worker
    draws its own sequences) and fails on one whose every sequence is the same."""
    varied, same = tmp_path / "varied.txt", tmp_path / "same.txt"
    varied.write_text("".join(f"verse {i}: and it came to pass.\n" for i in range(100)))
    same.write_text("a" * 2000)
    assert run(_stream_check, 1, str(varied)) == ["trained"]
    assert "identical first batches" in run(_stream_check, 1, str(same))[0]


def _bf16(rank: int, text: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from common import make_trainer, snapshot

    from localsgd import LocalSGDStrategy

    pl.seed_everything(0, verbose=False)
    model = LanguageModel(GPT.sized("nano", context=32), lr=3e-3)
    data = TextDataModule(path=text, context=32, batch_size=4, eval_batch_size=16)
    strategy = LocalSGDStrategy(sync_every=4, timeout=TIMEOUT)
    trainer = make_trainer(
        strategy, max_steps=12, precision="bf16-mixed", limit_val_batches=None, val_check_interval=12
    )
    trainer.fit(model, data)
    dtypes = {p.dtype for p in model.parameters()}
    return {"final": snapshot(model), "val/bpb": float(trainer.callback_metrics["val/bpb"]), "dtypes": dtypes}


@pytest.mark.distributed
def test_the_lm_trains_in_bf16_mixed_precision(tmp_path: Path) -> None:
    """bf16 autocast for the forward, fp32 parameters and averaging: the workers end equal and
    the model has learned something (bits per byte below a uniform guess's 8)."""
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    a, b = run(_bf16, 2, str(path))
    assert a["dtypes"] == {torch.float32} and max_diff(a["final"], b["final"]) == 0.0
    assert a["val/bpb"] < 7.0, a["val/bpb"]


def test_the_gpu_config_builds_gpt2_small_and_its_hub_data() -> None:
    """configs/lm_gpt2_small_diloco.yaml (tests/test_cli.py parses it): its model is the size it
    says and runs a forward pass; its data module is built (reading the hub is left to the GPU
    node)."""
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "lm_gpt2_small_diloco.yaml").read_text())
    model = LanguageModel(**{**config["model"]["init_args"], "compile": False})
    assert 85.5e6 < sum(p.numel() for p in model.parameters()) < 86.5e6  # "~86M" in the config
    with torch.no_grad():
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 256)
    data = TextDataModule(**config["data"]["init_args"])
    assert (data.dataset, data.context, data.max_bytes) == ("HuggingFaceFW/fineweb-edu", 1024, 2_000_000_000)


def _sharded(rank: int, text: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    from common import make_trainer

    from localsgd import DiLoCo, LocalSGDStrategy

    pl.seed_everything(0, verbose=False)
    model = LanguageModel(GPT.sized("nano", context=32), lr=3e-3)
    data = TextDataModule(path=text, context=32, batch_size=4, eval_batch_size=16)
    strategy = LocalSGDStrategy(sync_every=4, shards_per_worker=2, outer_optimizer=DiLoCo(), timeout=TIMEOUT)
    trainer = make_trainer(strategy, max_steps=12, limit_val_batches=None, val_check_interval=12)
    trainer.fit(model, data)
    block = model.net.blocks[0].qkv.weight
    return {
        "sharded": type(block).__name__ == "DTensor" and block.to_local().shape[0] < block.shape[0],
        "global": [p.full_tensor() for p in model.net.parameters()],
        "val/bpb": float(trainer.callback_metrics["val/bpb"]),
    }


@pytest.mark.distributed
def test_the_lm_trains_on_sharded_workers(tmp_path: Path) -> None:
    """LocalSGDStrategy(shards_per_worker=2) on 4 processes: the LanguageModel shards its GPT
    in configure_model (a block per FSDP2 unit), DiLoCo runs over the 2 workers, and every
    process ends with the same global model."""
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    results = run(_sharded, 4, str(path))
    assert all(r["sharded"] for r in results)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["global"], results[0]["global"]))
    assert results[0]["val/bpb"] < 8.0
