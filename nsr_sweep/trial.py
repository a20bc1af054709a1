"""One trial: (layer, neuron, head, freeze) with one set of hyperparameters — trained, evaluated, analysed.

Plain Python, no Ray: the sweep machinery calls exactly `run_trial`. It reads like the experiment:

    the neuron's activations (the target; permuted for the shuffled control)
    → a seeded train/val/test split
    → fit the head (`fit`: a probe on cached features, or the model under a frozen head)
    → predictions on every text, the neuron re-read in the final model, the metrics
    → the analyses in the final model (`analyses`, through `forward.TrialModel`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .cache import ActivationCache, neuron_hook
from .config import TrialSpec, split_sizes
from .errors import NsrError
from .fit import fit_probes, train_model
from .forward import TrialModel, read_points, resid_after
from .heads import HeadMap, LinearHead, digit_token_ids, frozen_head
from .metrics import prediction_metrics
from .models import BaseModel
from .surface import Surface
from .uncertainty import metric_intervals

SPLITS = ("train", "val", "test")


@dataclass
class TrialResult:
    spec: TrialSpec
    status: str  # ok | failed
    metrics: dict = field(default_factory=dict)
    reason: str | None = None
    preds: pd.DataFrame | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    save_model: Callable | None = None  # writes the final model as an HF-format directory (save_weights)
    history: list[dict] = field(default_factory=list)
    patch: pd.DataFrame | None = None  # raw activation-patching points


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


def run_trial(cache: ActivationCache, model: BaseModel | None, spec: TrialSpec, on_epoch=None,
              outsider: BaseModel | None = None) -> TrialResult:
    """Train, evaluate and analyse one trial. A non-finite loss gives status `failed` with the reason.

    `on_epoch(record) -> bool` sees each epoch's validation record; False stops training there.
    For the cross_model control, `outsider` is the other model: it reads the same texts (its own
    tokens, from `cross_view`) and is what trains; the target stays this model's neuron."""
    return run_trials(cache, model, [spec], on_epoch, outsider)[0]


def run_trials(cache: ActivationCache, model: BaseModel | None, specs: list[TrialSpec], on_epoch=None,
               outsider: BaseModel | None = None) -> list[TrialResult]:
    """Trials that share one fit: the frozen-base probes of many neurons of a layer (`batchable`), fitted
    together — each neuron's probe, metrics and analyses are what `run_trial` gives it alone — or one
    trial of any kind."""
    spec = specs[0]
    if len(specs) > 1:
        batchable(specs)
    if spec.control == "cross_model":
        if outsider is None:
            raise NsrError("control cross_model needs the other model (outsider)")
        cache, model = cross_view(cache), outsider
    else:
        for s in specs:
            s.check(model)
    if spec.freeze == "none" and spec.feature_hook != cache.meta["spec"]["features"]:
        raise NsrError(f"feature_hook {spec.feature_hook!r} is not the cache's features "
                       f"({cache.meta['spec']['features']!r})")
    for s in specs:
        _injected_failure(s)
    t0 = time.perf_counter()
    reals = [np.asarray(cache.activations(s.layer, s.neuron), np.float64) for s in specs]
    ys = [np.random.default_rng(s.seed).permutation(r) if s.control == "shuffled" else r for s, r in zip(specs, reals)]
    splits = split_indices(cache.n_texts, spec.splits, spec.split_seed)
    seqs, answer_pos, digit_ids = sequences(cache, spec, model)
    try:
        fits: list[Fit | FloatingPointError] = (
            probe_fits(cache, model, specs, np.stack(ys, 1), splits, on_epoch) if spec.freeze == "none"
            else [fit_head(cache, model, spec, ys[0], splits, seqs, answer_pos, digit_ids, on_epoch)])
    except FloatingPointError as e:
        fits = [e] * len(specs)
    shared = (time.perf_counter() - t0) / len(specs)  # the joint fit, shared out
    if len(specs) == 1:  # alone, an error goes up (and Tune retries the trial)
        return [_finish(cache, model, spec, fits[0], reals[0], ys[0], splits, seqs, answer_pos, shared)]
    return [_finish_member(cache, model, s, fit, real, y, splits, seqs, answer_pos, shared)
            for s, fit, real, y in zip(specs, fits, reals, ys)]


