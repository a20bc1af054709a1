"""Fitting a head: probes on cached features (freeze none), or the model itself (after_target, all).

- `fit_probes`: one linear head per neuron of a layer, all at once. By default solved to convergence
  (a frozen-base probe is convex): `solve_ridge` (exact ridge, λ chosen on validation) for regression,
  `solve_logistic` (L-BFGS on whitened features to a gradient tolerance, L2 chosen on validation) for
  classification — both batched over neurons, each neuron's answer the same as alone;
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
        if not np.isfinite(features).all():
            raise FloatingPointError("non-finite features: no probe can be solved")
        bad = ~np.isfinite(targets).all(0)
        if bad.any():  # those neurons fail alone; the rest of the layer is solved
            return _without(bad, fit_probes(features, np.where(bad, 0.0, targets), head, spec, splits, on_epoch))
        fit = solve_ridge(features, targets, splits) if head == "regression" else \
            solve_logistic(features, targets, head, spec.n_bins, splits)
        if on_epoch is not None and len(fit.history) == 1:
            on_epoch(fit.history[0][-1])  # one record: a scheduler sees the solved probe
        return fit
    return adamw_probes(features, targets, head, spec, splits, on_epoch)


def _without(bad: np.ndarray, fit: ProbeFit) -> ProbeFit:
    """The fit with the neurons in `bad` (non-finite targets) marked failed."""
    fit.failed = ["non-finite targets: no probe can be solved" if b else f for b, f in zip(bad, fit.failed)]
    return fit


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
"""Logistic L2 strengths on whitened features, strongest first (each warm-starts the next; the path
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


LOGISTIC_BLOCK = 256
"""Most neurons solved together by `solve_logistic`; fewer where their L-BFGS histories would pass
LOGISTIC_MEMORY (2 × 20 pairs × block × n_bins·(d+1) float64 numbers)."""
LOGISTIC_MEMORY = 512e6


def solve_logistic(features: np.ndarray, targets: np.ndarray, head: str, n_bins: int,
                   splits: dict[str, np.ndarray], tol: float = 1e-8, max_iter: int = 1000) -> ProbeFit:
    """Multinomial logistic regression on the bins for every column of `targets`, on the whitened
    train features (principal components of unit variance: well conditioned, so L-BFGS needs tens of
    iterations, not hundreds): full-batch L-BFGS in float64 until the largest gradient component is
    below `tol`, the L2 strength chosen per neuron on validation MSE. Neurons are solved side by side
    (`lbfgs_rows`), each as it would be alone, in blocks of LOGISTIC_BLOCK."""
    X = torch.as_tensor(np.asarray(features, np.float64))
    tr = splits["train"]
    mx = X[tr].mean(0)
    _, s, Vt = torch.linalg.svd(X[tr] - mx, full_matrices=False)
    keep = s > s[0] * 1e-6 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)  # numerical rank
    P = Vt[keep].T / s[keep] * math.sqrt(len(tr))  # d × r: centred features → whitened components
    Xw = (X - mx) @ P
    maps = [HeadMap(head, targets[tr, j], n_bins) for j in range(targets.shape[1])]
    per_neuron = 2 * 20 * maps[0].n_out * (Xw.shape[1] + 1) * 8 if maps else 1
    block = int(max(1, min(LOGISTIC_BLOCK, LOGISTIC_MEMORY // per_neuron)))
    blocks = [_logistic_path(Xw, targets[:, lo : lo + block], maps[lo : lo + block], splits, tol, max_iter)
              for lo in range(0, len(maps), block)]
    W = torch.cat([w for w, _, _ in blocks]) @ P.T  # back to the raw features: out = (x − m)·P·W_wᵀ + b_w
    b = torch.cat([b for _, b, _ in blocks]) - W @ mx
    info = [{**i, "rank": int(keep.sum())} for _, _, block in blocks for i in block]
    history = []
    for j, m in enumerate(maps):
        out = X[splits["val"]] @ W[j].T + b[j]
        history.append([val_record(0, m.predict(out), targets[splits["val"], j], m.train_mean,
                                   float(m.loss(out, torch.from_numpy(m.labels(targets[splits["val"], j])))))])
    return ProbeFit(W.float(), b.float(), maps, history, [None] * len(maps), info)


def _logistic_path(Xs: torch.Tensor, y: np.ndarray, maps: list[HeadMap], splits: dict[str, np.ndarray], tol: float,
                   max_iter: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """A block of neurons along the L2 path, strongest first, each solution warm-starting the next; a
    neuron leaves the path at the first weaker penalty that does not improve its validation MSE."""
    tr, va = splits["train"], splits["val"]
    N, K, d = len(maps), maps[0].n_out, Xs.shape[1]
    onehot = torch.stack([F.one_hot(torch.from_numpy(m.labels(y[tr, j])), K) for j, m in enumerate(maps)]).double()
    values = torch.stack([torch.as_tensor(m.values) for m in maps])  # N × K
    y_val = torch.as_tensor(np.asarray(y[va], np.float64)).T  # N × n_val
    theta = torch.zeros(N, K * (d + 1), dtype=torch.float64)
    best_mse, best_theta = torch.full((N,), math.inf, dtype=torch.float64), theta.clone()
    on_path = torch.ones(N, dtype=torch.bool)
    info: list[dict] = [{} for _ in range(N)]
    for lam in L2_GRID:
        def objective(th: torch.Tensor, rows: torch.Tensor, lam=lam):
            return _cross_entropy(th, Xs[tr], onehot[rows], lam, K)

        theta, grad_max, iters = lbfgs_rows(objective, theta, on_path.clone(), tol, max_iter)
        W, b = _unpack(theta, K, d)
        probs = torch.softmax(torch.einsum("td,nkd->ntk", Xs[va], W) + b[:, None], -1)
        mse = (((probs * values[:, None]).sum(-1) - y_val) ** 2).mean(1)
        better = on_path & (mse < best_mse)
        on_path &= better  # a weaker penalty no longer helps this neuron on validation
        best_mse[better], best_theta[better] = mse[better], theta[better]
        for j in torch.nonzero(better).flatten().tolist():
            info[j] = {"solver": "lbfgs", "converged": bool(grad_max[j] <= tol), "l2": lam,
                       "grad_max": float(grad_max[j]), "iterations": int(iters[j])}
        if not on_path.any():
            break
    W, b = _unpack(best_theta, K, d)
    return W, b, info


def _unpack(theta: torch.Tensor, K: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return theta[:, : K * d].view(-1, K, d), theta[:, K * d :]


def _cross_entropy(theta: torch.Tensor, X: torch.Tensor, onehot: torch.Tensor, lam: float, K: int):
    """Per row: mean cross-entropy + λ/2·|W|², and its gradient (analytic: (softmax − onehot)ᵀX/T + λW)."""
    W, b = _unpack(theta, K, X.shape[1])
    logp = torch.log_softmax(torch.einsum("td,nkd->ntk", X, W) + b[:, None], -1)
    T = X.shape[0]
    f = -(onehot * logp).sum((1, 2)) / T + lam / 2 * (W**2).sum((1, 2))
    G = (logp.exp() - onehot) / T
    grad = torch.cat([(torch.einsum("ntk,td->nkd", G, X) + lam * W).flatten(1), G.sum(1)], 1)
    return f, grad


def lbfgs_rows(objective, theta: torch.Tensor, active: torch.Tensor, tol: float, max_iter: int, history: int = 20):
    """Minimise N independent smooth objectives at once, one per row of `theta` (N × P):
    `objective(theta[rows], rows) -> (f [n], grad [n × P])`. L-BFGS with each row's own curvature
    history and its own backtracking (Armijo) step; a row stops once max|grad| ≤ tol (or no step
    decreases it) and is not touched after — so each row ends where it would alone. Rows not `active`
    are left as they are. Returns (theta, max|grad| per row, iterations per row)."""
    N, P = theta.shape
    theta, rows = theta.clone(), torch.arange(N)
    f, g = theta.new_zeros(N), theta.new_zeros(N, P)
    f[active], g[active] = objective(theta[active], rows[active])
    S, Y = theta.new_zeros(history, N, P), theta.new_zeros(history, N, P)
    rho = theta.new_zeros(history, N)
    n_pairs, newest = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    iters = torch.zeros(N, dtype=torch.long)
    for _ in range(max_iter):
        active &= g.abs().amax(1) > tol
        if not active.any():
            break
        a = torch.nonzero(active).flatten()
        d = -_two_loop(g[a], S[:, a], Y[:, a], rho[:, a], n_pairs[a], newest[a])
        gd = (g[a] * d).sum(1)
        restart = gd >= 0  # not a descent direction (numerical): the gradient, history dropped
        d[restart], n_pairs[a[restart]] = -g[a][restart], 0
        gd = torch.where(restart, -(g[a] ** 2).sum(1), gd)
        t = torch.where(n_pairs[a] > 0, 1.0, torch.clamp(1.0 / g[a].abs().sum(1), max=1.0))
        moved = torch.zeros(len(a), dtype=torch.bool)
        for _ in range(50):  # halve each row's step until it decreases f enough (Armijo)
            look = torch.nonzero(~moved).flatten()
            fc, gc = objective(theta[a[look]] + t[look, None] * d[look], a[look])
            ok = fc <= f[a[look]] + 1e-4 * t[look] * gd[look]
            acc, acc_rows = look[ok], a[look[ok]]
            s_new = t[acc, None] * d[acc]
            y_new = gc[ok] - g[acc_rows]
            theta[acc_rows] += s_new
            f[acc_rows], g[acc_rows] = fc[ok], gc[ok]
            sy = (s_new * y_new).sum(1)
            keep = sy > 1e-10 * (y_new * y_new).sum(1).sqrt() * s_new.norm(dim=1)
            kr = acc_rows[keep]
            newest[kr] = (newest[kr] + 1) % history
            S[newest[kr], kr], Y[newest[kr], kr], rho[newest[kr], kr] = s_new[keep], y_new[keep], 1.0 / sy[keep]
            n_pairs[kr] = torch.clamp(n_pairs[kr] + 1, max=history)
            moved[acc] = True
            if moved.all():
                break
            t = torch.where(moved, t, t / 2)
        iters[a[moved]] += 1
        active[a[~moved]] = False  # no decrease at machine precision: as converged as it gets
    return theta, g.abs().amax(1), iters


def _two_loop(g, S, Y, rho, n_pairs, newest):
    """L-BFGS's two-loop recursion for every row at once (H·g, H the row's inverse-Hessian estimate)."""
    m, n = S.shape[0], g.shape[0]
    cols = torch.arange(n)
    q, saved = g.clone(), []
    for k in range(m):
        idx, valid = (newest - k) % m, k < n_pairs
        alpha = torch.where(valid, rho[idx, cols] * (S[idx, cols] * q).sum(1), 0.0)
        q -= alpha[:, None] * Y[idx, cols]
        saved.append((idx, valid, alpha))
    s0, y0 = S[newest, cols], Y[newest, cols]
    gamma = torch.where(n_pairs > 0, (s0 * y0).sum(1) / (y0 * y0).sum(1).clamp_min(1e-300), 1.0)
    r = gamma[:, None] * q
    for idx, valid, alpha in reversed(saved):
        beta = torch.where(valid, rho[idx, cols] * (Y[idx, cols] * r).sum(1), 0.0)
        r += torch.where(valid, alpha - beta, 0.0)[:, None] * S[idx, cols]
    return r


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
