"""One neuron's page (`nsr-sweep neuron`, `Results.neuron`): its numbers are the Parquet tables', its highlighted
activations are the neuron's (an independent forward), a neuron the sweep lacks is one line and exit 2, the Python
object and the page agree, and the page renders in headless Chromium."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_report import CHROMIUM, FLAGS

from nsr_sweep.api import open_results
from nsr_sweep.cli import main
from nsr_sweep.core.files import write_json
from nsr_sweep.core.models import bundled_models, load_model
from nsr_sweep.core.spec import TrialSpec, dump_sweep, parse_sweep
from nsr_sweep.core.trial import run_trial, run_trials
from nsr_sweep.report.markup import cell as _fmt
from nsr_sweep.report.neuron import gap_sentence, q_text
from nsr_sweep.report.plots import slope_text
from nsr_sweep.results.layout import STATE
from nsr_sweep.results.records import save_trial, save_unit
from nsr_sweep.results.store import open_store
from nsr_sweep.sweep.grid import expand, unit_id
from nsr_sweep.sweep.inputs import build_cache

LAYER = 1
SPEC = {"name": "npage", "model": "nsr-tiny", "corpus": {"n_texts": 240, "max_tokens": 24}, "layers": [LAYER],
        "neurons": [{"select": "top_variance", "k": 2}], "heads": ["regression", "classification"],
        "freeze": ["none", "after_target"], "controls": ["shuffled", {"cross_model": "nsr-tiny-seed1"}, "input_only"],
        "search": {"num_samples": 1}, "training": {"epochs": 1}, "analysis": {"patch_texts": 12, "n_grid": 3}}
TOP, SAMPLE = 5, 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A small sweep written in this process (no Ray), both layouts: every probe of the layer's two top neurons as
    one unit of Parquet rows; one unfrozen trial (a directory) for the first neuron only — the second's are missing."""
    d = tmp_path_factory.mktemp("results") / "npage"
    spec = parse_sweep(SPEC)
    model = load_model("nsr-tiny")
    cache = build_cache(spec, progress=False, model=model)
    neurons = [n for n, _ in cache.top_neurons(LAYER, "variance", 2)]
    groups = expand(spec, {LAYER: neurons})
    probes = [TrialSpec.in_sweep(spec, **g.model_dump()) for g in groups if g.freeze == "none"]
    save_unit([(r, s.trial_id, s.sample) for s, r in zip(probes, run_trials(cache, model, probes))], d,
              unit_id([g for g in groups if g.freeze == "none"]))
    unfrozen = TrialSpec.in_sweep(spec, layer=LAYER, neuron=neurons[0], freeze="after_target")
    save_trial(run_trial(cache, model, unfrozen), d / "trials" / unfrozen.trial_id)
    (d / "sweep.yaml").write_text(dump_sweep(spec))
    write_json(d / STATE, {"name": "npage", "status": "incomplete", "n_expected": len(groups), "n_missing": 5,
                           "neurons": {str(LAYER): neurons}})
    assert CliRunner().invoke(main, ["report", str(d)]).exit_code == 0
    return d, neurons


@pytest.fixture(scope="module")
def page(sweep):
    d, neurons = sweep
    r = CliRunner().invoke(main, ["neuron", str(d), "--layer", str(LAYER), "--neuron", str(neurons[0]),
                                  "--top", str(TOP), "--sample", str(SAMPLE)])
    assert r.exit_code == 0, r.output
    path = d / "neurons" / f"L{LAYER}-N{neurons[0]}.html"
    assert f"neuron page: {path}" in r.output
    return path


class Cells(HTMLParser):
    """Every element's attributes and text, and the rows of the table inside the element with id `table_id`."""

    def __init__(self, table_id: str | None = None):
        super().__init__()
        self.elements: list[dict] = []
        self.rows: list[list[str]] = []
        self._open: list[dict] = []
        self._table_id, self._inside = table_id, 0

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, **dict(attrs), "text": ""}
        if el.get("id") == self._table_id:
            self._inside = 1
        if self._inside and tag == "tr":
            self.rows.append([])
        if tag not in ("br", "img", "meta"):
            self._open.append(el)
        self.elements.append(el)

    def handle_endtag(self, tag):
        el = self._open.pop() if self._open else None
        if el and self._inside and tag in ("td", "th"):
            self.rows[-1].append(el["text"])
        if el and el.get("id") == self._table_id:
            self._inside = 0

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data