def _finish_member(cache, model, spec: TrialSpec, *args) -> TrialResult:
    """A batch member: its own error fails it alone, not the rest of the batch."""
    try:
        return _finish(cache, model, spec, *args)
    except Exception as e:  # noqa: BLE001 - recorded as this trial's reason
        return TrialResult(spec, "failed", reason=f"{type(e).__name__}: {e}"[:2000])


BATCH_KEYS = ("layer", "head", "freeze", "control", "cross_model", "feature_hook", "solver", "n_bins", "splits",
              "split_seed", "analyses", "patch_grid", "n_grid", "scales", "patch_texts")
"""What the trials of one batch share (they differ in neuron and seed)."""


def batchable(specs: list[TrialSpec]) -> None:
    """Only exact frozen-base probes of one layer, head and control fit together."""
    s = specs[0]
    if s.freeze != "none" or s.solver != "exact":
        raise NsrError("only frozen-base probes solved exactly (freeze none, solver exact) run as a batch")
    for other in specs[1:]:
        if any(getattr(other, k) != getattr(s, k) for k in BATCH_KEYS):
            raise NsrError(f"a batch's trials share {', '.join(BATCH_KEYS)}")


def _finish(cache, model, spec: TrialSpec, fit, real, y, splits, seqs, answer_pos, shared: float) -> TrialResult:
    """One trial after its fit: predictions, metrics, analyses."""
    t0 = time.perf_counter()
    if isinstance(fit, FloatingPointError):
        return TrialResult(spec, "failed", reason=str(fit), metrics={"seconds": shared})
    hook = cache.meta["spec"]["hook"]
    if spec.freeze == "all" and spec.control != "cross_model":
        assert model is not None and fit.surface is not None  # the neuron itself trained: re-read it, same texts, same position
        actual_ft = read_points(fit.surface, cache.tokens, cache.positions, [neuron_hook(spec.layer, hook)],
                                model.tokenizer.pad_token_id)[neuron_hook(spec.layer, hook)][:, spec.neuron]
    else:
        actual_ft = real
    preds = predictions(cache.n_texts, splits, y, actual_ft, fit)
    metrics = trial_metrics(preds, fit.hmap.train_mean, real, shuffled=spec.control == "shuffled")
    best = int(np.argmin([h["val_mse"] for h in fit.history]))
    metrics.update({"epochs_run": len(fit.history), "best_epoch": best, "val_mse": fit.history[best]["val_mse"],
                    "val_loss": fit.history[best]["val_loss"], "train_seconds": shared + time.perf_counter() - t0,
                    **fit.solver})
    points = None
    if spec.analyses and model is not None and fit.surface is not None and spec.control in (None, "shuffled"):
        from .analyses import analyse

        final = TrialModel(fit.surface, fit.head, spec.read_hook, seqs, answer_pos, cache.positions, spec.layer,
                           hook, spec.neuron, model.tokenizer.pad_token_id)
        columns, points = analyse(cache, model.surface, final, fit.trained, spec, fit.hmap, preds, splits, real)
        metrics.update(columns)
    metrics["seconds"] = shared + time.perf_counter() - t0
    save: Callable | None = None
    if fit.trained and spec.save_weights and fit.surface is not None and model is not None:
        hf, tok = fit.surface.to_hf(), model.tokenizer
        def save(path):
            hf.save_pretrained(path)
            tok.save_pretrained(path)
    return TrialResult(spec, "ok", metrics, preds=preds, head={**fit.head.state(), **fit.hmap.state()},
                       save_model=save, history=fit.history, patch=points)


def probe_fits(cache: ActivationCache, model: BaseModel | None, specs: list[TrialSpec], Y: np.ndarray, splits: dict,
               on_epoch) -> list[Fit | FloatingPointError]:
    """Probes on the cached features (freeze none), one per column of Y, fitted in one call."""
    spec = specs[0]
    features = control_features(cache, spec)
    pf = fit_probes(features, Y, spec.head, spec, splits, on_epoch=on_epoch if len(specs) == 1 else None)
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


def fit_head(cache: ActivationCache, model: BaseModel | None, spec: TrialSpec, y: np.ndarray, splits: dict,
             seqs: list[list[int]], answer_pos: np.ndarray, digit_ids, on_epoch) -> Fit:
    """The model trained under a frozen head (freeze after_target or all)."""
    assert model is not None, "an unfrozen trial needs the base model"
    s = model.surface
    hmap = HeadMap(spec.head, y[splits["train"]], spec.n_bins)
    head = frozen_head(spec.head, s.unembed, model.d_model, hmap.n_out, spec.seed, digit_ids)
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
    net, history = train_model(s, start, inputs, head, hmap, y, answer_pos, spec, splits, on_epoch)
    final = TrialModel(net, head, spec.read_hook, seqs, answer_pos, cache.positions, spec.layer, "post",
                       spec.neuron, pad)
    out, _ = final.batched(np.arange(len(seqs)))
    return Fit(hmap, head, net, True, out, history, {"solver": "adamw", "converged": None})


