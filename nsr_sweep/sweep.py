"""From a validated SweepSpec to the shared inputs of its trials: model, corpus, cache, neurons."""

from __future__ import annotations

from pathlib import Path

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
    if "random_model" in spec.controls:  # the control's features: same architecture, random weights
        m = model.spec
        random = BaseModel(ModelSpec(name=m.name, init="random", seed=spec.seed + 1, device=m.device))
        rc = ActivationCache.build(random, corpus, spec.cache_spec(), root=root,
                                   batch_size=spec.batch_size_cache, progress=progress)
        cache.extra["random_model_features"] = rc.features
    return cache


def resolve_neurons(spec: SweepSpec, cache: ActivationCache) -> dict[int, list[int]]:
    """Per layer: the explicit neurons, then each selector's top k (no repeats, order kept)."""
    by = {"top_variance": "variance", "top_kurtosis": "kurtosis", "top_max": "max"}
    out = {}
    for L in spec.layers:
        chosen: list[int] = []
        for n in spec.neurons:
            picks = [n] if isinstance(n, int) else [i for i, _ in cache.top_neurons(L, by[n.select], n.k + len(chosen))]
            fresh = [i for i in picks if i not in chosen]
            chosen += fresh if isinstance(n, int) else fresh[: n.k]
        out[L] = chosen
    return out
