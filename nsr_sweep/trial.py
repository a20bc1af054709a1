"""One trial: (layer, neuron, head, freeze) with one set of hyperparameters — trained, evaluated, saved.

Plain Python, no Ray: the sweep machinery calls exactly `run_trial`.

- freeze `none`: the base is frozen and the head is fit on cached features only (no forward
  pass); `fit_probes` fits the same head for many neurons of a layer as one batched computation.
- freeze `after_target`: copies of blocks L+1… and ln_final train, the head is frozen at a seeded
  random init; training starts from the cached residual after block L.
- freeze `all`: a copy of every block and ln_final trains (embeddings frozen), head frozen.

The unfrozen paths run the plain HF GPT-2 modules with an explicit causal mask (eval mode:
no dropout, so a seed fixes every number); the resident base model is never modified.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .cache import ActivationCache, pad_batch
from .errors import NsrError
from .heads import HeadMap, digit_token_ids
from .metrics import prediction_metrics
from .models import BaseModel

FREEZES = ("none", "after_target", "all")
CONTROLS = (None, "shuffled", "random_model", "early_features")
SPLITS = ("train", "val", "test")
DEFAULT_SUFFIX = " Question: how strongly does neuron {neuron} of layer {layer} fire on this text, from 0 to 9? Answer:"


@dataclass(frozen=True)
class TrialSpec:
    layer: int
    neuron: int
    head: str = "regression"
    freeze: str = "none"
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 64
    weight_decay: float = 0.0
    patience: int = 3
    n_bins: int = 10
    solver: str = "adamw"  # regression probes (freeze none) may also be solved exactly: "lstsq" (ridge = weight_decay)
    seed: int = 0  # the trial's own randomness: init of a frozen head, minibatch order
    split_seed: int = 0  # the train/val/test split: shared by every trial of a sweep
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    suffix: str = DEFAULT_SUFFIX
    save_weights: bool = False
    control: str | None = None  # shuffled | random_model | early_features
    patch_grid: str = "quantiles"  # quantiles of the train activations, or `scale` factors
    n_grid: int = 7
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    patch_texts: int = 64
    analyses: bool = True

    def check(self, model: BaseModel | None = None) -> None:
        if self.head == "token" and self.freeze == "none":
            raise NsrError("head token with freeze none is not a valid trial: a frozen model has nothing to "
                           "train for a token head; use freeze after_target or all")
        if self.freeze not in FREEZES:
            raise NsrError(f"freeze {self.freeze!r} is not allowed; allowed: {', '.join(FREEZES)}")
        HeadMap(self.head, np.zeros(2), max(self.n_bins, 2))  # validates the head name
        if self.control not in CONTROLS:
            raise NsrError(f"control {self.control!r} is not allowed; allowed: {', '.join(map(str, CONTROLS))}")
        if self.control in ("random_model", "early_features") and self.freeze != "none":
            raise NsrError(f"control {self.control} swaps the head's features: it needs freeze none")
        if self.solver not in ("adamw", "lstsq"):
            raise NsrError(f"solver {self.solver!r} is not allowed; allowed: adamw, lstsq")
        if self.solver == "lstsq" and (self.head != "regression" or self.freeze != "none"):
            raise NsrError("solver lstsq is exact least squares: only for head regression with freeze none")
        if self.patch_grid not in ("quantiles", "scale"):
            raise NsrError(f"patch_grid {self.patch_grid!r} is not allowed; allowed: quantiles, scale")
        if model is not None:
            model.check_layer(self.layer)
            model.check_neuron(self.neuron)


@dataclass
class TrialResult:
    spec: TrialSpec
    status: str  # ok | failed
    metrics: dict = field(default_factory=dict)
    reason: str | None = None
    preds: pd.DataFrame | None = None
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)
    patch: pd.DataFrame | None = None  # raw activation-patching points


def split_indices(n: int, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded shuffle, then cut: train / val / test index arrays (sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    cuts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    if min(len(v) for v in cuts.values()) < 2:
        raise NsrError(f"corpus of {n} texts is too small to split {fractions}: each split needs ≥ 2 texts")
    return {k: np.sort(v) for k, v in cuts.items()}


# -- frozen base: probes on cached features ------------------------------------------------


@dataclass
class ProbeFit:
    weight: torch.Tensor  # N × d × n_out
    bias: torch.Tensor  # N × n_out
    maps: list[HeadMap]
    history: list[list[dict]]  # per neuron, per epoch
    failed: list[str | None]  # per neuron: reason, or None


def fit_probes(features: np.ndarray, targets: np.ndarray, head: str, spec: TrialSpec,
               splits: dict[str, np.ndarray], on_epoch=None) -> ProbeFit:
    """Fit one linear head per column of `targets` (n_texts × N) at once.

    The neurons share nothing: the loss is a sum of per-neuron means, AdamW is elementwise,
    each neuron early-stops on its own val MSE and keeps its own best epoch — so the result
    equals N one-at-a-time fits.
    """
    if spec.solver == "lstsq":
        return solve_probes(features, targets, spec, splits)
    X = torch.from_numpy(np.array(features, np.float32))  # a private copy: cache arrays are read-only views
    N = targets.shape[1]
    tr, va = splits["train"], splits["val"]
    maps = [HeadMap(head, targets[tr, j], spec.n_bins) for j in range(N)]
    enc = torch.stack([m.encode(targets[:, j]) for j, m in enumerate(maps)])  # N × n_texts
    y_val = torch.as_tensor(targets[va].T)  # N × n_val, activation units
    n_out = maps[0].n_out
    W = torch.zeros(N, X.shape[1], n_out, requires_grad=True)  # zero init: convex problem, seed-free
    b = torch.zeros(N, n_out, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    best = torch.full((N,), math.inf, dtype=torch.float64)
    best_W, best_b = W.detach().clone(), b.detach().clone()
    stale = torch.zeros(N, dtype=torch.long)
    active = torch.ones(N, dtype=torch.bool)
    failed: list[str | None] = [None] * N
    history: list[list[dict]] = [[] for _ in range(N)]
    for epoch in range(spec.epochs):
        order = torch.as_tensor(tr)[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), spec.batch_size):
            idx = order[start : start + spec.batch_size]
            out = torch.einsum("bd,ndo->nbo", X[idx], W) + b[:, None]
            per_neuron = torch.stack([maps[j].loss(out[j], enc[j, idx]) for j in range(N)])
            bad = ~torch.isfinite(per_neuron.detach())
            for j in torch.nonzero(bad & active).flatten().tolist():
                failed[j], active[j] = f"non-finite training loss at epoch {epoch}", False
            opt.zero_grad(set_to_none=True)
            per_neuron.masked_fill(bad, 0.0).sum().backward()
            opt.step()
        with torch.no_grad():
            out = torch.einsum("bd,ndo->nbo", X[va], W) + b[:, None]
            val_mse = torch.stack([((maps[j].predict(out[j]) - y_val[j]) ** 2).mean() for j in range(N)])
            val_loss = torch.stack([maps[j].loss(out[j], enc[j, va]) for j in range(N)])
        for j in torch.nonzero(active).flatten().tolist():
            history[j].append({"epoch": epoch, "val_mse": float(val_mse[j]), "val_loss": float(val_loss[j])})
            if not math.isfinite(float(val_mse[j])):
                failed[j], active[j] = f"non-finite validation MSE at epoch {epoch}", False
            elif val_mse[j] < best[j]:
                best[j], stale[j] = val_mse[j], 0
                best_W[j], best_b[j] = W[j].detach(), b[j].detach()
            else:
                stale[j] += 1
                active[j] = stale[j] < spec.patience
        if not active.any():
            break
        if on_epoch is not None and N == 1 and not on_epoch(history[0][-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    return ProbeFit(best_W, best_b, maps, history, failed)


def solve_probes(features: np.ndarray, targets: np.ndarray, spec: TrialSpec, splits: dict[str, np.ndarray]) -> ProbeFit:
    """Exact ridge regression (λ = weight_decay, bias unpenalised) for every column of `targets` in one solve."""
    tr, va = splits["train"], splits["val"]
    X = np.asarray(features, np.float64)
    maps = [HeadMap("regression", targets[tr, j]) for j in range(targets.shape[1])]
    Z = np.stack([(targets[:, j] - m.mu) / m.sigma for j, m in enumerate(maps)], 1)  # standardised, as AdamW sees it
    mx, mz = X[tr].mean(0), Z[tr].mean(0)
    Xc = X[tr] - mx
    W = np.linalg.solve(Xc.T @ Xc + spec.weight_decay * np.eye(X.shape[1]), Xc.T @ (Z[tr] - mz))  # d × N
    b = mz - mx @ W
    history = []
    for j, m in enumerate(maps):
        pred = m.mu + m.sigma * (X[va] @ W[:, j] + b[j])
        mse = float(np.mean((pred - targets[va, j]) ** 2))
        history.append([{"epoch": 0, "val_mse": mse, "val_loss": float(np.mean((X[va] @ W[:, j] + b[j] - Z[va, j]) ** 2))}])
    weight = torch.as_tensor(W.T[:, :, None], dtype=torch.float32)
    return ProbeFit(weight, torch.as_tensor(b[:, None], dtype=torch.float32), maps, history, [None] * len(maps))


# -- unfrozen: the model learns, the head is frozen ----------------------------------------


def _gpt2(model: BaseModel):
    tr = getattr(model.hf, "transformer", None)
    if tr is None or not hasattr(tr, "h"):
        raise NsrError(f"freeze after_target/all needs a GPT-2-style model (transformer.h, ln_f); "
                       f"{model.spec.name} is {type(model.hf).__name__}")
    return tr


def causal_mask(T: int, device) -> torch.Tensor:
    """Additive causal mask for eager attention; right padding needs nothing more at real positions."""
    return torch.full((T, T), torch.finfo(torch.float32).min, device=device).triu(1)[None, None]


def run_blocks(blocks, resid: torch.Tensor) -> torch.Tensor:
    """resid [B, T, d] through `blocks` (HF GPT-2 blocks, causal)."""
    mask = causal_mask(resid.shape[1], resid.device)
    for blk in blocks:
        out = blk(resid, attention_mask=mask)
        resid = out[0] if isinstance(out, tuple) else out
    return resid


class FrozenHead(torch.nn.Module):
    """The frozen readout of an unfrozen trial: seeded random linear map, or the digit unembedding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)  # d × n_out
        self.register_buffer("bias", bias if bias is not None else torch.zeros(weight.shape[1]))

    def forward(self, x):
        return x @ self.weight + self.bias


