"""One trial: (layer, neuron, head, freeze) with one set of hyperparameters — trained, evaluated, analysed.

Plain Python, no Ray: a model worker calls `run_trial` for an unfrozen trial and `run_trials` for a unit of
frozen-base probes, with its `reuse.Reuse` (what it keeps between units). It reads like the experiment:

    the neuron's activations (the target; permuted for the shuffled control)
    → a seeded train/val/test split
    → fit the head (`fit`: a probe on cached features, or the model under a frozen head)
    → predictions on every text, the neuron re-read in the final model, the metrics
    → the analyses in the final model (`analyses`, through `forward.TrialModel`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .cache import ActivationCache, neuron_hook
from .controls import control_of
from .errors import NsrError
from .finish import Predictions, trial_metrics
from .fit import Recipe, fit_probes, train_model
from .forward import TrialModel, read_points, resid_after
from .heads import HeadMap, LinearHead, digit_token_ids, frozen_head
from .models import LoadedModel
from .reuse import Reuse
from .spec import TrialSpec, split_sizes
from .surface import Surface


@dataclass
class TrialResult:
    spec: TrialSpec
    status: str  # ok | failed
    metrics: dict = field(default_factory=dict)
    reason: str | None = None
    predictions: Predictions | None = None  # every text's values: row `column` of its unit's stacked predictions
    column: int = 0
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    save_model: Callable | None = None  # writes the final model as an HF-format directory (save_weights)
    history: list[dict] = field(default_factory=list)
    patch: pd.DataFrame | None = None  # raw activation-patching points

    @property
    def preds(self) -> pd.DataFrame | None:
        """Every text: text_id, split, actual_orig, actual_ft, pred, readout (a table built on each call)."""
        return None if self.predictions is None else self.predictions.frame(self.column)


@dataclass
class Fit:
    """What fitting produced, the same for every freeze mode."""

    hmap: HeadMap
    head: LinearHead
    surface: Surface | None  # the final model: the base surface (probes) or the trained one
    trained: bool
    out: torch.Tensor  # head outputs on every text
    history: list[dict]
    solver: dict  # how the head was fitted: solver, converged, l2, iterations (recorded as metrics)


def split_indices(n: int, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded shuffle, then cut: train / val / test index arrays (sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val, _ = split_sizes(n, fractions)
    cuts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    if min(len(v) for v in cuts.values()) < 2:
        raise NsrError(f"corpus of {n} texts is too small to split {fractions}: each split needs ≥ 2 texts")
    return {k: np.sort(v) for k, v in cuts.items()}


def run_trial(cache: ActivationCache, model: LoadedModel | None, spec: TrialSpec, on_epoch=None,
              outsider: LoadedModel | None = None, reuse: Reuse | None = None) -> TrialResult:
    """Train, evaluate and analyse one trial. A non-finite loss gives status `failed` with the reason.

    `on_epoch(record) -> bool` sees each epoch's validation record; False stops training there.
    For the cross_model control, `outsider` is the other model: it reads the same texts (its own
    tokens, from `cross_view`) and is what trains; the target stays this model's neuron."""
    return run_trials(cache, model, [spec], on_epoch, outsider, reuse)[0]


def run_trials(cache: ActivationCache, model: LoadedModel | None, specs: list[TrialSpec], on_epoch=None,
               outsider: LoadedModel | None = None, reuse: Reuse | None = None) -> list[TrialResult]:
    """Trials that share their work: the frozen-base probes of one layer — any neurons, heads and controls —
    fitted together and patched from one set of patched features (`run_probes`; each probe's numbers are
    what it gets alone), or one unfrozen trial. `reuse`: the worker's memos (none: a fresh one, this call only)."""
    if specs[0].freeze == "none":
        return run_probes(cache, model, specs, on_epoch, reuse)
    if len(specs) != 1:
        raise NsrError("only frozen-base probes (freeze none) run together; an unfrozen trial runs alone")
    spec = specs[0]
    if spec.control == "cross_model":
        if outsider is None:
            raise NsrError("control cross_model needs the other model (outsider)")
        cache, model = cross_view(cache), outsider
    else:
        spec.check(model)
    t0 = time.perf_counter()
    real = np.asarray(cache.activations(spec.layer, spec.neuron), np.float64)
    y = shuffled_target(real, spec) if spec.control == "shuffled" else real
    splits = split_indices(cache.n_texts, spec.splits.fractions, spec.seed)
    seqs, answer_pos, digit_ids = sequences(cache, spec, model)
    try:
        fit: Fit | FloatingPointError = fit_head(cache, model, spec, y, splits, seqs, answer_pos, digit_ids, on_epoch)
    except FloatingPointError as e:
        fit = e
    return _finish(cache, model, [spec], [fit], [real], [y], splits, [time.perf_counter() - t0], seqs=seqs,
                   answer_pos=answer_pos)