def parsed(path, table_id=None) -> Cells:
    c = Cells(table_id)
    c.feed(path.read_text())
    return c


def field_rows(path, table_id) -> dict[str, dict[str, str]]:
    """A transposed table (a field per row, a column per head/freeze or probe) as {field: {column: cell}}."""
    rows = parsed(path, table_id).rows
    head = rows[0][1:]
    return {r[0]: dict(zip(head, r[1:])) for r in rows[1:]}


# -- the wording (no sweep needed) -----------------------------------------------------------------------


def test_gaps_are_worded_honestly():
    row = lambda g, lo, hi, q: pd.Series({"gap_cross_r": g, "gap_cross_r_lo": lo, "gap_cross_r_hi": hi,  # noqa: E731
                                          "gap_cross_r_q": q})
    assert gap_sentence(row(0.54, 0.43, 0.72, 6e-6), "cross") == "Self beats cross-model by 0.54 [0.43, 0.72] in r, q = 6e-6."
    assert gap_sentence(row(-0.2, -0.3, -0.1, 0.01), "cross") == "Cross-model beats self by 0.20 [0.10, 0.30] in r, q = 0.01."
    assert gap_sentence(row(0.05, -0.1, 0.2, 0.4), "cross").startswith("Self and cross-model are not told apart: "
                                                                       "self − cross-model = +0.05 [-0.10, +0.20]")
    assert "interval reaches 0" in gap_sentence(row(0.05, -0.01, 0.2, 0.03), "cross")
    assert gap_sentence(row(np.nan, np.nan, np.nan, np.nan), "cross").startswith("No cross-model predictor")
    assert [q_text(q) for q in (0.0123, 0.4, 6.2e-6, np.nan)] == ["0.012", "0.4", "6e-6", "n/a"]


