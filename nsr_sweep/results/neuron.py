"""One neuron of a sweep, read whole: what `nsr-sweep neuron` and `Results.neuron` show.

For one (layer, neuron) of a results directory, finished or partial:

    comparison    its rows of tables/comparison.parquet (self vs cross-model vs input-only, per head/freeze)
    probes        the best ok trial of each of its groups — real and every control, probes and unfrozen
                  trials — as trial-table rows, with `role` (self, shuffled, cross_model, input_only, …) and `label`
    predictions   their test predictions (`TrialStore.test_predictions`), one row per probe × test text
    patch         their patching points with the deltas (`TrialStore.patch_points`)
    cosines       the cosine columns of their rows
    texts         the top-activating test texts and a seeded random sample, each with the neuron's activation
                  on every token: a forward of those texts through the sweep's model, read by the model surface
                  (`Surface.read`, the one way the package reads a hook), tokenised as the cache was (`encode`)
    notes         what is missing, in words (a partial sweep, a table not built yet, a failed trial)

Nothing here draws: `report.neuron` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import PREDICTORS, SHUFFLED
from ..core.errors import NsrError
from ..core.spec import SweepSpec
from .layout import read_state, resolved_spec, run_state
from .schema import ID_COLUMNS
from .store import TrialStore, open_store

ROLES = tuple(c.role for c in PREDICTORS if c.on_page)
"""The predictors every neuron page shows, in this order (other controls follow when a sweep ran them)."""
ROLE_NAMES = {c.role: c.display for c in PREDICTORS}


@dataclass
class NeuronData:
    """One neuron of a sweep: its comparison rows, probes, predictions, patching, cosines and texts (DataFrames),
    and `notes`: what is missing, in words."""

    sweep_dir: Path
    sweep: str
    layer: int
    neuron: int
    hook: str
    model: str
    cross_model: str | None
    controls: list[str]
    comparison: pd.DataFrame
    probes: pd.DataFrame
    predictions: pd.DataFrame
    patch: pd.DataFrame
    cosines: pd.DataFrame
    texts: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def read_neuron(sweep_dir: Path | str, layer: int, neuron: int, *, top: int = 8, sample: int = 8) -> NeuronData:
    """Neuron `neuron` of layer `layer` of a results directory; a layer or neuron the sweep does not hold is an
    NsrError naming it and what the sweep holds."""
    sweep_dir = Path(sweep_dir).resolve()
    spec = resolved_spec(sweep_dir)
    notes = _sweep_notes(sweep_dir)
    trials = _trials(sweep_dir, spec, notes)
    check_in_sweep(sweep_dir, spec, trials, layer, neuron)
    mine = trials[(trials["layer"] == layer) & (trials["neuron"] == neuron)] if len(trials) else trials
    probes = shown_probes(mine, notes)
    store = open_store(sweep_dir, trials=probes)  # the probes' units from the table: no unit's record read to find one
    predictions = probe_predictions(store, probes)
    texts = neuron_texts(spec, neuron_activations(predictions), layer, neuron, top, sample, notes)
    return NeuronData(sweep_dir=sweep_dir, sweep=spec.name, layer=layer, neuron=neuron, hook=spec.target.hook,
                      model=spec.model.name, cross_model=spec.cross_model, controls=list(spec.control_names),
                      comparison=comparison_rows(sweep_dir, layer, neuron, notes), probes=probes,
                      predictions=predictions, patch=probe_patches(store, probes), cosines=cosine_table(probes),
                      texts=texts, notes=notes)


# -- which neuron, which trials ---------------------------------------------------------------


def _sweep_notes(sweep_dir: Path) -> list[str]:
    state = run_state(sweep_dir)
    if state in ("finished", "unknown"):
        return []
    return [f"The sweep is {state}: this page shows the trials that had finished when the tables were last built."]


def _trials(sweep_dir: Path, spec: SweepSpec, notes: list[str]) -> pd.DataFrame:
    """tables/trials.parquet, or — before `nsr-sweep report` has built it — the table rebuilt from the records."""
    f = sweep_dir / "tables" / "trials.parquet"
    if f.is_file():
        return pd.read_parquet(f)
    from .tables import trial_table

    notes.append(f"tables/trials.parquet does not exist yet (`nsr-sweep report {sweep_dir}` builds it): the trials "
                 "are read from their records.")
    return trial_table(open_store(sweep_dir), spec.search.metric, spec.search.mode)


def sweep_neurons(sweep_dir: Path, spec: SweepSpec, trials: pd.DataFrame) -> dict[int, list[int]]:
    """Per layer, the neurons the sweep chose (sweep_state.json's `neurons`; else the explicit ones of the sweep file
    and those with a trial)."""
    chosen = {int(k): [int(n) for n in v] for k, v in (read_state(sweep_dir).get("neurons") or {}).items()}
    explicit = [n for n in spec.neurons if isinstance(n, int)]
    for L in spec.layers:
        if L not in chosen:
            seen = trials.loc[trials["layer"] == L, "neuron"].tolist() if len(trials) else []
            chosen[L] = sorted(set(explicit) | {int(n) for n in seen})
    return chosen


def check_in_sweep(sweep_dir: Path, spec: SweepSpec, trials: pd.DataFrame, layer: int, neuron: int) -> None:
    if layer not in spec.layers:
        raise NsrError(f"layer {layer} is not in sweep {spec.name!r}: its layers are "
                       f"{', '.join(map(str, spec.layers))}")
    have = sweep_neurons(sweep_dir, spec, trials)[layer]
    if neuron not in have:
        listed = ", ".join(map(str, have[:20])) + (f", … ({len(have)} in all)" if len(have) > 20 else "")
        raise NsrError(f"neuron {neuron} is not in sweep {spec.name!r} at layer {layer}: its neurons there are "
                       f"{listed or 'none yet (no trial has finished)'}")


def role_of(control) -> str:
    return "self" if control is None or control is pd.NA or (isinstance(control, float) and np.isnan(control)) \
        else str(control)


def shown_probes(mine: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The best ok trial of each of the neuron's groups, ordered self, shuffled, cross-model, input-only, the rest."""
    if mine.empty:
        notes.append("No trial of this neuron has finished yet.")
        return pd.DataFrame(columns=list(dict.fromkeys([*ID_COLUMNS, "status", "best", *mine.columns, "role", "label"])))
    failed = mine[mine["status"] != "ok"]
    if len(failed):
        notes.append("Failed trials of this neuron: " + "; ".join(
            f"{t} ({e})" for t, e in zip(failed["trial_id"], failed["error"].fillna("no reason recorded"))) + ".")
    best = mine[(mine["status"] == "ok") & mine["best"]].copy()
    best["role"] = [role_of(c) for c in best["control"]]
    best["label"] = [f"{ROLE_NAMES.get(r, r)} · {h}/{f}" for r, h, f in zip(best["role"], best["head"], best["freeze"])]
    order = {r: i for i, r in enumerate(ROLES)}
    best["_order"] = [order.get(r, len(ROLES)) for r in best["role"]]
    return best.sort_values(["_order", "role", "freeze", "head"], key=_freeze_order).drop(columns="_order") \
        .reset_index(drop=True)


