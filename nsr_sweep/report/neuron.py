"""One neuron's page: `nsr-sweep neuron results/<name> --layer L --neuron N` and `Results.neuron(L, N)`.

A researcher's questions about one neuron, answered on one self-contained HTML page (images embedded, no
script; from templates/neuron.html.j2): how self compares with the outsiders, in words first, then every column
of its comparison rows; the texts it fires on (the top-activating test texts and a seeded random sample), each
token coloured by the neuron's activation, the target token framed, beside every probe's prediction for that
text; prediction against actual for self, shuffled, cross-model and input-only (every head and freeze, unfrozen
trials included); the patch curves with their slopes; the cosines. What is missing is said, not crashed on.

`NeuronPage` is the data (`results.neuron.NeuronData`: DataFrames) that renders itself: `.html()`, `.write()`,
and `_repr_html_` — the same page inline in a notebook, its CSS scoped to the page's own element.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import OUTSIDERS as OUTSIDER_CONTROLS
from ..core.controls import PREDICTORS, REAL
from ..core.files import atomic_write
from ..results.compare import Q
from ..results.neuron import ROLE_NAMES, ROLES, NeuronData, read_neuron
from . import plots
from .markup import html_table, png_img, template


@dataclass(repr=False)
class NeuronPage(NeuronData):
    """One neuron of a sweep (`comparison`, `probes`, `predictions`, `patch`, `cosines`, `texts`: DataFrames;
    `notes`: what is missing) that renders as its page."""

    def __repr__(self) -> str:
        return (f"NeuronPage(layer {self.layer}, neuron {self.neuron} of {self.sweep!r}: {len(self.probes)} probes, "
                f"{len(self.texts)} texts)")

    def html(self) -> str:
        return render_neuron_page(self)

    def _repr_html_(self) -> str:
        return self.html()

    def write(self, path: str | Path | None = None) -> Path:
        """The page, written atomically (a temp file, then renamed) to `path`, by default
        <sweep>/neurons/L<layer>-N<neuron>.html."""
        out = Path(path) if path is not None else page_path(self.sweep_dir, self.layer, self.neuron)
        page = self.html()
        return atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def page_path(sweep_dir: Path, layer: int, neuron: int) -> Path:
    return Path(sweep_dir) / "neurons" / f"L{layer}-N{neuron}.html"


def neuron_page(sweep_dir: Path | str, layer: int, neuron: int, *, top: int = 8, sample: int = 8) -> NeuronPage:
    """Neuron `neuron` of layer `layer` of a results directory, as a page (what `Results.neuron` returns)."""
    data = read_neuron(sweep_dir, layer, neuron, top=top, sample=sample)
    return NeuronPage(**vars(data))


def write_neuron_page(sweep_dir: Path | str, layer: int, neuron: int, out: str | Path | None = None, *,
                      top: int = 8, sample: int = 8, echo=print) -> Path:
    """`nsr-sweep neuron`: the page written, its path, size and time echoed."""
    t0 = time.perf_counter()
    path = neuron_page(sweep_dir, layer, neuron, top=top, sample=sample).write(out)
    echo(f"neuron page: {path} ({path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    return path


# -- the comparison, in words ---------------------------------------------------------------------

OUTSIDERS = {str(c.comparison): c.display for c in OUTSIDER_CONTROLS}
"""The comparison's outsiders by their source name in tables/comparison.parquet, as a reader names them."""


def q_text(q: float) -> str:
    """A q-value as a reader writes it: 0.012, 0.4, 6e-6."""
    if not np.isfinite(q):
        return "n/a"
    return re.sub(r"e-0*(\d)", r"e-\1", f"{q:.0e}") if q < 1e-3 else f"{q:.2g}"


def _r(row: pd.Series, source: str, name: str) -> str:
    v, lo, hi = (row.get(f"{source}_r{s}", np.nan) for s in ("", "_lo", "_hi"))
    if not np.isfinite(v):
        return f"no {name} r"
    return f"{name} r = {v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def standing(row: pd.Series, n_test) -> str:
    """Each predictor's test r with its interval, and what the numbers rest on."""
    eff = row.get("n_test_eff", np.nan)
    rest = f" on {n_test} test texts" if n_test is not None else ""
    if np.isfinite(eff):
        rest += f", of which about {eff:.0f} carry the neuron's variance (n_test_eff)"
        if eff < 10:
            rest += " — r, skill and their intervals rest on a handful of texts"
    return ", ".join(_r(row, str(c.comparison), c.display) for c in (REAL, *OUTSIDER_CONTROLS)) + rest + "."


