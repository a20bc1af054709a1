"""HTML pieces that the report and the neuron page share: their templates, a table and its cells, an embedded PNG
(escaped here, once)."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pandas as pd


def cell(v) -> str:
    """A table cell's text: 4 significant digits for floats, empty for a missing value, escaped."""
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    if v is None or (isinstance(v, type(pd.NA)) and v is pd.NA):
        return ""
    return html.escape(str(v))


MAX_HTML_ROWS = 200
"""A longer table shows its top and bottom rows by the numeric column that ranks it; the Parquet tables hold all."""


def extremes(df: pd.DataFrame, limit: int, rank: str | None = None) -> tuple[pd.DataFrame, str]:
    """At most `limit` rows of a table: the highest and lowest half by `rank` (a numeric column; else the first and
    last by layer and neuron), and the words that say so (empty when every row is kept). An every-neuron sweep's
    tables are shown by their extremes; tables/ holds every row."""
    if len(df) <= limit:
        return df, ""
    k = limit // 2
    if rank is not None and rank in df:
        ranked = df.sort_values(rank, ascending=False, na_position="last", kind="stable")
        valued = ranked.dropna(subset=[rank])
        if len(valued) > limit:
            return pd.concat([valued.head(k), valued.tail(k)]), f"the {k:,} highest and {k:,} lowest by `{rank}`"
        without = ranked[ranked[rank].isna()].head(limit - len(valued))  # the rest: rows without a value, in order
        return pd.concat([valued, without]), f"the {len(valued):,} with a `{rank}` and {len(without):,} without one"
    keys = [c for c in ("layer", "neuron") if c in df]
    ranked = df.sort_values(keys, kind="stable") if keys else df
    return pd.concat([ranked.head(k), ranked.tail(k)]), f"the first and last {k:,} by {' and '.join(keys) or 'row'}"


def cut_line(n_rows: int, note: str) -> str:
    """The line above a table cut to its extremes (`extremes`' words), as Markdown (code in backticks)."""
    return f"{n_rows:,} rows: {note} are shown; the whole table is in `tables/` (Parquet and CSV)."


def shown_note(n_rows: int, note: str) -> str:
    """`cut_line` as HTML."""
    words = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(cut_line(n_rows, note)))
    return f"<p class='muted'>{words}</p>"


def html_table(df: pd.DataFrame, cls: str = "", left: int = 1, charts: frozenset[str] = frozenset(),
               rank: str | None = None) -> str:
    """An HTML table; a trial id with a diagnostics chart (in `charts`) links to it. Over MAX_HTML_ROWS rows,
    the highest and lowest by `rank` (a numeric column; else by layer and neuron) are shown."""
    if df.empty:
        return "<p class='muted'>No finished trials yet.</p>"
    shown, note = extremes(df, MAX_HTML_ROWS, rank)
    if note:  # an every-neuron sweep: the extremes here, everything in tables/
        return shown_note(len(df), note) + html_table(shown, cls, left, charts)
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(str(c))}</th>" for i, c in enumerate(df.columns))
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for i, (c, v) in enumerate(zip(df.columns, rec)):
            text = cell(v)
            if c == "trial_id" and text in charts:
                text = f"<a href='trials/{text}/diagnostics.png'>{text}</a>"
            cells.append(f"<td class='{'l' if i < left else ''}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def template(name: str):
    """A page template from templates/ (jinja2, autoescaped)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("nsr_sweep.report", "templates"), autoescape=True) \
        .get_template(name)


def png_img(png: bytes, alt: str):
    """A PNG embedded in the page (base64), as markup the templates insert unescaped."""
    from markupsafe import Markup

    return Markup(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