RANK = {"none": 0, "after_target": 1, "all": 2, "regression": 0, "classification": 1, "token": 2}
"""Heads and freeze modes in the order a page or a figure lists them (the sweep file's order)."""


def _freeze_order(col: pd.Series) -> pd.Series:
    return col.map(lambda v: RANK.get(v, v)) if col.name in ("freeze", "head") else col


# -- the tables of its probes -------------------------------------------------------------------

PROBE_KEYS = ["trial_id", "role", "label", "head", "freeze"]


def probe_predictions(store: TrialStore, probes: pd.DataFrame) -> pd.DataFrame:
    """Test predictions of the shown probes, labelled: trial_id, role, label, head, freeze, text_id, actual_orig
    (a shuffled control's: its permuted target), actual_ft, pred, readout."""
    if probes.empty:
        return pd.DataFrame(columns=[*PROBE_KEYS, "text_id", "actual_orig", "actual_ft", "pred", "readout"])
    p = store.test_predictions(probes["trial_id"])
    return probes[PROBE_KEYS].merge(p, on="trial_id").sort_values(["trial_id", "text_id"], kind="stable") \
        .reset_index(drop=True)


def probe_patches(store: TrialStore, probes: pd.DataFrame) -> pd.DataFrame:
    """Patching points of the shown probes that were patched, labelled, with delta_act and delta_pred."""
    frames = []
    for row in probes.itertuples(index=False):
        p = store.patch_points(row.trial_id)
        if p is not None and len(p):
            keys = {k: getattr(row, k) for k in PROBE_KEYS}
            frames.append(p.assign(**keys)[[*PROBE_KEYS, *[c for c in p.columns if c not in PROBE_KEYS]]])
    if not frames:
        return pd.DataFrame(columns=[*PROBE_KEYS, "text_id", "grid_value", "delta_act", "delta_pred"])
    return pd.concat(frames, ignore_index=True)


def cosine_table(probes: pd.DataFrame) -> pd.DataFrame:
    """The trial table's cosine columns (raw and effective, their z-scores, `_ft`) of the probes that have any."""
    cols = [c for c in probes.columns if c.startswith("cos_") and probes[c].notna().any()]
    if not cols:
        return pd.DataFrame(columns=PROBE_KEYS)
    have = probes[cols].notna().any(axis=1)
    return probes.loc[have, PROBE_KEYS + cols].reset_index(drop=True)


def comparison_rows(sweep_dir: Path, layer: int, neuron: int, notes: list[str]) -> pd.DataFrame:
    f = sweep_dir / "tables" / "comparison.parquet"
    if not f.is_file():
        notes.append(f"tables/comparison.parquet does not exist yet: `nsr-sweep report {sweep_dir}` builds it.")
        return pd.DataFrame()
    comp = pd.read_parquet(f)
    if comp.empty:
        notes.append("The comparison table is empty: no neuron has a finished real trial with test predictions yet.")
        return comp
    rows = comp[(comp["layer"] == layer) & (comp["neuron"] == neuron)]
    rows = rows.sort_values(["head", "freeze"], key=_freeze_order, kind="stable").reset_index(drop=True)
    if rows.empty:
        notes.append("The comparison table has no row for this neuron: none of its real trials had finished when "
                     f"the tables were built (`nsr-sweep report {sweep_dir}` rebuilds them).")
    return rows


