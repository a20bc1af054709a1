"""`nsr-sweep report DIR`: the tables and pictures researchers decide from, and one HTML file.

Everything is computed from `tables/trials.parquet`, itself rebuilt from the trial records
(`records`: trial directories and the probes' Parquet datasets), and the stored test predictions, so a
report on a running or partial sweep shows what has finished and lists what failed.

    tables/trials.parquet        one row per trial and control
    tables/best.parquet          the best trial per (layer, neuron, head, freeze) by the sweep metric
    tables/pivot_<metric>.{parquet,csv}   neuron × (head, freeze), best trials
    tables/per_layer.{parquet,csv}        mean / median of each metric per layer × head × freeze
    tables/comparison.{parquet,csv}       per neuron: self vs cross-model vs input-only, gaps with 95% intervals,
                                          p-values and Benjamini–Hochberg q-values
    tables/comparison_by_layer.{parquet,csv}  the same per layer × head × freeze: means over neurons with
                                          intervals over the shared test texts; neurons whose gap survives
    tables/patch_estimate.{parquet,csv}   how the first-order patch estimate agrees with exact patching
    tables/summary.md            the pivots and the per-layer summary as Markdown
    figures/*.png                self vs outsiders, gap distributions, heatmaps, depth curves, r vs patch slope,
                                 offset vs drift, cosines, controls
    report.html                  self-contained (images and the JavaScript libraries of its interactive tables inlined:
                                 interactive.py), from templates/report.html.j2; works offline
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import OUTSIDERS, gap_columns, names
from ..core.files import atomic_write
from ..core.memory import give_back
from ..core.spec import CELL_COLUMNS
from ..results.compare import Q, compare
from .markup import MAX_HTML_ROWS, cut_line, extremes, html_table, png_img, template

PIVOT_METRICS = ["pearson_r", "mse", "offset", "patch_slope", "drift", "skill"]
LAYER_METRICS = ["pearson_r", "spearman_rho", "r2", "mse", "offset", "skill", "std_ratio", "patch_slope",
                 "patch_r2", "drift", "identity_r", "proj_readout_r", "proj_wout_r", "cos_win", "cos_wout"]
GROUP = list(CELL_COLUMNS)
FIRST_FIGURES = ("r_vs_patch_slope", "offset_vs_drift")  # right after the answer; the rest follow the overview


def combo_label(head: str, freeze: str) -> str:
    return f"{head}/{freeze}"


def real_trials(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["control"].isna()] if "control" in df else df


def best_trials(df: pd.DataFrame) -> pd.DataFrame:
    """The best real trial of each group, in group order: taken from the table once (half a layer's table, copied
    once, not three times)."""
    mine = df["best"].to_numpy(bool) & (df["control"].isna().to_numpy() if "control" in df else True)
    at = np.flatnonzero(mine)
    keys = df[GROUP].iloc[at]
    order = np.lexsort([keys[c].to_numpy() for c in reversed(GROUP)])  # as sort_values(GROUP): stable, by each key
    return df.take(at[order]).reset_index(drop=True)


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
    both = both[~both["control"].isin(names(patched=False))]  # their slope is 0 by construction
    if both.empty:
        return pd.DataFrame()

    def agree(g: pd.DataFrame) -> pd.Series:
        est, exact = g["patch_slope_est"].to_numpy(float), g["patch_slope"].to_numpy(float)
        r = float(np.corrcoef(est, exact)[0, 1]) if len(g) > 2 and est.std() > 0 and exact.std() > 0 else np.nan
        return pd.Series({"n": len(g), "r": r, "mean_abs_diff": float(np.abs(est - exact).mean()),
                          "median_est": float(np.median(est)), "median_exact": float(np.median(exact))})

    return both.groupby(["layer", "head", "control"]).apply(agree, include_groups=False).reset_index()


def _md(df: pd.DataFrame, rank: str | None = None) -> str:
    """A table as Markdown: over MAX_HTML_ROWS rows, its extremes by `rank` (as the HTML shows them)."""
    if df.empty:
        return "_(no finished trials yet)_\n"
    shown, note = extremes(df, MAX_HTML_ROWS, rank)
    if note:
        return f"_{cut_line(len(df), note)}_\n\n" + _md(shown)
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_table(df: pd.DataFrame, base: Path) -> None:
    atomic_write(base.with_suffix(".parquet"), lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(base.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))


def load_trials(sweep_dir: Path):
    from ..results.layout import resolved_spec
    from ..results.tables import write_trials_table

    spec = resolved_spec(sweep_dir)
    return spec, write_trials_table(sweep_dir, spec.search.metric, spec.search.mode)


def build_report(sweep_dir: Path | str, echo=print, table: pd.DataFrame | None = None) -> Path:
    """Tables, figures and report.html for a sweep directory (running, partial or finished). `table`: the trial table
    tables/trials.parquet holds, just written (a launch's last step); without it, it is rebuilt from the records."""
    from ..results.layout import read_state, resolved_spec, run_state
    from . import plots

    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir).resolve()
    spec, df = (resolved_spec(sweep_dir), table) if table is not None else load_trials(sweep_dir)
    del table
    state = read_state(sweep_dir)
    tables = sweep_dir / "tables"
    best = best_trials(df) if len(df) else pd.DataFrame()
    atomic_write(tables / "best.parquet", lambda tmp: best.to_parquet(tmp, index=False))
    give_back()  # what reading the table and writing best.parquet let go: a layer's table is hundreds of MB
    pivots = {m: pivot(best, m) for m in PIVOT_METRICS}
    for m, p in pivots.items():
        _write_table(p, tables / f"pivot_{m}")
    layers = per_layer(best)
    _write_table(layers, tables / "per_layer")
    comp, comp_layers = compare(sweep_dir, df)
    give_back()  # what the comparison held: its predictions a block at a time, its trials' ids
    _write_table(comp, tables / "comparison")
    _write_table(comp_layers, tables / "comparison_by_layer")
    agreement = patch_agreement(df)
    if len(agreement):
        agreement.insert(0, "hook", spec.target.hook)
    _write_table(agreement, tables / "patch_estimate")
    summary = [f"# {spec.name}: summary\n", f"Best trial per group by `{spec.search.metric}` ({spec.search.mode}).\n"]
    for m, p in pivots.items():
        summary += [f"\n## {m} (neuron × head/freeze)\n\n", _md(p, rank=p.columns[2] if p.shape[1] > 2 else None)]
    summary += ["\n## Self vs cross-model vs input-only, per layer (mean over neurons, 95% CI over the shared test "
                "texts)\n\n", _md(comp_layers),
                "\n## Per layer (best trials)\n\n", _md(layers),
                "\n## Patching: first-order estimate vs exact (probes with both)\n\n", _md(agreement)]
    atomic_write(tables / "summary.md", lambda tmp: tmp.write_text("".join(summary)))

    figures = plots.report_figures(df, best, sweep_dir / "figures", spec)
    answer = [(p, c) for p, c in (
        (plots.self_vs_outsiders(comp_layers, sweep_dir / "figures" / "self_vs_outsiders.png"),
         "Self vs cross-model vs input-only against depth: mean test r over the layer's neurons, 95% intervals over "
         "the shared test texts."),
        (plots.gap_distributions(comp, sweep_dir / "figures" / "gap_distributions.png"),
         "Per layer, the distribution over neurons of the gaps self − outsider in test r (box: quartiles; dots: "
         f"neurons whose gap survives Benjamini–Hochberg at q = {Q}).")) if p]
    running = run_state(sweep_dir) == "running"
    give_back()
    page = render_html(Report(spec, df, best, pivots, layers, figures, state, running, sweep_dir, comp_layers, comp,
                              answer, agreement))
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
table.sortable.dataTable{width:auto;margin:.5em 0 1.5em} div.itable{margin:.5em 0 1.5em} div.itable table.dataTable{margin:0} table.dataTable td code{font-size:11px}
button.card-open{font-size:12px;padding:0 .6em;cursor:pointer}
.card{max-width:52em;padding:.5em 1.5em 1em;border:1px solid #bbb;border-radius:6px;box-shadow:0 4px 24px rgba(0,0,0,.25);
line-height:1.45;color:#222} .card::backdrop{background:rgba(0,0,0,.15)}
.card .card-close{float:right;font-size:20px;border:none;background:none;cursor:pointer;margin-top:.3em}
"""


GLUE_JS = """
document.querySelectorAll('script.nsr-table').forEach(function (s) {
  new DataTable('#' + s.dataset.table, JSON.parse(s.textContent));
});
document.querySelectorAll('table.sortable').forEach(function (t) {
  new DataTable(t, {paging: false, searching: false, info: false, autoWidth: false, order: []});
});
var fig = document.getElementById('r-vs-patch-data');
(fig ? (function (f) { return Plotly.newPlot('r-vs-patch', f.data, f.layout, f.config); })(JSON.parse(fig.textContent))
     : Promise.resolve()).then(function () { window.nsrReady = performance.now(); });
"""  # hands each table's options and the scatter's figure (JSON written by interactive.py) to the libraries


def answer_table(comp_layers: pd.DataFrame) -> pd.DataFrame:
    """The first screen: per layer and head/freeze, r of self / cross-model / input-only and the gaps, as
    'value [lo, hi]' strings, and how many neurons' gaps survive the multiple-comparison control."""
    if comp_layers.empty:
        return comp_layers
    out = comp_layers[["layer", "head", "freeze", "n_neurons"]].copy()
    for col, label in (("self_r", "self r"), ("cross_r", "cross-model r"), ("input_only_r", "input-only r"),
                       ("gap_cross_r", "self − cross"), ("gap_input_only_r", "self − input-only")):
        out[label] = [_ci(v, lo, hi) for v, lo, hi in zip(comp_layers[col], comp_layers[f"{col}_lo"],
                                                          comp_layers[f"{col}_hi"])]
    for other in OUTSIDERS:
        c, label = f"gap_{other.comparison}_r", other.display
        out[f"gap > 0 vs {label}"] = [_count(p, n, f, by) for p, n, f, by in
                                      zip(comp_layers[f"n_{c}_positive"], comp_layers[f"n_{c}_tested"],
                                          comp_layers.get(f"n_{c}_false_expected", np.nan),
                                          comp_layers.get(f"n_{c}_positive_by", np.nan))]
        out[f"gap < 0 vs {label}"] = [f"{m}" if n else "—" for m, n in
                                      zip(comp_layers[f"n_{c}_negative"], comp_layers[f"n_{c}_tested"])]
    return out


def _count(k, n, false_expected, k_by) -> str:
    """'k of n', with the false calls BH allows on average and the count under Benjamini–Yekutieli."""
    if not n:
        return "—"
    if not np.isfinite(false_expected):
        return f"{k} of {n}"
    return f"{k} of {n} (≈ {false_expected:.0f} false; BY {k_by:.0f})"


def _ci(v: float, lo: float, hi: float) -> str:
    if not np.isfinite(v):
        return "—"
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else f"{v:+.3f}"


def survivors(comp: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Neurons with a gap that survives Benjamini–Hochberg (either outsider), and the gap column that ranks them."""
    if comp.empty:
        return comp, None
    gaps = [g for g in gap_columns() if comp[g].notna().any()]
    if not gaps:
        return comp.iloc[:0], None
    hit = comp[np.logical_or.reduce([comp[f"{g}_q"] <= Q for g in gaps])]
    cols = ["layer", "neuron", "head", "freeze", "self_r"] + [c for g in gaps for c in
                                                             (g.replace("gap_", ""), g, f"{g}_lo", f"{g}_hi", f"{g}_q")]
    return hit[[c for c in dict.fromkeys(cols) if c in hit]], gaps[0]


class Report:
    """What report.html shows, gathered once (the template decides where)."""

    def __init__(self, spec, df, best, pivots, layers, figures, state, running, sweep_dir, comp_layers, comp, answer,
                 agreement):
        self.spec, self.df, self.best, self.pivots, self.layers = spec, df, best, pivots, layers
        self.figures, self.state, self.running, self.sweep_dir = figures, state, running, sweep_dir
        self.comp_layers, self.comp, self.answer, self.agreement = comp_layers, comp, answer, agreement


SECTIONS = [("answer", "Does the model know its neuron better than an outsider?"),
            ("reads", "Reads the neuron, or recomputes it?"), ("overview", "What was swept"),
            ("headline", "Headline: best trial per neuron × head/freeze"), ("figures", "Figures"),
            ("layers", "Per-layer summary"), ("pivots", "Pivots"), ("controls", "Controls"), ("failures", "Failures"),
            ("trials", "All trials")]


def _overview(r: Report) -> list[tuple[str, str]]:
    spec, state, df = r.spec, r.state, r.df
    started, finished = state.get("started"), state.get("finished")
    took = (finished or time.time()) - started if started else None
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    t = state.get("timings") or {}
    return [
        ("sweep", spec.name),
        ("state", "running" if r.running else ("interrupted" if state.get("status") == "running"
                                               else state.get("status", "unknown"))),
        ("model", f"{spec.model.name} ({spec.model.init}, processing {spec.model.processing})"),
        ("corpus", f"{spec.corpus.source}: {spec.corpus.n_texts} texts ≤ {spec.corpus.max_tokens} tokens "
                   f"(seed {spec.corpus.seed})"),
        ("target", f"blocks.L.mlp.hook_{spec.target.hook}, {spec.target.position} token; features {spec.features.hook}"),
        ("layers", ", ".join(map(str, spec.layers))),
        ("neurons", ", ".join(f"L{k}: {_neurons_text(v)}" for k, v in (state.get("neurons") or {}).items())),
        ("heads × freeze", ", ".join(combo_label(h, f) for h, f in spec.combos())),
        ("search", f"{spec.search.algorithm}, {spec.search.num_samples} samples per group, metric {spec.search.metric}"),
        ("controls", ", ".join(spec.control_names) + (f" (cross_model: {spec.cross_model})" if spec.cross_model else "")
         if spec.controls else "none"),
        ("trials", f"{len(df)} finished of {state.get('n_expected', '?')} "
                   f"({', '.join(f'{v} {k}' for k, v in counts.items())})"),
        ("took", (f"{took / 60:.1f} min" + (f" (cache {t.get('cache_s')} s, trials {t.get('trials_wall_s')} s)"
                                            if t else "")) if took else "?"),
        ("workers", f"{state.get('workers')} on {state.get('device')}; base model loaded {state.get('model_loads')}×"),
    ]


def _neurons_text(v: list) -> str:
    return f"{len(v)} neurons ({v[0]}…{v[-1]})" if len(v) > 12 else str(v)


TRIAL_COLUMNS = ["trial_id", "layer", "neuron", "head", "freeze", "control", "status", "best", "solver", "lr", "epochs",
                 "pearson_r", "skill", "mse", "patch_slope", "drift", "seconds"]
"""The columns of the interactive trial table (every column is in tables/trials.parquet)."""


def trial_rows(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, str]:
    """The interactive trial table's rows — TRIAL_COLUMNS and the sweep's metric — cut to the extremes by that metric
    (`interactive.cut`), and the line that says so."""
    from .interactive import cut

    if df.empty:
        return df, ""
    return cut(df[[c for c in dict.fromkeys(TRIAL_COLUMNS + [metric]) if c in df]], metric)


def trial_cells(trials: pd.DataFrame, charts: frozenset[str]) -> pd.DataFrame:
    """The trial table's rows as shown: a real trial's control `-`, a trial id linked to its chart where it has one."""
    if trials.empty:
        return trials
    from .interactive import REAL

    control = trials["control"] if "control" in trials else pd.Series(None, index=trials.index, dtype=object)
    return trials.assign(control=control.astype(object).where(control.notna(), REAL),
                         trial_id=[f"<a href='trials/{html.escape(t)}/diagnostics.png'>{html.escape(t)}</a>"
                                   if t in charts else html.escape(t) for t in trials["trial_id"]])


def render_html(r: Report) -> str:
    """report.html from its template (`templates/report.html.j2`), one self-contained file: static tables sortable,
    the per-neuron comparison, survivors and trial tables interactive, with neuron cards (interactive.py)."""
    from markupsafe import Markup

    from . import interactive as ia

    df, best, comp, spec = r.df, r.best, r.comp, r.spec
    failed = df[df["status"].isin(["failed", "damaged"])] if len(df) else pd.DataFrame()
    charts = frozenset(p.parent.name for p in (Path(r.sweep_dir) / "trials").glob("*/diagnostics.png"))
    cols = lambda frame, names: frame[[c for c in names if c in frame]] if len(frame) else frame  # noqa: E731
    hit, rank = survivors(comp)
    fig = lambda figs: [{"img": png_img(p.read_bytes(), p.stem), "caption": c} for p, c in figs]  # noqa: E731
    html_ = lambda x: Markup(x)  # noqa: E731 - tables rendered by html_table escape their own cells
    static = lambda frame, **kw: html_(html_table(frame, **{"cls": "sortable compact", **kw}))  # noqa: E731

    carded = ia.card_neurons(spec, comp, hit, rank)
    with_page = lambda frame: ia.with_page(frame, r.sweep_dir, set(carded))  # noqa: E731
    (hit_rows, hit_note), (comp_rows, comp_note) = ia.cut(hit, rank), ia.cut(comp, rank or "self_r")
    comp_visible = ["layer", "neuron", "head", "freeze", "page", "n_test_eff", "self_r", "cross_r", "input_only_r",
                    "gap_cross_r", "gap_cross_r_q", "gap_input_only_r", "gap_input_only_r_q"]
    trials, trials_note = trial_rows(df, spec.search.metric)
    scatter = ia.r_vs_patch_figure(df)
    vendor_css, vendor_js = ia.vendor_assets()
    return template("report.html.j2").render(
        spec=spec, css=Markup(CSS + vendor_css), vendor_js=Markup(vendor_js), glue_js=Markup(GLUE_JS), q=Q,
        running=r.running, missing=r.state.get("n_missing"), expected=r.state.get("n_expected", "?"),
        missing_reason=r.state.get("missing_reason") or "",
        answer_table=static(answer_table(r.comp_layers), left=3), answer_figures=fig(r.answer),
        survivors=html_(ia.table_block("survivors-table", with_page(hit_rows), hit_note,
                                       order=[(rank, "desc")] if rank else None, html_cols=frozenset({"page"}))
                        if len(hit) else
                        "<p class='muted'>None: no neuron's gap survives the control (or no outsider ran).</p>"),
        per_neuron=html_(ia.table_block("comparison-table", with_page(comp_rows), comp_note, visible=comp_visible,
                                        html_cols=frozenset({"page"}))),
        cards=ia.cards(r.sweep_dir, comp, df, carded), max_cards=ia.MAX_CARDS, n_survivors=len(set(zip(
            hit["layer"], hit["neuron"]))) if len(hit) else 0,
        sweep_arg=ia.dir_arg(r.sweep_dir), scatter=Markup(scatter) if scatter else None,
        sections=SECTIONS, reads_figures=fig([(p, c) for p, c in r.figures if p.stem in FIRST_FIGURES
                                              and not (scatter and p.stem == "r_vs_patch_slope")]),
        agreement=static(r.agreement, left=4) if len(r.agreement) else html_("<p class='muted'>No probe has both "
                                                                                "yet.</p>"),
        overview=_overview(r),
        headline=static(cols(best, ["layer", "neuron", "head", "freeze", "pearson_r", "skill", "mse", "offset",
                                    "patch_slope", "drift", "identity_r", "cos_win", "cos_wout", "trial_id"]),
                        cls="headline sortable compact", left=4, charts=charts, rank="pearson_r"),
        figures=fig([(p, c) for p, c in r.figures if p.stem not in FIRST_FIGURES]),
        per_layer=static(r.layers, left=3),
        pivots=[(m, static(p, left=2, rank=p.columns[2] if p.shape[1] > 2 else None)) for m, p in r.pivots.items()],
        failures=static(cols(failed, ["trial_id", "status", "layer", "neuron", "head", "freeze", "error"]), left=6)
        if len(failed) else html_("<p class='muted'>None.</p>"),
        trials=html_(ia.table_block("trials-table", trial_cells(trials, charts), trials_note,
                                    html_cols=frozenset({"trial_id"}))),
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), sweep_dir=str(r.sweep_dir),
    )
