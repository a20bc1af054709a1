"""Fitting a head: probes on cached features (freeze none), or the model itself (after_target, all).

- `fit_probes`: one linear head per neuron of a layer, all at once. By default solved to convergence
  (a frozen-base probe is convex): `solve_ridge` (exact ridge, λ chosen on validation) for regression,
  `solve_logistic` (the bins regressed, multinomial-logistically, on the ridge readout: damped Newton to a
  gradient tolerance, L2 chosen on validation) for classification — both batched over neurons, each
  neuron's answer the same as alone;
  `adamw_probes` (solver adamw) trains from zero with early stopping;
- `train_model`: a trainable copy of blocks start… and the final norm (from the model surface)
  under a frozen head, with AdamW; returns the trained surface.

Every fit returns validation records per epoch (`val_mse`, `val_loss`, `val_pearson_r`, `val_skill`)
and restores its best epoch (an exact solve has one record).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .heads import HeadMap, LinearHead
from .metrics import prediction_metrics
from .surface import Surface


@dataclass(frozen=True)
class Recipe:
    """How to fit: the training hyperparameters and the seed of this fit's randomness (plain values: this module
    knows no sweep file)."""

    solver: str = "exact"  # exact | adamw (probes); unfrozen models always train with AdamW
    n_bins: int = 10
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 64
    weight_decay: float = 0.0
    patience: int = 3
    precision: str = "fp32"  # fp32 | bf16 (autocast of an unfrozen model's training forward)
    seed: int = 0


Svd = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""How a fit gets the thin SVD of its centred train features: `thin_svd`, or a worker's memo of it
(`reuse.Reuse.svd`: every unit, head and solver of the same features reads one)."""


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


def fit_probes(features: np.ndarray, targets: np.ndarray, head: str, recipe: Recipe,
               splits: dict[str, np.ndarray], on_epoch=None, svd: Svd | None = None) -> ProbeFit:
    """Fit one linear head per column of `targets` (n_texts × N) at once: solved exactly (the default), or AdamW.
    `svd`: how an exact solve gets the SVD of the centred train features (`thin_svd` unless a memo is given)."""
    if recipe.solver == "exact":
        if not np.isfinite(features).all():
            raise FloatingPointError("non-finite features: no probe can be solved")
        bad = ~np.isfinite(targets).all(0)
        if bad.any():  # those neurons fail alone; the rest of the layer is solved
            return _without(bad, fit_probes(features, np.where(bad, 0.0, targets), head, recipe, splits, on_epoch, svd))
        fit = solve_ridge(features, targets, splits, svd) if head == "regression" else \
            solve_logistic(features, targets, head, recipe.n_bins, splits, svd=svd)
        if on_epoch is not None and len(fit.history) == 1:
            on_epoch(fit.history[0][-1])  # one record: a scheduler sees the solved probe
        return fit
    return adamw_probes(features, targets, head, recipe, splits, on_epoch)


def _without(bad: np.ndarray, fit: ProbeFit) -> ProbeFit:
    """The fit with the neurons in `bad` (non-finite targets) marked failed."""
    fit.failed = ["non-finite targets: no probe can be solved" if b else f for b, f in zip(bad, fit.failed)]
    return fit


def val_record(epoch: int, pred, y_val, train_mean: float, loss: float) -> dict:
    """One validation record: every val_* metric a search or a scheduler may rank by."""
    m = prediction_metrics(np.asarray(pred, np.float64), np.asarray(y_val, np.float64), train_mean)
    return {"epoch": epoch, "val_mse": m["mse"], "val_loss": float(loss), "val_pearson_r": m["pearson_r"],
            "val_skill": m["skill"]}