def gap_sentence(row: pd.Series, other: str) -> str:
    """Self against one outsider in test r: who wins, by how much, the paired interval and the q-value, and the honest
    wording when the gap is not significant or goes the other way."""
    name = OUTSIDERS[other]
    col = f"gap_{other}_r"
    g, lo, hi, q = (row.get(c, np.nan) for c in (col, f"{col}_lo", f"{col}_hi", f"{col}_q"))
    if not np.isfinite(g):
        return f"No {name} predictor to compare with (not in the sweep, or not finished)."
    reaches_zero = " — though its interval reaches 0" if np.isfinite(lo) and lo <= 0 <= hi else ""
    if np.isfinite(q) and q <= Q and g > 0:
        return f"Self beats {name} by {g:.2f} [{lo:.2f}, {hi:.2f}] in r, q = {q_text(q)}{reaches_zero}."
    if np.isfinite(q) and q <= Q and g < 0:
        return (f"{name.capitalize()} beats self by {-g:.2f} [{-hi:.2f}, {-lo:.2f}] in r, q = {q_text(q)}"
                f"{reaches_zero}.")
    return (f"Self and {name} are not told apart: self − {name} = {g:+.2f} [{lo:+.2f}, {hi:+.2f}] in r, "
            f"q = {q_text(q)} (not ≤ {Q}).")


def verdict(row: pd.Series, n_test) -> dict:
    """One comparison row in words: its head/freeze, each predictor's standing, and self against each outsider (the
    page and the report's neuron cards)."""
    return {"combo": f"{row['head']}/{row['freeze']}", "standing": standing(row, n_test),
            "gaps": [gap_sentence(row, o) for o in OUTSIDERS]}


def verdicts(page: NeuronData) -> list[dict]:
    out = []
    for _, row in page.comparison.iterrows():  # in the order of the sweep's heads and freeze modes
        self_row = page.probes[page.probes["trial_id"] == row.get("self_trial")]
        n_test = int(self_row["n_test"].iloc[0]) if len(self_row) and pd.notna(self_row["n_test"].iloc[0]) else None
        out.append(verdict(row, n_test))
    return out


def comparison_columns(comparison: pd.DataFrame) -> pd.DataFrame:
    """Every column of the neuron's comparison rows, one column per head/freeze (a field per row)."""
    if comparison.empty:
        return comparison
    t = comparison.drop(columns=["layer", "neuron"]).set_index(comparison["head"] + "/" + comparison["freeze"]).T
    return t.drop(index=["head", "freeze"]).rename_axis("field").reset_index()


# -- texts ------------------------------------------------------------------------------------------


def _value(v: float) -> str:
    """A number as the page's data attributes carry it (enough digits to compare with the tables)."""
    return f"{v:.9g}"


def token_cells(tokens: list[str], acts: list[float], target: int, scale: float, bos: bool) -> list[dict]:
    """Each token with its activation: a red (positive) or blue (negative) background in proportion to
    |activation| / `scale`, the target framed."""
    cells = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = 0.85 * min(1.0, abs(a) / scale)
        rgb = "214,39,40" if a >= 0 else "31,119,180"
        cells.append({"text": tok, "act": _value(a), "title": f"token {i}: {a:.4g}", "target": i == target,
                      "bos": bos and i == 0, "style": f"background:rgba({rgb},{alpha:.2f})"})
    return cells


def prediction_cells(page: NeuronData, text_id: int) -> list[dict]:
    """Each shown probe's prediction for one text (a dash where it has none)."""
    got = page.predictions[page.predictions["text_id"] == text_id].set_index("trial_id")["pred"]
    return [{"trial_id": tid, "value": _value(got[tid]), "text": f"{got[tid]:.3g}"} if tid in got.index
            else {"trial_id": tid, "value": "", "text": "—"} for tid in page.probes["trial_id"]]


def text_rows(page: NeuronData, chosen: str) -> list[dict]:
    scale = max((abs(a) for acts in page.texts["activations"] for a in acts), default=0.0) or 1.0
    return [{"text_id": t.text_id, "tokens": token_cells(t.tokens, t.activations, t.target, scale, t.bos),
             "activation": _value(t.activation), "activation_text": f"{t.activation:.3g}",
             "actual_orig": _value(t.actual_orig), "preds": prediction_cells(page, t.text_id)}
            for t in page.texts[page.texts["chosen"] == chosen].itertuples(index=False)]


def text_groups(page: NeuronData) -> list[dict]:
    n_top, n_random = ((page.texts["chosen"] == c).sum() for c in ("top", "random"))
    return [{"id": "texts-top", "title": f"The {n_top} highest-activating test texts", "rows": text_rows(page, "top")},
            {"id": "texts-random", "title": f"{n_random} other test texts drawn at random (seeded by the sweep's seed, "
             "the layer and the neuron)", "rows": text_rows(page, "random")}]


# -- probes, patching, cosines ----------------------------------------------------------------------

