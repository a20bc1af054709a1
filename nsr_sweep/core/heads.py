"""Heads: how a head's raw outputs map to a prediction in activation units (docs/science.md).

- regression: one number; trained on the train-standardised target, pred = μ + σ·out.
- classification: K logits; the bins are the K intervals of the train activations that maximise the hard-bin
  ceiling (`ceiling_bins`), a bin's value is the mean train activation inside it, pred = Σ pₖ·valueₖ;
  cross-entropy on the bin index.
- token: the ten digit logits of the model's own vocabulary, binned as classification with K=10.

Predictions of the binned heads are convex combinations of train-bin means, so they always
lie inside [min, max] of the train activations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import NsrError
from .spec import HEADS

DIGITS = "0123456789"

MIN_SHARE = 32
"""Every bin holds at least n_train/(MIN_SHARE·K) train texts (and at least 2): 4 of 1,050 at K = 10."""
CUT_GRID = 256
"""Candidate cuts: the fine train quantiles j/G, G = max(CUT_GRID, 4K), each moved to the nearest place where the
sorted value changes."""


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
        self.edges = ceiling_bins(y_train, k)
        labels = self.labels(y_train)
        mids = (self.edges[:-1] + self.edges[1:]) / 2  # an empty bin (too few distinct values) takes its midpoint
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

    def bin_ceiling(self, y: np.ndarray) -> float:
        """The hard-bin ceiling on `y`: corr(value[bin(y)], y), the r of a head that always picks the true bin —
        what a binned head reading the neuron perfectly reaches (NaN for regression, or where either is constant)."""
        y = np.asarray(y, np.float64)
        if self.head == "regression" or len(y) < 2:
            return float("nan")
        v = self.values[self.labels(y)]
        if np.ptp(v) == 0 or np.ptp(y) == 0:
            return float("nan")
        return float(np.corrcoef(v, y)[0, 1])

    def state(self) -> dict[str, torch.Tensor]:
        """What saves beside the head weights to turn outputs into activations."""
        if self.head == "regression":
            return {"mu": torch.tensor([self.mu]), "sigma": torch.tensor([self.sigma])}
        return {"bin_edges": torch.as_tensor(self.edges), "bin_values": torch.as_tensor(self.values)}


def ceiling_bins(y_train: np.ndarray, k: int) -> np.ndarray:
    """The K + 1 edges of the bins that maximise the train hard-bin ceiling corr(value[bin(y)], y)², value = the
    bin's train mean: optimal 1-D quantisation, the least within-bin sum of squares (the ceiling is 1 − that sum
    over the total one), solved exactly by dynamic programming over the candidate cuts. A cut lies only where the
    sorted value changes (a tied value — a ReLU's resting 0 — is never split), on the fine train quantiles
    (`CUT_GRID`), and every bin holds at least max(2, ⌈n/(MIN_SHARE·K)⌉) train texts, so that every class has
    examples to learn from. A sparse neuron's dense resting cluster costs little sum of squares, its active
    range much: the bins go where the activation varies. An edge lies halfway between the two train values it
    separates; the first and last are the train min and max. Where K such bins do not exist (too few distinct
    values or texts) the most that do are used and the rest are empty bins [min, min) below the first (their
    value: the midpoint rule, min), so the head always has K outputs.

    Cost: K steps over a CUT_GRID² matrix, about 1 ms a neuron at K = 10."""
    y = np.sort(np.asarray(y_train, np.float64))
    n = len(y)
    m = max(2, math.ceil(n / (MIN_SHARE * k)))
    change = np.flatnonzero(y[1:] > y[:-1]) + 1  # i with y[i−1] < y[i]: the places a cut may lie
    cuts = np.zeros(0, np.int64)
    if len(change):
        grid = max(CUT_GRID, 4 * k)
        want = np.arange(1, grid) * n / grid  # the fine quantiles, as positions
        at = np.searchsorted(change, want)
        below, above = change[np.maximum(at - 1, 0)], change[np.minimum(at, len(change) - 1)]
        cuts = np.unique(np.where(want - below <= above - want, below, above))  # the nearest change (ties: below)
    pos = np.r_[0, cuts, n]  # candidate bin boundaries, as positions in the sorted train values
    c = y - y.mean()
    s1, s2 = np.r_[0.0, np.cumsum(c)][pos], np.r_[0.0, np.cumsum(c * c)][pos]
    count = pos[None, :] - pos[:, None]  # texts in the bin [pos[a], pos[b])
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (s2[None] - s2[:, None]) - (s1[None] - s1[:, None]) ** 2 / count  # within-bin sum of squares
    cost[count < m] = np.inf
    best = cost[0]  # best[b]: the least sum of squares of j bins covering [0, pos[b]), j = 1, 2, …
    steps, feasible = [], [np.isfinite(best[-1])]
    for _ in range(k - 1):
        total = best[:, None] + cost
        arg = total.argmin(0)
        best = total[arg, np.arange(len(pos))]
        steps.append(arg)
        feasible.append(np.isfinite(best[-1]))
    used = int(np.flatnonzero(feasible)[-1]) + 1 if any(feasible) else 1  # bins that exist (≥ 1: one holds all)
    ends = [len(pos) - 1]
    for arg in reversed(steps[: used - 1]):
        ends.append(int(arg[ends[-1]]))
    inner = pos[ends[::-1][:-1]]  # the used − 1 cuts, as positions
    mid = (y[inner - 1] + y[inner]) / 2
    edges = np.r_[y[0], np.where(mid > y[inner - 1], mid, y[inner]), y[-1]]  # adjacent floats: the upper one
    return np.r_[np.full(k - used, y[0]), edges]


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
