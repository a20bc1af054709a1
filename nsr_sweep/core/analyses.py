"""Does the predictor *use* the neuron? (docs/science.md: directions and cosines, projections, patching.)

Every function here takes a finished trial's context and returns columns for the trial table:
- `readout_direction` and `weight_cosines`: the head's direction in residual space against the
  neuron's input and output weights, with z-scores against other neurons and random directions;
- `projections`: Pearson r (and p) of the neuron with the readout, with LN2(resid_mid)·W_in[:, n]
  (`identity_r`, exactly 1 for `hook: pre`) and with the final residual on W_out[n, :];
- `patch`: set the neuron at the target position to each value of a grid in the trial's *final*
  model, one batched forward per grid value, and fit Δprediction = slope·Δactivation + b;
  `patch_slope_estimate`: for probes, the same slope to first order, from the layer's Jacobian (a unit's
  few neurons: pushed forward along each one's output direction, `LastPosition.feature_gradient`);
- `residual_change`: for unfrozen trials, what fine-tuning did to the final residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from scipy import special

from .heads import HeadMap, LinearHead
from .patching import LastPosition
from .uncertainty import slope_interval


def readout_direction(head_weight: torch.Tensor, hmap) -> torch.Tensor:
    """Regression: the weight vector. Binned heads: Σₖ (valueₖ − v̄)·wₖ over the class (or digit-unembedding) vectors."""
    w = head_weight.double().cpu()  # n_out × d (an unfrozen trial's head sits on the model's device)
    if hmap.head == "regression":
        return w[0]
    values = torch.as_tensor(hmap.values, dtype=torch.float64)
    return (values - values.mean()) @ w


def _cos(a: torch.Tensor, B: torch.Tensor, B_norms: torch.Tensor | None = None) -> torch.Tensor:
    """cos(a, each column of B) — for each row of a when a is P × d (P × M); `B_norms`: B's column norms, if known."""
    return (a @ B) / (a.norm(dim=-1, keepdim=True) * (B.norm(dim=0) if B_norms is None else B_norms)).clamp_min(1e-30)


