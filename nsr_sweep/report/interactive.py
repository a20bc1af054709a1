"""The interactive parts of report.html: the per-neuron comparison, survivors and trial tables (sort any column, filter
by layer / head / control / a range of q, search) and the self-r vs patch-slope scatter with the neuron under the
pointer; neuron cards for the neurons the report highlights.

Libraries, vendored in `vendor/` (versions, sources and licences: vendor/README.md) and inlined into report.html, so
the report works offline: DataTables 3 with its ColumnControl (sort and filter from each column's header: a list of
values for layer, head, freeze, control, status; conditions on numbers) and SearchBuilder (conditions over any
columns, ranges included: q between 0 and 0.05) extensions, and plotly.js (the basic bundle: scatter). Nothing here
filters or sorts by hand: Python writes each table's rows and the libraries' options as JSON; a few lines in the
template hand them to the libraries. Cards are HTML popovers (no script): a row's `card` button opens its card.
"""

from __future__ import annotations

import html
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import PREDICTORS
from ..results.neuron import RANK
from .markup import extremes, shown_note

VENDOR_JS = ("dataTables.min.js", "dataTables.columnControl.min.js", "dataTables.searchBuilder.min.js",
             "plotly-basic.min.js")
VENDOR_CSS = ("dataTables.dataTables.min.css", "columnControl.dataTables.min.css", "searchBuilder.dataTables.min.css")

MAX_CARDS = 256
"""Neuron cards embedded in one report: the sweep file's named neurons first, then the survivors with the largest gap
(each card is ~1.5 kB; every other row shows the command that writes the neuron's page)."""

LIST_COLUMNS = frozenset({"layer", "head", "freeze", "control", "status", "best", "solver", "role"})
"""Columns filtered by picking values from a list (the others by conditions: equals, less or equal, …)."""

MISSING = "-"
"""A missing number as a table shows, sorts (below every number) and filters it: no condition on numbers matches it
(SearchBuilder would read an empty cell as 0, so `q between 0 and 0.05` would take in every row without a q)."""

REAL = "-"
"""The `control` of a real trial in the interactive trial table (null in tables/trials.parquet)."""


@lru_cache(maxsize=1)
def vendor_assets() -> tuple[str, str]:
    """The libraries' CSS and JavaScript, as the text to inline (read once per process)."""
    root = resources.files("nsr_sweep.report") / "vendor"
    css = "\n".join(root.joinpath(n).read_text(encoding="utf-8") for n in VENDOR_CSS)
    js = "\n".join(f"<script>{root.joinpath(n).read_text(encoding='utf-8')}</script>" for n in VENDOR_JS)
    return css, js


# -- values as JSON -------------------------------------------------------------------------------


def _column_json(s: pd.Series) -> list[str]:
    """One column's cells as JSON literals: floats to 4 significant digits (as the static tables show them), NaN and
    missing values as null."""
    if pd.api.types.is_bool_dtype(s.dtype) and not s.isna().any():
        return ["true" if v else "false" for v in s.to_numpy()]
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=float, na_value=np.nan)
        return [f"{x:.4g}" if np.isfinite(x) else "null" for x in v]
    if pd.api.types.is_integer_dtype(s.dtype):
        return ["null" if pd.isna(x) else str(int(x)) for x in s.to_numpy(dtype=object)]
    out = []
    for x in s.to_numpy(dtype=object):
        if x is None or x is pd.NA or (isinstance(x, float) and not np.isfinite(x)):
            out.append("null")
        elif isinstance(x, (bool, np.bool_)):
            out.append("true" if x else "false")
        elif isinstance(x, (int, np.integer)):
            out.append(str(int(x)))
        elif isinstance(x, (float, np.floating)):
            out.append(f"{float(x):.4g}")
        else:
            out.append(json.dumps(str(x), ensure_ascii=False))
    return out


def rows_json(df: pd.DataFrame) -> str:
    """The frame's rows as a JSON array of arrays."""
    cols = [_column_json(df[c]) for c in df.columns]
    return "[" + ",".join("[" + ",".join(cells) + "]" for cells in zip(*cols)) + "]"


