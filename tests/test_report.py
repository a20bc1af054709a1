"""The report: typed tables that agree with the trial table, and report.html checked in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nsr_sweep.cli import main
from nsr_sweep.core.files import write_json
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import dump_sweep, parse_sweep
from nsr_sweep.core.trial import TrialSpec, run_trial
from nsr_sweep.results.layout import LOCK, STATE
from nsr_sweep.results.records import save_trial
from nsr_sweep.sweep.grid import expand
from nsr_sweep.sweep.inputs import build_cache

SPEC = {"name": "rep", "model": "nsr-tiny", "corpus": {"n_texts": 300, "max_tokens": 32}, "layers": [1, 2],
        "neurons": [3, 5], "heads": ["regression", "classification"], "freeze": ["none"],
        "controls": ["shuffled", {"cross_model": "nsr-tiny-seed1"}, "input_only"],
        "search": {"num_samples": 2}, "training": {"epochs": 3}}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A partial sweep written trial by trial (no Ray): finished, failed, and one still to come."""
    d = tmp_path_factory.mktemp("results") / "rep"
    spec = parse_sweep(SPEC)
    model, sibling = load_model("nsr-tiny"), load_model("nsr-tiny-seed1")
    cache = build_cache(spec, progress=False, model=model)
    groups = expand(spec, {1: [3, 5], 2: [3, 5]})
    for g in groups:
        for sample, lr in enumerate((3e-3, 2e-2)):
            tid = g.at(sample).trial_id
            if tid == "L2-N5-classification-none-s1":
                write_json(d / "trials" / tid / "metrics.json", {
                    "trial_id": tid, "sample": sample, "status": "failed", "reason": "non-finite training loss at epoch 0",
                    "spec": {**g.model_dump(include={"layer", "neuron", "head", "freeze", "control"}), "lr": lr}, "metrics": {}})
                continue
            spec_t = TrialSpec(**g.at(sample).model_dump(), training={"lr": lr, "epochs": 3},
                               analysis={"n_grid": spec.analysis.n_grid, "patch_texts": 32})
            save_trial(run_trial(cache, model, spec_t, outsider=sibling), d / "trials" / tid, tid, sample)
    (d / "sweep.yaml").write_text(dump_sweep(spec))
    write_json(d / STATE, {"name": "rep", "status": "running", "started": 1.0e9, "n_expected": len(groups) * 2 + 4,
                           "neurons": {"1": [3, 5], "2": [3, 5]}, "workers": 1, "device": "cpu", "model_loads": 1})
    write_json(d / LOCK, {"pid": os.getpid(), "host": os.uname().nodename})
    r = CliRunner().invoke(main, ["report", str(d)])
    assert r.exit_code == 0, r.output
    return d


def test_tables_are_typed_and_round_trip(sweep_dir):
    t = sweep_dir / "tables"
    df = pd.read_parquet(t / "trials.parquet")
    schema = pq.read_schema(t / "trials.parquet")
    assert str(schema.field("layer").type) == "int64" and str(schema.field("pearson_r").type) == "double"
    assert str(schema.field("best").type) == "bool" and str(schema.field("status").type) in ("string", "large_string")
    assert str(schema.field("control").type) in ("string", "large_string")
    n_groups = 4 * (2 * 3 + 1)  # neurons × (heads × {real, shuffled, cross_model} + input_only)
    assert len(df) == n_groups * 2 and df["trial_id"].is_unique
    assert df["status"].value_counts().to_dict() == {"ok": n_groups * 2 - 1, "failed": 1}
    assert pq.read_table(t / "trials.parquet").num_rows == len(df)
    best = pd.read_parquet(t / "best.parquet")
    assert len(best) == 8 and best["control"].isna().all()  # one per (layer, neuron, head, freeze)


