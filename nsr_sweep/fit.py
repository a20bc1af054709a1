"""Fitting a head: probes on cached features (freeze none), or the model itself (after_target, all).

- `fit_probes`: one linear head per neuron of a layer, all at once. By default solved to convergence
  (a frozen-base probe is convex): `solve_ridge` (exact ridge, λ chosen on validation) for regression,
  `solve_logistic` (L-BFGS to a gradient tolerance, L2 chosen on validation) for classification;
  `adamw_probes` (solver adamw) trains from zero with early stopping;
- `train_model`: a trainable copy of blocks start… and the final norm (from the model surface)
  under a frozen head, with AdamW; returns the trained surface.

Every fit returns validation records per epoch (`val_mse`, `val_loss`, `val_pearson_r`, `val_skill`)
and restores its best epoch (an exact solve has one record).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrialSpec
from .heads import HeadMap, LinearHead
from .metrics import prediction_metrics
from .surface import Surface


@dataclass
class ProbeFit:
    weight: torch.Tensor  # N × n_out × d
    bias: torch.Tensor  # N × n_out
    maps: list[HeadMap]
    history: list[list[dict]]  # per neuron, per epoch
    failed: list[str | None]  # per neuron: reason, or None
    info: list[dict]  # per neuron: solver, converged, l2 (chosen on validation), iterations

    def head(self, j: int) -> LinearHead:
        return LinearHead(self.weight[j], self.bias[j])


def fit_probes(features: np.ndarray, targets: np.ndarray, head: str, spec: TrialSpec,
               splits: dict[str, np.ndarray], on_epoch=None) -> ProbeFit:
    """Fit one linear head per column of `targets` (n_texts × N) at once: solved exactly (the default), or AdamW."""
    if spec.solver == "exact":
        if not (np.isfinite(features).all() and np.isfinite(targets).all()):
            raise FloatingPointError("non-finite features or targets: no probe can be solved")
        fit = solve_ridge(features, targets, splits) if head == "regression" else \
            solve_logistic(features, targets, head, spec.n_bins, splits)
        if on_epoch is not None and len(fit.history) == 1:
            on_epoch(fit.history[0][-1])  # one record: a scheduler sees the solved probe
        return fit
    return adamw_probes(features, targets, head, spec, splits, on_epoch)


def val_record(epoch: int, pred, y_val, train_mean: float, loss: float) -> dict:
    """One validation record: every val_* metric a search or a scheduler may rank by."""
    m = prediction_metrics(np.asarray(pred, np.float64), np.asarray(y_val, np.float64), train_mean)
    return {"epoch": epoch, "val_mse": m["mse"], "val_loss": float(loss), "val_pearson_r": m["pearson_r"],
            "val_skill": m["skill"]}


def adamw_probes(features: np.ndarray, targets: np.ndarray, head: str, spec: TrialSpec,
                 splits: dict[str, np.ndarray], on_epoch=None) -> ProbeFit:
    """AdamW from zero, minibatches; the neurons share nothing (a sum of per-neuron means, elementwise
    AdamW), each early-stops on its own val MSE and keeps its own best epoch — N one-at-a-time fits."""
    X = torch.from_numpy(np.array(features, np.float32))  # a private copy: cache arrays are read-only views
    N = targets.shape[1]
    tr, va = splits["train"], splits["val"]
    maps = [HeadMap(head, targets[tr, j], spec.n_bins) for j in range(N)]
    enc = torch.stack([m.encode(targets[:, j]) for j, m in enumerate(maps)])  # N × n_texts
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
        for j in torch.nonzero(active).flatten().tolist():
            rec = val_record(epoch, maps[j].predict(out[j]), targets[va, j], maps[j].train_mean,
                             float(maps[j].loss(out[j], enc[j, va])))
            history[j].append(rec)
            if not math.isfinite(rec["val_mse"]):
                failed[j], active[j] = f"non-finite validation MSE at epoch {epoch}", False
            elif rec["val_mse"] < best[j]:
                best[j], stale[j] = rec["val_mse"], 0
                best_W[j], best_b[j] = W[j].detach(), b[j].detach()
            else:
                stale[j] += 1
                active[j] = stale[j] < spec.patience
        if not active.any():
            break
        if on_epoch is not None and N == 1 and not on_epoch(history[0][-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    info = [{"solver": "adamw", "converged": None} for _ in range(N)]
    return ProbeFit(best_W, best_b, maps, history, failed, info)


RIDGE_GRID = (0.0,) + tuple(10.0**k for k in range(-10, 1))
"""Ridge λ candidates, relative to the largest eigenvalue of the train features' scatter matrix (scale-free)."""
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3)
"""Logistic L2 strengths on standardised features, strongest first (each warm-starts the next; the path
stops once a weaker penalty improves no neuron's validation MSE)."""