def _frozen_head(model: BaseModel, spec: TrialSpec, n_out: int, digit_ids) -> FrozenHead:
    if spec.head == "token":
        return FrozenHead(model.hf.get_output_embeddings().weight[digit_ids].detach().T.clone(), None)
    gen = torch.Generator().manual_seed(spec.seed)
    w = torch.randn(model.d_model, n_out, generator=gen) / math.sqrt(model.d_model)
    return FrozenHead(w, torch.zeros(n_out))


class Suffix(torch.nn.Module):
    """The trainable part of the network: blocks[start:] and ln_final (a private copy)."""

    def __init__(self, model: BaseModel, start: int, with_embeddings: bool):
        super().__init__()
        tr = _gpt2(model)
        self.start = start
        self.blocks = copy.deepcopy(tr.h[start:])
        self.ln_f = copy.deepcopy(tr.ln_f)
        self.wte = tr.wte if with_embeddings else None  # shared and frozen: never trained
        self.wpe = tr.wpe if with_embeddings else None
        self.eval()  # no dropout: a seed fixes every number
        for p in self.parameters():
            p.requires_grad_(True)
        if with_embeddings:
            self.wte.requires_grad_(False)
            self.wpe.requires_grad_(False)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def features(self, resid: torch.Tensor, normalized: bool) -> torch.Tensor:
        x = run_blocks(self.blocks, resid)
        return F.layer_norm(x, x.shape[-1:], eps=self.ln_f.eps) if normalized else self.ln_f(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))[None]