@pytest.mark.parametrize("metric", ["pearson_r", "mse", "offset", "patch_slope", "drift", "skill"])
def test_pivots_agree_with_the_trial_table(sweep_dir, metric):
    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    best = trials[trials["best"] & trials["control"].isna()]
    for fmt in ("parquet", "csv"):
        p = getattr(pd, f"read_{fmt}")(sweep_dir / "tables" / f"pivot_{metric}.{fmt}")
        assert len(p) == 4 and set(p.columns) == {"layer", "neuron", "regression/none", "classification/none"}
        for row in best.itertuples():
            cell = p[(p.layer == row.layer) & (p.neuron == row.neuron)][f"{row.head}/{row.freeze}"].item()
            assert cell == pytest.approx(getattr(row, metric), rel=1e-12, abs=1e-12)
    md = (sweep_dir / "tables" / "summary.md").read_text()
    assert f"## {metric} (neuron × head/freeze)" in md


def test_comparison_agrees_with_the_trials_and_recomputes_from_predictions(sweep_dir):
    """Self / cross / input-only r per neuron are the best trials' own test r; the gap is their difference,
    recomputed here from the saved predictions with numpy; the per-layer rows are means over neurons."""
    import numpy as np

    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    comp = pd.read_parquet(sweep_dir / "tables" / "comparison.parquet")
    best = trials[trials["best"] & (trials["status"] == "ok")]
    assert len(comp) == 8
    for row in comp.itertuples():
        sel = best[(best.layer == row.layer) & (best.neuron == row.neuron)]
        mine = sel[(sel["head"] == row.head) & sel["control"].isna()]
        cross = sel[(sel["head"] == row.head) & (sel["control"] == "cross_model")]
        text = sel[sel["control"] == "input_only"]
        assert row.self_r == pytest.approx(mine.pearson_r.item(), abs=1e-12)
        assert row.cross_r == pytest.approx(cross.pearson_r.item(), abs=1e-12)
        assert row.input_only_r == pytest.approx(text.pearson_r.item(), abs=1e-12)
        p = {k: pd.read_parquet(sweep_dir / "trials" / t / "preds.parquet").query("split == 'test'").sort_values("text_id")
             for k, t in (("self", row.self_trial), ("cross", row.cross_trial))}
        r = {k: np.corrcoef(v["pred"], p["self"]["actual_orig"])[0, 1] for k, v in p.items()}
        d = p["self"]["actual_orig"].to_numpy() - p["self"]["actual_orig"].mean()
        assert row.n_test_eff == pytest.approx((d**2).sum() ** 2 / (d**4).sum(), rel=1e-12)
        assert row.n_test_eff == pytest.approx(mine.n_test_eff.item(), rel=1e-12)
        assert row.gap_cross_r == pytest.approx(r["self"] - r["cross"], abs=1e-9)
        assert row.gap_cross_r_lo <= row.gap_cross_r <= row.gap_cross_r_hi
        assert row.self_r_lo <= row.self_r <= row.self_r_hi
    layers = pd.read_parquet(sweep_dir / "tables" / "comparison_by_layer.parquet")
    from scipy.stats import false_discovery_control

    for row in layers.itertuples():
        sel = comp[(comp.layer == row.layer) & (comp["head"] == row.head)]
        assert row.gap_input_only_r == pytest.approx(sel.gap_input_only_r.mean())
        assert row.gap_input_only_r_lo < row.gap_input_only_r < row.gap_input_only_r_hi and row.n_neurons == 2
        for g in ("gap_cross_r", "gap_input_only_r"):  # Benjamini–Hochberg over the layer's neurons, as scipy does it
            np.testing.assert_allclose(sel[f"{g}_q"], false_discovery_control(sel[f"{g}_p"]), rtol=1e-12)
            assert getattr(row, f"n_{g}_positive") == int(((sel[f"{g}_q"] <= 0.05) & (sel[g] > 0)).sum())
            by = false_discovery_control(sel[f"{g}_p"], method="by")  # Benjamini–Yekutieli: any dependence
            assert getattr(row, f"n_{g}_positive_by") == int(((by <= 0.05) & (sel[g] > 0)).sum())
            calls = int((sel[f"{g}_q"] <= 0.05).sum())
            assert getattr(row, f"n_{g}_false_expected") == pytest.approx(0.05 * calls)
            assert getattr(row, f"n_{g}_tested") == 2


