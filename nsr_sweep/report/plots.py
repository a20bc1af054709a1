"""Figures computed from saved tables (never from in-memory state), so a plot always matches its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..core.controls import OUTSIDERS, REAL, SHUFFLED, gap_columns  # noqa: E402


def trial_chart(result) -> bytes:
    """A finished trial's diagnostics.png, as bytes (drawn by the worker that ran it)."""
    import io

    s, png = result.spec, io.BytesIO()
    diagnostics_png(result.preds, result.metrics, f"layer {s.layer} neuron {s.neuron} — {s.head} / freeze {s.freeze}", png)
    return png.getvalue()


def diagnostics_png(preds: pd.DataFrame, metrics: dict, title: str, path: Path | BinaryIO) -> None:
    """The 4-panel chart: pred vs actual (y = x), error histogram, both distributions, error vs actual."""
    test = preds[preds["split"] == "test"]
    actual, pred = test["actual_orig"].to_numpy(), test["pred"].to_numpy()
    err = pred - actual
    fig, ax = plt.subplots(2, 2, figsize=(10, 8))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.91, wspace=0.25, hspace=0.32)
    lo, hi = float(min(actual.min(), pred.min())), float(max(actual.max(), pred.max()))
    ax[0, 0].scatter(actual, pred, s=8, alpha=0.5)
    ax[0, 0].plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax[0, 0].set(xlabel="actual activation (original model)", ylabel="prediction", title="Prediction vs actual")
    ax[0, 0].legend(loc="upper left")
    ax[0, 1].hist(err, bins=40, color="tab:red", alpha=0.7, histtype="stepfilled")
    ax[0, 1].axvline(0, color="k", lw=1)
    ax[0, 1].set(xlabel="prediction − actual", ylabel="texts", title="Error histogram")
    bins = np.linspace(lo, hi, 40) if hi > lo else 10
    ax[1, 0].hist(actual, bins=bins, alpha=0.5, label="actual", histtype="stepfilled")
    ax[1, 0].hist(pred, bins=bins, alpha=0.5, label="prediction", histtype="stepfilled")
    ax[1, 0].set(xlabel="activation", ylabel="texts", title="Distributions")
    ax[1, 0].legend()
    ax[1, 1].scatter(actual, err, s=8, alpha=0.5, color="tab:purple")
    ax[1, 1].axhline(0, color="k", lw=1)
    ax[1, 1].set(xlabel="actual activation", ylabel="prediction − actual", title="Error vs actual")
    box = (f"r = {metrics.get('pearson_r', float('nan')):.3f}\nMSE = {metrics.get('mse', float('nan')):.4g}\n"
           f"offset = {metrics.get('offset', float('nan')):.4g}\ndrift = {metrics.get('drift', float('nan')):.4g}")
    ax[0, 0].text(0.97, 0.03, box, transform=ax[0, 0].transAxes, ha="right", va="bottom", family="monospace",
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    fig.suptitle(f"{title} — test split, {len(test)} texts")
    fig.savefig(path, dpi=72, format="png")
    plt.close(fig)


# -- report figures --------------------------------------------------------------------------

HEATMAP_METRICS = ["pearson_r", "skill", "patch_slope", "offset", "drift", "mse"]


def _combos(df: pd.DataFrame) -> list[str]:
    order = {"regression": 0, "classification": 1, "token": 2, "none": 0, "after_target": 1, "all": 2}
    pairs = sorted({(h, f) for h, f in zip(df["head"], df["freeze"])}, key=lambda p: (order[p[0]], order[p[1]]))
    return [f"{h}/{f}" for h, f in pairs]


def _with_combo(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(combo=df["head"] + "/" + df["freeze"])


def _scatter_by_combo(ax, best: pd.DataFrame, x: str, y: str) -> None:
    b = _with_combo(best)
    for c in _combos(best):
        g = b[b["combo"] == c]
        ax.scatter(g[x], g[y], s=22, alpha=0.8, label=c)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return path


def heatmap(best: pd.DataFrame, metric: str, path: Path) -> Path | None:
    if metric not in best or best[metric].notna().sum() == 0:
        return None
    b = _with_combo(best).assign(row="L" + best["layer"].astype(str) + " N" + best["neuron"].astype(str))
    cols = _combos(best)
    rows = list(dict.fromkeys(b.sort_values(["layer", "neuron"])["row"]))
    if len(rows) > MAX_HEATMAP_ROWS:
        return None  # unreadable at this scale: `distributions` summarises instead
    grid = b.pivot_table(index="row", columns="combo", values=metric, aggfunc="first").reindex(index=rows, columns=cols)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.2 + 0.32 * len(rows)))
    v = grid.to_numpy(dtype=float)
    signed = metric in ("pearson_r", "skill", "patch_slope", "offset", "drift")
    lim = np.nanmax(np.abs(v)) if np.isfinite(v).any() else 1
    im = ax.imshow(v, aspect="auto", cmap="RdBu_r" if signed else "viridis",
                   vmin=-lim if signed else None, vmax=lim if signed else None)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if v.size <= 400:
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"{metric}: best trial per neuron × head/freeze")
    fig.subplots_adjust(left=0.18, bottom=0.25, top=0.92)
    return _save(fig, path)