def _feature_normalized(hook: str) -> bool:
    if hook not in ("ln_final.hook_normalized", "ln_final.hook_out"):
        raise NsrError(f"features.hook {hook!r}: unfrozen trials read ln_final.hook_normalized or ln_final.hook_out")
    return hook == "ln_final.hook_normalized"


def _sequences(cache: ActivationCache, spec: TrialSpec, model: BaseModel):
    """Token sequences the model reads, and the answer position of each (suffix appended for token heads)."""
    if spec.head != "token":
        return cache.tokens, cache.positions, None
    suffix = spec.suffix.format(layer=spec.layer, neuron=spec.neuron)
    digit_ids = digit_token_ids(model.tokenizer, suffix)
    suffix_ids = model.tokenizer.encode(suffix, add_special_tokens=False)
    seqs = [list(t) + suffix_ids for t in cache.tokens]
    return seqs, np.array([len(s) - 1 for s in seqs]), digit_ids


@torch.no_grad()
def _resid_after(model: BaseModel, seqs, layer: int, batch: int = 64) -> torch.Tensor:
    """Residual after block `layer` at every position, computed once under no_grad (blocks ≤ L never train)."""
    tr = _gpt2(model)
    T = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), T, model.d_model)
    for s in range(0, len(seqs), batch):
        ids, mask = pad_batch(seqs[s : s + batch], model.tokenizer.pad_token_id, model.device)
        x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1], device=ids.device))[None]
        x = run_blocks(tr.h[: layer + 1], x)
        out[s : s + batch, : ids.shape[1]] = (x * mask[..., None]).cpu()
    return out


