"""ActivationCache: every neuron of the requested layers, and the head's features, read once.

One build runs the corpus through the base model in large right-padded batches and keeps,
at each text's target position (its last real token):
  - `acts[L]`: n_texts × d_mlp, component n = neuron n of `blocks.L.mlp.hook_post` (or `hook_pre`);
  - `features`: n_texts × width at the configured feature hook (default `ln_final.hook_out`);
  - `mlp_in[L]`: norm2 of what the MLP reads, with its affine (`blocks.L.ln2.hook_out`),
    `resid_pre[L]`: the residual before block L, and `resid_final`: the residual entering the
    final norm — for the analyses;
  - optionally `resid[L]`: the residual after block L at every position (the `after_target` start).

Everything is read in one forward through the model surface (`nsr_sweep.core.surface`), with native
forward hooks on the modules TransformerLens' adapter names: no unembedding is computed. Every
build checks, on a sample, the neuron identity of the model's family (`check_identity`) and
records the errors in the metadata.

On disk: `<root>/<key>/` with `meta.json`, `texts.parquet` (text, tokens, position) and
`arrays.arrow` (Arrow IPC, memory-mapped on load); `key` is a hash of everything the numbers
depend on, so a second build is a load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import Corpus
from .errors import NsrError
from .files import atomic_dir
from .models import LoadedModel
from .spec import Position, TargetHook, is_feature_hook

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 3
HOOKS = get_args(TargetHook)
DEFAULT_FEATURES = "ln_final.hook_out"  # what the unembedding reads: the final norm with its affine


def default_root() -> Path:
    return Path(os.environ.get("NSR_CACHE_DIR", Path.home() / ".cache" / "nsr-sweep" / "activations"))


def neuron_hook(layer: int, hook: str) -> str:
    """The TransformerLens name of the hook whose component n is neuron n (never hook_mlp_out)."""
    return f"blocks.{layer}.mlp.hook_{hook}"


@dataclass(frozen=True)
class CacheSpec:
    layers: tuple[int, ...]
    hook: TargetHook = "post"
    position: Position = "last"
    features: str = DEFAULT_FEATURES
    max_tokens: int = 64
    store_resid: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(set(int(L) for L in self.layers))))
        if not self.layers:
            raise NsrError("cache layers is empty: give at least one layer")
        if self.hook not in HOOKS:
            raise NsrError(f"target.hook {self.hook!r} is not allowed; allowed: {', '.join(HOOKS)}")
        if self.position != "last":
            raise NsrError(f"target.position {self.position!r} is not allowed; allowed: last")
        if not is_feature_hook(self.features):
            raise NsrError(
                f"features.hook {self.features!r} is not a TransformerLens hook name "
                f"(e.g. {DEFAULT_FEATURES}, ln_final.hook_out, blocks.3.hook_resid_post)"
            )
        if not 2 <= self.max_tokens <= 8192:
            raise NsrError(f"corpus.max_tokens {self.max_tokens} is out of range: allowed 2..8192")

    def check(self, model: LoadedModel) -> None:
        for L in self.layers:
            model.check_layer(L)
        m = re.match(r"^blocks\.(\d+)\.", self.features)
        if m:
            model.check_layer(int(m.group(1)), field="features.hook layer")
        try:
            model.surface.point(self.features)
        except NsrError as e:
            raise NsrError(f"features.hook: {e}") from None


def tokenize(model: LoadedModel, texts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """BOS + text tokens, at most `max_tokens` in all (as TransformerLens prepends BOS); count truncated."""
    return encode(model.tokenizer, texts, max_tokens)


def encode(tok, texts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """`tokenize` with a tokenizer alone."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out, n_trunc = [], 0
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        ids = bos + ids
        if len(ids) > max_tokens:
            ids, n_trunc = ids[:max_tokens], n_trunc + 1
        out.append(ids)
    return out, n_trunc


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (causal attention: real positions never see the padding)."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# -- reading and the identity check ---------------------------------------------------------


def mlp_input_hook(layer: int) -> str:
    """What the MLP reads: the norm in front of it, with its affine (resid_mid or, in parallel blocks, resid_pre)."""
    return f"blocks.{layer}.ln2.hook_out"


