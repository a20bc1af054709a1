"""Does the predictor *use* the neuron? (DESIGN.md §1: directions and cosines, projections, patching.)

Every function here takes a finished trial's context and returns columns for the trial table:
- `readout_direction` and `weight_cosines`: the head's direction in residual space against the
  neuron's input and output weights, with z-scores against other neurons and random directions;
- `projections`: Pearson r (and p) of the neuron with the readout, with LN2(resid_mid)·W_in[:, n]
  (`identity_r`, exactly 1 for `hook: pre`) and with the final residual on W_out[n, :];
- `patch`: set the neuron at the target position to each value of a grid in the trial's *final*
  model, one batched forward per grid value, and fit Δprediction = slope·Δactivation + b;
  `patch_slope_estimate`: for probes, the same slope to first order, from the layer's Jacobian;
- `residual_change`: for unfrozen trials, what fine-tuning did to the final residual.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .uncertainty import slope_interval


def readout_direction(head_weight: torch.Tensor, hmap) -> torch.Tensor:
    """Regression: the weight vector. Binned heads: Σₖ (valueₖ − v̄)·wₖ over the class (or digit-unembedding) vectors."""
    w = head_weight.double()  # n_out × d
    if hmap.head == "regression":
        return w[0]
    values = torch.as_tensor(hmap.values, dtype=torch.float64)
    return (values - values.mean()) @ w


def _cos(a: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """cos(a, each column of B)."""
    return (a @ B) / (a.norm() * B.norm(dim=0)).clamp_min(1e-30)


def weight_cosines(direction: torch.Tensor, vectors: dict[str, torch.Tensor], neuron: int, suffix: str = "",
                   n_random: int = 1000, seed: int = 0) -> dict:
    """cos(direction, vectors[name][:, n]) for each named [d_model, d_mlp] set, z-scored against the layer's
    other neurons and against random Gaussian directions; columns `cos_<name><suffix>[_z_neurons|_z_random]`."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(direction.shape[0], n_random, generator=gen, dtype=torch.float64)
    null_random = _cos(direction, rand)
    others = torch.tensor([m for m in range(next(iter(vectors.values())).shape[1]) if m != neuron])
    out: dict = {}
    for name, V in vectors.items():
        c_all = _cos(direction, V)
        c, null = float(c_all[neuron]), c_all[others]
        out[f"cos_{name}{suffix}"] = c
        out[f"cos_{name}{suffix}_z_neurons"] = float((c - null.mean()) / null.std())
        out[f"cos_{name}{suffix}_z_random"] = float((c - null_random.mean()) / null_random.std())
    out[f"cos_null_random_std{suffix}"] = float(null_random.std())
    out[f"cos_null_n_neurons{suffix}"] = len(others)
    return out


def direction_cosines(surface, read_hook: str, direction: torch.Tensor, layer: int, neuron: int, seed: int = 0,
                      suffix: str = "") -> dict:
    """The head's readout direction against the neuron's weights in `surface` (DESIGN §1), raw and effective.

    Raw: the direction in the head's feature basis against W_in[:, n] (the up projection), W_gate[:, n]
    (gated MLPs) and W_out[n, :]. Effective (`_eff`): both sides as directions in the residual stream —
    the head's through the norm it reads after (γ ⊙ d, centred for LayerNorm), the neuron's read
    vectors through norm2 (γ ⊙ w, centred for LayerNorm); W_out writes to the residual as it is."""
    w = surface.neuron_weights(layer)
    if direction.shape[0] != w["W_out"].shape[1]:
        return {}  # not a residual-width direction (e.g. a probe on MLP neurons)
    raw = {"win": w["W_in"], "wout": w["W_out"].T} | ({"wgate": w["W_gate"]} if "W_gate" in w else {})
    out = weight_cosines(direction, raw, neuron, suffix, seed=seed)
    out[f"cos_win_wout{suffix}"] = float(_cos(w["W_in"][:, neuron], w["W_out"][neuron][:, None])[0])
    eff_dir = surface.residual_direction(read_hook, direction)
    if eff_dir is not None:
        ln2 = surface.ln2(layer)
        eff = {"win_eff": surface.effective(ln2, w["W_in"]), "wout_eff": w["W_out"].T}
        if "W_gate" in w:
            eff["wgate_eff"] = surface.effective(ln2, w["W_gate"])
        got = weight_cosines(eff_dir, eff, neuron, suffix, seed=seed)
        out.update({k: v for k, v in got.items() if not k.startswith("cos_null")})
    return out