def sequences(cache: ActivationCache, spec: TrialSpec, model: BaseModel | None):
    """Token sequences the model reads, the head's read position in each (the answer position: the
    suffix's last token for token heads, else the text's last token), and the digit token ids."""
    if spec.head != "token":
        return cache.tokens, np.asarray(cache.positions), None
    assert model is not None, "a token head needs the model's tokenizer"
    suffix = spec.suffix.format(layer=spec.layer, neuron=spec.neuron)
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
    neuron stays the target (`acts`). Built by `sweep.build_cache` for the cross_model control."""
    if "cross_model_features" not in cache.extra:
        raise NsrError("control cross_model needs the other model's features in the cache "
                       "(add {cross_model: <model>} to the sweep's controls)")
    padded = np.asarray(cache.extra["cross_model_tokens"])
    seqs = [row[row >= 0].tolist() for row in padded]
    return replace(cache, tokens=seqs, positions=np.array([len(q) - 1 for q in seqs], np.int64),
                   features=cache.extra["cross_model_features"], resid={})


def predictions(n: int, splits: dict, y: np.ndarray, actual_ft: np.ndarray, fit: Fit) -> pd.DataFrame:
    preds = pd.DataFrame({
        "text_id": np.arange(n, dtype=np.int64),
        "split": pd.Categorical(np.full(n, "train", dtype=object), categories=list(SPLITS)),
        "actual_orig": y, "actual_ft": np.asarray(actual_ft, np.float64),
        "pred": fit.hmap.predict(fit.out).numpy(), "readout": fit.hmap.readout(fit.out).numpy(),
    })
    for name, idx in splits.items():
        preds.loc[idx, "split"] = name
    return preds


def trial_metrics(preds: pd.DataFrame, train_mean: float, real: np.ndarray | None = None,
                  shuffled: bool = False) -> dict[str, float]:
    """Test-split metrics against actual_orig (with bootstrap intervals for r and skill), and against
    actual_ft (suffix `_ft`), plus drift.

    `drift` = mean(actual_ft − the real neuron): for the shuffled control the real neuron, not the permuted
    target, so it is 0 whenever the neuron cannot change; its `_ft` metrics would mix the two and are null."""
    test_mask = (preds["split"] == "test").to_numpy()
    test, val = preds[test_mask], preds[preds["split"] == "val"]
    m = prediction_metrics(test["pred"].to_numpy(), test["actual_orig"].to_numpy(), train_mean)
    ft = prediction_metrics(test["pred"].to_numpy(), test["actual_ft"].to_numpy(), train_mean)
    m.update(metric_intervals(test["pred"].to_numpy(), test["actual_orig"].to_numpy(), train_mean))
    m.update({f"{k}_ft": (float("nan") if shuffled else v) for k, v in ft.items()})
    real_test = test["actual_orig"].to_numpy() if real is None else np.asarray(real)[test_mask]
    m["drift"] = float(np.mean(test["actual_ft"].to_numpy() - real_test))
    v = prediction_metrics(val["pred"].to_numpy(), val["actual_orig"].to_numpy(), train_mean)
    m.update({"val_pearson_r": v["pearson_r"], "val_skill": v["skill"]})
    m["n_train"], m["n_val"], m["n_test"] = (int((preds["split"] == s).sum()) for s in SPLITS)
    return m


def _injected_failure(spec: TrialSpec) -> None:
    """Fault injection for tests of the failure path: NSR_SWEEP_FAIL_TRIALS lists layer/neuron/head/freeze keys."""
    key = f"L{spec.layer}-N{spec.neuron}-{spec.head}-{spec.freeze}"
    if key in os.environ.get("NSR_SWEEP_FAIL_TRIALS", "").split(","):
        raise RuntimeError(f"injected failure for {key} (NSR_SWEEP_FAIL_TRIALS)")


def spec_dict(spec: TrialSpec) -> dict:
    return spec.model_dump(mode="json")
