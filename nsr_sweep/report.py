"""`nsr-sweep report DIR`: the tables and pictures researchers decide from, and one HTML file.

Everything is computed from `tables/trials.parquet`, itself rebuilt from the trial directories,
so a report on a running or partial sweep shows what has finished and lists what failed.

    tables/trials.parquet        one row per trial and control
    tables/best.parquet          the best trial per (layer, neuron, head, freeze) by the sweep metric
    tables/pivot_<metric>.{parquet,csv}   neuron × (head, freeze), best trials
    tables/per_layer.{parquet,csv}        mean / median of each metric per layer × head × freeze
    tables/comparison.{parquet,csv}       per neuron: self vs cross-model vs input-only, gaps, 95% intervals
    tables/comparison_by_layer.{parquet,csv}  the same per layer × head × freeze, intervals over neurons
    tables/summary.md            the pivots and the per-layer summary as Markdown
    figures/*.png                heatmaps, depth curves, r vs patch slope, offset vs drift, cosines, controls
    report.html                  self-contained (images embedded), works offline
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import by_layer, comparison
from .results import atomic_write

PIVOT_METRICS = ["pearson_r", "mse", "offset", "patch_slope", "drift", "skill"]
LAYER_METRICS = ["pearson_r", "spearman_rho", "r2", "mse", "offset", "skill", "std_ratio", "patch_slope",
                 "patch_r2", "drift", "identity_r", "proj_readout_r", "proj_wout_r", "cos_win", "cos_wout"]
GROUP = ["layer", "neuron", "head", "freeze"]
FIRST_FIGURES = ("r_vs_patch_slope", "offset_vs_drift")  # right after the answer; the rest follow the overview


def combo_label(head: str, freeze: str) -> str:
    return f"{head}/{freeze}"


def real_trials(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["control"].isna()] if "control" in df else df


def best_trials(df: pd.DataFrame) -> pd.DataFrame:
    ok = real_trials(df)
    return ok[ok["best"]].sort_values(GROUP).reset_index(drop=True)


def pivot(best: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Neuron × (head, freeze) for one metric; flat string columns so it travels through Parquet and CSV."""
    if metric not in best or best.empty:
        return pd.DataFrame()
    p = best.pivot_table(index=["layer", "neuron"], columns=["head", "freeze"], values=metric, aggfunc="first")
    p.columns = [combo_label(h, f) for h, f in p.columns]
    return p.reset_index()


def per_layer(best: pd.DataFrame) -> pd.DataFrame:
    metrics = [m for m in LAYER_METRICS if m in best]
    if best.empty or not metrics:
        return pd.DataFrame()
    g = best.groupby(["layer", "head", "freeze"])[metrics].agg(["mean", "median"])
    g.columns = [f"{m}_{stat}" for m, stat in g.columns]
    g.insert(0, "n_neurons", best.groupby(["layer", "head", "freeze"])["neuron"].nunique())
    return g.reset_index()


def patch_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """How well the first-order estimate `patch_slope_est` agrees with exact patching where a probe has
    both, per layer, head and control: n, Pearson r, mean |estimate − exact|, and the medians."""
    if df.empty or "patch_slope_est" not in df or "patch_slope" not in df:
        return pd.DataFrame()
    both = df[(df["status"] == "ok") & df["patch_slope_est"].notna() & df["patch_slope"].notna()].copy()
    if both.empty:
        return pd.DataFrame()
    both["control"] = both["control"].fillna("-")

    def agree(g: pd.DataFrame) -> pd.Series:
        est, exact = g["patch_slope_est"].to_numpy(float), g["patch_slope"].to_numpy(float)
        r = float(np.corrcoef(est, exact)[0, 1]) if len(g) > 2 and est.std() > 0 and exact.std() > 0 else np.nan
        return pd.Series({"n": len(g), "r": r, "mean_abs_diff": float(np.abs(est - exact).mean()),
                          "median_est": float(np.median(est)), "median_exact": float(np.median(exact))})

    return both.groupby(["layer", "head", "control"]).apply(agree, include_groups=False).reset_index()


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no finished trials yet)_\n"
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_table(df: pd.DataFrame, base: Path) -> None:
    atomic_write(base.with_suffix(".parquet"), lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(base.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))


def load_trials(sweep_dir: Path):
    from .sweepdir import resolved_spec
    from .tables import finished_rows, write_trials_table

    spec = resolved_spec(sweep_dir)
    df = write_trials_table(sweep_dir, finished_rows(sweep_dir), spec.search.metric, spec.search.mode)
    return spec, df