def _kind(s: pd.Series, name: str, html_cols: frozenset[str]) -> str:
    if name in html_cols:
        return "html"
    if pd.api.types.is_bool_dtype(s.dtype) or not pd.api.types.is_numeric_dtype(s.dtype):
        return "string"
    return "num"


def _script_json(text: str) -> str:
    """JSON safe inside a <script> element: `<` only occurs inside JSON strings, where \\u003c means the same."""
    return text.replace("<", "\\u003c")


def table_config(df: pd.DataFrame, *, visible: list[str] | None = None, order: list[tuple[str, str]] | None = None,
                 html_cols: frozenset[str] = frozenset(), page_length: int = 10) -> str:
    """The DataTables options for `df` (its rows included), as JSON: every column sortable from its header; a list of
    values to pick from for the LIST_COLUMNS, conditions for the others; SearchBuilder above the table; only the
    `visible` columns shown at first (the others from any column's menu: "Column visibility")."""
    columns, list_targets = [], []
    for i, c in enumerate(df.columns):
        kind = _kind(df[c], str(c), html_cols)
        columns.append({"title": str(c), "name": str(c), "type": kind, "visible": visible is None or c in visible,
                        "defaultContent": MISSING if kind == "num" else ""})
        if c in LIST_COLUMNS:
            list_targets.append(i)
    names = list(map(str, df.columns))
    options = {
        "columns": columns,
        "columnDefs": [{"targets": list_targets, "columnControl": [
            "order", ["orderAsc", "orderDesc", "orderClear", "spacer", "searchList", "spacer", "colVisDropdown"]]}],
        "columnControl": ["order", ["orderAsc", "orderDesc", "orderClear", "spacer", "search", "spacer",
                                    "colVisDropdown"]],
        "ordering": {"indicators": False},
        "order": [[names.index(c), d] for c, d in (order or []) if c in names],
        "layout": {"top2": "searchBuilder", "topStart": "pageLength", "topEnd": "search", "bottomStart": "info",
                   "bottomEnd": "paging"},
        "pageLength": page_length, "lengthMenu": [10, 25, 100, 500],
        "deferRender": True, "scrollX": True, "autoWidth": False,
        "searchBuilder": {"columns": [i for i, c in enumerate(columns) if c["type"] != "html"]},
        "language": {"searchBuilder": {"title": {"0": "Conditions (e.g. a q between 0 and 0.05)",
                                                 "_": "Conditions (%d)"}}},
    }
    head = json.dumps(options, ensure_ascii=False, allow_nan=False)
    return _script_json(head[:-1] + ', "data": ' + rows_json(df) + "}")


MAX_TABLE_ROWS = 20_000
"""Rows an interactive table embeds: a longer one (an every-neuron sweep's comparison or trials) shows its extremes
by the column that ranks it, and says so; tables/ holds every row (a report stays a page a browser opens)."""


def cut(df: pd.DataFrame, rank: str | None) -> tuple[pd.DataFrame, str]:
    """At most MAX_TABLE_ROWS of a table's rows — its highest and lowest by `rank` — and the line that says so above
    it (empty when every row is kept): cut before a table's cells are written, so a layer's rows never are."""
    shown, words = extremes(df, MAX_TABLE_ROWS, rank)
    return shown, shown_note(len(df), words) if words else ""


def table_block(table_id: str, df: pd.DataFrame, note: str = "", **kw) -> str:
    """An interactive table: the element DataTables fills, and its options (rows included) as JSON beside it."""
    if df.empty:
        return "<p class='muted'>No rows yet.</p>"
    return (f"<div class='itable' id='{table_id}-box'>{note}<table id='{table_id}' class='display compact'></table>"
            f"<noscript><p class='muted'>This table needs JavaScript; every row is in <code>tables/</code>.</p></noscript>"
            f"<script type='application/json' class='nsr-table' data-table='{table_id}'>{table_config(df, **kw)}</script>"
            "</div>")


# -- neuron cards ---------------------------------------------------------------------------------