def adamw_probes(features: np.ndarray, targets: np.ndarray, head: str, recipe: Recipe,
                 splits: dict[str, np.ndarray], on_epoch=None) -> ProbeFit:
    """AdamW from zero, minibatches; the neurons share nothing (a sum of per-neuron means, elementwise
    AdamW), each early-stops on its own val MSE and keeps its own best epoch — N one-at-a-time fits."""
    X = torch.from_numpy(np.array(features, np.float32))  # a private copy: cache arrays are read-only views
    N = targets.shape[1]
    tr, va = splits["train"], splits["val"]
    maps = [HeadMap(head, targets[tr, j], recipe.n_bins) for j in range(N)]
    enc = torch.stack([m.encode(targets[:, j]) for j, m in enumerate(maps)])  # N × n_texts
    n_out = maps[0].n_out
    W = torch.zeros(N, n_out, X.shape[1], requires_grad=True)  # zero init: convex problem, seed-free
    b = torch.zeros(N, n_out, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    best = torch.full((N,), math.inf, dtype=torch.float64)
    best_W, best_b = W.detach().clone(), b.detach().clone()
    stale = torch.zeros(N, dtype=torch.long)
    active = torch.ones(N, dtype=torch.bool)
    failed: list[str | None] = [None] * N
    history: list[list[dict]] = [[] for _ in range(N)]
    for epoch in range(recipe.epochs):
        order = torch.as_tensor(tr)[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
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
                active[j] = stale[j] < recipe.patience
        if not active.any():
            break
        if on_epoch is not None and N == 1 and not on_epoch(history[0][-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    info = [{"solver": "adamw", "converged": None} for _ in range(N)]
    return ProbeFit(best_W, best_b, maps, history, failed, info)


RANK_CUTOFF = 1e-6
"""Directions of the centred train features whose singular value is ≤ RANK_CUTOFF·s₁ are no directions
(float32 rounding: a LayerNorm's output spans d − 1 dimensions, its last singular value ~1e-8·s₁). One
constant for both solvers (a classification probe reads the ridge readout)."""
RIDGE_GRID = (0.0,) + tuple(10.0**k for k in range(-10, 1))
"""Ridge λ candidates, relative to the largest eigenvalue of the train features' scatter matrix (scale-free)."""
L2_GRID = tuple(10.0 ** (-k / 2) for k in range(11))
"""Logistic L2 strengths on the slopes of the standardised readout, 1 … 1e-5 in half decades, strongest first
(each warm-starts the next); every strength is solved and the best on validation is chosen."""
TIE = 1e-6
"""Validation MSEs within TIE × the baseline's (predicting the train mean: the target's scale) of the least
are a tie, and a tie goes to the weakest penalty (an exact answer stays exact). TIE is far above float64
rounding and the solvers' tolerance (two Newton paths to the same optima give validation MSEs within 2e-9 of
the baseline on nsr-tiny), so no choice depends on the BLAS build or on which neurons share a batch."""


def _choose(val_mse: np.ndarray, baseline: np.ndarray, strongest_first: bool) -> np.ndarray:
    """Per column of val_mse (grid × N): the index of the weakest penalty among those tied for the least."""
    tied = val_mse <= val_mse.min(0) + TIE * baseline
    if strongest_first:
        return len(val_mse) - 1 - np.argmax(tied[::-1], 0)
    return np.argmax(tied, 0)


def _ridge(X: torch.Tensor, targets: np.ndarray, splits: dict[str, np.ndarray], svd: Svd | None = None):
    """Exact ridge of every standardised column of `targets` on X (float64, bias unpenalised), λ chosen per
    column from RIDGE_GRID on the validation MSE in activation units. Returns the regression maps, W (d × N,
    standardised-target units; no component outside the kept directions), b (N), the choice (N), the λ scale
    s₁² and the numerical rank."""
    svd = svd or thin_svd
    tr, va = splits["train"], splits["val"]
    maps = [HeadMap("regression", targets[tr, j]) for j in range(targets.shape[1])]
    Z = torch.as_tensor(np.stack([(targets[:, j] - m.mu) / m.sigma for j, m in enumerate(maps)], 1))
    sigma = torch.as_tensor([m.sigma for m in maps], dtype=torch.float64)
    mx, mz = X[tr].mean(0), Z[tr].mean(0)
    U, s, Vt = svd(X[tr] - mx)
    keep = s > s[0] * RANK_CUTOFF if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    U, s, Vt = U[:, keep], s[keep], Vt[keep]  # the numerical rank
    UtZ = U.T @ (Z[tr] - mz)  # r × N
    Xv = (X[va] - mx) @ Vt.T  # n_val × r
    scale = float(s[0] ** 2) if s.numel() else 1.0
    val_mse = torch.stack([(((Xv @ ((s / (s**2 + rel * scale))[:, None] * UtZ) + mz - Z[va]) * sigma) ** 2).mean(0)
                           for rel in RIDGE_GRID])  # grid × N, activation units
    choice = _choose(val_mse.numpy(), _baseline(maps, targets[va]), strongest_first=False)
    coef = torch.stack([s / (s**2 + RIDGE_GRID[c] * scale) for c in choice], 1) if len(choice) else UtZ  # r × N
    W = Vt.T @ (coef * UtZ)  # d × N
    return maps, W, mz - mx @ W, choice, scale, int(s.numel())


def thin_svd(Xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, s, Vᵀ) of centred train features."""
    if Xc.shape[1] > Xc.shape[0]:  # wide (token counts: ~10⁴ columns): Xᵀ = QR, then the SVD of the small Rᵀ —
        Q, R = torch.linalg.qr(Xc.T)  # as accurate as the direct SVD (QR is backward stable), 5× faster here
        U, s, Wt = torch.linalg.svd(R.T, full_matrices=False)
        return U, s, Wt @ Q.T
    U, s, Vt = torch.linalg.svd(Xc, full_matrices=False)
    return U, s, Vt


def _baseline(maps: list[HeadMap], y_val: np.ndarray) -> np.ndarray:
    """Per neuron: the validation MSE of predicting its train mean (the scale TIE is relative to)."""
    return np.array([np.mean((m.train_mean - y_val[:, j]) ** 2) for j, m in enumerate(maps)])


def solve_ridge(features: np.ndarray, targets: np.ndarray, splits: dict[str, np.ndarray], svd: Svd | None = None
                ) -> ProbeFit:
    """Exact ridge regression (bias unpenalised) for every column of `targets`, λ chosen per column on the
    validation split from RIDGE_GRID (ties within TIE: the smaller λ); one SVD of the centred train features
    (directions below RANK_CUTOFF·s₁ dropped) serves every λ and column."""
    va = splits["val"]
    X = torch.as_tensor(np.asarray(features, np.float64))
    maps, W, b, choice, scale, rank = _ridge(X, targets, splits, svd)
    out_val = (X[va] @ W + b).numpy()
    history, info = [], []
    for j, m in enumerate(maps):
        history.append([val_record(0, m.mu + m.sigma * out_val[:, j], targets[va, j], m.train_mean,
                                   float(np.mean((out_val[:, j] - (targets[va, j] - m.mu) / m.sigma) ** 2)))])
        info.append({"solver": "ridge", "converged": True, "l2": RIDGE_GRID[choice[j]] * scale,
                     "l2_relative": RIDGE_GRID[choice[j]], "rank": rank})
    return ProbeFit(W.T[:, None, :].float(), b[:, None].float(), maps, history, [None] * len(maps), info)


LOGISTIC_BLOCK = 128
"""Most neurons whose Newton iterations run side by side (a few n_train × n_bins float64 arrays each)."""


def solve_logistic(features: np.ndarray, targets: np.ndarray, head: str, n_bins: int,
                   splits: dict[str, np.ndarray], tol: float = 1e-10, max_iter: int = 100, svd: Svd | None = None
                   ) -> ProbeFit:
    """Binned probes for every column of `targets`: multinomial logistic regression of the bins on the neuron's
    exact ridge readout (`_ridge`, the regression probe's), out_k = a_k·ŝ + b_k with ŝ the readout standardised
    on train. The bins are intervals of one ordered quantity, so their logits move along the one direction
    that predicts it (an ordinal head); a full K × d multinomial head instead spreads its weight over every
    feature correlated with the neuron and, on features as wide as half the train texts, overfits.
    Mean cross-entropy + λ/2·|a|² (biases unpenalised), every λ of L2_GRID solved (strongest first, each
    warm-started from the last moved along the path's tangent) by damped Newton in float64 until max|grad| ≤
    `tol` (at most `max_iter` iterations per strength); λ chosen per neuron on validation MSE (ties within TIE:
    the weaker). The head stored is the linear map on the raw features, W = a ⊗ ŵ/sd(ŝ) (rank one), b − W·x̄.
    Neurons are solved side by side, each as it would be alone."""
    tr, va = splits["train"], splits["val"]
    X = torch.as_tensor(np.asarray(features, np.float64))
    _, Wr, _, ridge_choice, _, rank = _ridge(X, targets, splits, svd)
    mx = X[tr].mean(0)
    S = (X - mx) @ Wr  # n × N: each neuron's readout
    sd = S[tr].std(0, correction=0)
    sd[sd == 0] = 1.0  # no readout (e.g. constant features): ŝ = 0, the head predicts the bin frequencies
    S = (S / sd).numpy()
    maps = [HeadMap(head, targets[tr, j], n_bins) for j in range(targets.shape[1])]
    labels = np.stack([m.labels(targets[:, j]) for j, m in enumerate(maps)], 1) if maps else np.zeros((len(X), 0))
    baseline = _baseline(maps, targets[va])
    thetas, info = [], []
    for lo in range(0, len(maps), LOGISTIC_BLOCK):
        hi = lo + LOGISTIC_BLOCK
        theta, block_info = _ordinal_path(S[:, lo:hi], labels[:, lo:hi], maps[lo:hi], targets[va, lo:hi],
                                          baseline[lo:hi], splits, tol, max_iter)
        thetas.append(theta)
        info += block_info
    K = maps[0].n_out if maps else n_bins
    theta = torch.cat(thetas) if thetas else torch.zeros(0, 2 * K - 1, dtype=torch.float64)
    a, b = _unpack(theta, K)
    W = a[:, :, None] * (Wr.T / sd[:, None])[:, None, :]  # N × K × d
    b = b - W @ mx
    info = [{**i, "rank": rank, "readout_l2_relative": RIDGE_GRID[c]} for i, c in zip(info, ridge_choice)]
    Xt = X[va]
    history = []
    for j, m in enumerate(maps):
        out = Xt @ W[j].T + b[j]
        history.append([val_record(0, m.predict(out), targets[va, j], m.train_mean,
                                   float(m.loss(out, torch.from_numpy(m.labels(targets[va, j])))))])
    return ProbeFit(W.float(), b.float(), maps, history, [None] * len(maps), info)


def _unpack(theta: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = (a₀…a_{K−1}, b₁…b_{K−1}); b₀ = 0 (softmax is blind to a common shift of the unpenalised biases)."""
    return theta[:, :K], F.pad(theta[:, K:], (1, 0))


def _ordinal_path(S: np.ndarray, labels: np.ndarray, maps: list[HeadMap], y_val: np.ndarray, baseline: np.ndarray,
                  splits: dict[str, np.ndarray], tol: float, max_iter: int) -> tuple[torch.Tensor, list[dict]]:
    """A block of neurons along L2_GRID, strongest first, each solution (moved along the path's tangent)
    warm-starting the next; per neuron the strength with the least validation MSE (ties within TIE: the weaker)."""
    tr, va = splits["train"], splits["val"]
    s, lab = torch.as_tensor(S[tr].T.copy()), torch.as_tensor(labels[tr].T.copy())  # N × n_train
    s_val = torch.as_tensor(S[va].T.copy())
    values = torch.stack([torch.as_tensor(m.values) for m in maps])  # N × K
    y = torch.as_tensor(np.asarray(y_val, np.float64).T)  # N × n_val
    N, K = len(maps), maps[0].n_out
    theta = torch.zeros(N, 2 * K - 1, dtype=torch.float64)
    path, val_mse, last = [], [], None
    for lam in L2_GRID:
        if last is not None:  # predict the next solution: dθ/d log λ = −λ·H⁻¹·(a, 0) (the path's tangent)
            lam0, H = last
            L, bad = torch.linalg.cholesky_ex(H)
            tangent = -lam0 * torch.cholesky_solve(F.pad(theta[:, :K], (0, K - 1))[:, :, None], L)[:, :, 0]
            theta = theta + math.log(lam / lam0) * torch.where((bad == 0)[:, None], tangent, 0.0)
        theta, grad_max, iters, H = newton_rows(
            lambda th, rows, lam=lam: _ordinal_loss(th, s if rows is None else s[rows],
                                                    lab if rows is None else lab[rows], lam, K), theta, tol, max_iter)
        last = (lam, H)
        a, b = _unpack(theta, K)
        pred = torch.softmax(s_val[:, :, None] * a[:, None] + b[:, None], -1) @ values[:, :, None]
        val_mse.append(((pred[..., 0] - y) ** 2).mean(1).numpy())
        path.append((theta, grad_max, iters))
    choice = _choose(np.stack(val_mse), baseline, strongest_first=True)
    best = torch.stack([path[c][0][j] for j, c in enumerate(choice)])
    info = [{"solver": "newton", "converged": bool(path[c][1][j] <= tol), "l2": L2_GRID[c],
             "grad_max": float(path[c][1][j]), "iterations": int(path[c][2][j])} for j, c in enumerate(choice)]
    return best, info


def _ordinal_loss(theta: torch.Tensor, s: torch.Tensor, lab: torch.Tensor, lam: float, K: int):
    """Per row: the mean cross-entropy of out_k = a_k·s + b_k plus λ/2·|a|², its gradient and its Hessian
    (analytic: with Q_t = diag(p_t) − p_t p_tᵀ, H = Σ_t Q_t ⊗ (s_t, 1)(s_t, 1)ᵀ / T, plus λ on the slopes).
    Laid out rows × K × T, so every reduction over the K classes runs along contiguous texts."""
    a, b = _unpack(theta, K)
    T = s.shape[1]
    z = torch.baddbmm(b[:, :, None], a[:, :, None], s[:, None, :])  # N × K × T
    z = z.sub_(z.amax(1, keepdim=True))  # every text's largest logit 0
    p = z.exp()
    se = p.sum(1, keepdim=True)
    # −log p_y per text, summed: small terms, no difference of large sums (f resolves 1e-16, as Armijo needs)
    f = (torch.log(se) - z.gather(1, lab[:, None, :])).sum((1, 2)) / T + lam / 2 * (a**2).sum(1)
    p.div_(se)
    ps = p * s[:, None, :]
    pss = ps * s[:, None, :]
    Pt = p.transpose(1, 2)
    Haa = torch.diag_embed(pss.sum(2)) - pss @ Pt
    Hab = (torch.diag_embed(ps.sum(2)) - ps @ Pt)[:, :, 1:]
    Hbb = (torch.diag_embed(p.sum(2)) - p @ Pt)[:, 1:, 1:]
    H = torch.cat([torch.cat([Haa, Hab], 2), torch.cat([Hab.transpose(1, 2), Hbb], 2)], 1) / T
    H[:, :K, :K] += lam * torch.eye(K, dtype=H.dtype)
    G = p.scatter_add_(1, lab[:, None, :], -torch.ones_like(p[:, :1])).div_(T)  # (p − onehot) / T
    grad = torch.cat([(G @ s[:, :, None])[:, :, 0] + lam * a, G.sum(2)[:, 1:]], 1)
    return f, grad, H


def newton_rows(objective, theta: torch.Tensor, tol: float, max_iter: int):
    """Minimise N independent smooth, strictly convex objectives at once, one per row of `theta` (N × P):
    `objective(theta[rows], rows) -> (f [n], grad [n × P], H [n × P × P])` (rows None: every row). Damped
    Newton: each row its own Cholesky step (the gradient where H is not numerically positive definite) and
    its own Armijo backtracking from the full step (near the optimum, where f's decrease is below its
    rounding, a full step that halves max|grad| is taken); a row stops once max|grad| ≤ tol (or no step
    decreases it, at machine precision) and is not touched after — so each row ends where it would alone. Returns
    (theta, max|grad| per row, Newton iterations per row, the Hessian at theta)."""
    N = theta.shape[0]
    theta = theta.clone()
    f, g, H = objective(theta, None)
    iters = torch.zeros(N, dtype=torch.long)
    active = g.abs().amax(1) > tol
    for _ in range(max_iter):
        a = torch.nonzero(active).flatten()
        if not len(a):
            break
        L, bad = torch.linalg.cholesky_ex(H[a])
        d = -torch.cholesky_solve(g[a, :, None], L)[:, :, 0]
        d[bad != 0] = -g[a][bad != 0]
        gd = (g[a] * d).sum(1)
        t = torch.ones(len(a), dtype=theta.dtype)
        moved = torch.zeros(len(a), dtype=torch.bool)
        for _ in range(60):  # halve each row's step until it decreases f enough (Armijo)
            look = torch.nonzero(~moved).flatten()
            rows = a[look]
            step = theta[rows] + t[look, None] * d[look]
            fc, gc, Hc = objective(step, None if len(rows) == N else rows)
            ok = fc <= f[rows] + 1e-4 * t[look] * gd[look]
            # at the optimum f's decrease falls below its rounding: a full step that shrinks the gradient
            # and does not raise f beyond rounding is taken
            ok |= (t[look] == 1) & (gc.abs().amax(1) < g[rows].abs().amax(1) / 2) & \
                (fc <= f[rows] + 1e-14 * (1 + f[rows].abs()))
            acc = rows[ok]
            theta[acc], f[acc], g[acc], H[acc] = step[ok], fc[ok], gc[ok], Hc[ok]
            moved[look[ok]] = True
            if moved.all():
                break
            t[look[~ok]] /= 2
        iters[a[moved]] += 1
        active[a[~moved]] = False  # no decrease at machine precision: as converged as it gets
        active &= g.abs().amax(1) > tol
    return theta, g.abs().amax(1), iters, H


def train_model(surface: Surface, start: int, inputs, head: LinearHead, hmap: HeadMap, y: np.ndarray,
                read_pos: np.ndarray, recipe: Recipe, splits: dict[str, np.ndarray], on_epoch=None
                ) -> tuple[Surface, list[dict]]:
    """Train a copy of blocks start… and the final norm so that `head` on the final norm's output predicts y.

    `inputs(idx)` gives the residual entering block `start` (the cached residual after block L for
    after_target; the token embeddings for all). The head is frozen; the best epoch is restored."""
    net = surface.trainable_from(start)
    trainable = net.trainable()
    target = hmap.encode(y)

    autocast = torch.autocast(surface.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16")

    def outputs(idx: np.ndarray, train: bool = False) -> torch.Tensor:
        with autocast if train else contextlib.nullcontext():  # evaluation always in float32
            final = net.ln_final(net.run(inputs(idx), start))
        return head(final[torch.arange(len(idx)), torch.as_tensor(read_pos[idx])].float())

    opt = torch.optim.AdamW(trainable.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    tr, va = splits["train"], splits["val"]
    best, stale, history = math.inf, 0, []
    best_state = {k: v.detach().clone() for k, v in trainable.items()}
    for epoch in range(recipe.epochs):
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for s in range(0, len(order), recipe.batch_size):
            idx = order[s : s + recipe.batch_size]
            loss = hmap.loss(outputs(idx, train=True), target[idx].to(surface.device))
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
            if stale >= recipe.patience:
                break
        if on_epoch is not None and not on_epoch(history[-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    with torch.no_grad():
        for k, v in trainable.items():
            v.copy_(best_state[k])
    for p in trainable.values():
        p.requires_grad_(False)
    return net, history
