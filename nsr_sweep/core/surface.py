"""The model surface: the one place that knows a model family's module names.

A `Surface` is a causal language model seen as a function with named points: embed the tokens,
run blocks i…j on a residual, the final norm (with its affine), the unembedding, the module whose
output (or input) is neuron n's `hook_pre` / `hook_post`, and each neuron's read and write vectors
with the norm in front of them. The cache, training, re-reading a fine-tuned neuron, patching
and the weight analyses all go through it, on one copy of the weights, so a patch always reaches
the forward that is read.

Module names are not written here by hand: they come from TransformerLens 4's own architecture
adapters (`transformer_lens.model_bridge.supported_architectures`), which map its canonical
components (`embed`, `blocks`, `ln1`, `ln2`, `attn`, `mlp.in`/`gate`/`out`, `ln_final`,
`unembed`) to the HF module paths of every architecture it supports. What this module adds is
which of those architectures nsr-sweep has validated (GPT-2, GPT-NeoX, Llama-style) and the
TransformerLens hook names, read off the modules the adapter names:

    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post   block input / ln2 input / block output
    blocks.L.ln1.hook_normalized / ln1.hook_out / hook_attn_out  norm without / with affine, attention out
    blocks.L.ln2.hook_normalized / ln2.hook_out                  what the MLP reads (without / with affine)
    blocks.L.mlp.hook_pre / hook_pre_linear / hook_post          the neuron (see `neuron_point`)
    ln_final.hook_in / hook_normalized / hook_out                the final norm's input and outputs
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .errors import NsrError
from .families import FAMILIES, FAMILY_NAMES, check_architecture, check_hook, hook_names  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Architecture:
    """HF module paths of one architecture (from TransformerLens' adapter) and its family's shape."""

    family: str
    embed: str
    pos_embed: str | None
    rotary: str | None
    blocks: str
    ln1: str
    ln2: str
    attn: str
    mlp_in: str  # the up projection (TransformerLens' W_in)
    mlp_gate: str | None  # gated MLPs: the gate projection (W_gate); hook_pre is its output
    mlp_out: str  # the down projection; its input is hook_post
    ln_final: str
    unembed: str
    norm: str  # layernorm | rmsnorm
    parallel: bool  # attention and MLP read the same block input (GPT-NeoX)
    act_fn: str


def architecture(config) -> Architecture:
    """The Architecture of an HF config (a supported family, or a one-line error), from TransformerLens' adapter."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
    from transformer_lens.model_bridge.sources.transformers.source import build_bridge_config_from_hf

    archs = getattr(config, "architectures", None) or []
    family = check_architecture(archs[0] if archs else None, getattr(config, "name_or_path", "") or config.model_type)
    arch = determine_architecture_from_hf_config(config)
    cfg: Any = build_bridge_config_from_hf(config, arch, "nsr-sweep", None)  # type: ignore[arg-type]
    cm: Any = ArchitectureAdapterFactory.select_architecture_adapter(cfg).component_mapping
    blocks = cm["blocks"]
    sub = blocks.submodules
    mlp = sub["mlp"]
    parts = mlp.submodules
    name = lambda k: cm[k].name if k in cm else None  # noqa: E731
    return Architecture(
        family=family, embed=cm["embed"].name, pos_embed=name("pos_embed"), rotary=name("rotary_emb"),
        blocks=blocks.name, ln1=sub["ln1"].name, ln2=sub["ln2"].name, attn=sub["attn"].name,
        mlp_in=f"{mlp.name}.{parts['in'].name}",
        mlp_gate=f"{mlp.name}.{parts['gate'].name}" if "gate" in parts else None,
        mlp_out=f"{mlp.name}.{parts['out'].name}", ln_final=cm["ln_final"].name, unembed=cm["unembed"].name,
        norm="rmsnorm" if cfg.normalization_type == "RMS" else "layernorm",
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)), act_fn=str(cfg.act_fn),
    )


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _matrix(module: Any) -> torch.Tensor:
    """A projection's weight as [in, out] (x @ W): HF GPT-2's Conv1D stores it so, nn.Linear transposed."""
    w = module.weight
    return w if type(module).__name__ == "Conv1D" else w.T