ROLE_ABOUT = {c.role: c.about for c in PREDICTORS}
"""Each predictor role's line on the neuron page ({cross}: the other model)."""


def _img(png: bytes | None, alt: str):
    """A drawn figure embedded, or None where there was nothing to draw."""
    return None if png is None else png_img(png, alt)


def probe_panels(page: NeuronData) -> list[dict]:
    """One panel per predictor role: the four every page has, then any other control the sweep ran."""
    roles = list(ROLES) + sorted(set(page.probes["role"]) - set(ROLES))
    panels = []
    for role in roles:
        probes = page.probes[page.probes["role"] == role]
        name = ROLE_NAMES.get(role, role)
        ran = role == REAL.role or role in page.controls
        missing = (f"No finished {name} trial of this neuron yet." if ran else
                   f"No {name} predictor: the sweep's controls do not include {role}.")
        panels.append({"role": role, "name": name, "about": ROLE_ABOUT.get(role, "").format(cross=page.cross_model),
                       "img": _img(plots.prediction_scatter(probes, page.predictions), f"{role} prediction vs actual"),
                       "missing": missing})
    return panels


def patch_sentences(page: NeuronData) -> list[str]:
    out = []
    patched = set(page.patch["trial_id"]) if len(page.patch) else set()
    for row in page.probes.itertuples(index=False):
        if row.trial_id not in patched or not np.isfinite(row.patch_slope):
            continue
        r2 = f", R² {row.patch_r2:.2f}" if np.isfinite(row.patch_r2) else ""
        est = getattr(row, "patch_slope_est", np.nan)
        est_text = f"; first-order estimate {plots.slope_text(est)}" if est is not None and np.isfinite(est) else ""
        n = page.patch[page.patch["trial_id"] == row.trial_id]
        out.append(f"{row.label}: slope {plots.slope_text(row.patch_slope, row.patch_slope_lo, row.patch_slope_hi)}"
                   f"{r2}{est_text} ({n['text_id'].nunique()} texts × {n['grid_value'].nunique()} grid values).")
    return out


def _cosine_order(col: str) -> tuple:
    """Raw and effective cosines first (W_in, W_out, W_gate), then their z-scores, the `_ft` ones, the nulls' sizes."""
    ft = "_ft" in col
    base = col.replace("_ft", "")
    vector = next((i for i, v in enumerate(("win", "wout", "wgate")) if base.startswith(f"cos_{v}")), 3)
    return ("null" in base, ft, "_z_" in base, vector, base)


def cosine_fields(cosines: pd.DataFrame) -> pd.DataFrame:
    """The cosine columns, a field per row, one column per probe."""
    cols = sorted((c for c in cosines.columns if c.startswith("cos_")), key=_cosine_order)
    return cosines.set_index("label")[cols].T.rename_axis("field").reset_index()


# -- the page -------------------------------------------------------------------------------------------

CSS = """
.nsr-neuron{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
.nsr-neuron h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.nsr-neuron table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}
.nsr-neuron th,.nsr-neuron td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
.nsr-neuron th{background:#f4f4f4} .nsr-neuron td.l,.nsr-neuron th.l{text-align:left}
.nsr-neuron .muted{color:#777} .nsr-neuron .notes{background:#fff6e5;border:1px solid #f0d9a8;padding:.2em 1em}
.nsr-neuron .scroll{overflow-x:auto} .nsr-neuron img{max-width:100%;border:1px solid #eee}
.nsr-neuron td.tokens{text-align:left;white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;font-size:12px;
min-width:26em;max-width:46em}
.nsr-neuron .tok{border-radius:2px} .nsr-neuron .tok.target{outline:2px solid #000}
.nsr-neuron .tok.bos{color:#999;font-size:10px} .nsr-neuron th.probe{font-size:11px}
"""


def render_neuron_page(page: NeuronData) -> str:
    """The page from its template (`templates/neuron.html.j2`), one self-contained file."""
    from markupsafe import Markup

    return template("neuron.html.j2").render(
        p=page, css=Markup(CSS), q=Q, verdicts=verdicts(page),
        comparison=Markup(html_table(comparison_columns(page.comparison), left=1)) if len(page.comparison) else None,
        probe_heads=[{"role": ROLE_NAMES.get(r, r), "head": h, "freeze": f} for r, h, f in
                     zip(page.probes["role"], page.probes["head"], page.probes["freeze"])], text_groups=text_groups(page),
        panels=probe_panels(page), patch_sentences=patch_sentences(page),
        patch_img=_img(plots.patch_curves(page.probes, page.patch), "patch curves"),
        has_outsiders=bool(page.probes["role"].isin([c.role for c in OUTSIDER_CONTROLS]).any()),
        cosines=Markup(html_table(cosine_fields(page.cosines), left=1)) if len(page.cosines) else None,
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
