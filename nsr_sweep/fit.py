"""Fitting a head: probes on cached features (freeze none), or the model itself (after_target, all).

- `fit_probes`: one linear head per neuron of a layer, all at once (AdamW from zero, each neuron
  early-stopping on its own validation MSE) — equal to N one-at-a-time fits;
- `solve_probes`: exact ridge regression for the same (solver lstsq), one solve for every neuron;
- `train_model`: a trainable copy of blocks start… and the final norm (from the model surface)
  under a frozen head, with AdamW; returns the trained surface.

Every fit returns validation records per epoch (`val_mse`, `val_loss`) and restores its best epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrialSpec
from .heads import HeadMap, LinearHead
from .surface import Surface


@dataclass
class ProbeFit:
    weight: torch.Tensor  # N × n_out × d
    bias: torch.Tensor  # N × n_out
    maps: list[HeadMap]
    history: list[list[dict]]  # per neuron, per epoch
    failed: list[str | None]  # per neuron: reason, or None

    def head(self, j: int) -> LinearHead:
        return LinearHead(self.weight[j], self.bias[j])


def fit_probes(features: np.ndarray, targets: np.ndarray, head: str, spec: TrialSpec,
               splits: dict[str, np.ndarray], on_epoch=None) -> ProbeFit:
    """Fit one linear head per column of `targets` (n_texts × N) at once.

    The neurons share nothing: the loss is a sum of per-neuron means, AdamW is elementwise,
    each neuron early-stops on its own val MSE and keeps its own best epoch — so the result
    equals N one-at-a-time fits.
    """
    if spec.solver == "lstsq":
        return solve_probes(features, targets, spec, splits)
    X = torch.from_numpy(np.array(features, np.float32))  # a private copy: cache arrays are read-only views
    N = targets.shape[1]
    tr, va = splits["train"], splits["val"]
    maps = [HeadMap(head, targets[tr, j], spec.n_bins) for j in range(N)]
    enc = torch.stack([m.encode(targets[:, j]) for j, m in enumerate(maps)])  # N × n_texts
    y_val = torch.as_tensor(targets[va].T)  # N × n_val, activation units
    n_out = maps[0].n_out
    W = torch.zeros(N, n_out, X.shape[1], requires_grad=True)  # zero init: convex problem, seed-free
    b = torch.zeros(N, n_out, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    best = torch.full((N,), math.inf, dtype=torch.float64)
    best_W, best_b = W.detach().clone(), b.detach().clone()
    stale = torch.zeros(N, dtype=torch.long)
    active = torch.ones(N, dtype=torch.bool)
    failed: list[str | None] = [None] * N
    history: list[list[dict]] = [[] for _ in range(N)]
    for epoch in range(spec.epochs):
        order = torch.as_tensor(tr)[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), spec.batch_size):
            idx = order[start : start + spec.batch_size]
            out = torch.einsum("bd,nod->nbo", X[idx], W) + b[:, None]
            per_neuron = torch.stack([maps[j].loss(out[j], enc[j, idx]) for j in range(N)])
            bad = ~torch.isfinite(per_neuron.detach())
            for j in torch.nonzero(bad & active).flatten().tolist():
                failed[j], active[j] = f"non-finite training loss at epoch {epoch}", False
            opt.zero_grad(set_to_none=True)
            per_neuron.masked_fill(bad, 0.0).sum().backward()
            opt.step()
        with torch.no_grad():
            out = torch.einsum("bd,nod->nbo", X[va], W) + b[:, None]
            val_mse = torch.stack([((maps[j].predict(out[j]) - y_val[j]) ** 2).mean() for j in range(N)])
            val_loss = torch.stack([maps[j].loss(out[j], enc[j, va]) for j in range(N)])
        for j in torch.nonzero(active).flatten().tolist():
            history[j].append({"epoch": epoch, "val_mse": float(val_mse[j]), "val_loss": float(val_loss[j])})
            if not math.isfinite(float(val_mse[j])):
                failed[j], active[j] = f"non-finite validation MSE at epoch {epoch}", False
            elif val_mse[j] < best[j]:
                best[j], stale[j] = val_mse[j], 0
                best_W[j], best_b[j] = W[j].detach(), b[j].detach()
            else:
                stale[j] += 1
                active[j] = stale[j] < spec.patience
        if not active.any():
            break
        if on_epoch is not None and N == 1 and not on_epoch(history[0][-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    return ProbeFit(best_W, best_b, maps, history, failed)


def solve_probes(features: np.ndarray, targets: np.ndarray, spec: TrialSpec, splits: dict[str, np.ndarray]) -> ProbeFit:
    """Exact ridge regression (λ = weight_decay, bias unpenalised) for every column of `targets` in one solve."""
    tr, va = splits["train"], splits["val"]
    X = np.asarray(features, np.float64)
    maps = [HeadMap("regression", targets[tr, j]) for j in range(targets.shape[1])]
    Z = np.stack([(targets[:, j] - m.mu) / m.sigma for j, m in enumerate(maps)], 1)  # standardised, as AdamW sees it
    mx, mz = X[tr].mean(0), Z[tr].mean(0)
    Xc = X[tr] - mx
    W = np.linalg.solve(Xc.T @ Xc + spec.weight_decay * np.eye(X.shape[1]), Xc.T @ (Z[tr] - mz))  # d × N
    b = mz - mx @ W
    history = []
    for j, m in enumerate(maps):
        pred = m.mu + m.sigma * (X[va] @ W[:, j] + b[j])
        mse = float(np.mean((pred - targets[va, j]) ** 2))
        history.append([{"epoch": 0, "val_mse": mse, "val_loss": float(np.mean((X[va] @ W[:, j] + b[j] - Z[va, j]) ** 2))}])
    weight = torch.as_tensor(W.T[:, None, :], dtype=torch.float32)
    return ProbeFit(weight, torch.as_tensor(b[:, None], dtype=torch.float32), maps, history, [None] * len(maps))


def train_model(surface: Surface, start: int, inputs, head: LinearHead, hmap: HeadMap, y: np.ndarray,
                read_pos: np.ndarray, spec: TrialSpec, splits: dict[str, np.ndarray], on_epoch=None
                ) -> tuple[Surface, list[dict]]:
    """Train a copy of blocks start… and the final norm so that `head` on the final norm's output predicts y.

    `inputs(idx)` gives the residual entering block `start` (the cached residual after block L for
    after_target; the token embeddings for all). The head is frozen; the best epoch is restored."""
    net = surface.trainable_from(start)
    trainable = net.trainable()
    target = hmap.encode(y)

    def outputs(idx: np.ndarray) -> torch.Tensor:
        final = net.ln_final(net.run(inputs(idx), start))
        return head(final[torch.arange(len(idx)), torch.as_tensor(read_pos[idx])])

    opt = torch.optim.AdamW(trainable.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    tr, va = splits["train"], splits["val"]
    best, stale, history = math.inf, 0, []
    best_state = {k: v.detach().clone() for k, v in trainable.items()}
    for epoch in range(spec.epochs):
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for s in range(0, len(order), spec.batch_size):
            idx = order[s : s + spec.batch_size]
            loss = hmap.loss(outputs(idx), target[idx].to(surface.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = torch.cat([outputs(va[s : s + 256]) for s in range(0, len(va), 256)]).cpu()
        val_mse = float(((hmap.predict(out) - torch.as_tensor(y[va])) ** 2).mean())
        history.append({"epoch": epoch, "val_mse": val_mse, "val_loss": float(hmap.loss(out, target[va]))})
        if not math.isfinite(val_mse):
            raise FloatingPointError(f"non-finite validation MSE at epoch {epoch}")
        if val_mse < best:
            best, stale = val_mse, 0
            best_state = {k: v.detach().clone() for k, v in trainable.items()}
        else:
            stale += 1
            if stale >= spec.patience:
                break
        if on_epoch is not None and not on_epoch(history[-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    with torch.no_grad():
        for k, v in trainable.items():
            v.copy_(best_state[k])
    for p in trainable.values():
        p.requires_grad_(False)
    return net, history