def test_report_leads_with_self_vs_outsiders(sweep_dir):
    page = (sweep_dir / "report.html").read_text()
    assert page.index('id="answer"') < page.index('id="reads"') < page.index('id="overview"') < page.index('id="trials"')
    answer = page[page.index('id="answer-table"'):page.index("</table>", page.index('id="answer-table"'))]
    for label in ("self r", "cross-model r", "input-only r", "self − cross", "self − input-only"):
        assert label in answer
    assert "nsr-tiny-seed1" in page


def test_per_layer_summary_is_the_mean_of_best_trials(sweep_dir):
    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    best = trials[trials["best"] & trials["control"].isna()]
    layers = pd.read_parquet(sweep_dir / "tables" / "per_layer.parquet")
    for row in layers.itertuples():
        sel = best[(best.layer == row.layer) & (best["head"] == row.head) & (best.freeze == row.freeze)]
        assert row.pearson_r_mean == pytest.approx(sel.pearson_r.mean()) and row.n_neurons == len(sel)


def test_report_lists_failures_and_the_running_state(sweep_dir):
    page = (sweep_dir / "report.html").read_text()
    assert "L2-N5-classification-none-s1" in page and "non-finite training loss" in page
    assert "still running" in page
    prose = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)  # the inlined libraries name their homes
    assert not re.search(r"https?://(?!www\.w3\.org)", prose)  # nothing fetched from the network (and see below)
    assert (sweep_dir / "report.html").stat().st_size <= 3e6  # a quickstart-sized report, libraries inlined


def test_not_a_sweep_directory_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "is not a sweep directory" in r.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target && e.target.src)), true);
const _err = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); _err(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const out = {errors: window.__errors, images: imgs, headline: !!document.querySelector('#headline-table table tbody tr')};
  const el = document.createElement('pre'); el.id = '__probe'; el.textContent = JSON.stringify(out);
  document.body.appendChild(el);
});
</script>"""


def test_report_renders_in_headless_chromium(sweep_dir, tmp_path):
    assert CHROMIUM, "Chromium is required (Debian package `chromium`; .ci/run installs it)"
    probed = tmp_path / "probed.html"
    probed.write_text((sweep_dir / "report.html").read_text().replace("<head>", "<head>" + PROBE, 1))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["errors"] == [] and probe["headline"]
    assert len(probe["images"]) >= 5 and all(probe["images"])

    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1280,2400", f"--screenshot={shot}",
                    (sweep_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels[..., :3].std() > 0.05  # not a blank page
    assert (pixels[..., :3].mean(-1) < 0.5).mean() > 0.005  # some dark ink: text and axes


def test_damaged_records_are_flagged_not_fatal(sweep_dir, tmp_path):
    """A truncated metrics.json, sweep_state.json and sweep.lock: status and report still work and name the damage."""
    d = tmp_path / "rep"
    shutil.copytree(sweep_dir, d)
    (d / "trials" / "L1-N3-regression-none-s0" / "metrics.json").write_text('{"trial_id": "L1-N3-regr')
    (d / STATE).write_text('{"name": "rep", "sta')
    (d / LOCK).write_text("{")
    st = CliRunner().invoke(main, ["status", str(d), "--json"])
    assert st.exit_code == 2, st.output  # a damaged file is named, and owes its trial
    status = json.loads(st.output)
    assert status["counts"]["damaged"] == 1 and status["state"] == "damaged"
    assert [(x["path"], x["trials"], x["rerun"]) for x in status["damaged"]] == \
        [("trials/L1-N3-regression-none-s0/metrics.json", 1, True)]
    r = CliRunner().invoke(main, ["report", str(d)])
    assert r.exit_code == 0, r.output
    page = (d / "report.html").read_text()
    failures = page[page.index('id="failures"'):page.index('id="trials"')]
    assert "L1-N3-regression-none-s0" in failures and "damaged" in failures and "unreadable metrics.json" in failures


# -- the interactive report in a real browser: sort, filter, search, cards, the scatter's hover ---------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium driven through its DevTools protocol (tests/cdp.py), shared by the tests below."""
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    from cdp import Browser

    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


READY = "window.nsrReady"  # set by the report once every table is built and the scatter drawn