def build_report(sweep_dir: Path | str, echo=print) -> Path:
    """Tables, figures and report.html for a sweep directory (running, partial or finished)."""
    from . import plots
    from .sweepdir import read_state, run_state

    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir).resolve()
    spec, df = load_trials(sweep_dir)
    state = read_state(sweep_dir)
    tables = sweep_dir / "tables"
    best = best_trials(df) if len(df) else pd.DataFrame()
    atomic_write(tables / "best.parquet", lambda tmp: best.to_parquet(tmp, index=False))
    pivots = {m: pivot(best, m) for m in PIVOT_METRICS}
    for m, p in pivots.items():
        _write_table(p, tables / f"pivot_{m}")
    layers = per_layer(best)
    _write_table(layers, tables / "per_layer")
    comp = comparison(sweep_dir, df)
    comp_layers = by_layer(comp)
    _write_table(comp, tables / "comparison")
    _write_table(comp_layers, tables / "comparison_by_layer")
    agreement = patch_agreement(df)
    _write_table(agreement, tables / "patch_estimate")
    summary = [f"# {spec.name}: summary\n", f"Best trial per group by `{spec.search.metric}` ({spec.search.mode}).\n"]
    for m, p in pivots.items():
        summary += [f"\n## {m} (neuron × head/freeze)\n\n", _md(p)]
    summary += ["\n## Self vs cross-model vs input-only, per layer (mean over neurons, 95% CI)\n\n", _md(comp_layers),
                "\n## Per layer (best trials)\n\n", _md(layers),
                "\n## Patching: first-order estimate vs exact (probes with both)\n\n", _md(agreement)]
    atomic_write(tables / "summary.md", lambda tmp: tmp.write_text("".join(summary)))

    figures = plots.report_figures(df, best, sweep_dir / "figures", spec)
    answer = plots.self_vs_outsiders(comp_layers, sweep_dir / "figures" / "self_vs_outsiders.png")
    running = run_state(sweep_dir) == "running"
    page = render_html(spec, df, best, pivots, layers, figures, state, running, sweep_dir, comp_layers, comp, answer,
                       agreement)
    out = sweep_dir / "report.html"
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    echo(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB, {len(df)} trials, {time.perf_counter() - t0:.1f} s)")
    return out


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em} th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .muted{color:#777} .bad{color:#b00}
nav ul{columns:2} figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:13px}
.kv td:first-child{text-align:left;font-weight:600}
"""


SORT_JS = """
document.querySelectorAll('table:not(.kv) th').forEach(function(th){th.style.cursor='pointer';th.title='sort';
th.addEventListener('click',function(){var t=th.closest('table'),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th),
asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';var rows=Array.prototype.slice.call(b.rows);
rows.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,p=parseFloat(a),q=parseFloat(c);
var r=(isNaN(p)||isNaN(q))?a.localeCompare(c):p-q;return asc?r:-r;});rows.forEach(function(r){b.appendChild(r);});});});
"""  # click a column header to sort (no network, no library)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    if v is None or (isinstance(v, type(pd.NA)) and v is pd.NA):
        return ""
    return html.escape(str(v))


MAX_HTML_ROWS = 200
"""A longer table shows its top and bottom rows (by test r where it has one); the Parquet tables hold all."""


def _table(df: pd.DataFrame, cls: str = "", left: int = 1, charts: frozenset[str] = frozenset()) -> str:
    """An HTML table; a trial id with a diagnostics chart (in `charts`) links to it."""
    if df.empty:
        return "<p class='muted'>No finished trials yet.</p>"
    if len(df) > MAX_HTML_ROWS:  # an every-neuron sweep: the extremes here, everything in tables/
        ranked = df.sort_values("pearson_r", ascending=False, na_position="last") if "pearson_r" in df else df
        k = MAX_HTML_ROWS // 2
        note = (f"<p class='muted'>{len(df)} rows: the {k} {'highest and lowest by test r' if 'pearson_r' in df else 'first and last'}"
                " are shown; the whole table is in <code>tables/</code> (Parquet and CSV).</p>")
        return note + _table(pd.concat([ranked.head(k), ranked.tail(k)]), cls, left, charts)
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(str(c))}</th>" for i, c in enumerate(df.columns))
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for i, (c, v) in enumerate(zip(df.columns, rec)):
            text = _fmt(v)
            if c == "trial_id" and text in charts:
                text = f"<a href='trials/{text}/diagnostics.png'>{text}</a>"
            cells.append(f"<td class='{'l' if i < left else ''}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def answer_table(comp_layers: pd.DataFrame) -> pd.DataFrame:
    """The first screen: per layer and head/freeze, r of self / cross-model / input-only and the gaps, as
    'value [lo, hi]' strings."""
    if comp_layers.empty:
        return comp_layers
    out = comp_layers[["layer", "head", "freeze", "n_neurons"]].copy()
    for col, label in (("self_r", "self r"), ("cross_r", "cross-model r"), ("input_only_r", "input-only r"),
                       ("gap_cross_r", "self − cross"), ("gap_input_only_r", "self − input-only")):
        out[label] = [_ci(v, lo, hi) for v, lo, hi in zip(comp_layers[col], comp_layers[f"{col}_lo"],
                                                          comp_layers[f"{col}_hi"])]
    return out


def _ci(v: float, lo: float, hi: float) -> str:
    if not np.isfinite(v):
        return "—"
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else f"{v:+.3f}"


def render_html(spec, df, best, pivots, layers, figures, state, running, sweep_dir, comp_layers, comp, answer,
                agreement) -> str:
    started, finished = state.get("started"), state.get("finished")
    took = (finished or time.time()) - started if started else None
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    real = real_trials(df) if len(df) else df
    controls = df[df["control"].notna()] if len(df) and "control" in df else pd.DataFrame()
    failed = df[df["status"].isin(["failed", "damaged"])] if len(df) else pd.DataFrame()
    sections = [("answer", "Does the model know its neuron better than an outsider?"),
                ("reads", "Reads the neuron, or recomputes it?"), ("overview", "What was swept"),
                ("headline", "Headline: best trial per neuron × head/freeze"),
                ("figures", "Figures"), ("layers", "Per-layer summary"), ("pivots", "Pivots"),
                ("controls", "Controls"), ("failures", "Failures"), ("trials", "All trials")]
    toc = "".join(f"<li><a href='#{k}'>{v}</a></li>" for k, v in sections)
    charts = frozenset(p.parent.name for p in (Path(sweep_dir) / "trials").glob("*/diagnostics.png"))
    t = state.get("timings") or {}
    overview = {
        "sweep": spec.name, "state": "running" if running else
        ("interrupted" if state.get("status") == "running" else state.get("status", "unknown")),
        "model": f"{spec.model.name} ({spec.model.init}, processing {spec.model.processing})",
        "corpus": f"{spec.corpus.source}: {spec.corpus.n_texts} texts ≤ {spec.corpus.max_tokens} tokens (seed {spec.corpus.seed})",
        "target": f"blocks.L.mlp.hook_{spec.target.hook}, {spec.target.position} token; features {spec.features.hook}",
        "layers": ", ".join(map(str, spec.layers)),
        "neurons": ", ".join(f"L{k}: {v}" for k, v in (state.get("neurons") or {}).items()),
        "heads × freeze": ", ".join(combo_label(h, f) for h, f in spec.combos()),
        "search": f"{spec.search.algorithm}, {spec.search.num_samples} samples per group, metric {spec.search.metric}",
        "controls": ", ".join(spec.control_names) + (f" (cross_model: {spec.cross_model})" if spec.cross_model else "")
                    if spec.controls else "none",
        "trials": f"{len(df)} finished of {state.get('n_expected', '?')} ({', '.join(f'{v} {k}' for k, v in counts.items())})",
        "took": f"{took / 60:.1f} min" + (f" (cache {t.get('cache_s')} s, trials {t.get('trials_wall_s')} s)" if t else "") if took else "?",
        "workers": f"{state.get('workers')} on {state.get('device')}; base model loaded {state.get('model_loads')}×",
    }
    ov = "".join(f"<tr><td>{html.escape(k)}</td><td class='l'>{html.escape(str(v))}</td></tr>" for k, v in overview.items())
    headline_cols = [c for c in ["layer", "neuron", "head", "freeze", "pearson_r", "skill", "mse", "offset",
                                 "patch_slope", "drift", "identity_r", "cos_win", "cos_wout", "trial_id"] if c in best]
    figs = "".join(f"<figure>{_img(p)}<figcaption>{html.escape(caption)}</figcaption></figure>" for p, caption in figures
                   if p.stem not in FIRST_FIGURES)
    piv = "".join(f"<h3>{m}</h3>{_table(p, left=2)}" for m, p in pivots.items())
    ctl_cols = [c for c in ["trial_id", "control", "layer", "neuron", "head", "freeze", "pearson_r", "skill",
                            "patch_slope"] if c in controls]
    fail_cols = [c for c in ["trial_id", "status", "layer", "neuron", "head", "freeze", "error"] if c in failed]
    trial_cols = [c for c in ["trial_id", "control", "status", "best", "lr", "epochs", "pearson_r", "skill", "mse",
                              "patch_slope", "drift", "seconds"] if c in real]
    banner = "<p class='bad'><b>This sweep is still running</b>: the report shows the trials finished so far.</p>" if running else ""
    if not running and state.get("n_missing"):
        banner = (f"<p class='bad'><b>{state['n_missing']} of {state.get('n_expected', '?')} trials are missing</b>: "
                  f"{html.escape(state.get('missing_reason') or '')}. Every table below lacks them; "
                  "<code>nsr-sweep launch &lt;sweep file&gt; --resume</code> reruns them.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nsr-sweep report: {html.escape(spec.name)}</title>
<style>{CSS}</style></head><body>
<h1>Neuron self-report sweep: {html.escape(spec.name)}</h1>{banner}
<h2 id="answer">Does the model know its neuron better than an outsider?</h2>
<p>Per layer and head/freeze, the mean test correlation over neurons of <b>self</b> (this model predicting its own
neuron), <b>cross-model</b> (another model, <code>{html.escape(str(spec.cross_model or "not run"))}</code>, trained the same
way to predict this model's neuron on the same texts) and <b>input-only</b> (ridge on the text's tokens, no
transformer), with 95% intervals over neurons. A positive self − cross gap whose interval excludes 0 is evidence of
privileged access; self ≈ input-only means the text alone explains the report. Cross-model rows exist for freeze
<code>none</code> and <code>all</code> (the other model has no target layer).</p>
<div id="answer-table">{_table(answer_table(comp_layers), left=3)}</div>
{f"<figure>{_img(answer)}<figcaption>Self vs cross-model vs input-only against depth (mean r over neurons, 95% CI).</figcaption></figure>" if answer else ""}
<h3>Per neuron</h3><p>Gaps with paired bootstrap 95% intervals over the test texts
(<code>tables/comparison.parquet</code>).</p>
{_table(comp[[c for c in comp.columns if not c.endswith("_trial")]] if len(comp) else comp, left=4)}
<nav><h2 id="toc">Contents</h2><ul>{toc}</ul></nav>
<h2 id="reads">Reads the neuron, or recomputes it?</h2>
{"".join(f"<figure>{_img(p)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in figures
         if p.stem in FIRST_FIGURES) or "<p class='muted'>No figures yet.</p>"}
<h3>Exact patching and its first-order estimate</h3><p>Probes get <code>patch_slope_est</code>, the mean
d prediction / d activation at each text's own activation (through the layer's Jacobian, shared by every probe of
the layer); exact patching (<code>patch_slope</code>, a fit over a grid of values) runs for every trial run alone and
for <code>analysis.exact_patch_neurons</code> of each batch. Where both exist (<code>tables/patch_estimate.parquet</code>):</p>
{_table(agreement, left=3) if len(agreement) else "<p class='muted'>No probe has both yet.</p>"}
<h2 id="overview">What was swept</h2><table class="kv">{ov}</table>
<h2 id="headline">Headline: best trial per neuron × head/freeze</h2>
<p>Best of each group's hyperparameter samples by <code>{spec.search.metric}</code>; metrics on the test split.
<code>patch_slope</code> near 1 means the prediction moves with the neuron (it reads it); near 0 with high r means it
recomputes the neuron from context. Trial ids link to their diagnostics charts (trials run one at a time have one; batched probes do not).</p>
<div id="headline-table">{_table(best[headline_cols] if len(best) else best, cls='headline', left=4, charts=charts)}</div>
<h2 id="figures">Figures</h2>{figs or "<p class='muted'>No figures yet.</p>"}
<h2 id="layers">Per-layer summary</h2><p>Mean and median over the best trials of each neuron: how deep in the network self-report works.</p>{_table(layers, left=3)}
<h2 id="pivots">Pivots</h2>{piv}
<h2 id="controls">Controls</h2><p>Controls separate self-report from recomputation: <code>shuffled</code> (permuted targets),
<code>random_model</code> (features of a randomly initialised model), <code>early_features</code> (the residual before the layer),
<code>cross_model</code> (another model), <code>input_only</code> (the text alone).</p>
{_table(controls[ctl_cols].sort_values(["control", "trial_id"]) if len(controls) else controls, left=6)}
<h2 id="failures">Failures</h2>{_table(failed[fail_cols], left=6) if len(failed) else "<p class='muted'>None.</p>"}
<h2 id="trials">All trials</h2>{_table(real[trial_cols] if len(real) else real, left=2, charts=charts)}
<script>{SORT_JS}</script>
<p class="muted">Generated by nsr-sweep on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {html.escape(str(sweep_dir))}.</p>
</body></html>
"""