def _bias(module: Any, n_out: int) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return b if b is not None else torch.zeros(n_out, dtype=module.weight.dtype, device=module.weight.device)


def causal_mask(T: int, device, dtype=torch.float32) -> torch.Tensor:
    """Additive causal mask for eager attention; right padding needs nothing more at real positions."""
    return torch.full((T, T), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]


@dataclass(frozen=True)
class Point:
    """Where a TransformerLens hook's value lives: the input or output of one module, maybe transformed."""

    layer: int | None  # None: after the last block (ln_final)
    module: Any
    side: str  # in | out
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


class Surface:
    """A causal LM as a function with named points (see the module docstring)."""

    trainable_start: int | None = None  # set on a trainable copy: blocks from here on (and the final norm) train

    def __init__(self, hf: Any, arch: Architecture, blocks: list | None = None, ln_final: Any = None):
        self.hf, self.arch = hf, arch
        self.config = hf.config
        self.embed = _get(hf, arch.embed)
        self.pos_embed = _get(hf, arch.pos_embed) if arch.pos_embed else None
        self.rotary = _get(hf, arch.rotary) if arch.rotary else None
        self.blocks = blocks if blocks is not None else list(_get(hf, arch.blocks))
        self.ln_final = ln_final if ln_final is not None else _get(hf, arch.ln_final)
        self.unembed = _get(hf, arch.unembed)
        self.n_layers = len(self.blocks)

    # -- parts ----------------------------------------------------------------------------
    def part(self, layer: int, path: str) -> Any:
        return _get(self.blocks[layer], path)

    def ln2(self, layer: int) -> Any:
        return self.part(layer, self.arch.ln2)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- the forward, in pieces -----------------------------------------------------------
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(ids.shape[1], device=ids.device))[None]
        return x

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
            positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual x [B, T, d] entering block `start` through blocks start…stop-1 (causal). With
        `positions` (B), x holds alternatives of one position per text instead of a sequence (the
        attention `nsr_sweep.core.patching` routes them through supplies the earlier positions)."""
        stop = self.n_layers if stop is None else stop
        if start >= stop:
            return x
        T = x.shape[1]
        kw: dict = {"attention_mask": causal_mask(T, x.device, x.dtype) if positions is None else None}
        if self.rotary is not None:
            position_ids = torch.arange(T, device=x.device)[None] if positions is None else \
                positions.to(x.device)[:, None].expand(-1, T)
            kw.update(position_ids=position_ids, position_embeddings=self.rotary(x, position_ids=position_ids))
        for blk in self.blocks[start:stop]:
            out = blk(x, **kw)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def normalized(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        """The norm without its affine (TransformerLens' `hook_normalized`)."""
        eps = norm_eps(norm)
        if self.arch.norm == "rmsnorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return F.layer_norm(x, x.shape[-1:], eps=eps)

    def logits(self, final_resid: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the residual entering the final norm: the norm with its affine, then the unembedding."""
        return self.unembed(self.ln_final(final_resid))

    # -- named points ---------------------------------------------------------------------
    def point(self, name: str) -> Point:
        """The module (and side) carrying TransformerLens hook `name`, or an error listing the known hooks."""
        a = self.arch
        if name.startswith("ln_final."):
            got = {"hook_in": (self.ln_final, "in", None), "hook_out": (self.ln_final, "out", None),
                   "hook_normalized": (self.ln_final, "in", lambda x: self.normalized(self.ln_final, x))}.get(name[9:])
            if got:
                return Point(None, *got)
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if m and int(m.group(1)) < self.n_layers:
            L, rest = int(m.group(1)), m.group(2)
            blk, ln1, ln2 = self.blocks[L], self.part(L, a.ln1), self.part(L, a.ln2)
            table = {
                "hook_resid_pre": (blk, "in", None),
                "hook_resid_post": (blk, "out", None),
                "ln1.hook_normalized": (ln1, "in", lambda x: self.normalized(ln1, x)),
                "ln1.hook_out": (ln1, "out", None),
                "hook_attn_out": (self.part(L, a.attn), "out", None),
                "ln2.hook_normalized": (ln2, "in", lambda x: self.normalized(ln2, x)),
                "ln2.hook_out": (ln2, "out", None),
                "mlp.hook_pre": (self.part(L, a.mlp_gate or a.mlp_in), "out", None),
                "mlp.hook_post": (self.part(L, a.mlp_out), "in", None),
            }
            if not a.parallel:  # parallel blocks have no residual between attention and MLP
                table["hook_resid_mid"] = (ln2, "in", None)
            if a.mlp_gate:
                table["mlp.hook_pre_linear"] = (self.part(L, a.mlp_in), "out", None)
            if rest in table:
                return Point(L, *table[rest])
        raise NsrError(f"hook {name!r} is not known for {a.family} models; known: {', '.join(self.hook_names())}")

    def hook_names(self, layer: int | str = "L") -> list[str]:
        return hook_names(layer, self.arch.parallel, self.arch.mlp_gate is not None)

    @contextmanager
    def reading(self, names: list[str], positions: torch.Tensor | dict[str, torch.Tensor] | None,
                full: frozenset | set = frozenset()) -> Iterator[dict[str, torch.Tensor]]:
        """Record each named point during the forwards inside the block: at `positions` (one per row; or
        per name), or whole (`full`, or positions None)."""
        out: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            p = self.point(name)

            def hook(mod, args, kwargs, output, name=name, p=p):
                x = (args[0] if args else next(iter(kwargs.values()))) if p.side == "in" else output
                x = x[0] if isinstance(x, tuple) else x
                x = p.transform(x) if p.transform else x
                at = positions.get(name) if isinstance(positions, dict) else positions
                out[name] = x if name in full or at is None else x[torch.arange(x.shape[0]), at.to(x.device)]
            handles.append(p.module.register_forward_hook(hook, with_kwargs=True))
        try:
            yield out
        finally:
            for h in handles:
                h.remove()

    def read(self, ids: torch.Tensor, names: list[str], positions: torch.Tensor | None,
             full: frozenset | set = frozenset()) -> dict[str, torch.Tensor]:
        """One forward from the tokens, as far as the last named point needs."""
        points = [self.point(n) for n in names]
        layers = [p.layer for p in points]
        stop = self.n_layers if None in layers else max(L for L in layers if L is not None) + 1
        with self.reading(names, positions, full) as got:
            x = self.run(self.embed_ids(ids), 0, stop)
            if stop == self.n_layers and any(p.layer is None for p in points):
                self.ln_final(x)
        return got

    # -- the neuron -----------------------------------------------------------------------
    def neuron_point(self, layer: int, hook: str) -> Point:
        """`post`: the input of the down projection (act(pre), or act(gate)·up); `pre`: the gate's (or in's) output."""
        return self.point(f"blocks.{layer}.mlp.hook_{hook}")

    @contextmanager
    def patch(self, layer: int, hook: str, positions: torch.Tensor, neuron: int | slice, value) -> Iterator[None]:
        """Set neuron `neuron` (or a slice of them: value rows × neurons, which may carry gradients) of layer
        `layer` at one position per row to `value` during the forwards inside."""
        if value is None:
            yield
            return
        p = self.neuron_point(layer, hook)
        rows = torch.arange(len(positions), device=positions.device)

        def set_value(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[rows, positions, neuron] = torch.as_tensor(value, dtype=x.dtype, device=x.device)
            return x

        if p.side == "out":
            h = p.module.register_forward_hook(lambda m, i, o: set_value(o))
        else:
            h = p.module.register_forward_pre_hook(lambda m, args: (set_value(args[0]),) + tuple(args[1:]))
        try:
            yield
        finally:
            h.remove()

    def neuron_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """float64 [d_model, d_mlp] read matrices and [d_mlp, d_model] write matrix of a layer, as the model applies them,
        on the CPU whatever the model's device (the analyses' small float64 algebra runs there).

        `W_in`/`b_in`: the (up) input projection; `W_gate`/`b_gate`: the gate (gated MLPs only);
        `W_pre`/`b_pre`: what `hook_pre` reads (the gate for gated MLPs, else W_in); `W_out`: the write."""
        a = self.arch
        up, down = self.part(layer, a.mlp_in), self.part(layer, a.mlp_out)
        W_in = _matrix(up).detach().double().cpu()
        out = {"W_in": W_in, "b_in": _bias(up, W_in.shape[1]).detach().double().cpu(),
               "W_out": _matrix(down).detach().double().cpu()}
        if a.mlp_gate:
            gate = self.part(layer, a.mlp_gate)
            out["W_gate"] = _matrix(gate).detach().double().cpu()
            out["b_gate"] = _bias(gate, W_in.shape[1]).detach().double().cpu()
        out["W_pre"], out["b_pre"] = (out["W_gate"], out["b_gate"]) if a.mlp_gate else (W_in, out["b_in"])
        return out

    def norm_affine(self, norm: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(γ, β) of a norm in float64 on the CPU; β is None for RMSNorm."""
        b = getattr(norm, "bias", None)
        return norm.weight.detach().double().cpu(), (b.detach().double().cpu() if b is not None else None)

    def effective(self, norm: Any, vectors: torch.Tensor) -> torch.Tensor:
        """Read vectors behind `norm` as directions in the residual stream: γ ⊙ w, centred for LayerNorm.

        LN(x)·w = ((x − x̄)/σ)·(γ⊙w) + β·w = (x/σ)·centre(γ⊙w) + β·w; RMSNorm has no centring."""
        gamma, _ = self.norm_affine(norm)
        v = vectors * gamma.reshape(-1, *([1] * (vectors.dim() - 1)))
        return v - v.mean(0, keepdim=True) if self.arch.norm == "layernorm" else v

    def residual_direction(self, name: str, d: torch.Tensor) -> torch.Tensor | None:
        """A readout direction `d` over the values of point `name` (or the columns of a d × P matrix of them), as a
        direction in the residual stream.

        Residual points (and the attention output) are residual-space already; after a norm, the
        direction seen from the residual is γ ⊙ d (with affine) or d (normalised only), centred for
        LayerNorm; MLP points have no residual-space direction (None)."""
        m = re.match(r"^(?:blocks\.(\d+)\.)?(ln1|ln2|ln_final)\.hook_(normalized|out|in)$", name)
        if m:
            norm = self.ln_final if m.group(2) == "ln_final" else self.part(int(m.group(1)), getattr(self.arch, m.group(2)))
            if m.group(3) == "out":
                return self.effective(norm, d)
            if m.group(3) == "normalized" and self.arch.norm == "layernorm":
                return d - d.mean(0, keepdim=True)
            return d
        if re.search(r"(hook_resid_(pre|mid|post)|hook_attn_out)$", name):
            return d
        return None

    # -- training and saving --------------------------------------------------------------
    def trainable_from(self, start: int) -> "Surface":
        """A surface whose blocks start… and final norm are private, trainable copies (eval mode: no dropout).

        Blocks below `start`, the embeddings and the unembedding stay shared and frozen."""
        blocks = list(self.blocks[:start]) + [copy.deepcopy(b) for b in self.blocks[start:]]
        ln_final = copy.deepcopy(self.ln_final)
        for m in [*blocks[start:], ln_final]:
            m.eval().requires_grad_(True)
        s = Surface(self.hf, self.arch, blocks, ln_final)
        s.trainable_start = start
        return s

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters, named as in the HF state dict."""
        start = self.n_layers + 1 if self.trainable_start is None else self.trainable_start
        out = {}
        for i in range(start, self.n_layers):
            out.update({f"{self.arch.blocks}.{i}.{k}": p for k, p in self.blocks[i].named_parameters()})
        if start <= self.n_layers:
            out.update({f"{self.arch.ln_final}.{k}": p for k, p in self.ln_final.named_parameters()})
        return out

    def to_hf(self) -> Any:
        """A standalone HF model with this surface's weights (a copy; for `save_pretrained`)."""
        hf = copy.deepcopy(self.hf)
        state = {k: v.detach() for k, v in self.trainable().items()}
        missing = hf.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        return hf


def norm_eps(norm: torch.nn.Module) -> float:
    """LayerNorm's `eps`, RMSNorm's `variance_epsilon` (Llama) or `eps`."""
    for k in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(norm, k):
            return float(getattr(norm, k))
    raise NsrError(f"norm {type(norm).__name__} has no epsilon attribute")