UNIT_KEYS = ("layer", "freeze", "seed", "features", "splits", "analysis")
"""What the probes of one unit of work share (they differ in neuron, head, control and sample)."""
FIT_KEYS = ("head", "training")
"""Probes of a unit with the same values here, reading the same features, are one `fit_probes` call (one
column per probe: a real probe and its shuffled control share one solve)."""


def recipe(spec: TrialSpec) -> Recipe:
    """How the trial fits: its training section and its own seed, as plain values."""
    t = spec.training
    return Recipe(solver=t.solver, n_bins=t.n_bins, lr=t.lr, epochs=t.epochs, batch_size=t.batch_size,
                  weight_decay=t.weight_decay, patience=t.patience, precision=t.precision, seed=spec.trial_seed)


def feature_source(spec: TrialSpec) -> tuple:
    """Which features a probe reads: this model's (real and shuffled), or a control's stand-in."""
    return ("model",) if spec.reads_model else (spec.control, spec.cross_model)


def features_key(spec: TrialSpec) -> tuple:
    """What a probe's train features are, as a memo key: their source (at the neuron's layer for a source read
    there) and the split (the sweep's seed and fractions)."""
    layer = spec.layer if control_of(spec.control).layer_features else None
    return (*feature_source(spec), layer, spec.seed, spec.splits.fractions)


def analyses_read_neuron(spec: TrialSpec) -> bool:
    """Whether a trial's analyses (cosines, projections, patching) read this model's neuron: analyses on, and the
    real target or its shuffled control — another model's or the text's predictor has no path from it."""
    return spec.analysis.enabled and spec.reads_model


def batchable(specs: list[TrialSpec]) -> None:
    """Only frozen-base probes of one layer, with the same splits and analyses, share a unit; only exact
    solves (nothing to search) run more than one at a time."""
    s = specs[0]
    if s.freeze != "none" or (len(specs) > 1 and any(o.training.solver != "exact" for o in specs)):
        raise NsrError("only frozen-base probes solved exactly (freeze none, solver exact) run as a batch")
    for other in specs[1:]:
        if any(getattr(other, k) != getattr(s, k) for k in UNIT_KEYS):
            raise NsrError(f"a batch's trials share {', '.join(UNIT_KEYS)}")


def shuffled_target(real: np.ndarray, spec: TrialSpec) -> np.ndarray:
    """The shuffled control's target: the neuron's activations permuted once — one permutation per neuron
    and split seed, the same for every head and search sample."""
    return np.random.default_rng([spec.seed, spec.layer, spec.neuron, 0x5EED]).permutation(real)


