"""From a validated SweepSpec to the shared inputs of its trials: model, corpus, cache, neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import ActivationCache
from .config import SweepSpec
from .corpus import load_corpus
from .models import BaseModel, ModelSpec, load_model


def model_spec(spec: SweepSpec, device: str = "cpu") -> ModelSpec:
    m = spec.model
    return ModelSpec(name=m.name, init=m.init, processing=m.processing, seed=m.seed, device=device)


def build_cache(spec: SweepSpec, root: str | Path | None = None, progress: bool = True,
                model: BaseModel | None = None) -> ActivationCache:
    """Build or load the sweep's cache (with the random-model control's features when asked for)."""
    model = model or load_model(model_spec(spec))
    c = spec.corpus
    corpus = load_corpus(c.source, n_texts=c.n_texts, seed=c.seed)
    cache = ActivationCache.build(model, corpus, spec.cache_spec(), root=root,
                                  batch_size=spec.batch_size_cache, progress=progress)
    if "random_model" in spec.control_names:  # the control's features: same architecture, random weights
        m = model.spec
        random = BaseModel(ModelSpec(name=m.name, init="random", seed=spec.seed + 1, device=m.device))
        rc = ActivationCache.build(random, corpus, spec.cache_spec(), root=root,
                                   batch_size=spec.batch_size_cache, progress=progress)
        cache.extra["random_model_features"] = rc.features
    if spec.cross_model is not None:
        other = load_model(ModelSpec(name=spec.cross_model, device=model.spec.device))
        cache.extra.update(cross_model_inputs(model, other, cache.tokens, spec.features.hook))
    return cache


def aligned_tokens(model: BaseModel, other: BaseModel, seqs: list[list[int]]) -> list[list[int]]:
    """The same texts in the other model's tokens: this model's (truncated) tokens decoded back to text,
    then encoded by the other tokenizer (BOS first), so both models read exactly the same characters."""
    from .cache import tokenize

    bos = model.tokenizer.bos_token_id
    texts = [model.tokenizer.decode(q[1:] if q and q[0] == bos else q, clean_up_tokenization_spaces=False)
             for q in seqs]
    limit = getattr(other.hf.config, "max_position_embeddings", None) or 8192
    return tokenize(other, texts, int(limit))[0]


def cross_model_inputs(model: BaseModel, other: BaseModel, seqs: list[list[int]], hook: str) -> dict:
    """The cross_model control's inputs: the other model's tokens (−1-padded) and its features at each
    text's last token."""
    from .forward import read_points

    other_seqs = aligned_tokens(model, other, seqs)
    positions = np.array([len(q) - 1 for q in other_seqs], np.int64)
    feats = read_points(other.surface, other_seqs, positions, [hook], other.tokenizer.pad_token_id)[hook]
    padded = np.full((len(other_seqs), max(len(q) for q in other_seqs)), -1, np.int64)
    for i, q in enumerate(other_seqs):
        padded[i, : len(q)] = q
    return {"cross_model_features": feats.astype(np.float32), "cross_model_tokens": padded}


def resolve_neurons(spec: SweepSpec, cache: ActivationCache) -> dict[int, list[int]]:
    """Per layer: the explicit neurons, then each selector's top k, or all of them (no repeats, order kept)."""
    by = {"top_variance": "variance", "top_kurtosis": "kurtosis", "top_max": "max"}
    out = {}
    for L in spec.layers:
        chosen: list[int] = []
        for n in spec.neurons:
            if isinstance(n, int):
                picks = [n]
            elif n.select == "all":
                picks = list(range(cache.acts[L].shape[1]))
            else:
                k = n.k or 0  # a ranking selector always has k
                picks = [i for i, _ in cache.top_neurons(L, by[n.select], k + len(chosen)) if i not in chosen][:k]
            chosen += [i for i in picks if i not in chosen]
        out[L] = chosen
    return out