def _no_grad(fn):
    """torch.no_grad, imported when the function runs: the driver reads caches without torch."""
    @functools.wraps(fn)
    def inner(*a, **k):
        import torch

        with torch.no_grad():
            return fn(*a, **k)
    return inner


@_no_grad
def check_identity(model: LoadedModel, seqs: list[list[int]], layer: int) -> dict:
    """The neuron's definition recomputed by hand from the norm's input and the weights (docs/science.md).

    hook_pre == norm2(x)·W_pre[:, n] + b_pre[n] with norm2 written out (LayerNorm or RMSNorm, with its
    affine) and x what the MLP reads (resid_mid, or resid_pre in parallel blocks); hook_post ==
    act(hook_pre), times hook_pre_linear = norm2(x)·W_in[:, n] + b_in[n] in gated MLPs."""
    import torch
    from transformers.activations import ACT2FN

    from .surface import norm_eps

    s = model.surface
    norm = s.ln2(layer)
    names = [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
    ids, mask = pad_batch(seqs, model.tokenizer.pad_token_id, model.device)
    seen: dict[str, torch.Tensor] = {}
    h = norm.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    try:
        got = s.read(ids, names, None)
    finally:
        h.remove()
    real = mask.bool()
    x, pre, post = (t[real].double().cpu() for t in (seen["x"], got[names[0]], got[names[1]]))  # the weights' device
    gamma, beta = s.norm_affine(norm)
    eps = norm_eps(norm)
    if s.arch.norm == "rmsnorm":
        normed = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * gamma
    else:
        c = x - x.mean(-1, keepdim=True)
        normed = c / torch.sqrt((c**2).mean(-1, keepdim=True) + eps) * gamma + (0 if beta is None else beta)
    w = s.neuron_weights(layer)
    recomputed = normed @ w["W_pre"] + w["b_pre"]
    act = ACT2FN[s.arch.act_fn](pre.float()).double()
    post_want = act * (normed @ w["W_in"] + w["b_in"]) if s.arch.mlp_gate else act
    r = np.corrcoef(recomputed.flatten().cpu().numpy(), pre.flatten().cpu().numpy())[0, 1]
    return {
        "layer": layer,
        "family": s.arch.family,
        "n_values": int(pre.numel()),
        "pre_max_abs_err": float((recomputed - pre).abs().max()),
        "pre_r": float(r),
        "post_max_abs_err": float((post_want - post).abs().max()),
    }


# -- the cache -----------------------------------------------------------------------------


def _hooks(spec: CacheSpec) -> tuple[list[str], dict[str, str], list[str]]:
    """The hooks one pass of the cache reads: every one (deduplicated), the extra arrays' by their key (each layer's
    MLP input and residual stream before it, the final residual), and the residual streams kept whole."""
    extra = {f"mlp_in_L{L}": mlp_input_hook(L) for L in spec.layers}
    extra.update({f"resid_pre_L{L}": f"blocks.{L}.hook_resid_pre" for L in spec.layers})
    extra["resid_final"] = "ln_final.hook_in"
    resid = [f"blocks.{L}.hook_resid_post" for L in spec.layers] if spec.store_resid else []
    names = [neuron_hook(L, spec.hook) for L in spec.layers] + [spec.features] + list(extra.values()) + resid
    return list(dict.fromkeys(names)), extra, resid


@dataclass
class ActivationCache:
    texts: list[str]
    tokens: list[list[int]]
    positions: np.ndarray  # int64, the target position of each text
    acts: dict[int, np.ndarray]  # layer → n_texts × d_mlp (float32)
    features: np.ndarray  # n_texts × d_model
    resid: dict[int, np.ndarray] = field(default_factory=dict)  # layer → n_texts × max_len × d_model
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # "mlp_in_L{L}", "resid_pre_L{L}", "resid_final"

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    @property
    def key(self) -> str:
        return self.meta["key"]

    def top_neurons(self, layer: int, by: str = "variance", k: int = 10) -> list[tuple[int, float]]:
        """Neurons of `layer` ranked by variance, kurtosis or max over the corpus: [(neuron, score)]."""
        a = self.acts[layer].astype(np.float64)
        if by == "variance":
            score = a.var(0)
        elif by == "kurtosis":
            z = (a - a.mean(0)) / np.maximum(a.std(0), 1e-12)
            score = (z**4).mean(0) - 3.0
        elif by == "max":
            score = a.max(0)
        else:
            raise NsrError(f"--by {by!r} is not allowed; allowed: variance, kurtosis, max")
        order = np.argsort(-score, kind="stable")[:k]
        return [(int(i), float(score[i])) for i in order]

    def activations(self, layer: int, neuron: int) -> np.ndarray:
        if layer not in self.acts:
            raise NsrError(f"layer {layer} is not in this cache (layers {sorted(self.acts)})")
        return self.acts[layer][:, neuron]

    # -- building ----------------------------------------------------------------------
    @staticmethod
    def key_for(model: LoadedModel, corpus: Corpus, spec: CacheSpec) -> str:
        ident = {k: model.identity[k] for k in ("name", "init", "seed", "weights_hash", "processing", "tokenizer")}
        blob = json.dumps({"v": FORMAT_VERSION, "model": ident, "corpus": corpus.hash, "spec": asdict(spec)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        corpus: Corpus,
        spec: CacheSpec,
        *,
        root: Path | str | None = None,
        batch_size: int = 64,
        progress: bool = True,
        identity_sample: int = 16,
    ) -> "ActivationCache":
        """Load the cache for (model, corpus, spec) if it exists under `root`, else build and save it."""
        spec.check(model)
        root = Path(root) if root is not None else default_root()
        key = cls.key_for(model, corpus, spec)
        if (root / key / "meta.json").is_file():
            return cls.load(root / key)
        cache = cls.compute(model, corpus, spec, batch_size=batch_size, progress=progress, identity_sample=identity_sample)
        cache.meta["key"] = key
        cache.save(root / key)
        return cache

    @classmethod
    def compute(
        cls, model: LoadedModel, corpus: Corpus, spec: CacheSpec, *,
        batch_size: int = 64, progress: bool = True, identity_sample: int = 16,
    ) -> "ActivationCache":
        """Run the corpus through the model once (no disk): the numbers every stage reads."""
        import torch
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        seqs, n_trunc = tokenize(model, corpus.texts, spec.max_tokens)
        positions = np.array([len(s) - 1 for s in seqs], dtype=np.int64)
        names, extra_names, resid_names = _hooks(spec)
        n, max_len = len(seqs), max(len(s) for s in seqs)
        acts = {L: np.empty((n, model.d_mlp), np.float32) for L in spec.layers}
        features: np.ndarray | None = None  # its width is the feature hook's (d_model for the residual, d_mlp for an MLP hook)
        extra = {k: np.empty((n, model.d_model), np.float32) for k in extra_names}
        resid = {L: np.zeros((n, max_len, model.d_model), np.float32) for L in spec.layers} if spec.store_resid else {}
        order = np.argsort([-len(s) for s in seqs], kind="stable")  # similar lengths share a batch: less padding
        bar = tqdm(total=int(positions.sum() + n), unit="tok", desc="cache", disable=not progress)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], model.tokenizer.pad_token_id, model.device)
            pos = torch.as_tensor(positions[idx], device=model.device)
            got = model.surface.read(ids, names, pos, full=set(resid_names))
            for L in spec.layers:
                acts[L][idx] = got[neuron_hook(L, spec.hook)].float().cpu().numpy()
                if spec.store_resid:
                    r = got[f"blocks.{L}.hook_resid_post"].float().cpu().numpy()
                    resid[L][idx, : r.shape[1]] = r * mask.cpu().numpy()[..., None]
            g = got[spec.features]
            if spec.features in resid_names:  # read whole for the after_target start: take the target positions
                g = g[torch.arange(g.shape[0]), pos]
            f = g.float().cpu().numpy()
            if features is None:
                features = np.empty((n, f.shape[1]), np.float32)
            features[idx] = f
            for k, name in extra_names.items():
                extra[k][idx] = got[name].float().cpu().numpy()
            bar.update(int(mask.sum()))
        bar.close()
        seconds = time.perf_counter() - t0
        n_tokens = int(positions.sum() + n)
        sample = [seqs[i] for i in np.linspace(0, n - 1, min(identity_sample, n)).astype(int)]
        identity = [check_identity(model, sample, L) for L in spec.layers]
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model.identity,
            "corpus": {"source": corpus.source, "hash": corpus.hash, **corpus.report, "n_truncated": n_trunc},
            "spec": asdict(spec),
            "n_texts": n, "n_tokens": n_tokens, "max_len": max_len,
            "build_seconds": round(seconds, 3), "tokens_per_second": round(n_tokens / seconds, 1),
            "identity": identity,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tokens = [list(s) for s in seqs]
        assert features is not None
        return cls(list(corpus.texts), tokens, positions, acts, features, resid, meta, extra=extra)

    # -- the object store ---------------------------------------------------------------
    def to_arrays(self) -> dict:
        """Plain dict for `ray.put`: numpy arrays travel zero-copy, the rest is small."""
        return {"texts": self.texts, "tokens": self.tokens, "positions": np.asarray(self.positions),
                "acts": {L: np.asarray(a) for L, a in self.acts.items()}, "features": np.asarray(self.features),
                "resid": {L: np.asarray(r) for L, r in self.resid.items()}, "meta": self.meta,
                "extra": {k: np.asarray(v) for k, v in self.extra.items()}}

    @classmethod
    def from_arrays(cls, d: dict) -> "ActivationCache":
        return cls(d["texts"], d["tokens"], d["positions"], d["acts"], d["features"], d["resid"], d["meta"],
                   extra=d.get("extra", {}))

    # -- persistence -------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write to a temp directory beside `path`, then rename: a reader never sees half a cache."""

        def write(tmp: Path) -> None:
            pq.write_table(
                pa.table({
                    "text": pa.array(self.texts, pa.string()),
                    "tokens": pa.array(self.tokens, pa.list_(pa.int64())),
                    "position": pa.array(self.positions, pa.int64()),
                }),
                tmp / "texts.parquet",
            )
            cols = {f"acts_L{L}": a for L, a in self.acts.items()}
            cols["features"] = self.features
            cols.update({f"resid_L{L}": r.reshape(len(r), -1) for L, r in self.resid.items()})
            cols.update({f"extra_{k}": v for k, v in self.extra.items()})
            table = pa.table({k: _fixed_list(v) for k, v in cols.items()})
            with pa.OSFile(str(tmp / "arrays.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")

        atomic_dir(Path(path), write)
        self.path = Path(path)

    @classmethod
    def load(cls, path: Path | str) -> "ActivationCache":
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise NsrError(f"cache {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}: rebuild it")
        texts = pq.read_table(path / "texts.parquet")
        arrays = pa.ipc.open_file(pa.memory_map(str(path / "arrays.arrow"))).read_all()
        cols = {name: _to_numpy(arrays.column(name)) for name in arrays.column_names}
        layers = sorted(int(k[6:]) for k in cols if k.startswith("acts_L"))
        d_model = cols["features"].shape[1]
        resid = {L: cols[f"resid_L{L}"].reshape(len(texts), -1, d_model) for L in layers if f"resid_L{L}" in cols}
        return cls(
            texts=texts.column("text").to_pylist(),
            tokens=texts.column("tokens").to_pylist(),
            positions=texts.column("position").to_numpy(),
            acts={L: cols[f"acts_L{L}"] for L in layers},
            features=cols["features"],
            resid=resid,
            meta=meta,
            path=path,
            extra={k[6:]: v for k, v in cols.items() if k.startswith("extra_")},
        )


def _fixed_list(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def _to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """Zero-copy view of a FixedSizeList column as a read-only 2-D array."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return arr.values.to_numpy(zero_copy_only=True).reshape(len(arr), arr.type.list_size)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("nsr-sweep", "torch", "transformers", "transformer-lens", "numpy", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