def run_probes(cache: ActivationCache, model: LoadedModel | None, specs: list[TrialSpec], on_epoch=None,
               reuse: Reuse | None = None) -> list[TrialResult]:
    """Probes on cached features (freeze none) of one layer, fitted per (head, control) group in one solve,
    then each probe's predictions, metrics and analyses; exact patching for every probe that reads this
    model (`probe_patching`: the patched features of each neuron computed once, read by every probe of it)."""
    batchable(specs)
    reuse = (reuse or Reuse()).bind(cache, model)
    spec = specs[0]
    for s in specs:
        if s.reads_model:
            s.check(model)
    if any(s.reads_model for s in specs) and spec.features.hook != cache.meta["spec"]["features"]:
        raise NsrError(f"features.hook {spec.features.hook!r} is not the cache's features "
                       f"({cache.meta['spec']['features']!r})")
    t0 = time.perf_counter()
    splits = split_indices(cache.n_texts, spec.splits.fractions, spec.seed)
    reals = [np.asarray(cache.activations(s.layer, s.neuron), np.float64) for s in specs]
    ys = [shuffled_target(r, s) if s.control == "shuffled" else r for s, r in zip(specs, reals)]
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((feature_source(s), *(getattr(s, k) for k in FIT_KEYS)), []).append(i)
    fits: list[Fit | FloatingPointError] = [FloatingPointError("not fitted")] * len(specs)
    fit_seconds = [0.0] * len(specs)
    for members in groups.values():
        t = time.perf_counter()
        got = probe_fits(cache, model, [specs[i] for i in members], np.stack([ys[i] for i in members], 1), splits,
                         on_epoch if len(specs) == 1 else None, reuse)
        for i, f in zip(members, got):
            fits[i], fit_seconds[i] = f, (time.perf_counter() - t) / len(members)
    weights = None
    if model is not None and any(analyses_read_neuron(s) for s in specs):
        from .analyses import LayerWeights

        weights = LayerWeights(model.surface, spec.layer)  # once per unit: every probe's cosines read it
    results = _finish(cache, model, specs, fits, reals, ys, splits, fit_seconds, batched=len(specs) > 1, weights=weights)
    _cosine_probes(specs, fits, results, weights)
    _patch_probes(cache, model, specs, fits, results, reals, splits, len(specs) > 1, reuse)
    share = (time.perf_counter() - t0) / len(specs)  # the unit's wall time, shared out
    for r in results:
        r.metrics["seconds"] = share
    return results


def _member(batched: bool, spec: TrialSpec, finish: Callable[[], TrialResult]) -> TrialResult:
    """A probe's own error fails it alone in a batch; alone, it goes up (and Tune retries the trial)."""
    if not batched:
        return finish()
    try:
        return finish()
    except Exception as e:  # noqa: BLE001 - recorded as this trial's reason
        return TrialResult(spec, "failed", reason=f"{type(e).__name__}: {e}"[:2000])


def _cosine_probes(specs, fits, results, weights) -> None:
    """Every analysed probe's readout direction against its neuron's weights: one matrix product per weight set
    for the whole unit (`analyses.direction_cosines`)."""
    from .analyses import direction_cosines, readout_direction

    todo = [i for i, (s, r) in enumerate(zip(specs, results))
            if r.status == "ok" and analyses_read_neuron(s) and weights is not None]
    if not todo:
        return
    directions = torch.stack([readout_direction(fits[i].head.weight, fits[i].hmap) for i in todo])
    cols = direction_cosines(weights, specs[todo[0]].read_hook, directions, [specs[i].neuron for i in todo])
    for i, c in zip(todo, cols):
        results[i].metrics.update(c)


def _patch_probes(cache, model, specs, fits, results, reals, splits, batched: bool, reuse: Reuse) -> None:
    """Exact patching (and its first-order estimate) for every fitted probe that reads this model's features."""
    from .analyses import Probe, fit_patch, patch_grid, probe_patching

    todo = [i for i, (s, r) in enumerate(zip(specs, results))
            if r.status == "ok" and analyses_read_neuron(s) and model is not None]
    if not todo:
        return
    t0 = time.perf_counter()
    spec = specs[todo[0]]
    sample = splits["test"][: spec.analysis.patch_texts]
    engine = last_position(model, cache, sample, spec.layer, spec.features.hook, reuse)
    train = splits["train"]
    grids = {specs[i].neuron: patch_grid(reals[i][train], spec.analysis.patch_grid, spec.analysis.n_grid, spec.analysis.scales) for i in todo}
    probes = [Probe(specs[i].neuron, fits[i].head, fits[i].hmap) for i in todo]
    points, estimates = probe_patching(engine, probes, grids, spec.analysis.patch_grid == "scale", sample)
    share = (time.perf_counter() - t0) / len(todo)
    for i, pts, est in zip(todo, points, estimates):
        try:
            results[i].metrics.update({**fit_patch(pts), "patch_slope_est": est, "patch_seconds": share})
            results[i].patch = pts
        except Exception as e:  # noqa: BLE001 - this probe alone
            if not batched:
                raise
            results[i] = TrialResult(specs[i], "failed", reason=f"{type(e).__name__}: {e}"[:2000])


