"""Language models for the experiments: a byte-level tokenizer (no vocabulary to download), a
small decoder-only transformer (:class:`GPT`), its LightningModule (:class:`LanguageModel`, loss
in nats per token and bits per byte) and a data module over an embedded corpus or local text
files (:class:`TextDataModule`).

The embedded corpus is the King James Bible (public domain) from Debian's ``bible-kjv`` package,
which ``scripts/setup.sh`` installs where apt is available: its 31,102 verses as plain text,
without the verse references, 4,137,850 bytes (:func:`kjv_text`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from localsgd.core.options import check_choice
from localsgd.core.schedules import check_positive_int
from localsgd.research.data import InMemoryDataModule, Sampling
from localsgd.research.models import weight_decay_groups


class ByteTokenizer:
    """UTF-8 bytes as tokens: a vocabulary of 256, every text encodes and decodes losslessly, and
    a token is a byte, so nats per token / ln 2 is bits per byte."""

    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, tokens: Tensor | Sequence[int]) -> str:
        values = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return bytes(values).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- the model
SIZES: dict[str, dict[str, int]] = {
    "nano": {"layers": 2, "heads": 2, "width": 64, "context": 64},  # ~0.1M parameters: tests
    "micro": {"layers": 4, "heads": 4, "width": 128, "context": 128},  # ~0.8M: the CPU default
    "mini": {"layers": 6, "heads": 6, "width": 384, "context": 256},  # ~11M
    "gpt2-small": {"layers": 12, "heads": 12, "width": 768, "context": 1024},  # ~85M + embeddings
}
"""Model sizes by name (``GPT.sized``)."""

Positions = Literal["learned", "rotary"]


def _rotary(x: Tensor) -> Tensor:
    """Rotary position embedding of ``x`` (batch, heads, time, head width): pairs of channels
    rotated by an angle that grows with the position, at frequencies 10000^(-2i/d)."""
    t, d = x.shape[-2], x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x MLP, each residual;
    the projections have no biases."""

    def __init__(self, width: int, heads: int, positions: Positions) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads, self.positions = heads, positions
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # no biases in the projections: a key bias has no effect on the attention (the softmax
        # ignores a constant per query), so its gradient is rounding noise, which Adam's
        # normalization turns into steps of the lr's size
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.positions == "rotary":
            q, k = _rotary(q), _rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer over bytes: token embedding (tied to the output layer), learned
    or rotary positions, ``layers`` pre-LayerNorm blocks, a final LayerNorm.

    Args:
        layers, heads, width: depth, attention heads, model width.
        context: the longest sequence it reads (learned positions have one row per position).
        positions: ``"learned"`` (GPT-2's) or ``"rotary"``.
        vocab_size: 256 for :class:`ByteTokenizer`.
    """

    def __init__(
        self,
        *,
        layers: int = 4,
        heads: int = 4,
        width: int = 128,
        context: int = 128,
        positions: Positions = "learned",
        vocab_size: int = ByteTokenizer.vocab_size,
    ) -> None:
        super().__init__()
        for name, value in (("layers", layers), ("heads", heads), ("width", width), ("context", context)):
            check_positive_int(name, value)
        self.context = context
        self.positions = check_choice("positions", positions, ("learned", "rotary"))
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width) if positions == "learned" else None
        self.blocks = nn.ModuleList(Block(width, heads, positions) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by the depth
            assert isinstance(block, Block)
            for layer in (block.proj, block.mlp[2]):
                assert isinstance(layer, nn.Linear)
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def sized(cls, size: str, **overrides: Any) -> GPT:
        """The model of a named size (:data:`SIZES`), with any argument overridden."""
        if size not in SIZES:
            raise ValueError(f"size ({size!r}) must be one of {sorted(SIZES)}")
        return cls(**{**SIZES[size], **overrides})

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (batch, time, vocabulary) for ``tokens`` (batch, time), time <= context."""
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"the sequence ({t} tokens) is longer than the model's context ({self.context})")
        x = self.embed(tokens.long())  # the data holds bytes as uint8
        if self.position is not None:
            x = x + self.position(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ---------------------------------------------------------------------------- the LightningModule
class LanguageModel(pl.LightningModule):
    """Next-byte prediction with AdamW and a cosine lr schedule after a linear warmup.

    Logs ``train/loss`` and ``val/loss`` in nats per token, ``val/bpb`` (bits per byte) and
    ``val/ppl`` (perplexity per byte).

    Args:
        net: the model (default: ``GPT.sized(size)``); ``compile=True`` wraps it in
            ``torch.compile``.
        lr, betas, eps, weight_decay: AdamW's (no decay on biases and LayerNorms).
        warmup_steps: linear warmup from 0; then cosine decay to ``min_lr_ratio * lr`` at
            ``decay_steps`` (``None``: constant after the warmup).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        size: str = "micro",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr ({lr!r}) must be > 0")
        if warmup_steps < 0 or (decay_steps is not None and decay_steps <= warmup_steps):
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be >= 0 and below decay_steps ({decay_steps})"
            )
        self.net = net if net is not None else GPT.sized(size)
        self.lr, self.betas, self.eps, self.weight_decay = lr, (betas[0], betas[1]), eps, weight_decay
        self.warmup_steps, self.decay_steps, self.min_lr_ratio = warmup_steps, decay_steps, min_lr_ratio
        self.use_compile = compile  # (nn.Module.compile is a method)
        self._compiled: Any = None

    def forward(self, tokens: Tensor) -> Tensor:
        if not self.use_compile:
            return self.net(tokens)
        if self._compiled is None:  # at the first call: after configure_model sharded the net
            # kept outside the module tree, so that the state dict holds the net once
            object.__setattr__(self, "_compiled", torch.compile(self.net))
        return self._compiled(tokens)

    def configure_model(self) -> None:
        """Under ``LocalSGDStrategy(shards_per_worker=S)``: shard the GPT with FSDP2 over the
        worker's ``"shard"`` mesh dimension, each block one unit (whole workers: nothing)."""
        mesh = self.device_mesh
        if mesh is None or "shard" not in (mesh.mesh_dim_names or ()):
            return
        from torch.distributed.fsdp import fully_shard

        for block in getattr(self.net, "blocks", ()):
            fully_shard(block, mesh=mesh["shard"])
        fully_shard(self.net, mesh=mesh["shard"])

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=batch[0].numel())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        n = batch[0].numel()
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.log("val/bpb", loss / math.log(2), sync_dist=True, batch_size=n)
        self.log("val/ppl", loss.exp(), sync_dist=True, batch_size=n)

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of ``lr`` at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> Any:
        groups = weight_decay_groups(self.net, self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# ---------------------------------------------------------------------------- the data
_VERSE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ ", re.M)


def kjv_text(cache: str | os.PathLike[str] | None = None) -> str:
    """The King James Bible as plain text, one verse per line, references stripped: dumped
    once from Debian's ``bible-kjv`` (its ``bible`` program) and cached."""
    folder = cache or os.environ.get("LOCALSGD_DATA") or Path.home() / ".cache" / "localsgd"
    path = Path(folder) / "kjv.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    program = shutil.which("bible")
    if program is None:
        raise ValueError(
            "corpus='kjv' needs Debian's bible-kjv package (the King James Bible, public domain), "
            "which is not installed. HINT: apt-get install bible-kjv (scripts/setup.sh does), or pass "
            "path= to your own text files"
        )
    dump = subprocess.run([program, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
    text = _VERSE.sub("", dump.stdout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


class TextDataModule(InMemoryDataModule):
    """Bytes of a text cut into sequences of ``context`` tokens (targets: the next byte); the
    last ``val_fraction`` of the text is the validation split. Each worker draws its own shard
    of the training sequences (Lightning's DistributedSampler, or the simulator's).

    Args:
        corpus: ``"kjv"`` (the embedded default, :func:`kjv_text`); ignored with ``path`` or
            ``dataset``.
        path: a text file, or a list of them (concatenated), instead of the corpus.
        dataset: a Hugging Face dataset by name (``datasets.load_dataset(dataset,
            dataset_config, split=...)``, the ``lm`` extra), its ``text_field`` column joined by
            newlines; with ``max_bytes`` streamed (nothing beyond what is read is downloaded) and
            cut there, without it the whole split.
        context: tokens per sequence (the model's context or less).
        batch_size: sequences per worker and step.
    """

    def __init__(
        self,
        *,
        corpus: Literal["kjv"] = "kjv",
        path: str | Sequence[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        text_field: str = "text",
        max_bytes: int | None = None,
        context: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        val_fraction: float = 0.05,
        sampling: Sampling = "without_replacement",
        noise_seed: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            sampling=sampling,
            noise_seed=noise_seed,
            device=device,
        )
        self.corpus = check_choice("corpus", corpus, ("kjv",))
        self.paths = [path] if isinstance(path, str) else list(path) if path is not None else None
        if self.paths is not None and dataset is not None:
            raise ValueError(f"pass path ({path!r}) or dataset ({dataset!r}), not both")
        self.dataset, self.dataset_config = dataset, dataset_config
        self.dataset_split, self.text_field = dataset_split, text_field
        self.max_bytes = None if max_bytes is None else check_positive_int("max_bytes", max_bytes)
        self.context = check_positive_int("context", context)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction ({val_fraction!r}) must be in (0, 1)")
        self.val_fraction = val_fraction

    def text(self) -> str:
        if self.dataset is not None:
            return self._hub_text()
        if self.paths is None:
            return kjv_text()
        missing = [p for p in self.paths if not Path(p).is_file()]
        if missing:
            raise ValueError(f"path: {missing} is not a file")
        return "\n".join(Path(p).read_text(encoding="utf-8") for p in self.paths)

    def _hub_text(self) -> str:
        try:
            import datasets
        except ImportError as err:
            raise ValueError(
                f"dataset={self.dataset!r} needs Hugging Face's datasets. HINT: pip install -e '.[lm]'"
            ) from err
        data = datasets.load_dataset(
            self.dataset, self.dataset_config, split=self.dataset_split, streaming=self.max_bytes is not None
        )
        parts: list[str] = []
        size = 0
        for record in data:
            if self.text_field not in record:
                raise ValueError(
                    f"text_field ({self.text_field!r}) is not a column of {self.dataset!r}: {sorted(record)}"
                )
            text = record[self.text_field]
            parts.append(text)
            size += len(text.encode("utf-8")) + 1
            if self.max_bytes is not None and size >= self.max_bytes:
                break
        joined = "\n".join(parts)
        if self.max_bytes is not None:
            joined = joined.encode("utf-8")[: self.max_bytes].decode("utf-8", errors="ignore")
        return joined

    def _load(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tokens = ByteTokenizer().encode(self.text()).to(torch.uint8)  # a byte each, not 8
        split = round(len(tokens) * (1 - self.val_fraction))
        train_x, train_y = self._sequences(tokens[:split])
        val_x, val_y = self._sequences(tokens[split:])
        return train_x.to(device), train_y.to(device), val_x.to(device), val_y.to(device)

    def _sequences(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Non-overlapping windows: inputs ``tokens[i*c : (i+1)*c]``, targets shifted by one."""
        c = self.context
        n = (len(tokens) - 1) // c
        if n < 1:
            raise ValueError(
                f"the text ({len(tokens)} bytes in a split) is shorter than one sequence ({c} + 1)"
            )
        return tokens[: n * c].view(n, c), tokens[1 : n * c + 1].view(n, c)