def solve_ridge(features: np.ndarray, targets: np.ndarray, splits: dict[str, np.ndarray]) -> ProbeFit:
    """Exact ridge regression (bias unpenalised) for every column of `targets`, λ chosen per column on the
    validation split from RIDGE_GRID; one SVD of the centred train features serves every λ and column."""
    tr, va = splits["train"], splits["val"]
    X = np.asarray(features, np.float64)
    maps = [HeadMap("regression", targets[tr, j]) for j in range(targets.shape[1])]
    Z = np.stack([(targets[:, j] - m.mu) / m.sigma for j, m in enumerate(maps)], 1)  # standardised targets
    mx, mz = X[tr].mean(0), Z[tr].mean(0)
    U, s, Vt = np.linalg.svd(X[tr] - mx, full_matrices=False)
    keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros_like(s, bool)  # numerical rank: a dead feature is no direction
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    UtZ = U.T @ (Z[tr] - mz)  # r × N
    Xv = (X[va] - mx) @ Vt.T  # n_val × r
    scale = float(s[0] ** 2) if s.size else 1.0
    sigma = np.array([m.sigma for m in maps])
    val_mse = np.stack([np.mean(((Xv @ ((s / (s**2 + rel * scale))[:, None] * UtZ) + mz - Z[va]) * sigma) ** 2, 0)
                        for rel in RIDGE_GRID])  # grid × N, activation units
    choice = np.argmin(val_mse, 0)  # ties: the first (smallest λ) — an exact answer stays exact
    coef = np.stack([s / (s**2 + RIDGE_GRID[c] * scale) for c in choice], 1)  # r × N
    W = Vt.T @ (coef * UtZ)  # d × N
    b = mz - mx @ W
    history, info = [], []
    for j, m in enumerate(maps):
        out = X[va] @ W[:, j] + b[j]
        history.append([val_record(0, m.mu + m.sigma * out, targets[va, j], m.train_mean,
                                   float(np.mean((out - Z[va, j]) ** 2)))])
        info.append({"solver": "ridge", "converged": True, "l2": RIDGE_GRID[choice[j]] * scale,
                     "l2_relative": RIDGE_GRID[choice[j]], "rank": int(s.size)})
    weight = torch.as_tensor(W.T[:, None, :], dtype=torch.float32)
    return ProbeFit(weight, torch.as_tensor(b[:, None], dtype=torch.float32), maps, history, [None] * len(maps), info)


def solve_logistic(features: np.ndarray, targets: np.ndarray, head: str, n_bins: int,
                   splits: dict[str, np.ndarray], tol: float = 1e-5, max_iter: int = 1000) -> ProbeFit:
    """Multinomial logistic regression on the bins for every column of `targets`, each solved on its own:
    full-batch L-BFGS (strong Wolfe) in float64 until the largest gradient component is below `tol`, the
    L2 strength chosen per neuron on validation MSE."""
    tr = splits["train"]
    X = torch.as_tensor(np.asarray(features, np.float64))
    mx, sx = X[tr].mean(0), X[tr].std(0)
    sx = torch.where(sx > 1e-12, sx, torch.ones_like(sx))  # a constant feature stays 0 after centring
    maps = [HeadMap(head, targets[tr, j], n_bins) for j in range(targets.shape[1])]
    fits = [_logistic_one((X - mx) / sx, targets[:, j], m, splits, tol, max_iter) for j, m in enumerate(maps)]
    weights = [W / sx for W, _, _ in fits]  # back to the raw features: out = x·(W/s)ᵀ + b − (W/s)·m
    biases = [b - W @ mx for W, (_, b, _) in zip(weights, fits)]
    history = []
    for j, (W, b, m) in enumerate(zip(weights, biases, maps)):
        out = X[splits["val"]] @ W.T + b
        history.append([val_record(0, m.predict(out), targets[splits["val"], j], m.train_mean,
                                   float(m.loss(out, torch.from_numpy(m.labels(targets[splits["val"], j])))))])
    return ProbeFit(torch.stack(weights).float(), torch.stack(biases).float(), maps, history,
                    [None] * len(maps), [info for _, _, info in fits])


def _logistic_one(Xs: torch.Tensor, y: np.ndarray, m: HeadMap, splits: dict[str, np.ndarray], tol: float,
                  max_iter: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One neuron: the L2 path strongest first, each solution warm-starting the next; the best on validation."""
    tr, va = splits["train"], splits["val"]
    labels = torch.from_numpy(m.labels(y))
    W = torch.zeros(m.n_out, Xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(m.n_out, dtype=torch.float64, requires_grad=True)
    best: tuple[float, torch.Tensor, torch.Tensor, dict] = (math.inf, W, b, {})
    for lam in L2_GRID:
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0,
                                history_size=20, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            loss = F.cross_entropy(Xs[tr] @ W.T + b, labels[tr]) + lam / 2 * (W**2).sum()
            loss.backward()
            return loss

        opt.step(objective)
        objective()
        grad = max(float(g.abs().max()) for g in (W.grad, b.grad) if g is not None)
        with torch.no_grad():
            mse = float(((m.predict(Xs[va] @ W.T + b) - torch.as_tensor(y[va])) ** 2).mean())
        if mse >= best[0]:
            break  # a weaker penalty no longer helps on validation
        info = {"solver": "lbfgs", "converged": grad <= tol, "l2": lam, "grad_max": grad,
                "iterations": int(opt.state[opt._params[0]].get("n_iter", 0))}
        best = (mse, W.detach().clone(), b.detach().clone(), info)
    return best[1], best[2], best[3]


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
        history.append(val_record(epoch, hmap.predict(out), y[va], hmap.train_mean, float(hmap.loss(out, target[va]))))
        val_mse = history[-1]["val_mse"]
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