def last_position(model: LoadedModel, cache: ActivationCache, sample: np.ndarray, layer: int, read_hook: str,
                  reuse: Reuse):
    """The patching engine for the texts `sample` of the cache, shared by the units of one worker that patch the
    same texts at the same layer (`reuse` is bound to this cache and model: the key names the texts by index)."""
    from .patching import LastPosition

    hook = cache.meta["spec"]["hook"]
    key = (layer, hook, read_hook, np.asarray(sample, np.int64).tobytes())
    return reuse.engine(key, lambda: LastPosition(model.surface, [cache.tokens[i] for i in sample], layer, hook,
                                                  read_hook, model.tokenizer.pad_token_id))


def _finish(cache, model, specs: list[TrialSpec], fits: list, reals: list, ys: list, splits, fit_seconds: list[float], *,
            batched: bool = False, weights=None, seqs=None, answer_pos=None) -> list[TrialResult]:
    """Trials after their fits — a unit's probes, or one unfrozen trial: every fitted trial's predictions stacked
    (`Predictions`), their metrics in one pass (`trial_metrics`), then each one's own columns (`_finish_one`). A
    failed fit fails its trial alone; in a batch (`batched`), so does an error in a trial's own columns."""
    t0 = time.perf_counter()
    done = [i for i, f in enumerate(fits) if isinstance(f, Fit)]
    finished: dict[int, TrialResult] = {}
    if done:
        fitted = [fits[i] for i in done]
        preds = Predictions.stacked(splits, [ys[i] for i in done],
                                    [final_activations(cache, model, specs[i], fits[i], reals[i]) for i in done],
                                    [f.hmap.predict(f.out).numpy() for f in fitted],
                                    [f.hmap.readout(f.out).numpy() for f in fitted])
        rows = trial_metrics(preds, [f.hmap.train_mean for f in fitted], np.stack([reals[i] for i in done]),
                             [specs[i].control == "shuffled" for i in done], [f.hmap for f in fitted])
        projecting = None
        if weights is not None:  # the layer's weights and the cache's test texts, read once for the unit's projections
            from .analyses import test_reads

            projecting = (weights, test_reads(cache, specs[0].layer, splits["test"]))
        for col, i in enumerate(done):
            finished[i] = _member(batched, specs[i], partial(_finish_one, cache, model, specs[i], fits[i], reals[i],
                                                             fit_seconds[i], preds, col, rows[col], splits, t0,
                                                             projecting, seqs, answer_pos))
    return [finished[i] if i in finished else TrialResult(s, "failed", reason=str(f), metrics={"seconds": sec})
            for i, (s, f, sec) in enumerate(zip(specs, fits, fit_seconds))]


def _finish_one(cache, model, spec: TrialSpec, fit: Fit, real, fit_seconds: float, preds: Predictions, col: int,
                metrics: dict, splits, t0: float, projecting, seqs, answer_pos) -> TrialResult:
    """A trial after its metrics (`metrics`; its predictions: row `col` of `preds`): how it fitted, and its analyses.
    A probe (`fit.trained` False) gets its projections here (`projecting`: its layer's weights and the cache's
    test-text reads, once per unit); its cosines and patching come for the whole unit (`_cosine_probes`,
    `_patch_probes`). An unfrozen trial is analysed in its final model (`seqs`, `answer_pos`)."""
    best = int(np.argmin([h["val_mse"] for h in fit.history]))
    train_seconds = fit_seconds + (time.perf_counter() - t0 if fit.trained else 0.0)  # the re-read counts as training
    metrics = {**metrics, "epochs_run": len(fit.history), "best_epoch": best, "val_mse": fit.history[best]["val_mse"],
               "val_loss": fit.history[best]["val_loss"], "train_seconds": train_seconds,
               "train_mean": fit.hmap.train_mean, **fit.solver}
    columns, points = _analyses(cache, model, spec, fit, preds, col, splits, real, projecting, seqs, answer_pos)
    metrics.update(columns)
    if fit.trained:  # a unit's probes get their share of the unit's time (`run_probes`)
        metrics["seconds"] = fit_seconds + time.perf_counter() - t0
    return TrialResult(spec, "ok", metrics, predictions=preds, column=col, head={**fit.head.state(), **fit.hmap.state()},
                       save_model=_saver(model, spec, fit), history=fit.history, patch=points)


