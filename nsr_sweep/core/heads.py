"""Heads: how a head's raw outputs map to a prediction in activation units (docs/science.md).

- regression: one number; trained on the train-standardised target, pred = μ + σ·out.
- classification: K logits; bins are train-split quantiles, a bin's value is the mean train
  activation inside it, pred = Σ pₖ·valueₖ; cross-entropy on the bin index.
- token: the ten digit logits of the model's own vocabulary, binned as classification with K=10.

Predictions of the binned heads are convex combinations of train-bin means, so they always
lie inside [min, max] of the train activations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import NsrError
from .spec import HEADS

DIGITS = "0123456789"


class HeadMap:
    """Target encoding, loss and prediction for one head on one neuron (fit on the train split)."""

    def __init__(self, head: str, y_train: np.ndarray, n_bins: int = 10):
        if head not in HEADS:
            raise NsrError(f"head {head!r} is not allowed; allowed: {', '.join(HEADS)}")
        self.head = head
        y_train = np.asarray(y_train, np.float64)
        self.train_mean = float(y_train.mean())
        if head == "regression":
            self.n_out = 1
            self.mu, self.sigma = self.train_mean, float(y_train.std()) or 1.0
            return
        k = 10 if head == "token" else n_bins
        self.n_out = k
        self.edges = np.quantile(y_train, np.linspace(0, 1, k + 1))
        labels = self.labels(y_train)
        mids = (self.edges[:-1] + self.edges[1:]) / 2  # an empty bin (tied quantiles) takes its midpoint
        self.values = np.array([y_train[labels == j].mean() if (labels == j).any() else mids[j] for j in range(k)])

    def labels(self, y: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges[1:-1], y, side="right"), 0, self.n_out - 1).astype(np.int64)

    def encode(self, y: np.ndarray) -> torch.Tensor:
        """The training target: standardised value (regression) or bin index."""
        if self.head == "regression":
            return torch.tensor((y - self.mu) / self.sigma, dtype=torch.float32)
        return torch.from_numpy(self.labels(y))

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the last-but-one axis: out [..., B, n_out], target [..., B] → [...]."""
        if self.head == "regression":
            return ((out[..., 0] - target) ** 2).mean(-1)
        ce = F.cross_entropy(out.reshape(-1, self.n_out), target.reshape(-1), reduction="none")
        return ce.view(target.shape).mean(-1)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Prediction in activation units (float64)."""
        out = out.double()
        if self.head == "regression":
            return self.mu + self.sigma * out[..., 0]
        return torch.softmax(out, -1) @ torch.as_tensor(self.values)

    def readout(self, out: torch.Tensor) -> torch.Tensor:
        """The prediction before mapping: the raw output (regression) or Σₖ (valueₖ − v̄)·logitₖ."""
        out = out.double()
        if self.head == "regression":
            return out[..., 0]
        return out @ torch.as_tensor(self.values - self.values.mean())

    def state(self) -> dict[str, torch.Tensor]:
        """What saves beside the head weights to turn outputs into activations."""
        if self.head == "regression":
            return {"mu": torch.tensor([self.mu]), "sigma": torch.tensor([self.sigma])}
        return {"bin_edges": torch.as_tensor(self.edges), "bin_values": torch.as_tensor(self.values)}


def digit_token_ids(tokenizer, suffix: str) -> list[int]:
    """Token id of each answer ' 0'…' 9' as it encodes after `suffix`; exactly one token each, or an error."""
    base = tokenizer.encode(suffix, add_special_tokens=False)
    ids = []
    for d in DIGITS:
        full = tokenizer.encode(suffix + " " + d, add_special_tokens=False)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise NsrError(
                f"token head: the answer ' {d}' does not encode to exactly one token after the suffix "
                f"{suffix!r} (got {len(full) - len(base)} tokens); change training.suffix or the model"
            )
        ids.append(full[-1])
    return ids


class LinearHead(torch.nn.Module):
    """The one head module of every freeze mode: out = features @ weightᵀ + bias, n_out outputs.

    Probes fit it; unfrozen trials freeze it at a seeded random init, or — for token heads — at the
    model's own unembedding rows (and bias) of the ten digit tokens, so the outputs are the real
    next-token logits of the digits."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())  # n_out × d
        self.register_buffer("bias", bias.detach().clone())  # n_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}


def frozen_head(head: str, unembed: Any, d_model: int, n_out: int, seed: int,
                digit_ids: list[int] | None) -> LinearHead:
    """The frozen head of an unfrozen trial: the digit unembedding (token), else a seeded random map."""
    if head == "token":
        assert digit_ids is not None
        w = unembed.weight[digit_ids]
        b = unembed.bias[digit_ids] if getattr(unembed, "bias", None) is not None else torch.zeros(len(digit_ids))
        return LinearHead(w.float().cpu(), b.float().cpu()).to(unembed.weight.device)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, d_model, generator=gen) / d_model**0.5
    return LinearHead(w, torch.zeros(n_out)).to(unembed.weight.device)
