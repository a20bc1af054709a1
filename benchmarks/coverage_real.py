"""Coverage of the tool's 95% intervals on real neurons, against texts the sweep never saw (issue 27).

    python benchmarks/coverage_real.py [--sweep sweeps/every-neuron.yaml] [--layers 2 3] [--draws 400]
                                       [--population 14545] [--threads 2] [--work DIR]

The sweep file's defaults, frozen-base probes (freeze none), every neuron of the chosen layers, both heads:
1. one activation cache of the sweep's model (and its cross-model) over its corpus *and* the texts after it —
   `load_corpus` keeps a prefix of one seeded order, so texts n_texts… are a held-out population;
2. the probes of self, cross-model and input-only fitted exactly as the sweep fits them (`fit_probes` on the sweep's
   own train/val split of its first n_texts texts: the same heads), and their predictions on every text;
3. each neuron's population value — r and skill of each predictor, and the gaps self − cross and self − input-only —
   on the held-out texts;
4. `--draws` fresh test sets of the sweep's test-split size, drawn from the population, each given to the tool's own
   interval functions (`compare.neuron_intervals`, the code behind tables/comparison.parquet); and, once, the
   sweep's own test split.

Prints, per cell (head × statistic): coverage (population inside the interval), the one-sided misses (population
below / above the interval), by `n_test_eff` of the draw, and the row of the sweep's own split. Population
predictions are kept in `--work` (rerunning only evaluates).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("self", "cross", "input_only")
N_EFF_BINS = (0, 5, 10, 30, np.inf)


def population_predictions(sweep: Path, layers: list[int], population: int | None, threads: int,
                           work: Path) -> dict:
    """Every text's prediction by the sweep's probes (self, cross-model, input-only; both heads) and the neurons'
    activations: {"spec", "n_texts", "y" (L → texts × neurons), "pred" ((L, head, source) → texts × neurons),
    "train_mean" ((L, head) → neurons)}; cached in `work`."""
    import torch

    from nsr_sweep.core.corpus import load_corpus
    from nsr_sweep.core.fit import fit_probes
    from nsr_sweep.core.spec import TrialSpec
    from nsr_sweep.core.trial import bag_of_tokens, recipe, split_indices
    from nsr_sweep.sweep.inputs import build_cache
    from nsr_sweep.sweep.validate import checked_sweep

    spec = checked_sweep(sweep)
    n = spec.corpus.n_texts
    total = len(load_corpus(spec.corpus.source, seed=spec.corpus.seed).texts)
    total = total if population is None else min(total, n + population)
    from nsr_sweep.core.spec import METHOD_VERSION

    key = f"{spec.name}-L{'-'.join(map(str, layers))}-{total}-m{METHOD_VERSION}"  # another method: other predictions
    path = work / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return _unpack(dict(z), spec)
    torch.set_num_threads(threads)
    full = spec.model_copy(update={"corpus": spec.corpus.model_copy(update={"n_texts": total}),
                                   "layers": list(layers)})
    t0 = time.perf_counter()
    cache = build_cache(full, progress=True)
    print(f"cache: {total} texts ({n} the sweep's, {total - n} held out), {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    sweep_splits = split_indices(n, spec.splits.fractions, spec.seed)
    features = {"self": cache.features, "cross": cache.extra["cross_model_features"],
                "input_only": bag_of_tokens(cache.tokens)}
    out: dict[str, np.ndarray] = {"n_texts": np.array(n), "test": sweep_splits["test"]}
    for L in layers:
        Y = np.asarray(cache.acts[L], np.float64)
        out[f"y/{L}"] = Y
        for head in ("regression", "classification"):
            if head not in spec.heads:
                continue
            probe = TrialSpec(layer=L, neuron=0, head=head, seed=spec.seed, training=spec.training,
                              splits=spec.splits, features=spec.features)
            for src in SOURCES:
                t0 = time.perf_counter()
                fit = fit_probes(features[src], Y, head, recipe(probe), sweep_splits)
                X = torch.from_numpy(np.array(features[src], np.float32))
                out[f"pred/{L}/{head}/{src}"] = np.stack(
                    [fit.maps[j].predict(fit.head(j)(X)).numpy() for j in range(Y.shape[1])], 1)
                if src == "self":
                    out[f"train_mean/{L}/{head}"] = np.array([m.train_mean for m in fit.maps])
                print(f"layer {L} {head} {src}: {Y.shape[1]} probes, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return _unpack(out, spec)


def _unpack(z: dict, spec) -> dict:
    got: dict = {"spec": spec, "n_texts": int(z["n_texts"]), "test": z["test"], "y": {}, "pred": {},
                 "train_mean": {}}
    for k, v in z.items():
        kind, *rest = k.split("/")
        if kind == "y":
            got["y"][int(rest[0])] = v
        elif kind == "pred":
            got["pred"][(int(rest[0]), rest[1], rest[2])] = v
        elif kind == "train_mean":
            got["train_mean"][(int(rest[0]), rest[1])] = v
    return got


def population_values(pop: dict, L: int, head: str) -> dict[str, np.ndarray]:
    """Each neuron's value of every statistic on the held-out texts (the same columns as `neuron_intervals`)."""
    from nsr_sweep.results.compare import neuron_intervals

    held = np.arange(pop["n_texts"], pop["y"][L].shape[0])
    return {k: v["point"] for k, v in neuron_intervals(*_arrays(pop, L, head, held)).items()}


