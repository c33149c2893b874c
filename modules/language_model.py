"""A small causal language model from ``torch.nn``: the reference model for streamed token data."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalLM"]


class CausalLM(pl.LightningModule):
    """A decoder-only Transformer (``nn.TransformerEncoder`` with a causal mask) over tokens.

    Next-token cross-entropy on ``(inputs, targets)`` batches of shape ``(batch, seq_len)``; any
    sequence length up to ``max_len`` works (sequence-length warmup feeds shorter ones).
    Logs ``train_loss`` (per step at Lightning's cadence and per epoch) and ``val_loss`` (per
    epoch, synchronised across DDP ranks); AdamW with ``lr`` and ``weight_decay``.

    Args:
        vocab_size: number of tokens.
        d_model, num_layers, num_heads: width, depth and heads of the Transformer.
        max_len: longest sequence (learned positional embeddings).
        lr, weight_decay: AdamW settings.
        dropout: dropout in the Transformer layers.

    Example:
        >>> model = CausalLM(vocab_size=28, d_model=32, num_layers=1, num_heads=2)
        >>> model(torch.zeros(2, 10, dtype=torch.long)).shape
        torch.Size([2, 10, 28])
    """

    def __init__(
        self,
        vocab_size: int = 28,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"`d_model` ({d_model}) must be a multiple of `num_heads` ({num_heads})")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"`lr` must be a finite number > 0, got {lr!r}")
        self.save_hyperparameters()
        self.lr = lr
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.hparams.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_len={self.hparams.max_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))

    def _loss(self, batch: Any) -> Tensor:
        inputs, targets = batch[0], batch[1]
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)
