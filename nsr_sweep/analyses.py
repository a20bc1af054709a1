"""Does the predictor *use* the neuron? (DESIGN.md §1: directions and cosines, projections, patching.)

Every function here takes a finished trial's context and returns columns for the trial table:
- `readout_direction` and `weight_cosines`: the head's direction in residual space against the
  neuron's input and output weights, with z-scores against other neurons and random directions;
- `projections`: Pearson r (and p) of the neuron with the readout, with LN2(resid_mid)·W_in[:, n]
  (`identity_r`, exactly 1 for `hook: pre`) and with the final residual on W_out[n, :];
- `patch`: set the neuron at the target position to each value of a grid in the trial's *final*
  model, one batched forward per grid value, and fit Δprediction = slope·Δactivation + b;
- `residual_change`: for unfrozen trials, what fine-tuning did to the final residual.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from scipy import stats


def neuron_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_in [d_model, d_mlp], b_in [d_mlp], W_out [d_mlp, d_model]) of a layer, as the HF model holds them."""
    mlp = model.hf.transformer.h[layer].mlp  # GPT-2 Conv1D: x @ weight
    return mlp.c_fc.weight.detach().double(), mlp.c_fc.bias.detach().double(), mlp.c_proj.weight.detach().double()


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


def weight_cosines(direction: torch.Tensor, W_in: torch.Tensor, W_out: torch.Tensor, neuron: int,
                   n_random: int = 1000, seed: int = 0) -> dict:
    """cos with W_in[:, n] and W_out[n, :], z-scored against the layer's other neurons and random directions."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(direction.shape[0], n_random, generator=gen, dtype=torch.float64)
    null_random = _cos(direction, rand)
    others = torch.tensor([m for m in range(W_in.shape[1]) if m != neuron])
    out = {}
    for name, vectors in (("win", W_in), ("wout", W_out.T)):
        c_all = _cos(direction, vectors)
        c, null = float(c_all[neuron]), c_all[others]
        out[f"cos_{name}"] = c
        out[f"cos_{name}_z_neurons"] = float((c - null.mean()) / null.std())
        out[f"cos_{name}_z_random"] = float((c - null_random.mean()) / null_random.std())
    out["cos_win_wout"] = float(_cos(W_in[:, neuron], W_out[neuron][:, None])[0])
    out["cos_null_random_std"] = float(null_random.std())
    out["cos_null_n_neurons"] = len(others)
    return out


def pearson(x, y) -> tuple[float, float]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    r, p = stats.pearsonr(x, y)
    return float(r), float(p)


def projections(act, readout, mlp_in, w_in, b_in, resid_final, w_out) -> dict:
    """Correlations of the neuron with its readout, its own input projection and its output direction."""
    ident = np.asarray(mlp_in, np.float64) @ w_in.numpy() + float(b_in)
    u = w_out.numpy() / np.linalg.norm(w_out.numpy())
    out = {}
    for name, x in (("readout", readout), ("identity", ident), ("wout", np.asarray(resid_final, np.float64) @ u)):
        r, p = pearson(act, x)
        key = "identity" if name == "identity" else f"proj_{name}"
        out[f"{key}_r"], out[f"{key}_p"] = r, p
    return out


@contextmanager
def patched(act_module, hook: str, positions: torch.Tensor, neuron: int, value: torch.Tensor | float | None):
    """Set one neuron at one position per row to `value` (post: the act's output; pre: its input)."""
    if value is None:
        yield
        return
    rows = torch.arange(len(positions))

    def set_value(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, positions, neuron] = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        return x

    if hook == "post":
        h = act_module.register_forward_hook(lambda m, i, o: set_value(o))
    else:
        h = act_module.register_forward_pre_hook(lambda m, args: (set_value(args[0]),) + tuple(args[1:]))
    try:
        yield
    finally:
        h.remove()


def patch_grid(y_train: np.ndarray, kind: str, n: int, scales) -> np.ndarray:
    if kind == "quantiles":
        return np.quantile(y_train, (np.arange(n) + 1) / (n + 1))
    return np.asarray(scales, np.float64)


def fit_patch(points: pd.DataFrame) -> dict:
    """Δpred = slope·Δact + b over all (text, grid value) points; plus the spread of per-text slopes."""
    dx, dy = points["delta_act"].to_numpy(), points["delta_pred"].to_numpy()
    if np.ptp(dx) == 0:
        return {"patch_slope": float("nan"), "patch_intercept": float("nan"), "patch_r2": float("nan"),
                "patch_slope_text_std": float("nan"), "patch_slope_text_median": float("nan")}
    slope, intercept = np.polyfit(dx, dy, 1)
    resid = dy - (slope * dx + intercept)
    r2 = 1 - resid.var() / dy.var() if dy.var() > 0 else float("nan")
    per_text = [np.polyfit(g["delta_act"], g["delta_pred"], 1)[0] for _, g in points.groupby("text_id")
                if np.ptp(g["delta_act"].to_numpy()) > 0]
    return {"patch_slope": float(slope), "patch_intercept": float(intercept), "patch_r2": float(r2),
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
    """Fine-tuned minus original final residual: along the frozen head direction, and its mean's cosines."""
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