def _arrays(pop: dict, L: int, head: str, idx: np.ndarray):
    """(predictions by source, actual, train_mean) on texts `idx`, neurons × texts."""
    return ({s: pop["pred"][(L, head, s)][idx].T for s in SOURCES}, pop["y"][L][idx].T,
            pop["train_mean"][(L, head)])


def _kurtosis(pop: dict, L: int, head: str, idx: np.ndarray, val: np.ndarray) -> dict:
    """Each predictor's `tail_kurtosis` over the test texts `idx` and the sweep's validation texts, as the sweep's
    trials measure it (test ∪ val: texts the weights never saw)."""
    from nsr_sweep.core.uncertainty import METRICS, tail_kurtosis

    preds, y, tm = _arrays(pop, L, head, np.concatenate([idx, val]))
    return {(src, m): tail_kurtosis(m, p, y, tm) for src, p in preds.items() for m in METRICS}


def evaluate(pop: dict, layers: list[int], draws: int, seed: int = 0) -> pd.DataFrame:
    """One row per (draw, layer, head, statistic, neuron): the interval, the population value, n_test_eff."""
    from nsr_sweep.core.trial import split_indices
    from nsr_sweep.core.uncertainty import effective_texts
    from nsr_sweep.results.compare import neuron_intervals

    n_test = len(pop["test"])
    spec = pop["spec"]
    val = split_indices(pop["n_texts"], spec.splits.fractions, spec.seed)["val"]
    rng = np.random.default_rng(seed)
    frames = []
    for L in layers:
        held = np.arange(pop["n_texts"], pop["y"][L].shape[0])
        for head in sorted({h for (LL, h, _) in pop["pred"] if LL == L}):
            truth = population_values(pop, L, head)
            for d in range(-1, draws):  # draw −1: the sweep's own test split
                idx = pop["test"] if d < 0 else np.sort(rng.choice(held, n_test, replace=False))
                preds, y, tm = _arrays(pop, L, head, idx)
                n_eff = np.array([effective_texts(row) for row in y])
                for stat, iv in neuron_intervals(preds, y, tm, _kurtosis(pop, L, head, idx, val)).items():
                    frames.append(pd.DataFrame({
                        "draw": d, "layer": L, "head": head, "stat": stat, "neuron": np.arange(len(y)),
                        "lo": iv["lo"], "hi": iv["hi"], "point": iv["point"], "truth": truth[stat],
                        "p": iv.get("p", np.nan), "n_test_eff": n_eff}))
    return pd.concat(frames, ignore_index=True)