MAX_HEATMAP_ROWS = 200


def depth_curves(best: pd.DataFrame, path: Path) -> Path | None:
    metrics = [m for m in ("pearson_r", "skill", "patch_slope", "patch_slope_est") if m in best and best[m].notna().any()]
    if best.empty or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    combos = _combos(best)
    b = _with_combo(best)
    for ax, m in zip(axes[0], metrics):
        for c in combos:  # the spread over neurons (intervals of the mean: the self-vs-outsiders figure)
            q = b[b["combo"] == c].groupby("layer")[m].quantile([0.25, 0.5, 0.75]).unstack().dropna()
            ax.errorbar(q.index, q[0.5], yerr=np.abs(np.stack([q[0.5] - q[0.25], q[0.75] - q[0.5]])), marker="o",
                        capsize=3, label=c)
        ax.set(xlabel="layer", ylabel=f"{m}: median over neurons (bars: quartiles)", title=f"{m} vs depth")
        ax.set_xticks(sorted(best["layer"].unique()))
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.3)
    return _save(fig, path)


def distributions(best: pd.DataFrame, path: Path) -> Path | None:
    """Per layer and head/freeze, the spread over neurons of test r and of the patch slope (exact where it
    ran, else the first-order estimate): what an every-neuron sweep shows instead of one row per neuron."""
    if best.empty or "pearson_r" not in best:
        return None
    b = _with_combo(best)
    if "patch_slope_est" in b:
        b["patch"] = b["patch_slope"].fillna(b["patch_slope_est"]) if "patch_slope" in b else b["patch_slope_est"]
    elif "patch_slope" in b:
        b["patch"] = b["patch_slope"]
    metrics = [m for m in ("pearson_r", "patch") if m in b and b[m].notna().any()]
    layers, combos = sorted(b["layer"].unique()), _combos(best)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.1 * len(layers) * len(combos) + 2), 3.4 * len(metrics)),
                             squeeze=False)
    width = 0.8 / len(combos)
    for ax, m in zip(axes[:, 0], metrics):
        for j, c in enumerate(combos):
            data = [b[(b["layer"] == L) & (b["combo"] == c)][m].dropna().to_numpy() for L in layers]
            keep = [i for i, d in enumerate(data) if len(d)]
            if not keep:
                continue
            bp = ax.boxplot([data[i] for i in keep], positions=[i + (j - (len(combos) - 1) / 2) * width for i in keep],
                            widths=width * 0.9, patch_artist=True, showfliers=False)
            for patch in bp["boxes"]:
                patch.set_facecolor(f"C{j}")
            ax.plot([], [], color=f"C{j}", lw=6, label=c)
        ax.set_xticks(range(len(layers)), [f"L{L}" for L in layers])
        ax.set(ylabel={"pearson_r": "test r", "patch": "patch slope (exact, else estimate)"}[m],
               title=f"{'test r' if m == 'pearson_r' else 'patch slope'} over neurons, per layer (box: quartiles; "
                     "whiskers: 1.5 IQR)")
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def r_vs_patch(best: pd.DataFrame, path: Path) -> Path | None:
    if "patch_slope" not in best or best["patch_slope"].notna().sum() == 0:
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    _scatter_by_combo(ax, best, "pearson_r", "patch_slope")
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    kw: dict[str, Any] = dict(transform=ax.transAxes, fontsize=9, color="dimgray")
    ax.text(0.98, 0.97, "reads the neuron", ha="right", va="top", **kw)
    ax.text(0.98, 0.03, "recomputes it from context", ha="right", va="bottom", **kw)
    ax.text(0.02, 0.5, "fails", ha="left", va="center", **kw)
    ax.set(xlabel="test Pearson r (prediction vs neuron)", ylabel="patch slope (Δprediction / Δactivation)",
           title="Correlation vs causal use of the neuron")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(left=0.11, right=0.74, bottom=0.11, top=0.92)
    return _save(fig, path)


