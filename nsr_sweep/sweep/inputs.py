"""From a validated SweepSpec to the shared inputs of its trials: model, corpus, cache, neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.cache import ActivationCache, CacheSpec
from ..core.corpus import load_corpus
from ..core.errors import NsrError
from ..core.models import LoadedModel, ModelSpec, load_model
from ..core.spec import SweepSpec


def model_spec(spec: SweepSpec, device: str = "cpu") -> ModelSpec:
    return ModelSpec.of(spec.model, device)


def cache_spec(spec: SweepSpec) -> CacheSpec:
    """What the sweep's activation cache holds."""
    return CacheSpec(layers=tuple(spec.layers), hook=spec.target.hook, position=spec.target.position,
                     features=spec.features.hook, max_tokens=spec.corpus.max_tokens,
                     store_resid="after_target" in spec.freeze)


def build_cache(spec: SweepSpec, root: str | Path | None = None, progress: bool = True,
                model: LoadedModel | None = None) -> ActivationCache:
    """Build or load the sweep's cache (with the random-model control's features when asked for)."""
    model = model or load_model(model_spec(spec))
    c = spec.corpus
    corpus = load_corpus(c.source, n_texts=c.n_texts, seed=c.seed)
    cache = ActivationCache.build(model, corpus, cache_spec(spec), root=root,
                                  batch_size=spec.batch_size_cache, progress=progress)
    if "random_model" in spec.control_names:  # the control's features: same architecture, random weights
        m = model.spec
        random = LoadedModel(ModelSpec(name=m.name, init="random", seed=spec.seed + 1, device=m.device))
        rc = ActivationCache.build(random, corpus, cache_spec(spec), root=root,
                                   batch_size=spec.batch_size_cache, progress=progress)
        cache.extra["random_model_features"] = rc.features
    if spec.cross_model is not None:
        other = load_model(ModelSpec(name=spec.cross_model, device=model.spec.device))
        cache.extra.update(cross_model_inputs(model, other, cache.tokens, spec.features.hook))
    return cache


def aligned_tokens(model: LoadedModel, other: LoadedModel, seqs: list[list[int]]) -> list[list[int]]:
    """The same texts in the other model's tokens: this model's (truncated) tokens decoded back to text,
    then encoded by the other tokenizer (BOS first), so both models read exactly the same characters —
    whole: a text longer than the other model's positions is refused (`check_cross_positions`)."""
    got = realigned(model.tokenizer, other.tokenizer, seqs)
    check_cross_positions(got, positions(other.hf.config), other.spec.name)
    return got


def realigned(tok, other_tok, seqs: list[list[int]]) -> list[list[int]]:
    from ..core.cache import encode

    bos = tok.bos_token_id
    texts = [tok.decode(q[1:] if q and q[0] == bos else q, clean_up_tokenization_spaces=False) for q in seqs]
    return encode(other_tok, texts, 1 << 30)[0]


def positions(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 8192


def check_cross_positions(other_seqs: list[list[int]], limit: int, name: str) -> None:
    """The other model must read every text whole, up to the target token: truncating its copy would hide
    the very token the neuron is read at. So a text that does not fit is refused, with the count."""
    over = [len(q) for q in other_seqs if len(q) > limit]
    if over:
        raise NsrError(f"controls: cross_model: {len(over)} of {len(other_seqs)} texts re-encoded by {name!r} are "
                       f"longer than its {limit} positions (up to {max(over)} tokens), so it would not see the target "
                       "token; lower corpus.max_tokens")


def check_cross_model(spec: SweepSpec) -> None:
    """Before Ray starts: the corpus, re-encoded by the cross_model's tokenizer, fits its positions (tokenizers
    and configs only; a hub model not cached locally is checked where it is loaded)."""
    if spec.cross_model is None:  # (before the imports: transformers' auto classes import torch)
        return
    from transformers import AutoConfig

    from ..core.cache import encode
    from ..core.models import load_tokenizer, resolve_model_dir

    tok, other = load_tokenizer(spec.model.name), load_tokenizer(spec.cross_model)
    path = resolve_model_dir(spec.cross_model, need_weights=False)
    if tok is None or other is None or path is None:
        return
    c = spec.corpus
    seqs = encode(tok, load_corpus(c.source, n_texts=c.n_texts, seed=c.seed).texts, c.max_tokens)[0]
    check_cross_positions(realigned(tok, other, seqs), positions(AutoConfig.from_pretrained(path)), spec.cross_model)


def cross_model_inputs(model: LoadedModel, other: LoadedModel, seqs: list[list[int]], hook: str) -> dict:
    """The cross_model control's inputs: the other model's tokens (−1-padded) and its features at each
    text's last token."""
    from ..core.forward import read_points

    other_seqs = aligned_tokens(model, other, seqs)
    last = np.array([len(q) - 1 for q in other_seqs], np.int64)
    feats = read_points(other.surface, other_seqs, last, [hook], other.tokenizer.pad_token_id)[hook]
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