def coverage_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (head, statistic): coverage and one-sided misses over fresh draws, by n_test_eff bin, and the sweep's
    own split. Intervals the data cannot bound (NaN: a statistic undefined on the draw) count as misses only when the
    population value is defined; they are also counted apart (`undefined`)."""
    r = rows[np.isfinite(rows["truth"])].copy()
    r["below"] = r["truth"] < r["lo"]  # the population lies below the interval: the interval is optimistic
    r["above"] = r["truth"] > r["hi"]
    r["undefined"] = ~(np.isfinite(r["lo"]) & np.isfinite(r["hi"]))
    r["covered"] = ~(r["below"] | r["above"] | r["undefined"])
    r["eff_bin"] = pd.cut(r["n_test_eff"], N_EFF_BINS, right=False,
                          labels=[f"<{N_EFF_BINS[1]}", *(f"{a}-{b}" for a, b in zip(N_EFF_BINS[1:-2], N_EFF_BINS[2:-1])),
                                  f"≥{N_EFF_BINS[-2]}"])
    fresh, own = r[r["draw"] >= 0], r[r["draw"] < 0]
    keys = ["head", "stat"]
    out = fresh.groupby(keys, sort=False).agg(coverage=("covered", "mean"), below=("below", "mean"),
                                             above=("above", "mean"), undefined=("undefined", "mean"),
                                             n=("covered", "size"))
    by_eff = fresh.groupby([*keys, "eff_bin"], observed=True, sort=False)["covered"].mean().unstack("eff_bin")
    out = out.join(by_eff.add_prefix("cov n_eff "))
    out["own split"] = own.groupby(keys, sort=False)["covered"].mean()
    return out.reset_index()


def count_table(rows: pd.DataFrame, q: float = 0.05) -> pd.DataFrame:
    """What a shared test split does to a layer's count "gap > 0: k of n" (Benjamini–Hochberg at q over the layer's
    neurons, as tables/comparison_by_layer.parquet counts): per (layer, head, gap), over fresh draws, k's mean, SD and
    5–95% range, the sweep's own split's k and its percentile among the draws, and the false calls — a call whose
    population gap has the other sign (or is 0) — as a mean count and as the false discovery rate (the mean over
    draws of false calls / calls)."""
    from nsr_sweep.core.multiple import bh_adjusted

    gaps = rows[rows["stat"].str.startswith("gap_")]
    per = []
    for (L, head, stat, d), g in gaps.groupby(["layer", "head", "stat", "draw"], sort=False):
        called = bh_adjusted(g["p"].to_numpy()) <= q
        pos, neg = called & (g["point"].to_numpy() > 0), called & (g["point"].to_numpy() < 0)
        truth = g["truth"].to_numpy()
        false = int((pos & ~(truth > 0)).sum() + (neg & ~(truth < 0)).sum())
        per.append({"layer": L, "head": head, "stat": stat, "draw": d, "k": int(pos.sum()), "calls": int(called.sum()),
                    "false": false, "fdp": false / max(int(called.sum()), 1), "n": len(g),
                    "truly_positive": int((truth > 0).sum())})
    per_df = pd.DataFrame(per)
    fresh, own = per_df[per_df["draw"] >= 0], per_df[per_df["draw"] < 0].set_index(["layer", "head", "stat"])
    out = fresh.groupby(["layer", "head", "stat"], sort=False).agg(
        n=("n", "first"), truly_positive=("truly_positive", "first"), k_mean=("k", "mean"), k_sd=("k", "std"),
        k_5=("k", lambda k: np.quantile(k, 0.05)), k_95=("k", lambda k: np.quantile(k, 0.95)),
        false_calls=("false", "mean"), fdr=("fdp", "mean"))
    out["own_k"] = own["k"]
    out["own_k_percentile"] = [float((fresh[(fresh.layer == L) & (fresh["head"] == h) & (fresh.stat == s)]["k"]
                                      <= own.loc[(L, h, s), "k"]).mean()) for L, h, s in out.index]
    return out.reset_index()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "every-neuron.yaml"))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--population", type=int, default=None, help="held-out texts (default: every text after the sweep's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".coverage_real")
    ap.add_argument("--rows", type=Path, default=None, help="also write every (draw, neuron, statistic) row here (Parquet)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    pop = population_predictions(Path(args.sweep), args.layers, args.population, args.threads, args.work)
    t1 = time.perf_counter()
    rows = evaluate(pop, args.layers, args.draws)
    if args.rows:
        rows.to_parquet(args.rows)
    table = coverage_table(rows)
    n_pop = pop["y"][args.layers[0]].shape[0] - pop["n_texts"]
    print(f"\n{pop['spec'].name}: layers {args.layers}, {len(pop['test'])} test texts per draw, {args.draws} draws from "
          f"{n_pop} held-out texts; population predictions {t1 - t0:.0f} s, intervals {time.perf_counter() - t1:.0f} s")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print("\nper layer: gap > 0 at BH q = 0.05 — k over fresh test draws, the sweep's own split, false calls")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(count_table(rows).to_string(index=False))
    cov, worst = table["coverage"], table[["below", "above"]].max(axis=1)
    ok = bool(((cov >= 0.93) & (cov <= 0.97) & (worst <= 0.04)).all())
    print(f"\nevery cell in 93–97% with one-sided misses ≤ 4%: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