def pearson(x, y) -> tuple[float, float]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    r, p = stats.pearsonr(x, y)
    return float(r), float(p)


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
    dx, dy = points["delta_act"].to_numpy(), points["delta_pred"].to_numpy()
    if np.ptp(dx) == 0:
        return {"patch_slope": float("nan"), "patch_slope_lo": float("nan"), "patch_slope_hi": float("nan"),
                "patch_intercept": float("nan"), "patch_r2": float("nan"),
                "patch_slope_text_std": float("nan"), "patch_slope_text_median": float("nan")}
    slope, intercept = np.polyfit(dx, dy, 1)
    resid = dy - (slope * dx + intercept)
    r2 = 1 - resid.var() / dy.var() if dy.var() > 0 else float("nan")
    per_text = [np.polyfit(g["delta_act"], g["delta_pred"], 1)[0] for _, g in points.groupby("text_id")
                if np.ptp(g["delta_act"].to_numpy()) > 0]
    lo, hi = slope_interval(points["text_id"].to_numpy(), dx, dy)
    return {"patch_slope": float(slope), "patch_slope_lo": lo, "patch_slope_hi": hi,
            "patch_intercept": float(intercept), "patch_r2": float(r2),
            "patch_slope_text_std": float(np.std(per_text)), "patch_slope_text_median": float(np.median(per_text))}


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


def analyse(cache, base, final, trained: bool, spec, hmap, preds: pd.DataFrame, splits: dict,
            real: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """The analysis columns of DESIGN §1 for one trial, and the raw patching points.

    One model at a time: the original neuron in the original model (cosines with the base weights;
    projections from the cache), and — for a trained model, as `_ft` columns — the fine-tuned neuron
    in the fine-tuned model. Every projection is read at the target position (the text's last token);
    patching runs in the final model, based at the real neuron's value there."""
    from .cache import mlp_input_hook, neuron_hook

    L, n = spec.layer, spec.neuron
    test = splits["test"]
    direction = readout_direction(final.head.weight.double(), hmap)
    out: dict = direction_cosines(base, spec.read_hook, direction, L, n, seed=spec.seed)
    readout = preds["readout"].to_numpy()[test]
    w = base.neuron_weights(L)
    out.update(projections(real[test], readout, np.asarray(cache.extra[f"mlp_in_L{L}"])[test], w["W_pre"][:, n],
                           w["b_pre"][n], np.asarray(cache.extra["resid_final"])[test], w["W_out"][n]))
    if trained:
        ft = final.surface
        out.update(direction_cosines(ft, spec.read_hook, direction, L, n, seed=spec.seed, suffix="_ft"))
        act, mlp_in = neuron_hook(L, final.hook), mlp_input_hook(L)
        _, got = final.batched(test, reads=(act, mlp_in, "ln_final.hook_in"))
        wf = ft.neuron_weights(L)
        out.update(projections(got[act][:, n].numpy(), readout, got[mlp_in].numpy(), wf["W_pre"][:, n],
                               wf["b_pre"][n], got["ln_final.hook_in"].numpy(), wf["W_out"][n], suffix="_ft"))
        out.update(_residual_change(base, final, direction, test, real))
    sample = test[: spec.patch_texts]
    if not trained:  # a probe: the base model's Jacobian, shared by every probe of the layer
        out["patch_slope_est"] = patch_slope_estimate(final, hmap, sample)
    if not spec.exact_patch:
        return out, None
    grid = patch_grid(real[splits["train"]], spec.patch_grid, spec.n_grid, spec.scales)
    act_base = preds["actual_ft"].to_numpy()[sample]  # the real neuron in the final model
    points = run_patching(lambda v: hmap.predict(final.run(sample, v)[0]).numpy(), sample, act_base, grid,
                          scale=spec.patch_grid == "scale")
    out.update(fit_patch(points))
    return out, points


def patch_slope_estimate(final, hmap, sample: np.ndarray) -> float:
    """First-order patching (as attribution patching): the mean over the patching texts of d prediction /
    d activation at each text's own activation — the head's gradient in feature space (σ·w for
    regression; Wᵀ(p ⊙ (values − pred)) for the binned heads) through ∂features/∂neuron."""
    f, J = final.jacobian(sample)  # n × d_f, n × d_f × d_mlp
    column = J[:, :, final.neuron].double()  # ∂features/∂(this neuron), per text
    out = final.head(f).double()
    W = final.head.weight.double()  # n_out × d_f
    if hmap.head == "regression":
        grad_f = hmap.sigma * W[0].expand(len(sample), -1)
    else:
        p = torch.softmax(out, -1)
        values = torch.as_tensor(hmap.values, dtype=torch.float64)
        grad_f = (p * (values[None, :] - (p @ values)[:, None])) @ W  # ∂(p·values)/∂logits = p ⊙ (values − pred)
    return float((grad_f * column).sum(1).mean())


def _residual_change(base, final, direction: torch.Tensor, test: np.ndarray, real: np.ndarray) -> dict:
    """What training did to the final residual at the head's read position, against the original model."""
    from .forward import read_points

    seqs = [final.seqs[i] for i in test]
    at = final.answer_pos[test]
    before, after = (read_points(s, seqs, at, ["ln_final.hook_in"], final.pad_id)["ln_final.hook_in"]
                     for s in (base, final.surface))
    head_dir = final.surface.residual_direction("ln_final.hook_out", direction)
    w = base.neuron_weights(final.layer)
    return residual_change(after - before, head_dir, real[test], w["W_in"][:, final.neuron], w["W_out"][final.neuron])