def final_activations(cache, model, spec: TrialSpec, fit: Fit, real: np.ndarray) -> np.ndarray:
    """The neuron in the final model: re-read on the same texts at the same position where it trained (freeze all,
    this model), else the cached activations."""
    if not (spec.freeze == "all" and spec.reads_model):
        return real
    assert model is not None and fit.surface is not None
    hook = cache.meta["spec"]["hook"]
    return read_points(fit.surface, cache.tokens, cache.positions, [neuron_hook(spec.layer, hook)],
                       model.tokenizer.pad_token_id)[neuron_hook(spec.layer, hook)][:, spec.neuron]


def _analyses(cache, model, spec: TrialSpec, fit: Fit, preds: Predictions, col: int, splits, real, projecting, seqs,
              answer_pos):
    """(analysis columns, patching points or None): a predictor that reads this model's neuron is analysed (a probe:
    its projections; an unfrozen trial: `analyses.analyse` in its final model); any other gets the patch columns
    of a predictor the neuron cannot move."""
    from .analyses import analyse, projection_columns, unreachable_patch

    if not spec.analysis.enabled:
        return {}, None
    if not (spec.reads_model and model is not None):
        return unreachable_patch(probe=not fit.trained), None  # another model's features, or the text's
    if not fit.trained:
        test = splits["test"]
        weights, reads = projecting
        return projection_columns(reads, weights, spec.neuron, preds.readout[col][test], real[test]), None
    assert fit.surface is not None
    final = TrialModel(fit.surface, fit.head, spec.read_hook, seqs, answer_pos, cache.positions, spec.layer,
                       cache.meta["spec"]["hook"], spec.neuron, model.tokenizer.pad_token_id)
    return analyse(cache, model.surface, final, spec, fit.hmap, preds.frame(col), splits, real)


def _saver(model, spec: TrialSpec, fit: Fit) -> Callable | None:
    """What writes a fine-tuned model as an HF-format directory (save_weights), or None."""
    if not (spec.training.save_weights and fit.trained and fit.surface is not None and model is not None):
        return None
    hf, tok = fit.surface.to_hf(), model.tokenizer

    def save(path):
        hf.save_pretrained(path)
        tok.save_pretrained(path)
    return save


def probe_fits(cache: ActivationCache, model: LoadedModel | None, specs: list[TrialSpec], Y: np.ndarray, splits: dict,
               on_epoch, reuse: Reuse | None = None) -> list[Fit | FloatingPointError]:
    """Probes on the cached features (freeze none), one per column of Y, fitted in one call (the SVD of their
    features from `reuse`, bound to this cache)."""
    spec = specs[0]
    features = control_features(cache, spec)
    svd = reuse.svd(features_key(spec)) if reuse is not None else None
    try:
        pf = fit_probes(features, Y, spec.head, recipe(spec), splits, on_epoch=on_epoch, svd=svd)
    except FloatingPointError as e:
        return [e] * len(specs)
    X = torch.from_numpy(np.array(features, np.float32))  # a private copy: cache arrays are read-only views
    fits: list[Fit | FloatingPointError] = []
    for j in range(len(specs)):
        if pf.failed[j]:
            fits.append(FloatingPointError(pf.failed[j]))
            continue
        head = pf.head(j)
        solver = {k if k in ("solver", "converged") else f"solver_{k}": v for k, v in pf.info[j].items()}
        fits.append(Fit(pf.maps[j], head, model.surface if model is not None else None, False, head(X),
                        pf.history[j], solver))
    return fits


