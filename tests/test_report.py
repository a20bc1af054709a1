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
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing fetched from the network
    assert (sweep_dir / "report.html").stat().st_size < 15e6


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
    assert st.exit_code == 0, st.output
    status = json.loads(st.output)
    assert status["counts"]["damaged"] == 1 and status["state"] == "damaged"
    r = CliRunner().invoke(main, ["report", str(d)])
    assert r.exit_code == 0, r.output
    page = (d / "report.html").read_text()
    failures = page[page.index('id="failures"'):page.index('id="trials"')]
    assert "L1-N3-regression-none-s0" in failures and "damaged" in failures and "unreadable metrics.json" in failures