def offset_vs_drift(best: pd.DataFrame, path: Path) -> Path | None:
    if best.empty or "drift" not in best:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter_by_combo(ax, best, "drift", "offset")
    lim = float(np.nanmax(np.abs(np.r_[best["drift"], best["offset"]]))) or 1.0
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="offset = drift")
    ax.set(xlabel="drift = mean(actual_ft − actual_orig)", ylabel="offset = mean(pred − actual_orig)",
           title="A constant offset that equals the drift: the predictor tracks the drifted neuron")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.92)
    return _save(fig, path)


def cosine_nulls(best: pd.DataFrame, path: Path) -> Path | None:
    cols = [c for c in ("cos_win", "cos_wout") if c in best and best[c].notna().any()]
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(5.5 * len(cols), 4), squeeze=False)
    sd = float(best["cos_null_random_std"].mean())
    xs = np.linspace(-1, 1, 400)
    for ax, c in zip(axes[0], cols):
        ax.hist(best[c].dropna(), bins=30, range=(-1, 1), density=True, alpha=0.6, histtype="stepfilled",
                label=f"{c} (best trials)")
        ax.plot(xs, np.exp(-0.5 * (xs / sd) ** 2) / (sd * np.sqrt(2 * np.pi)), "k-", lw=1,
                label=f"random directions (sd {sd:.3f})")
        ax.set(xlabel=f"cosine of readout direction with {'W_in[:, n]' if c == 'cos_win' else 'W_out[n, :]'}",
               ylabel="density", title=f"{c} against its random null")
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    return _save(fig, path)


def controls_beside_trials(df: pd.DataFrame, path: Path) -> Path | None:
    if "control" not in df or df["control"].notna().sum() == 0:
        return None
    ok = _with_combo(df[(df["status"] == "ok") & df["best"]]).assign(kind=lambda d: d["control"].fillna("real"))
    metrics = [m for m in ("pearson_r", "patch_slope") if m in ok]
    kinds = ["real"] + sorted(k for k in ok["kind"].unique() if k != "real")
    combos = _combos(ok)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    w = 0.8 / len(kinds)
    for ax, m in zip(axes[0], metrics):
        for i, k in enumerate(kinds):
            means = [ok[(ok["kind"] == k) & (ok["combo"] == c)][m].mean() for c in combos]
            ax.bar(np.arange(len(combos)) + i * w, means, width=w, label=k)
        ax.set_xticks(np.arange(len(combos)) + w * (len(kinds) - 1) / 2, combos, rotation=30, ha="right")
        ax.axhline(0, color="k", lw=0.6)
        ax.set(ylabel=f"mean {m}", title=f"{m}: trials beside their controls")
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.27, top=0.9, wspace=0.25)
    return _save(fig, path)