def fit_head(cache: ActivationCache, model: LoadedModel | None, spec: TrialSpec, y: np.ndarray, splits: dict,
             seqs: list[list[int]], answer_pos: np.ndarray, digit_ids, on_epoch) -> Fit:
    """The model trained under a frozen head (freeze after_target or all)."""
    assert model is not None, "an unfrozen trial needs the base model"
    s = model.surface
    hmap = HeadMap(spec.head, y[splits["train"]], spec.training.n_bins)
    head = frozen_head(spec.head, s.unembed, model.d_model, hmap.n_out, spec.trial_seed, digit_ids)
    pad = model.tokenizer.pad_token_id
    lengths = np.array([len(q) for q in seqs])
    if spec.freeze == "after_target":  # blocks ≤ L never train: start from the residual after block L
        start = spec.layer + 1
        has = spec.head != "token" and spec.layer in cache.resid
        resid = torch.from_numpy(np.asarray(cache.resid[spec.layer])) if has else resid_after(s, seqs, spec.layer, pad)
        inputs = lambda idx: resid[idx, : int(lengths[idx].max())].to(s.device)  # noqa: E731
    else:
        from .cache import pad_batch

        start = 0
        inputs = lambda idx: s.embed_ids(pad_batch([seqs[i] for i in idx], pad, s.device)[0])  # noqa: E731
    net, history = train_model(s, start, inputs, head, hmap, y, answer_pos, recipe(spec), splits, on_epoch)
    final = TrialModel(net, head, spec.read_hook, seqs, answer_pos, cache.positions, spec.layer, "post",
                       spec.neuron, pad)
    out, _ = final.batched(np.arange(len(seqs)))
    return Fit(hmap, head, net, True, out, history, {"solver": "adamw", "converged": None})


def sequences(cache: ActivationCache, spec: TrialSpec, model: LoadedModel | None):
    """Token sequences the model reads, the head's read position in each (the answer position: the
    suffix's last token for token heads, else the text's last token), and the digit token ids."""
    if spec.head != "token":
        return cache.tokens, np.asarray(cache.positions), None
    assert model is not None, "a token head needs the model's tokenizer"
    suffix = spec.training.suffix.format(layer=spec.layer, neuron=spec.neuron)
    digit_ids = digit_token_ids(model.tokenizer, suffix)
    suffix_ids = model.tokenizer.encode(suffix, add_special_tokens=False)
    seqs = [list(t) + suffix_ids for t in cache.tokens]
    return seqs, np.array([len(q) - 1 for q in seqs]), digit_ids


def control_features(cache: ActivationCache, spec: TrialSpec) -> np.ndarray:
    """The features a frozen-base head reads: the cache's, or a control's stand-in."""
    if spec.control == "input_only":  # no transformer at all: what the text alone predicts
        return bag_of_tokens(cache.tokens)
    if spec.control == "early_features":  # the residual before block L cannot contain the neuron's output
        return cache.extra[f"resid_pre_L{spec.layer}"]
    if spec.control == "cross_model" and spec.freeze == "none":  # another model's features of the same texts
        if "cross_model_features" not in cache.extra:
            raise NsrError("control cross_model needs the other model's features in the cache "
                           "(add {cross_model: <model>} to the sweep's controls)")
        return cache.extra["cross_model_features"]
    if spec.control == "random_model":  # the same architecture with random weights
        if "random_model_features" not in cache.extra:
            raise NsrError("control random_model needs the random model's features in the cache "
                           "(add random_model to the sweep's controls)")
        return cache.extra["random_model_features"]
    return cache.features


def bag_of_tokens(seqs: list[list[int]]) -> np.ndarray:
    """The input-only control's features: counts of every token in the text, and one-hots of its last two
    tokens (the neuron is read at the last one), over the token ids the corpus uses (float32)."""
    vocab = {t: i for i, t in enumerate(sorted({t for q in seqs for t in q}))}
    V = len(vocab)
    X = np.zeros((len(seqs), 3 * V), np.float32)
    for row, q in enumerate(seqs):
        ids = [vocab[t] for t in q]
        np.add.at(X[row], ids, 1.0)
        X[row, V + ids[-1]] = 1.0
        if len(ids) > 1:
            X[row, 2 * V + ids[-2]] = 1.0
    return X


def cross_view(cache: ActivationCache) -> ActivationCache:
    """The cache as the other model sees the same texts: its tokens, positions and features; this model's
    neuron stays the target (`acts`). Its features are built by `sweep.inputs.build_cache` for the cross_model
    control."""
    if "cross_model_features" not in cache.extra:
        raise NsrError("control cross_model needs the other model's features in the cache "
                       "(add {cross_model: <model>} to the sweep's controls)")
    padded = np.asarray(cache.extra["cross_model_tokens"])
    seqs = [row[row >= 0].tolist() for row in padded]
    return replace(cache, tokens=seqs, positions=np.array([len(q) - 1 for q in seqs], np.int64),
                   features=cache.extra["cross_model_features"], resid={})