def train_unfrozen(cache: ActivationCache, model: BaseModel, spec: TrialSpec, y: np.ndarray,
                   splits: dict[str, np.ndarray], feature_hook: str, on_epoch=None):
    normalized = _feature_normalized(feature_hook)
    hmap = HeadMap(spec.head, y[splits["train"]], spec.n_bins)
    seqs, answer_pos, digit_ids = _sequences(cache, spec, model)
    head = _frozen_head(model, spec, hmap.n_out, digit_ids)
    after = spec.freeze == "after_target"
    net = Suffix(model, spec.layer + 1 if after else 0, with_embeddings=not after)
    if after:  # the residual after block L: from the cache when it holds it, else computed once
        has = spec.head != "token" and spec.layer in cache.resid
        start = torch.from_numpy(np.asarray(cache.resid[spec.layer])) if has else _resid_after(model, seqs, spec.layer)
    lengths = np.array([len(s) for s in seqs])
    target = hmap.encode(y)

    def inputs(idx: np.ndarray) -> torch.Tensor:
        T = int(lengths[idx].max())
        if after:
            return start[idx, :T].to(model.device)
        ids, _ = pad_batch([seqs[i] for i in idx], model.tokenizer.pad_token_id, model.device)
        return net.embed(ids)

    def outputs(idx: np.ndarray) -> torch.Tensor:
        feats = net.features(inputs(idx), normalized)
        return head(feats[torch.arange(len(idx)), torch.as_tensor(answer_pos[idx])])

    trainable = net.trainable()
    opt = torch.optim.AdamW(trainable.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    tr, va = splits["train"], splits["val"]
    best, stale, history = math.inf, 0, []
    best_state = {k: v.detach().clone() for k, v in trainable.items()}
    for epoch in range(spec.epochs):
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for s in range(0, len(order), spec.batch_size):
            idx = order[s : s + spec.batch_size]
            loss = hmap.loss(outputs(idx), target[idx].to(model.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = torch.cat([outputs(va[s : s + 256]) for s in range(0, len(va), 256)]).cpu()
        val_mse = float(((hmap.predict(out) - torch.as_tensor(y[va])) ** 2).mean())
        history.append({"epoch": epoch, "val_mse": val_mse, "val_loss": float(hmap.loss(out, target[va]))})
        if not math.isfinite(val_mse):
            raise FloatingPointError(f"non-finite validation MSE at epoch {epoch}")
        if val_mse < best:
            best, stale = val_mse, 0
            best_state = {k: v.detach().clone() for k, v in trainable.items()}
        else:
            stale += 1
            if stale >= spec.patience:
                break
        if on_epoch is not None and not on_epoch(history[-1]):
            break  # a scheduler (ASHA) stopped this trial: keep its best epoch so far
    with torch.no_grad():
        for k, v in trainable.items():
            v.copy_(best_state[k])
        all_idx = np.arange(len(seqs))
        out = torch.cat([outputs(all_idx[s : s + 256]) for s in range(0, len(seqs), 256)]).cpu()
        actual_ft = _reread_neuron(net, cache, spec, model) if not after else np.asarray(y, np.float64)
    weights = {k: v.detach().cpu().contiguous() for k, v in trainable.items()} if spec.save_weights else None
    return hmap, head, out, actual_ft, history, weights, net


@torch.no_grad()
def _reread_neuron(net: Suffix, cache: ActivationCache, spec: TrialSpec, model: BaseModel) -> np.ndarray:
    """The same neuron on the same texts (cache token ids, target position) in the fine-tuned model."""
    hook = cache.meta.get("spec", {}).get("hook", "post")
    act = net.blocks[spec.layer].mlp.act
    got, vals = {}, []
    handle = act.register_forward_hook(lambda m, i, o: got.__setitem__("v", i[0] if hook == "pre" else o))
    try:
        for s in range(0, cache.n_texts, 64):
            idx = np.arange(s, min(s + 64, cache.n_texts))
            ids, _ = pad_batch([cache.tokens[i] for i in idx], model.tokenizer.pad_token_id, model.device)
            run_blocks(net.blocks[: spec.layer + 1], net.embed(ids))
            vals.append(got["v"][torch.arange(len(idx)), torch.as_tensor(cache.positions[idx]), spec.neuron])
    finally:
        handle.remove()
    return torch.cat(vals).double().cpu().numpy()


# -- the trial's final model, for the analyses ------------------------------------------------


class FinalModel:
    """The trial's final model and head as one function of texts: outputs and final residual at the
    head's read position, with an optional neuron patch at the target position (DESIGN.md §1).

    Blocks below L cannot see a patch at layer L, so the residual entering block L is computed once
    per set of texts and every patched forward runs blocks L… only (features read after ln_final);
    other feature hooks go through a full forward of the base model."""

    def __init__(self, model: BaseModel, spec: TrialSpec, seqs, answer_pos, target_pos, feature_hook: str,
                 head, net: Suffix | None, hook: str, reuse_prefix: bool = True):
        self.model, self.spec, self.seqs, self.head, self.net, self.hook = model, spec, seqs, head, net, hook
        self.answer_pos, self.target_pos, self.feature_hook = answer_pos, target_pos, feature_hook
        tr = _gpt2(model)
        L = spec.layer
        if net is None:
            blocks, self.ln_f = list(tr.h), tr.ln_f
        elif spec.freeze == "after_target":
            blocks, self.ln_f = list(tr.h[: L + 1]) + list(net.blocks), net.ln_f
        else:
            blocks, self.ln_f = list(net.blocks), net.ln_f
        self.prefix_blocks, self.suffix_blocks = blocks[:L], blocks[L:]
        self.act = blocks[L].mlp.act
        self.fast = reuse_prefix and feature_hook in ("ln_final.hook_normalized", "ln_final.hook_out")
        self._prefix: dict[bytes, torch.Tensor] = {}
        if not self.fast:
            from .cache import make_reader

            self.reader = make_reader(model, list(dict.fromkeys([feature_hook, "ln_final.hook_in"])))

    @torch.no_grad()
    def run(self, idx: np.ndarray, patch_value=None) -> tuple[torch.Tensor, torch.Tensor]:
        from .analyses import patched

        ids, mask = pad_batch([self.seqs[i] for i in idx], self.model.tokenizer.pad_token_id, self.model.device)
        rows, at = torch.arange(len(idx)), torch.as_tensor(self.answer_pos[idx], device=ids.device)
        with patched(self.act, self.hook, torch.as_tensor(self.target_pos[idx]), self.spec.neuron, patch_value):
            if not self.fast:
                got = self.reader(ids, mask, at)
                return self.head(got[self.feature_hook]).cpu(), got["ln_final.hook_in"].double().cpu()
            key = np.asarray(idx).tobytes()
            if key not in self._prefix:
                tr = _gpt2(self.model)
                x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1], device=ids.device))[None]
                self._prefix[key] = run_blocks(self.prefix_blocks, x)
            final = run_blocks(self.suffix_blocks, self._prefix[key])[rows, at]
        normalized = _feature_normalized(self.feature_hook)
        feats = F.layer_norm(final, final.shape[-1:], eps=self.ln_f.eps) if normalized else self.ln_f(final)
        return self.head(feats).cpu(), final.double().cpu()