# -- its texts ----------------------------------------------------------------------------------


def neuron_activations(predictions: pd.DataFrame) -> pd.Series:
    """The neuron's activation on each test text (text_id → value), as the sweep's cache holds it: any probe's
    `actual_orig` but a shuffled control's (that is its permuted target)."""
    real = predictions[predictions["role"] != SHUFFLED.role]
    return real.drop_duplicates("text_id").set_index("text_id")["actual_orig"].sort_index()


def chosen_texts(activation: pd.Series, top: int, sample: int, seed) -> pd.DataFrame:
    """The `top` highest-activating test texts, then `sample` more drawn at random (seeded) from the rest."""
    order = activation.sort_values(ascending=False, kind="stable")
    best = order.index[:top].to_numpy()
    rest = np.setdiff1d(activation.index.to_numpy(), best)
    drawn = np.sort(np.random.default_rng(seed).choice(rest, size=min(sample, len(rest)), replace=False))
    ids = np.r_[best, drawn].astype(np.int64)
    return pd.DataFrame({"text_id": ids, "chosen": ["top"] * len(best) + ["random"] * len(drawn),
                         "actual_orig": activation.loc[ids].to_numpy(np.float64)})


TEXT_COLUMNS = ["text_id", "chosen", "text", "tokens", "bos", "activations", "target", "activation", "actual_orig"]


def neuron_texts(spec: SweepSpec, activation: pd.Series, layer: int, neuron: int, top: int, sample: int,
                 notes: list[str]) -> pd.DataFrame:
    """The chosen texts with their tokens (as strings; `bos`: the first is the BOS token the cache prepends) and the
    neuron's activation on every token (`activations`), `target` its position (the last token) and `activation` the
    value there; `actual_orig` is the cache's."""
    empty = pd.DataFrame(columns=TEXT_COLUMNS)
    if activation.empty:
        notes.append("No test predictions of this neuron yet, so no texts are shown.")
        return empty
    chosen = chosen_texts(activation, top, sample, [spec.seed, layer, neuron])
    try:
        texts = corpus_texts(spec, chosen["text_id"].to_numpy())
        model = sweep_model(spec)
    except (NsrError, OSError) as e:
        notes.append(f"The texts could not be read again, so none are shown: {e}")
        return empty
    from ..core.cache import encode

    seqs, _ = encode(model.tokenizer, texts, spec.corpus.max_tokens)
    acts = token_activations(model, seqs, layer, spec.target.hook, neuron)
    out = chosen.assign(text=texts, tokens=[token_strings(model.tokenizer, s) for s in seqs],
                        bos=model.tokenizer.bos_token_id is not None,
                        activations=[a.tolist() for a in acts], target=[len(s) - 1 for s in seqs],
                        activation=[float(a[-1]) for a in acts])[TEXT_COLUMNS]
    off = np.abs(out["activation"] - out["actual_orig"]).max()
    if off > 1e-4:
        notes.append(f"The forward of these texts differs from the sweep's cache by up to {off:.3g} at the target "
                     "token: the model or the corpus has changed since the sweep ran.")
    return out


def corpus_texts(spec: SweepSpec, text_ids: np.ndarray) -> list[str]:
    """The sweep's texts by id: its corpus, loaded as the cache loaded it (a seeded order, a prefix kept)."""
    from ..core.corpus import load_corpus

    c = spec.corpus
    texts = load_corpus(c.source, n_texts=c.n_texts, seed=c.seed).texts
    if len(text_ids) and int(text_ids.max()) >= len(texts):
        raise NsrError(f"the corpus {c.source!r} now has {len(texts)} texts, fewer than the sweep read")
    return [texts[int(i)] for i in text_ids]


def sweep_model(spec: SweepSpec):
    """The sweep's base model (loaded once per process)."""
    from ..core.models import ModelSpec, load_model

    return load_model(ModelSpec.of(spec.model))


def token_activations(model, seqs: list[list[int]], layer: int, hook: str, neuron: int) -> list[np.ndarray]:
    """The neuron's activation at every token of each sequence: one right-padded forward through the model
    surface, the neuron's hook read whole (causal attention: the padding changes no real position)."""
    import torch

    from ..core.cache import neuron_hook, pad_batch

    name = neuron_hook(layer, hook)
    ids, _ = pad_batch(seqs, model.tokenizer.pad_token_id, model.device)
    with torch.no_grad():
        whole = model.surface.read(ids, [name], None)[name][..., neuron].double().cpu().numpy()
    return [whole[i, : len(s)] for i, s in enumerate(seqs)]


def token_strings(tok, seq: list[int]) -> list[str]:
    return [tok.decode([t], clean_up_tokenization_spaces=False) for t in seq]