def self_vs_outsiders(layers: pd.DataFrame, path: Path) -> Path | None:
    """Per head/freeze: mean r over neurons against layer for self, cross-model and input-only (95% intervals that
    leave each shared test text out of every neuron at once)."""
    if layers.empty:
        return None
    combos = _combos(layers)
    cols = min(4, len(combos))
    rows = -(-len(combos) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(combos):]:
        ax.set_visible(False)
    b = _with_combo(layers)
    for ax, c in zip(axes.flat, combos):
        g = b[b["combo"] == c].sort_values("layer")
        for j, (p, style) in enumerate(zip((REAL, *OUTSIDERS), ("-o", "--s", ":^"))):  # a colour per predictor
            name, label, color = p.comparison, p.display, f"C{j}"
            y = g[f"{name}_r"].to_numpy()
            if np.isfinite(y).any():
                err = np.abs(np.stack([y - g[f"{name}_r_lo"].to_numpy(), g[f"{name}_r_hi"].to_numpy() - y]))
                ax.errorbar(g["layer"], y, yerr=np.nan_to_num(err), fmt=style, color=color, capsize=3, label=label)
        ax.set(title=c, xlabel="layer")
        ax.set_xticks(sorted(layers["layer"].unique()))
        ax.axhline(0, color="k", lw=0.5)
    for row in axes:
        row[0].set_ylabel("mean test r (95% CI)")
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.92, wspace=0.08, hspace=0.45)
    return _save(fig, path)


def gap_distributions(comp: pd.DataFrame, path: Path) -> Path | None:
    """Per head/freeze and layer, the distribution over neurons of the gaps self − cross-model and
    self − input-only in test r; a neuron whose gap survives the multiple-comparison control is a dot."""
    gaps = [g for g in gap_columns() if g in comp and comp[g].notna().any()]
    if comp.empty or not gaps:
        return None
    combos = _combos(comp)
    layers = sorted(comp["layer"].unique())
    fig, axes = plt.subplots(1, len(combos), figsize=(max(5.0, 0.9 * len(layers) * len(gaps) + 2) * len(combos), 4),
                             squeeze=False, sharey=True)
    b = _with_combo(comp)
    width = 0.8 / len(gaps)
    for ax, c in zip(axes[0], combos):
        for j, gcol in enumerate(gaps):
            for i, L in enumerate(layers):
                sel = b[(b["combo"] == c) & (b["layer"] == L)]
                v = sel[gcol].dropna().to_numpy()
                if not len(v):
                    continue
                x = i + (j - (len(gaps) - 1) / 2) * width
                bp = ax.boxplot([v], positions=[x], widths=width * 0.9, patch_artist=True, showfliers=False)
                bp["boxes"][0].set_facecolor(f"C{j + 1}")
                hit = sel[(sel[f"{gcol}_q"] <= 0.05)][gcol].dropna()
                ax.scatter(np.full(len(hit), x), hit, s=6, color="k", alpha=0.5, zorder=3)
        for j, gcol in enumerate(gaps):
            ax.plot([], [], color=f"C{j + 1}", lw=6, label=dict(zip(gap_columns(), (f"self − {c.display}"
                                                                                    for c in OUTSIDERS)))[gcol])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(layers)), [f"L{L}" for L in layers])
        ax.set(title=c, ylabel="gap in test r, per neuron")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def report_figures(df: pd.DataFrame, best: pd.DataFrame, fig_dir: Path, spec) -> list[tuple[Path, str]]:
    if best.empty:
        return []
    out = []
    for m in HEATMAP_METRICS:
        p = heatmap(best, m, fig_dir / f"heatmap_{m}.png")
        if p:
            out.append((p, f"Heatmap of {m} over neurons × head/freeze (best trial per group)."))
    candidates = [
        (depth_curves(best, fig_dir / "depth_curves.png"), "Metrics against layer, per head/freeze (median over neurons, bars: quartiles): how deep self-report works."),
        (distributions(best, fig_dir / "distributions.png"), "Per layer, the spread over neurons of test r and of the patch slope."),
        (r_vs_patch(best, fig_dir / "r_vs_patch_slope.png"), "Correlation against patching slope: reads the neuron / recomputes it / fails."),
        (offset_vs_drift(best, fig_dir / "offset_vs_drift.png"), "Offset against drift: a constant gap explained by the fine-tuned neuron moving."),
        (cosine_nulls(best, fig_dir / "cosine_nulls.png"), "Weight cosines of readout directions against random-direction nulls."),
        (controls_beside_trials(df, fig_dir / "controls.png"), "Trials beside their controls (best per group)."),
    ]
    return out + [(p, c) for p, c in candidates if p]