@torch.no_grad()
def base_final_resid(model: BaseModel, seqs, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The original model's residual entering ln_final, at `pos`, for `seqs[idx]`."""
    from .cache import make_reader

    reader = make_reader(model, ["ln_final.hook_in"])
    out = []
    for s in range(0, len(idx), 64):
        part = idx[s : s + 64]
        ids, mask = pad_batch([seqs[i] for i in part], model.tokenizer.pad_token_id, model.device)
        out.append(reader(ids, mask, torch.as_tensor(pos[part]))["ln_final.hook_in"].double().cpu())
    return torch.cat(out).numpy()


def analyse(cache: ActivationCache, model: BaseModel, spec: TrialSpec, final: FinalModel, hmap: HeadMap,
            head_weight: torch.Tensor, preds: pd.DataFrame, splits: dict) -> tuple[dict, pd.DataFrame]:
    """The analysis columns of DESIGN.md §1 for one trial, and the raw patching points."""
    from . import analyses as A

    L, n = spec.layer, spec.neuron
    W_in, b_in, W_out = A.neuron_weights(model, L)
    test = splits["test"]
    out: dict = {}
    direction = A.readout_direction(head_weight, hmap)
    if direction.shape[0] == model.d_model:  # a direction in residual space (not e.g. an MLP-basis probe)
        out.update(A.weight_cosines(direction, W_in, W_out, n, seed=spec.seed))
    needs_model = final.net is not None or spec.head == "token"
    if needs_model:
        _, final_ft = zip(*(final.run(test[s : s + 64]) for s in range(0, len(test), 64)))
        final_ft = torch.cat(final_ft).numpy()
    else:
        final_ft = np.asarray(cache.extra["resid_final"])[test]
    actual = preds["actual_orig"].to_numpy()
    out.update(A.projections(actual[test], preds["readout"].to_numpy()[test],
                             np.asarray(cache.extra[f"mlp_in_L{L}"])[test], W_in[:, n], b_in[n], final_ft, W_out[n]))
    sample = test[: spec.patch_texts]
    grid = A.patch_grid(actual[splits["train"]], spec.patch_grid, spec.n_grid, spec.scales)
    act_base = preds["actual_ft"].to_numpy()[sample]
    points = A.run_patching(lambda v: hmap.predict(final.run(sample, v)[0]).numpy(), sample, act_base, grid,
                            scale=spec.patch_grid == "scale")
    out.update(A.fit_patch(points))
    if final.net is not None:
        orig = base_final_resid(model, final.seqs, test, final.answer_pos)
        out.update(A.residual_change(final_ft - orig, direction, actual[test], W_in[:, n], W_out[n]))
    return out, points


# -- the trial -----------------------------------------------------------------------------


def run_trial(cache: ActivationCache, model: BaseModel | None, spec: TrialSpec,
              feature_hook: str | None = None, on_epoch=None) -> TrialResult:
    """Train, evaluate and analyse one trial. A non-finite loss gives status `failed` with the reason.

    `on_epoch(record) -> bool` sees each epoch's validation record; False stops training there."""
    spec.check(model)
    feature_hook = feature_hook or cache.meta["spec"]["features"]
    t0 = time.perf_counter()
    y = np.asarray(cache.activations(spec.layer, spec.neuron), np.float64)
    if spec.control == "shuffled":  # the same trial against permuted targets: what chance looks like
        y = np.random.default_rng(spec.seed).permutation(y)
    splits = split_indices(cache.n_texts, spec.splits, spec.split_seed)
    weights, net = None, None
    try:
        if spec.freeze == "none":
            features = control_features(cache, spec)
            fit = fit_probes(features, y[:, None], spec.head, spec, splits, on_epoch=on_epoch)
            if fit.failed[0]:
                raise FloatingPointError(fit.failed[0])
            hmap, history = fit.maps[0], fit.history[0]
            out = torch.as_tensor(np.asarray(features, np.float32)) @ fit.weight[0] + fit.bias[0]
            head = {"weight": fit.weight[0].T.contiguous(), "bias": fit.bias[0].contiguous()}
            head_fn = lambda f, w=fit.weight[0], b=fit.bias[0]: f.float() @ w + b  # noqa: E731
            actual_ft = y
        else:
            hmap, frozen, out, actual_ft, history, weights, net = train_unfrozen(
                cache, model, spec, y, splits, feature_hook, on_epoch=on_epoch)
            head = {"weight": frozen.weight.T.contiguous(), "bias": frozen.bias.contiguous()}
            head_fn = frozen
    except FloatingPointError as e:
        return TrialResult(spec, "failed", reason=str(e), metrics={"seconds": time.perf_counter() - t0})
    preds = pd.DataFrame({
        "text_id": np.arange(cache.n_texts, dtype=np.int64),
        "split": pd.Categorical(np.full(cache.n_texts, "train", dtype=object), categories=list(SPLITS)),
        "actual_orig": y, "actual_ft": np.asarray(actual_ft, np.float64),
        "pred": hmap.predict(out).numpy(), "readout": hmap.readout(out).numpy(),
    })
    for name, idx in splits.items():
        preds.loc[idx, "split"] = name
    metrics = trial_metrics(preds, hmap.train_mean)
    best = int(np.argmin([h["val_mse"] for h in history]))
    metrics.update({"epochs_run": len(history), "best_epoch": best, "val_mse": history[best]["val_mse"],
                    "val_loss": history[best]["val_loss"], "train_seconds": time.perf_counter() - t0})
    points = None
    if spec.analyses and model is not None and spec.control in (None, "shuffled"):
        seqs, answer_pos, _ = _sequences(cache, spec, model)
        final = FinalModel(model, spec, seqs, answer_pos, cache.positions, feature_hook, head_fn, net,
                           cache.meta["spec"]["hook"])
        columns, points = analyse(cache, model, spec, final, hmap, head["weight"], preds, splits)
        metrics.update(columns)
    metrics["seconds"] = time.perf_counter() - t0
    head.update(hmap.state())
    return TrialResult(spec, "ok", metrics, preds=preds, head=head, weights=weights, history=history, patch=points)


def control_features(cache: ActivationCache, spec: TrialSpec) -> np.ndarray:
    """The features a frozen-base head reads: the cache's, or a control's stand-in."""
    if spec.control == "early_features":  # the residual before block L cannot contain the neuron's output
        return cache.extra[f"resid_pre_L{spec.layer}"]
    if spec.control == "random_model":  # the same architecture with random weights
        if "random_model_features" not in cache.extra:
            raise NsrError("control random_model needs the random model's features in the cache "
                           "(add random_model to the sweep's controls)")
        return cache.extra["random_model_features"]
    return cache.features


def trial_metrics(preds: pd.DataFrame, train_mean: float) -> dict[str, float]:
    """Test-split metrics against actual_orig, and against actual_ft (suffix `_ft`), plus drift."""
    test = preds[preds["split"] == "test"]
    val = preds[preds["split"] == "val"]
    m = prediction_metrics(test["pred"].to_numpy(), test["actual_orig"].to_numpy(), train_mean)
    ft = prediction_metrics(test["pred"].to_numpy(), test["actual_ft"].to_numpy(), train_mean)
    m.update({f"{k}_ft": v for k, v in ft.items()})
    m["drift"] = float(np.mean(test["actual_ft"].to_numpy() - test["actual_orig"].to_numpy()))
    v = prediction_metrics(val["pred"].to_numpy(), val["actual_orig"].to_numpy(), train_mean)
    m.update({"val_pearson_r": v["pearson_r"], "val_skill": v["skill"]})
    m["n_train"], m["n_val"], m["n_test"] = (int((preds["split"] == s).sum()) for s in SPLITS)
    return m


def spec_dict(spec: TrialSpec) -> dict:
    d = asdict(spec)
    d["splits"] = list(spec.splits)
    d["scales"] = list(spec.scales)
    return d