@lru_cache(maxsize=4)
def random_directions(d: int, n: int = 1000, seed: int = 0) -> torch.Tensor:
    """The random null: n Gaussian directions in d dimensions (seeded, the same for every trial)."""
    return torch.randn(d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class LayerWeights:
    """A layer's neuron weights as the cosines read them, built once per model and layer and shared by every
    probe of a unit (float64 on the CPU): raw read/write vectors (`win`, `wout`, `wgate`), the effective ones
    through norm2 (`_eff`), and each column's norm."""

    def __init__(self, surface, layer: int):
        self.surface, self.layer = surface, layer
        self.w = w = surface.neuron_weights(layer)
        self.raw = {"win": w["W_in"], "wout": w["W_out"].T} | ({"wgate": w["W_gate"]} if "W_gate" in w else {})
        ln2 = surface.ln2(layer)
        self.eff = {"win_eff": surface.effective(ln2, w["W_in"]), "wout_eff": w["W_out"].T} | \
            ({"wgate_eff": surface.effective(ln2, w["W_gate"])} if "W_gate" in w else {})
        self.norms = {k: V.norm(dim=0) for k, V in (self.raw | self.eff).items()}
        self.win_wout = (w["W_in"] * w["W_out"].T).sum(0) / (self.norms["win"] * self.norms["wout"]).clamp_min(1e-30)


def weight_cosines(directions: torch.Tensor, vectors: dict[str, torch.Tensor], neurons, suffix: str = "",
                   n_random: int = 1000, seed: int = 0, norms: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """cos(directions[p], vectors[name][:, neurons[p]]) for each named [d_model, d_mlp] set, z-scored against
    the layer's other neurons and against random Gaussian directions; columns
    `cos_<name><suffix>[_z_neurons|_z_random]`, one dict per row of `directions` (P × d: one matrix product
    per set for all probes of a unit)."""
    D = directions.reshape(-1, directions.shape[-1]).double()
    P, neurons = D.shape[0], torch.as_tensor(np.atleast_1d(neurons), dtype=torch.long)
    null_random = _cos(D, random_directions(D.shape[1], n_random, seed))  # P × n_random
    r_mean, r_std = null_random.mean(1), null_random.std(1)
    rows = torch.arange(P)
    out: list[dict] = [{} for _ in range(P)]
    for name, V in vectors.items():
        c_all = _cos(D, V, norms[name] if norms else None)  # P × M
        c = c_all[rows, neurons]
        keep = torch.ones_like(c_all, dtype=torch.bool)
        keep[rows, neurons] = False
        null = c_all[keep].view(P, -1)  # the layer's other neurons
        z_n, z_r = (c - null.mean(1)) / null.std(1), (c - r_mean) / r_std
        for p in range(P):
            out[p] |= {f"cos_{name}{suffix}": float(c[p]), f"cos_{name}{suffix}_z_neurons": float(z_n[p]),
                       f"cos_{name}{suffix}_z_random": float(z_r[p])}
    for p in range(P):
        out[p] |= {f"cos_null_random_std{suffix}": float(r_std[p]),
                   f"cos_null_n_neurons{suffix}": next(iter(vectors.values())).shape[1] - 1}
    return out


def direction_cosines(weights: LayerWeights, read_hook: str, directions: torch.Tensor, neurons, seed: int = 0,
                      suffix: str = "", chunk: int = 512) -> list[dict]:
    """Each head's readout direction (a row of `directions`) against its neuron's weights (docs/science.md),
    raw and effective; one dict per row.

    Raw: the direction in the head's feature basis against W_in[:, n] (the up projection), W_gate[:, n]
    (gated MLPs) and W_out[n, :]. Effective (`_eff`): both sides as directions in the residual stream —
    the head's through the norm it reads after (γ ⊙ d, centred for LayerNorm), the neuron's read
    vectors through norm2 (γ ⊙ w, centred for LayerNorm); W_out writes to the residual as it is."""
    D = directions.reshape(-1, directions.shape[-1]).double()
    neurons = np.atleast_1d(np.asarray(neurons))
    if len(neurons) != len(D):
        raise ValueError(f"direction_cosines: {len(D)} directions but {len(neurons)} neurons")
    if D.shape[1] != weights.w["W_out"].shape[1]:
        return [{} for _ in range(len(D))]  # not a residual-width direction (e.g. a probe on MLP neurons)
    out: list[dict] = []
    for lo in range(0, len(D), chunk):  # bounded memory: chunk × d_mlp cosines per set at a time
        part, ns = D[lo : lo + chunk], neurons[lo : lo + chunk]
        got = weight_cosines(part, weights.raw, ns, suffix, seed=seed, norms=weights.norms)
        for g, n in zip(got, ns):
            g[f"cos_win_wout{suffix}"] = float(weights.win_wout[int(n)])
        effective = weights.surface.residual_direction(read_hook, part.T)  # the chunk's columns at once
        if effective is not None:
            eff = weight_cosines(effective.T, weights.eff, ns, suffix, seed=seed, norms=weights.norms)
            for g, e in zip(got, eff):
                g.update({k: v for k, v in e.items() if not k.startswith("cos_null")})
        out += got
    return out


def pearson(x, y) -> tuple[float, float]:
    """r and its two-sided p-value (t test, n − 2 df: scipy.stats.pearsonr's, without its per-call overhead —
    this runs several times per probe)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    x, y = x - x.mean(), y - y.mean()
    r = float(np.clip(x @ y / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))
    df = len(x) - 2
    if df < 1:
        return r, 1.0
    t = abs(r) * np.sqrt(df / (1.0 - r * r)) if abs(r) < 1 else np.inf
    return r, float(2 * special.stdtr(df, -t))


def projections(act, readout, mlp_in, w_pre, b_pre, resid_final, w_out, suffix: str = "") -> dict:
    """Correlations of the neuron with its readout, its own input projection and its output direction.

    All arrays are at the target position and from one model: `act` the neuron, `mlp_in` what its MLP
    reads (norm2 with its affine), `resid_final` the residual entering the final norm."""
    ident = np.asarray(mlp_in, np.float64) @ w_pre.numpy() + float(b_pre)
    u = w_out.numpy() / np.linalg.norm(w_out.numpy())
    out = {}
    for name, x in (("proj_readout", readout), ("identity", ident), ("proj_wout", np.asarray(resid_final, np.float64) @ u)):
        out[f"{name}_r{suffix}"], out[f"{name}_p{suffix}"] = pearson(act, x)
    return out


def patch_grid(y_train: np.ndarray, kind: str, n: int, scales) -> np.ndarray:
    if kind == "quantiles":
        return np.quantile(y_train, (np.arange(n) + 1) / (n + 1))
    return np.asarray(scales, np.float64)


def fit_patch(points: pd.DataFrame) -> dict:
    """Δpred = slope·Δact + b over all (text, grid value) points; plus the spread of per-text slopes."""
    dx, dy = points["delta_act"].to_numpy(np.float64), points["delta_pred"].to_numpy(np.float64)
    if np.ptp(dx) == 0:
        return {"patch_slope": float("nan"), "patch_slope_lo": float("nan"), "patch_slope_hi": float("nan"),
                "patch_intercept": float("nan"), "patch_r2": float("nan"),
                "patch_slope_text_std": float("nan"), "patch_slope_text_median": float("nan")}
    slope, intercept = np.polyfit(dx, dy, 1)
    resid = dy - (slope * dx + intercept)
    r2 = 1 - resid.var() / dy.var() if dy.var() > 0 else float("nan")
    texts, inv = np.unique(points["text_id"].to_numpy(), return_inverse=True)  # per-text least squares, from sums
    n, sx, sy = (np.bincount(inv, w, len(texts)) for w in (np.ones_like(dx), dx, dy))
    sxx, sxy = np.bincount(inv, dx * dx, len(texts)), np.bincount(inv, dx * dy, len(texts))
    var = sxx - sx**2 / n
    spread = var > 1e-12 * np.maximum(sxx, 1e-300)  # a text whose grid moved the neuron at all
    per_text = (sxy - sx * sy / n)[spread] / var[spread]
    lo, hi = slope_interval(points["text_id"].to_numpy(), dx, dy)
    return {"patch_slope": float(slope), "patch_slope_lo": lo, "patch_slope_hi": hi,
            "patch_intercept": float(intercept), "patch_r2": float(r2),
            "patch_slope_text_std": float(np.std(per_text)) if len(per_text) else float("nan"),
            "patch_slope_text_median": float(np.median(per_text)) if len(per_text) else float("nan")}


@dataclass
class Probe:
    """A fitted probe as the patching analyses see it: its neuron, head and head map."""

    neuron: int
    head: LinearHead
    hmap: HeadMap


def probe_patching(engine: LastPosition, probes: list[Probe], grids: dict[int, np.ndarray], scale: bool,
                   text_ids: np.ndarray) -> tuple[list[pd.DataFrame], list[float]]:
    """Exact patching points and the first-order estimate of every probe, from one frozen base model.

    The patched features of each (neuron, grid value, text) are computed once (`engine.features`) and read
    by every probe of that neuron — every head, real or shuffled. `grids[n]`: neuron n's grid (G values to
    set, or scale factors of its own value)."""
    neurons = np.array(sorted({p.neuron for p in probes}))
    col = {int(n): j for j, n in enumerate(neurons)}
    acts = engine.activations(neurons)  # B × N, the patched hook at each text's last position
    G = len(next(iter(grids.values())))
    values = torch.stack([acts[:, col[n]][:, None] * torch.as_tensor(grids[n]) if scale else
                          torch.as_tensor(grids[n], dtype=torch.float64).expand(len(text_ids), -1)
                          for n in neurons.tolist()], 1)  # B × N × G
    points: list[pd.DataFrame | None] = [None] * len(probes)
    step = engine.neurons_per_step(G)
    base = None
    for lo in range(0, len(neurons), step):
        feats, base = engine.features(neurons[lo : lo + step], values[:, lo : lo + step])
        for i, p in enumerate(probes):
            j = col[p.neuron] - lo
            if 0 <= j < feats.shape[1]:  # the unpatched features in the same call: same rounding
                pred = p.hmap.predict(p.head(torch.cat([base[:, None], feats[:, j]], 1))).numpy()  # B × (1 + G)
                pred0, pred = pred[:, 0], (pred[:, 1:] if engine.reachable else pred[:, :1].repeat(G, 1))
                points[i] = _points(text_ids, grids[p.neuron], acts[:, j + lo].numpy(),
                                    values[:, j + lo].numpy(), pred0, pred)
    assert base is not None
    grad = engine.feature_gradient(neurons)  # B × N × d_f
    estimates = [float((_prediction_gradient(p, base) * grad[:, col[p.neuron]]).sum(1).mean()) for p in probes]
    return [p for p in points if p is not None], estimates


def _points(text_ids, grid, act_base, act_patched, pred_base, pred_patched) -> pd.DataFrame:
    """The raw patching points of one probe: texts × grid values."""
    B, G = act_patched.shape
    points = pd.DataFrame({
        "text_id": np.repeat(np.asarray(text_ids, np.int64), G), "grid_value": np.tile(np.asarray(grid, np.float64), B),
        "act_base": np.repeat(act_base, G), "act_patched": act_patched.reshape(-1),
        "pred_base": np.repeat(pred_base, G), "pred_patched": pred_patched.reshape(-1)})
    points["delta_act"] = points["act_patched"] - points["act_base"]
    points["delta_pred"] = points["pred_patched"] - points["pred_base"]
    return points


def _prediction_gradient(p: Probe, features: torch.Tensor) -> torch.Tensor:
    """B × d_f: d prediction / d features of a probe — σ·w for regression; Wᵀ(p ⊙ (values − pred)) binned."""
    W = p.head.weight.double()
    if p.hmap.head == "regression":
        return (p.hmap.sigma * W[0]).expand(features.shape[0], -1)
    probs = torch.softmax(p.head(features).double(), -1)
    values = torch.as_tensor(p.hmap.values, dtype=torch.float64)
    return (probs * (values[None, :] - (probs @ values)[:, None])) @ W


def unreachable_patch(probe: bool = True) -> dict:
    """The patch columns of a predictor whose inputs have no path from the neuron (another model, the text's
    own tokens, or the residual before the layer): Δprediction ≡ 0, so the slope is exactly 0 (and so is a
    probe's first-order estimate)."""
    return {"patch_slope": 0.0, "patch_slope_lo": 0.0, "patch_slope_hi": 0.0, "patch_intercept": 0.0,
            "patch_r2": float("nan"), "patch_slope_text_std": 0.0, "patch_slope_text_median": 0.0,
            **({"patch_slope_est": 0.0} if probe else {})}


def run_patching(predict_with_patch, text_ids: np.ndarray, act_base: np.ndarray, grid: np.ndarray,
                 scale: bool) -> pd.DataFrame:
    """One batched forward unpatched, then one per grid value; the raw points."""
    pred_base = predict_with_patch(None)
    rows = []
    for g in grid:
        value = torch.as_tensor(act_base * g if scale else np.full(len(text_ids), g))
        pred = predict_with_patch(value)
        rows.append(pd.DataFrame({
            "text_id": text_ids, "grid_value": float(g), "act_base": act_base, "act_patched": value.numpy(),
            "pred_base": pred_base, "pred_patched": pred,
        }))
    points = pd.concat(rows, ignore_index=True)
    points["delta_act"] = points["act_patched"] - points["act_base"]
    points["delta_pred"] = points["pred_patched"] - points["pred_base"]
    return points


def residual_change(delta: np.ndarray, head_dir: torch.Tensor, act: np.ndarray, w_in, w_out) -> dict:
    """Fine-tuned minus original final residual at the head's read position: along the head's (effective)
    direction in the residual stream, and its mean's cosines with the original neuron's W_in and W_out."""
    u = head_dir.numpy() / np.linalg.norm(head_dir.numpy())
    along = delta @ u
    r, p = pearson(along, act)
    mean = torch.as_tensor(delta.mean(0))
    return {
        "resid_change_along_head_mean": float(along.mean()),
        "resid_change_along_head_r": r, "resid_change_along_head_p": p,
        "resid_change_norm_mean": float(np.linalg.norm(delta, axis=1).mean()),
        "resid_change_cos_win": float(_cos(mean, w_in[:, None])[0]),
        "resid_change_cos_wout": float(_cos(mean, w_out[:, None])[0]),
    }


def test_reads(cache, layer: int, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the projections read from the cache on the test texts: the layer's MLP input and the final residual
    (float64; once for all the probes of a unit)."""
    return tuple(np.asarray(np.asarray(cache.extra[k])[test], np.float64)  # type: ignore[return-value]
                 for k in (f"mlp_in_L{layer}", "resid_final"))


def projection_columns(reads: tuple[np.ndarray, np.ndarray], weights: LayerWeights, neuron: int, readout: np.ndarray,
                       act: np.ndarray) -> dict:
    """The original neuron in the original model (`act`), on the test split at the target position: its
    correlations with the head's readout in the original model (`readout`, test texts), with its own input
    projection and with the final residual on its write vector (both from the cache: `test_reads`)."""
    n, w = neuron, weights.w
    return projections(act, readout, reads[0], w["W_pre"][:, n], w["b_pre"][n], reads[1], w["W_out"][n])


def analyse(cache, base, final, spec, hmap, preds: pd.DataFrame, splits: dict, real: np.ndarray
            ) -> tuple[dict, pd.DataFrame]:
    """The analysis columns of an unfrozen trial, and its raw patching points (probes: `probe_patching`).

    One model at a time: the original neuron in the original model (cosines with the base weights; the
    readout of the frozen head on the original model's features; projections from the cache), and — as
    `_ft` columns — the fine-tuned neuron in the fine-tuned model. Every projection is read at the target
    position (the text's last token); patching runs in the final model, based at the neuron's value
    there, over a grid from that neuron's own train distribution."""
    from .cache import mlp_input_hook, neuron_hook
    from .forward import TrialModel

    L, n = spec.layer, spec.neuron
    test = splits["test"]
    direction = readout_direction(final.head.weight.double(), hmap)
    original = TrialModel(base, final.head, final.read_hook, final.seqs, final.answer_pos, final.target_pos, L,
                          final.hook, n, final.pad_id)
    readout = hmap.readout(original.batched(test)[0]).numpy()
    base_w, ft_w = LayerWeights(base, L), LayerWeights(final.surface, L)
    out = direction_cosines(base_w, spec.read_hook, direction, n)[0] | \
        projection_columns(test_reads(cache, L, test), base_w, n, readout, real[test])
    out.update(direction_cosines(ft_w, spec.read_hook, direction, n, suffix="_ft")[0])
    act, mlp_in = neuron_hook(L, final.hook), mlp_input_hook(L)
    _, got = final.batched(test, reads=(act, mlp_in, "ln_final.hook_in"))
    wf = ft_w.w
    out.update(projections(got[act][:, n].numpy(), preds["readout"].to_numpy()[test], got[mlp_in].numpy(),
                           wf["W_pre"][:, n], wf["b_pre"][n], got["ln_final.hook_in"].numpy(), wf["W_out"][n],
                           suffix="_ft"))
    out.update(_residual_change(base, final, direction, test, real, base_w.w))
    sample = test[: spec.analysis.patch_texts]
    actual_ft = preds["actual_ft"].to_numpy()
    grid = patch_grid(actual_ft[splits["train"]], spec.analysis.patch_grid, spec.analysis.n_grid, spec.analysis.scales)  # the final model's neuron
    points = run_patching(lambda v: hmap.predict(final.run(sample, v)[0]).numpy(), sample, actual_ft[sample], grid,
                          scale=spec.analysis.patch_grid == "scale")
    out.update(fit_patch(points))
    return out, points


def _residual_change(base, final, direction: torch.Tensor, test: np.ndarray, real: np.ndarray, w: dict) -> dict:
    """What training did to the final residual at the head's read position, against the original model."""
    from .forward import read_points

    seqs = [final.seqs[i] for i in test]
    at = final.answer_pos[test]
    before, after = (read_points(s, seqs, at, ["ln_final.hook_in"], final.pad_id)["ln_final.hook_in"]
                     for s in (base, final.surface))
    head_dir = final.surface.residual_direction("ln_final.hook_out", direction)
    return residual_change(after - before, head_dir, real[test], w["W_in"][:, final.neuron], w["W_out"][final.neuron])