def _shown(b, table: str) -> list[dict]:
    """The rows a DataTable shows on its current page, as {column title: cell text}."""
    return b.js(f"""(() => {{
        const w = document.getElementById('{table}_wrapper');
        const heads = [...w.querySelectorAll('.dt-scroll-head thead [data-dt-column] .dt-column-title')]
            .map(e => e.textContent);
        return [...document.querySelectorAll('#{table} tbody tr')]
            .map(tr => Object.fromEntries([...tr.cells].map((td, i) => [heads[i], td.textContent])));
    }})()""")


def _count(b, table: str) -> int:
    """How many rows the table holds after its filters, as its info line says ("… of N entries")."""
    info = b.js(f"document.getElementById('{table}_info').textContent")
    return int(re.search(r"of ([\d,]+) entries", info).group(1).replace(",", ""))


def _header(table: str, column: int) -> str:
    return f"#{table}_wrapper .dt-scroll-head [data-dt-column='{column}']"


def _pick(b, table: str, column: int, value: str) -> None:
    """Open a column's menu and pick one value from its list, as a reader does; then close the menu."""
    b.click(_header(table, column) + " button.dtcc-button_dropdown")
    b.wait("document.querySelector('.dtcc-dropdown .dtcc-list-buttons button')")
    b.click(f".dtcc-dropdown .dtcc-list-buttons button[aria-label='{value}']")
    b.send("Input.dispatchKeyEvent", session=True, type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)


def _words(text: str) -> str:
    return " ".join(text.split())


def _column(b, table: str, name: str) -> int:
    """The index of a table's column (as DataTables numbers it: shown or not) by its title."""
    return int(b.js(f"""[...document.querySelectorAll('#{table}_wrapper .dt-scroll-head thead [data-dt-column]')]
        .find(th => th.querySelector('.dt-column-title').textContent === {json.dumps(name)}).dataset.dtColumn"""))


@pytest.mark.slow
def test_the_comparison_table_sorts_filters_and_opens_cards(sweep_dir, browser):
    from nsr_sweep.report.neuron import OUTSIDERS, gap_sentence, standing

    b = browser
    took = b.open((sweep_dir / "report.html").as_uri(), READY)
    assert b.errors == [] and took < 10
    assert all(u.split(":")[0] in ("file", "data", "blob", "about") for u in b.requests), b.requests  # offline
    comp = pd.read_parquet(sweep_dir / "tables" / "comparison.parquet")
    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    t = "comparison-table"
    assert _count(b, t) == len(comp) == 8
    # sort: self_r, a click on its header ascending, another descending
    col = _column(b, t, "self_r")
    for state in ("ascending", "descending"):
        b.click(_header(t, col) + " .dt-column-title")
        b.wait(f"document.querySelector({json.dumps(_header(t, col))}).getAttribute('aria-sort') === '{state}'")
    rows = _shown(b, t)
    assert float(rows[0]["self_r"]) == pytest.approx(float(f"{comp['self_r'].max():.4g}"))
    assert [float(r["self_r"]) for r in rows] == sorted((float(r["self_r"]) for r in rows), reverse=True)
    # filter: layer 1 from the layer column's list
    _pick(b, t, _column(b, t, "layer"), "1")
    rows = _shown(b, t)
    assert _count(b, t) == len(rows) == int((comp["layer"] == 1).sum()) == 4
    assert {r["layer"] for r in rows} == {"1"}
    assert float(rows[0]["self_r"]) == pytest.approx(float(f"{comp.query('layer == 1')['self_r'].max():.4g}"))
    # the first row's card: the neuron's comparison rows in the neuron page's words
    b.click(f"#{t} tbody tr:first-child button.card-open")
    b.wait("document.querySelector('.card:popover-open')")
    card = b.js("""(() => { const c = document.querySelector('.card:popover-open');
                    return {layer: c.dataset.layer, neuron: c.dataset.neuron, text: c.textContent}; })()""")
    assert (card["layer"], card["neuron"]) == (rows[0]["layer"], rows[0]["neuron"])
    mine = comp[(comp["layer"] == int(card["layer"])) & (comp["neuron"] == int(card["neuron"]))]
    n_test = dict(zip(trials["trial_id"], trials["n_test"]))
    for _, row in mine.iterrows():
        assert _words(standing(row, n_test[row["self_trial"]])) in _words(card["text"])
        for other in OUTSIDERS:
            assert _words(gap_sentence(row, other)) in _words(card["text"])
    assert f"--layer {card['layer']} --neuron {card['neuron']}" in card["text"]
    # a range of q (SearchBuilder: gap_cross_r_q between 0 and 0.05), on a fresh page
    b.open((sweep_dir / "report.html").as_uri(), READY)
    w = f"#{t}_wrapper"
    b.click(w + " .dtsb-add")
    choose = """(([sel, v]) => { const s = document.querySelector(sel); s.value = v;
                 s.dispatchEvent(new Event('input', {bubbles: true})); s.dispatchEvent(new Event('change', {bubbles: true}));
                })(%s)"""
    b.js(choose % json.dumps([w + " .dtsb-data", str(_column(b, t, "gap_cross_r_q"))]))
    b.js(choose % json.dumps([w + " .dtsb-condition", "between"]))
    b.type(w + " input.dtsb-value", "0", 0)
    b.type(w + " input.dtsb-value", "0.05", 1)
    b.wait(f"document.getElementById('{t}_info').textContent.includes('filtered')")
    assert _count(b, t) == int(comp["gap_cross_r_q"].between(0, 0.05).sum())
    assert b.errors == []