def dir_arg(sweep_dir: Path) -> str:
    """The results directory as a command line names it: relative to the working directory when under it."""
    try:
        rel = Path(os.path.relpath(sweep_dir))
    except ValueError:
        return str(sweep_dir)
    return str(rel) if not str(rel).startswith("..") else str(sweep_dir)


def page_command(sweep_dir: Path, layer: int, neuron: int) -> str:
    return f"nsr-sweep neuron {dir_arg(sweep_dir)} --layer {layer} --neuron {neuron}"


def card_id(layer: int, neuron: int) -> str:
    return f"card-L{layer}-N{neuron}"


def named_neurons(spec) -> list[tuple[int, int]]:
    """(layer, neuron) for each neuron the sweep file names by number, in every layer it sweeps."""
    named = [n for n in spec.neurons if isinstance(n, int)]
    return [(int(L), int(n)) for L in spec.layers for n in named]


def card_neurons(spec, comp: pd.DataFrame, hit: pd.DataFrame, rank: str | None) -> list[tuple[int, int]]:
    """The neurons that get a card: the named ones the comparison holds, then survivors by their largest |gap| in
    `rank`, at most MAX_CARDS in all."""
    have = set(zip(comp["layer"].astype(int), comp["neuron"].astype(int))) if len(comp) else set()
    out = [k for k in named_neurons(spec) if k in have]
    if len(hit) and rank is not None and rank in hit:
        mag = hit.assign(_m=hit[rank].abs()).groupby(["layer", "neuron"])["_m"].max().sort_values(ascending=False,
                                                                                                  kind="stable")
        out += [(int(L), int(n)) for L, n in mag.index]
    return list(dict.fromkeys(out))[:MAX_CARDS]


def cards(sweep_dir: Path, comp: pd.DataFrame, trials: pd.DataFrame, chosen: list[tuple[int, int]]) -> list[dict]:
    """Each chosen neuron's card: its comparison rows in the neuron page's own words (`report.neuron.standing`,
    `gap_sentence`), a link to its page where one has been written, and the command that writes it."""
    from .neuron import page_path, verdict

    if not chosen or comp.empty:
        return []
    n_test = {}
    if len(trials) and "n_test" in trials:
        n_test = {t: (int(v) if pd.notna(v) else None) for t, v in zip(trials["trial_id"], trials["n_test"])}
    keys = pd.MultiIndex.from_arrays([comp["layer"].astype(int), comp["neuron"].astype(int)])
    mine = comp[keys.isin(chosen)]
    groups = {(int(k[0]), int(k[1])): g for k, g in mine.groupby(["layer", "neuron"], sort=False)}
    out = []
    for layer, neuron in chosen:
        rows = groups[(layer, neuron)]
        verdicts = [verdict(row, n_test.get(row["self_trial"])) for _, row in rows.iterrows()]
        page = page_path(sweep_dir, layer, neuron)
        out.append({"id": card_id(layer, neuron), "layer": layer, "neuron": neuron, "verdicts": verdicts,
                    "page": f"neurons/{page.name}" if page.is_file() else None,
                    "command": page_command(sweep_dir, layer, neuron)})
    return out


def with_page(frame: pd.DataFrame, sweep_dir: Path, with_card: set[tuple[int, int]]) -> pd.DataFrame:
    """The rows with a `page` column after head/freeze: each neuron's card button, or the command for its page."""
    if frame.empty:
        return frame
    out = frame.copy()
    out.insert(min(4, len(out.columns)), "page", page_cells(sweep_dir, out["layer"], out["neuron"], with_card))
    return out


def page_cells(sweep_dir: Path, layers, neurons, with_card: set[tuple[int, int]]) -> list[str]:
    """Per row: a button that opens the neuron's card, or the command that writes its page."""
    out = []
    for L, n in zip(layers, neurons):
        L, n = int(L), int(n)
        if (L, n) in with_card:
            out.append(f"<button type='button' class='card-open' popovertarget='{card_id(L, n)}'>card</button>")
        else:
            out.append(f"<code>{html.escape(page_command(sweep_dir, L, n))}</code>")
    return out


# -- the scatter ----------------------------------------------------------------------------------