def test_a_layer_or_neuron_not_in_the_sweep_is_one_line_and_exit_2(tmp_path):
    d = tmp_path / "npage"
    d.mkdir()
    (d / "sweep.yaml").write_text(dump_sweep(parse_sweep(SPEC)))
    write_json(d / STATE, {"name": "npage", "status": "finished", "neurons": {"1": [134, 432]}})
    for args, want in ((["--layer", "3", "--neuron", "134"], "error: layer 3 is not in sweep 'npage': its layers are 1"),
                       (["--layer", "1", "--neuron", "7"], "error: neuron 7 is not in sweep 'npage' at layer 1: its "
                                                          "neurons there are 134, 432")):
        r = CliRunner().invoke(main, ["neuron", str(d), *args])
        assert r.exit_code == 2 and r.output.strip() == want, r.output
    r = CliRunner().invoke(main, ["neuron", str(tmp_path), "--layer", "1", "--neuron", "7"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "is not a sweep directory" in r.output


def test_a_neuron_with_nothing_finished_yet_has_a_page_that_says_so(tmp_path):
    d = tmp_path / "npage"
    d.mkdir()
    (d / "sweep.yaml").write_text(dump_sweep(parse_sweep(SPEC)))
    write_json(d / STATE, {"name": "npage", "status": "running", "neurons": {"1": [134, 432]}})
    r = CliRunner().invoke(main, ["neuron", str(d), "--layer", "1", "--neuron", "134"])
    html = (d / "neurons" / "L1-N134.html").read_text()
    assert r.exit_code == 0 and "No trial of this neuron has finished yet" in html
    assert html.count('class="probe-panel"') == 4 and "No finished self trial" in html


# -- a sweep's page --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_page_numbers_are_the_tables(sweep, page):
    d, neurons = sweep
    html = page.read_text()
    assert len(html.encode()) < 2e6 and "<script" not in html
    comp = pd.read_parquet(d / "tables" / "comparison.parquet").query("neuron == @neurons[0]")
    cells = field_rows(page, "comparison-table")
    for row in comp.itertuples(index=False):
        combo = f"{row.head}/{row.freeze}"
        for col in comp.columns.drop(["layer", "neuron", "head", "freeze"]):
            assert cells[col][combo] == _fmt(getattr(row, col)), (col, combo)
        for other in ("cross", "input_only"):  # in words: the gap, its interval and q-value of this row
            assert gap_sentence(pd.Series(row._asdict()), other) in html
    trials = pd.read_parquet(d / "tables" / "trials.parquet").query("neuron == @neurons[0] and best")
    assert "after_target" in set(trials["freeze"]) and "unit" in trials and trials["unit"].notna().any()  # both layouts
    labels = {t: lab for t, lab in zip(trials["trial_id"], _labels(trials))}
    cos = field_rows(page, "cosine-table")
    for t in trials[trials["control"].isna() | (trials["control"] == "shuffled")].itertuples(index=False):
        assert cos["cos_win_eff"][labels[t.trial_id]] == _fmt(t.cos_win_eff)
        assert f"{labels[t.trial_id]}: slope {slope_text(t.patch_slope, t.patch_slope_lo, t.patch_slope_hi)}" in html
    preds = open_store(d).test_predictions(trials["trial_id"]).set_index(["trial_id", "text_id"])["pred"]
    shown = [e for e in parsed(page).elements if e.get("class") == "pred" and e.get("data-pred")]
    rows = [e for e in parsed(page).elements if e.get("class") == "text-row"]
    assert len(rows) == TOP + SAMPLE and len(shown) == len(rows) * len(trials)
    text_of = iter(int(r["data-text-id"]) for r in rows for _ in range(len(trials)))
    for e, text_id in zip(shown, text_of):
        assert float(e["data-pred"]) == pytest.approx(preds[(e["data-trial"], text_id)], rel=1e-8, abs=1e-12)


def _labels(trials: pd.DataFrame) -> list[str]:
    names = {"shuffled": "shuffled", "cross_model": "cross-model", "input_only": "input-only"}
    return [f"{names.get(c, 'self') if isinstance(c, str) else 'self'} · {h}/{f}"
            for c, h, f in zip(trials["control"], trials["head"], trials["freeze"])]


@pytest.mark.slow
def test_highlighted_activations_are_the_neurons_own(sweep, page):
    """Every token's highlighted value equals a plain transformers forward, each text alone, with a hook on the MLP's
    activation (the input of c_proj: hook_post); at the target token it also equals the sweep's cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, neurons = sweep
    path = bundled_models()["nsr-tiny"]
    hf, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    seen = {}
    hf.transformer.h[LAYER].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0]))
    cache = open_store(d).test_predictions([f"L{LAYER}-N{neurons[0]}-regression-none-s0"]).set_index("text_id")["actual_orig"]
    els = parsed(page).elements
    rows = [e for e in els if e.get("class") == "text-row"]
    texts = open_results(d).neuron(LAYER, neurons[0], top=TOP, sample=SAMPLE).texts
    assert [int(r["data-text-id"]) for r in rows] == texts["text_id"].tolist()
    starts = [i for i, e in enumerate(els) if e.get("class") == "text-row"] + [len(els)]
    for k, t in enumerate(texts.itertuples(index=False)):
        ids = ([tok.bos_token_id] + tok(t.text, add_special_tokens=False)["input_ids"])[: SPEC["corpus"]["max_tokens"]]
        with torch.no_grad():
            hf(torch.tensor([ids]))
        want = seen["post"][0, :, neurons[0]].double().numpy()
        spans = [e for e in els[starts[k] : starts[k + 1]] if e["tag"] == "span" and "tok" in e.get("class", "")]
        got = np.array([float(s["data-act"]) for s in spans])
        assert len(got) == len(ids) and np.abs(got - want).max() <= 1e-5
        assert "target" in spans[-1]["class"] and sum("target" in s["class"] for s in spans) == 1
        assert abs(got[-1] - cache[t.text_id]) <= 1e-5 and abs(t.activation - cache[t.text_id]) <= 1e-5
    assert (texts["chosen"] == "top").sum() == TOP
    top = texts[texts["chosen"] == "top"]["actual_orig"].to_numpy()
    assert np.allclose(top, np.sort(cache.to_numpy())[::-1][:TOP])  # the highest-activating test texts


@pytest.mark.slow
def test_results_neuron_is_the_page(sweep, page):
    d, neurons = sweep
    n = open_results(d).neuron(LAYER, neurons[0], top=TOP, sample=SAMPLE)
    comp = pd.read_parquet(d / "tables" / "comparison.parquet").query("neuron == @neurons[0]")
    key = ["head", "freeze"]
    pd.testing.assert_frame_equal(n.comparison.sort_values(key).reset_index(drop=True),
                                  comp.sort_values(key).reset_index(drop=True))
    assert set(n.probes["role"]) == {"self", "shuffled", "cross_model", "input_only"}
    want = open_store(d).test_predictions(n.probes["trial_id"]).sort_values(["trial_id", "text_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(n.predictions[want.columns].reset_index(drop=True), want)
    assert set(n.patch["role"]) == {"self", "shuffled"} and n.patch["delta_pred"].notna().all()
    assert {"cos_win", "cos_wout_eff"} <= set(n.cosines.columns)
    strip = lambda h: re.sub(r"Generated [^<]* by", "", h)  # noqa: E731
    assert strip(n._repr_html_()) == strip(page.read_text())
    assert ".nsr-neuron " in n.html() and "body{" not in n.html()  # inline in a notebook, its CSS stays its own


@pytest.mark.slow
def test_a_partial_sweep_says_what_is_missing(sweep, tmp_path):
    """The second neuron has no unfrozen trial; without the comparison table, and before any table is built, the
    page is still written and names what it lacks."""
    d, neurons = sweep
    copy = tmp_path / "npage"
    shutil.copytree(d, copy)
    (copy / "tables" / "comparison.parquet").unlink()
    n = open_results(copy).neuron(LAYER, neurons[1], top=2, sample=2)
    assert set(n.probes["freeze"]) == {"none"} and n.comparison.empty
    html = n.html()
    assert "comparison.parquet does not exist yet" in html and "is incomplete" in html
    assert html.count('class="probe-panel"') == 4 and len(n.texts) == 4
    shutil.rmtree(copy / "tables")
    out = tmp_path / "page.html"
    r = CliRunner().invoke(main, ["neuron", str(copy), "--layer", str(LAYER), "--neuron", str(neurons[0]),
                                  "--out", str(out)])
    assert r.exit_code == 0 and "tables/trials.parquet does not exist yet" in out.read_text()


PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target && e.target.src)), true);
window.addEventListener('load', () => {
  const loaded = el => !!el && el.complete && el.naturalWidth > 0;
  const panels = [...document.querySelectorAll('section.probe-panel')].map(s => ({id: s.id, img: loaded(s.querySelector('img'))}));
  const out = {errors: window.__errors, panels: panels, texts: document.querySelectorAll('tr.text-row').length,
               targets: document.querySelectorAll('span.tok.target').length,
               patch: loaded(document.querySelector('#patch-curve img')),
               height: document.body.scrollHeight};
  const el = document.createElement('pre'); el.id = '__probe'; el.textContent = JSON.stringify(out);
  document.body.appendChild(el);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (Debian package `chromium`)")
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = subprocess.run([CHROMIUM, *FLAGS, "--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=10000",
                          "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["errors"] == [] and probe["height"] > 2000
    assert [p["id"] for p in probe["panels"]] == ["panel-self", "panel-shuffled", "panel-cross_model", "panel-input_only"]
    assert all(p["img"] for p in probe["panels"]) and probe["patch"]
    assert probe["texts"] == TOP + SAMPLE and probe["targets"] == TOP + SAMPLE