@pytest.mark.slow
def test_the_trial_table_filters_by_control_and_searches(sweep_dir, browser):
    b = browser
    b.open((sweep_dir / "report.html").as_uri(), READY)
    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    t = "trials-table"
    assert _count(b, t) == len(trials)  # every trial and control
    _pick(b, t, _column(b, t, "control"), "shuffled")
    shuffled = trials[trials["control"] == "shuffled"]
    assert _count(b, t) == len(shuffled) and {r["control"] for r in _shown(b, t)} == {"shuffled"}
    b.type(f"#{t}_wrapper .dt-search input", "L2-N5")
    b.wait(f"document.getElementById('{t}_info').textContent.includes('of {int(shuffled.trial_id.str.contains('L2-N5').sum())} ')")
    assert all(r["trial_id"].startswith("L2-N5-") for r in _shown(b, t))
    survivors = pd.read_parquet(sweep_dir / "tables" / "comparison.parquet").query("gap_cross_r_q <= 0.05 or "
                                                                                   "gap_input_only_r_q <= 0.05")
    if len(survivors):
        assert _count(b, "survivors-table") == len(survivors)
    assert b.errors == []


@pytest.mark.slow
def test_the_scatter_names_the_neuron_under_the_pointer(sweep_dir, browser):
    b = browser
    b.open((sweep_dir / "report.html").as_uri(), READY)
    trials = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    shown = trials[(trials["status"] == "ok") & trials["best"] & (trials["control"].isna() |
                                                                   (trials["control"] == "shuffled"))]
    n_points = b.js("document.querySelectorAll('#r-vs-patch .scatterlayer path.point').length")
    assert n_points == len(shown) > 0
    for k in (0, n_points - 1):
        b.hover(*b.centre("#r-vs-patch .scatterlayer path.point", k))
        b.wait("document.querySelector('#r-vs-patch .hoverlayer .hovertext')")
        text = b.js("document.querySelector('#r-vs-patch .hoverlayer .hovertext').textContent")
        m = re.fullmatch(r"layer (\d+), neuron (\d+)head (\w+), freeze (\w+)control: (.+?)r = (\S+), patch slope = (\S+)",
                         text)
        assert m, text
        L, n, head, freeze, control, r, slope = m.groups()
        sel = shown[(shown["layer"] == int(L)) & (shown["neuron"] == int(n)) & (shown["head"] == head)
                    & (shown["freeze"] == freeze)]
        sel = sel[sel["control"].isna()] if control == "none (self)" else sel[sel["control"] == control]
        assert len(sel) == 1, text
        assert float(r) == pytest.approx(sel["pearson_r"].item(), abs=1.1e-3)
        assert float(slope) == pytest.approx(sel["patch_slope"].item(), abs=1.1e-3)
        b.hover(5, 5)