# -- one neuron's page (nsr-sweep neuron) -------------------------------------------------------


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, format="png")
    plt.close(fig)
    return buf.getvalue()


def _small_multiples(n: int, cols: int = 4, size: tuple[float, float] = (2.8, 2.6)):
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.1 if cols > 1 else 0.2, right=0.97, bottom=0.16 / rows ** 0.5, top=1 - 0.17 / rows ** 0.5,
                        wspace=0.35, hspace=0.6)
    return fig, list(axes.flat[:n])


def _interval(v: float, lo: float, hi: float) -> str:
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{v:.2f}"


def slope_text(v: float, lo: float = np.nan, hi: float = np.nan) -> str:
    """A patch slope (and its interval) with the digits it needs: 0.98, 0.031, -0.0012."""
    f = lambda x: f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"  # noqa: E731
    return f(v) + (f" [{f(lo)}, {f(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def prediction_scatter(probes: pd.DataFrame, preds: pd.DataFrame) -> bytes | None:
    """Probes of one role on the neuron's test texts: prediction against actual (y = x dashed), one small panel per
    head/freeze, its test r and interval in the title."""
    if probes.empty:
        return None
    fig, axes = _small_multiples(len(probes))
    for ax, row in zip(axes, probes.itertuples(index=False)):
        p = preds[preds["trial_id"] == row.trial_id]
        ax.scatter(p["actual_orig"], p["pred"], s=7, alpha=0.6)
        both = np.r_[p["actual_orig"], p["pred"]]
        if len(both):
            ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=0.8)
        lo, hi = (getattr(row, c, np.nan) for c in ("pearson_r_lo", "pearson_r_hi"))
        ax.set_title(f"{row.head}/{row.freeze}\nr = {_interval(row.pearson_r, lo, hi)}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("permuted target" if row.role == SHUFFLED.role else "actual activation", fontsize=7)
    axes[0].set_ylabel("prediction", fontsize=7)
    return _png(fig)


def patch_curves(probes: pd.DataFrame, patch: pd.DataFrame) -> bytes | None:
    """Per patched probe: Δprediction against Δactivation over the grid (texts × grid values), the mean per grid
    value, the fitted slope with its interval, and slope 1 (reads the neuron) for reference."""
    rows = [r for r in probes.itertuples(index=False) if r.trial_id in set(patch["trial_id"])]
    if not rows:
        return None
    fig, axes = _small_multiples(len(rows))
    for ax, row in zip(axes, rows):
        p = patch[patch["trial_id"] == row.trial_id]
        ax.scatter(p["delta_act"], p["delta_pred"], s=5, alpha=0.3, color="C0")
        g = p.groupby("grid_value")[["delta_act", "delta_pred"]].mean().sort_values("delta_act")
        ax.plot(g["delta_act"], g["delta_pred"], "o-", ms=3, lw=1, color="C1")
        xs = np.array([p["delta_act"].min(), p["delta_act"].max()])
        ax.plot(xs, xs, ":", color="grey", lw=0.8)
        if np.isfinite(row.patch_slope):
            ax.plot(xs, row.patch_slope * xs + np.nan_to_num(row.patch_intercept), "k-", lw=1)
        ax.set_title(f"{row.label}\nslope {slope_text(row.patch_slope, row.patch_slope_lo, row.patch_slope_hi)}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("Δactivation", fontsize=7)
    axes[0].set_ylabel("Δprediction", fontsize=7)
    return _png(fig)