SCATTER_ROLES = tuple(c.name for c in PREDICTORS if c.patched)
"""Trials whose patch slope says something: the real ones and the shuffled control (the outsiders cannot see the
neuron: their slope is 0 by construction)."""


MAX_POINTS = 20_000
"""Points the scatter draws at most (a seeded random sample beyond: an every-neuron sweep's best trials)."""


def _round(v) -> list:
    a = np.asarray(v, dtype=float)
    return [float(f"{x:.4g}") if np.isfinite(x) else None for x in a]


def r_vs_patch_figure(df: pd.DataFrame) -> str | None:
    """Test r against the exact patch slope, one point per best trial (real and shuffled), a trace per head/freeze and
    role; hovering a point names its layer, neuron, head, control, r and slope. plotly.js figure JSON, or None."""
    if df.empty or "patch_slope" not in df:
        return None
    if "control" not in df:
        df = df.assign(control=None)
    ok = df[(df["status"] == "ok") & df["best"] & df["patch_slope"].notna() & df["pearson_r"].notna()]
    ok = ok[ok["control"].isna() | ok["control"].isin([r for r in SCATTER_ROLES if r])]
    if ok.empty:
        return None
    n_best = len(ok)
    if n_best > MAX_POINTS:  # a sample a browser draws: the same one every time
        ok = ok.sample(MAX_POINTS, random_state=0).sort_index()
    traces = []
    combos = sorted({(h, f) for h, f in zip(ok["head"], ok["freeze"])}, key=lambda p: (RANK[p[0]], RANK[p[1]]))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for j, (h, f) in enumerate(combos):
        for role in SCATTER_ROLES:
            g = ok[(ok["head"] == h) & (ok["freeze"] == f)]
            g = g[g["control"].isna()] if role is None else g[g["control"] == role]
            if g.empty:
                continue
            control = "none (self)" if role is None else role
            traces.append({
                "type": "scatter", "mode": "markers", "name": f"{h}/{f}" + ("" if role is None else f" · {role}"),
                "x": _round(g["pearson_r"]), "y": _round(g["patch_slope"]),
                "customdata": [[int(L), int(n)] for L, n in zip(g["layer"], g["neuron"])],
                "hovertemplate": (f"layer %{{customdata[0]}}, neuron %{{customdata[1]}}<br>head {h}, freeze {f}<br>"
                                  f"control: {control}<br>r = %{{x:.3f}}, patch slope = %{{y:.3f}}<extra></extra>"),
                "marker": {"size": 6 if role is None else 5, "opacity": 0.75, "color": palette[j % len(palette)],
                           "symbol": "circle" if role is None else "x"},
            })
    grey = {"color": "#999", "width": 1, "dash": "dash"}
    note = {"xref": "paper", "yref": "paper", "showarrow": False, "font": {"color": "#666", "size": 11}}
    layout = {
        "height": 480, "margin": {"l": 60, "r": 10, "t": 30, "b": 50}, "hovermode": "closest",
        "xaxis": {"title": {"text": "test Pearson r (prediction vs neuron)"}, "zeroline": False},
        "yaxis": {"title": {"text": "patch slope (Δprediction / Δactivation)"}},
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": 0.5, "x1": 0.5, "y0": 0, "y1": 1, "line": grey},
                   {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": 0.5, "y1": 0.5, "line": grey}],
        "annotations": [{**note, "x": 0.99, "y": 0.99, "xanchor": "right", "yanchor": "top", "text": "reads the neuron"},
                        {**note, "x": 0.99, "y": 0.01, "xanchor": "right", "yanchor": "bottom",
                         "text": "recomputes it from context"},
                        {**note, "x": 0.01, "y": 0.5, "xanchor": "left", "text": "fails"}],
        "legend": {"title": {"text": "click to hide / show"}},
    }
    if n_best > MAX_POINTS:
        layout["title"] = {"text": f"a random {MAX_POINTS:,} of the {n_best:,} best trials (tables/best.parquet: all)",
                           "font": {"size": 12, "color": "#666"}}
    config = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
    return _script_json(json.dumps({"data": traces, "layout": layout, "config": config}, ensure_ascii=False,
                                   allow_nan=False))