@pytest.mark.slow
def test_an_every_neuron_sized_report_keeps_its_budget(sweep_dir, browser, tmp_path):
    """The fixture's rows tiled to every-neuron's shape (4 layers × 512 neurons × 2 heads: 4,096 comparison rows,
    14,336 trials), rendered as `nsr-sweep report` renders: at most 15 MB, every table ready in under 5 s."""
    import numpy as np

    from nsr_sweep.report import build
    from nsr_sweep.results.layout import read_state, resolved_spec

    tables = sweep_dir / "tables"
    comp, trials = (pd.read_parquet(tables / f"{n}.parquet") for n in ("comparison", "trials"))
    keys = [(L, n) for L in range(4) for n in range(512)]
    src = sorted(set(zip(comp["layer"], comp["neuron"])))
    one = trials[trials["sample"] == 0].assign(best=True)

    def tiled(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
        parts = []
        for j, (sL, sn) in enumerate(src):  # the j-th source neuron stands in for every len(src)-th new one
            block = frame[(frame["layer"] == sL) & (frame["neuron"] == sn)]
            mine = keys[j :: len(src)]
            L, n = (np.repeat([k[i] for k in mine], len(block)) for i in (0, 1))
            part = pd.concat([block] * len(mine), ignore_index=True).assign(layer=L, neuron=n)
            for c in ids:
                part[c] = [v.replace(f"L{sL}-N{sn}-", f"L{a}-N{b}-") if isinstance(v, str) else v
                           for v, a, b in zip(part[c], L, n)]
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    big_comp = tiled(comp, ["self_trial", "cross_trial", "input_only_trial"])
    big_trials = tiled(one, ["trial_id"])
    assert (len(big_comp), len(big_trials)) == (4096, 14336)
    best = build.best_trials(big_trials)
    spec = resolved_spec(sweep_dir)
    figures = [(p, p.stem) for p in sorted((sweep_dir / "figures").glob("*.png")) if not p.stem.startswith("heatmap")]
    report = build.Report(spec, big_trials, best, {m: build.pivot(best, m) for m in build.PIVOT_METRICS},
                          build.per_layer(best), figures, read_state(sweep_dir), False, sweep_dir,
                          pd.read_parquet(tables / "comparison_by_layer.parquet"), big_comp, [],
                          build.patch_agreement(big_trials))
    out = tmp_path / "report.html"
    out.write_text(build.render_html(report), encoding="utf-8")
    assert out.stat().st_size <= 15e6
    took = browser.open(out.as_uri(), READY)
    assert browser.errors == [] and _count(browser, "comparison-table") == 4096
    assert _count(browser, "trials-table") == 14336 and took < 5, f"report ready after {took:.1f} s"
    print(f"every-neuron-sized report: {out.stat().st_size / 1e6:.1f} MB, ready in {took:.2f} s")


def test_interactive_table_options_are_json_that_a_script_element_keeps():
    """Rows travel as JSON inside <script type="application/json">: numbers to 4 significant digits, NaN and missing
    values as null, text that could close the element escaped — and the q column a condition can range over."""
    import numpy as np

    from nsr_sweep.report.interactive import MISSING, table_config

    df = pd.DataFrame({"layer": [1, 2], "neuron": pd.array([3, None], dtype="Int64"), "head": ["regression", None],
                       "gap_cross_r_q": [0.0123456, np.nan], "best": [True, False], "note": ["</script><b>", "ok"]})
    text = table_config(df, visible=["layer", "gap_cross_r_q"], order=[("gap_cross_r_q", "asc")])
    assert "</" not in text and "<" not in text
    opts = json.loads(text)
    assert opts["data"] == [[1, 3, "regression", 0.01235, True, "</script><b>"], [2, None, None, None, False, "ok"]]
    cols = {c["name"]: c for c in opts["columns"]}
    assert cols["gap_cross_r_q"]["type"] == "num" and cols["gap_cross_r_q"]["defaultContent"] == MISSING
    assert [c["visible"] for c in opts["columns"]] == [True, False, False, True, False, False]
    assert opts["order"] == [[3, "asc"]] and opts["layout"]["top2"] == "searchBuilder"
    listed = {opts["columns"][i]["name"] for i in opts["columnDefs"][0]["targets"]}
    assert listed == {"layer", "head", "best"}  # picked from a list of values; the rest take conditions
