"""Exact activation patching of a frozen base model at the target position, for every neuron at once.

The neuron is read at each text's last real token. Patching it there changes nothing at earlier
positions (causal attention) and nothing exists after it, so downstream of the patch only that one
position differs from the base forward: its residual after block L moves by Δpost·W_out[n, :], and
blocks L+1… recompute that single position with the keys and values of every earlier position taken
from the base forward. `LastPosition` does exactly that, for many (neuron, value) alternatives of one
text at once: the alternatives ride along the sequence axis of the model's own blocks, and an
attention function registered with `transformers` lets each of them attend to the recorded earlier
keys and values plus its own key and value (never to another alternative). Every number is the full
re-forward's, to float rounding (tested against a plain `transformers` forward with a hook).

Points read before the patch (blocks below L, or block L upstream of the neuron) cannot move; points
inside block L downstream of it (the neuron's own hook_post for a hook_pre patch, hook_resid_post)
are written out directly.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .cache import neuron_hook, pad_batch
from .surface import Surface, _matrix

ATTENTION = "nsr_last_position"
_state = threading.local()  # the active recording: {id(attention module): (keys, values)} and the mode


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`record`: the family's own eager attention, keeping each layer's keys and values; `alternatives`:
    query/key/value hold M alternatives of each text's last position (B × heads × M × d_head): each
    attends to the recorded keys before that position and to its own key."""
    rec = _state.active
    if rec.mode == "record":
        if id(module) in rec.wanted:
            rec.kv[id(module)] = (key, value)
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    keys, values = rec.kv[id(module)]  # B × kv heads × T × d_head
    groups = query.shape[1] // keys.shape[1]  # grouped-query attention: each kv head serves `groups` heads
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    before = torch.matmul(query, keys.transpose(-1, -2)) * scale  # B × H × M × T
    before = before.masked_fill(~rec.earlier[:, None, None, :], torch.finfo(before.dtype).min)
    own = (query * key).sum(-1, keepdim=True) * scale  # B × H × M × 1
    w = torch.softmax(torch.cat([before, own], -1), -1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w[..., :-1], values) + w[..., -1:] * value
    return out.transpose(1, 2).contiguous(), None


@dataclass
class _Recording:
    mode: str
    wanted: set[int]
    kv: dict
    earlier: torch.Tensor | None = None  # B × T: the positions before each text's last one


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)


@contextmanager
def _attending(surface: Surface, rec: _Recording) -> Iterator[None]:
    """Route the surface's attention through `_attention` for the forwards inside."""
    _register()
    configs = {id(m.config): m.config for b in surface.blocks for m in b.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    previous = getattr(_state, "active", None)
    _state.active = rec
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
        _state.active = previous


def _attention_modules(surface: Surface, start: int) -> set[int]:
    return {id(surface.part(i, surface.arch.attn)) for i in range(start, surface.n_layers)}


class LastPosition:
    """The frozen base model on texts `seqs`, ready to recompute their last position with neuron values
    set at layer `layer` (hook `post` or `pre`), reading `read_hook` there."""

    def __init__(self, surface: Surface, seqs: list[list[int]], layer: int, hook: str, read_hook: str,
                 pad_id: int):
        self.s, self.layer, self.hook, self.read_hook = surface, layer, hook, read_hook
        self.pos = torch.tensor([len(q) - 1 for q in seqs], device=surface.device)
        self.point = surface.point(read_hook)
        ids, _ = pad_batch(seqs, pad_id, surface.device)
        T = ids.shape[1]
        names = list(dict.fromkeys([f"blocks.{layer}.hook_resid_post", neuron_hook(layer, "post"),
                                    neuron_hook(layer, "pre"), read_hook] + self._linear()))
        self.rec = _Recording("record", _attention_modules(surface, layer + 1), {})
        with torch.no_grad(), _attending(surface, self.rec), surface.reading(names, self.pos) as got:
            x = surface.run(surface.embed_ids(ids), 0, self._stop())
            if self.point.layer is None:
                surface.ln_final(x)
        self.base = {k: v.detach() for k, v in got.items()}
        self.rec.mode = "alternatives"
        self.rec.earlier = torch.arange(T, device=surface.device)[None, :] < self.pos[:, None]
        self.w_out = _matrix(surface.part(layer, surface.arch.mlp_out)).detach()  # d_mlp × d_model
        self._jacobian: torch.Tensor | None = None  # `resid_jacobian`, once built
        self._pushed = 0  # directions `feature_gradient` has pushed forward instead

    @property
    def reachable(self) -> bool:
        """Whether a patch can move the read point at all (not upstream of the neuron)."""
        p, L = self.point, self.layer
        inside = self.read_hook.split(".", 2)[-1] in (f"mlp.hook_{self.hook}", "mlp.hook_post", "hook_resid_post")
        return p.layer is None or p.layer > L or (p.layer == L and inside)

    def _linear(self) -> list[str]:
        return [f"blocks.{self.layer}.mlp.hook_pre_linear"] if self.s.arch.mlp_gate else []

    def _stop(self) -> int:
        """Blocks the forward must run: up to the read point's block (all of them for ln_final points)."""
        return self.s.n_layers if self.point.layer is None else max(self.point.layer, self.layer) + 1

    def activations(self, neurons: np.ndarray) -> torch.Tensor:
        """The neurons' own values at the last position (B × N, float64 on the CPU): the patched hook's."""
        return self.base[neuron_hook(self.layer, self.hook)][:, torch.as_tensor(neurons)].double().cpu()

    def delta_post(self, neurons: np.ndarray, values: torch.Tensor) -> torch.Tensor:
        """B × N × G: how much hook_post of each neuron moves when its patched hook is set to `values`."""
        n = torch.as_tensor(neurons)
        post = self.base[neuron_hook(self.layer, "post")][:, n]
        v = values.to(post.device, post.dtype)
        if self.hook == "post":
            return v - post[..., None]
        from transformers.activations import ACT2FN

        new = ACT2FN[self.s.arch.act_fn](v)
        if self.s.arch.mlp_gate:  # gated: hook_post = act(hook_pre) · hook_pre_linear
            new = new * self.base[f"blocks.{self.layer}.mlp.hook_pre_linear"][:, n][..., None]
        return new - post[..., None]

    @torch.no_grad()
    def features(self, neurons: np.ndarray, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The read hook's value at each text's last position with neuron `neurons[j]` set to `values[:, j, g]`
        (B × N × G), one alternative at a time: (B × N × G × d_f, and the unpatched B × d_f through the same path),
        float32 on the CPU whatever the model's device and dtype."""
        feats, base = self._features(neurons, values)
        return feats.float().cpu(), base.float().cpu()

    def _features(self, neurons: np.ndarray, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, G = values.shape
        L, p = self.layer, self.point
        base = self.base[self.read_hook]
        if p.layer is not None and p.layer < L:
            return base[:, None, None].expand(B, N, G, -1), base
        if p.layer == L and self.read_hook != f"blocks.{L}.hook_resid_post":
            return self._inside_block(neurons, values), base
        d = self.delta_post(neurons, values)  # B × N × G
        moved = d[..., None] * self.w_out[torch.as_tensor(neurons)][None, :, None, :]  # B × N × G × d_model
        resid = self.base[f"blocks.{L}.hook_resid_post"]
        x = torch.cat([resid[:, None], resid[:, None] + moved.reshape(B, N * G, -1)], 1)  # alternative 0: unpatched
        out = self._suffix(x)
        return out[:, 1:].reshape(B, N, G, -1), out[:, 0]

    def _inside_block(self, neurons, values) -> torch.Tensor:
        """Points in block L other than its output: upstream of the patch they keep their base value; the
        patched hook (and, for a hook_pre patch, hook_post) takes the set value in the neuron's coordinate."""
        B, N, G = values.shape
        base = self.base[self.read_hook]
        out = base[:, None, None].expand(B, N, G, -1).clone()
        n = torch.as_tensor(neurons, device=out.device)
        values = values.to(out.device)
        name = self.read_hook.split(".", 2)[-1]
        if name == f"mlp.hook_{self.hook}":
            new = values.to(out.dtype)
        elif name == "mlp.hook_post":  # a hook_pre patch seen downstream at hook_post
            new = base[:, n][..., None].to(out.dtype) + self.delta_post(neurons, values).to(out.dtype)
        else:
            return out
        out[:, torch.arange(N, device=out.device), :, n] = new.permute(1, 0, 2)  # advanced indices first: N × B × G
        return out

    def _suffix(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks L+1… on M alternatives of each text's last position (B × M × d), then the read point."""
        s, p = self.s, self.point
        with _attending(s, self.rec), s.reading([self.read_hook], None) as got:
            y = s.run(x, self.layer + 1, self._stop(), positions=self.pos)
            if p.layer is None:
                s.ln_final(y)
            elif self.read_hook.endswith("hook_resid_post") and p.layer == self.layer:
                return x
        return got[self.read_hook]


    def neurons_per_step(self, n_values: int, budget_bytes: float = 64e6) -> int:
        """Neurons whose `n_values` alternatives one suffix step carries: its largest activations (an MLP's
        hidden layer, the attention scores over the earlier positions) stay within `budget_bytes` (small
        steps also run fastest on a CPU: they stay in cache)."""
        assert self.rec.earlier is not None  # set once the base forward ran
        c, (B, T) = self.s.config, self.rec.earlier.shape
        hidden = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
        per_alternative = 4 * B * (hidden + c.num_attention_heads * (T + 1) + 4 * c.hidden_size)
        return max(1, int(budget_bytes // (per_alternative * n_values)))

    def dpost(self, neurons: np.ndarray) -> torch.Tensor:
        """B × N: d hook_post / d (the patched hook) of each neuron at the texts' own values."""
        n = torch.as_tensor(neurons)
        post = self.base[neuron_hook(self.layer, "post")][:, n].cpu()
        if self.hook == "post":
            return torch.ones_like(post)
        from transformers.activations import ACT2FN

        with torch.enable_grad():
            pre = self.base[neuron_hook(self.layer, "pre")][:, n].detach().float().cpu().requires_grad_()
            act = ACT2FN[self.s.arch.act_fn](pre)
            slope = torch.autograd.grad(act.sum(), pre)[0]
        if self.s.arch.mlp_gate:
            slope = slope * self.base[f"blocks.{self.layer}.mlp.hook_pre_linear"][:, n].float().cpu()
        return slope

    def feature_gradient(self, neurons: np.ndarray) -> torch.Tensor:
        """B × N × d_f: d (read hook's value) / d (neuron n's patched hook) at each text's own activation."""
        L, p = self.layer, self.point
        base = self.base[self.read_hook]
        B, N, d_f = base.shape[0], len(neurons), base.shape[-1]
        n = torch.as_tensor(neurons)
        if (p.layer is not None and p.layer < L) or \
                (p.layer == L and self.read_hook != f"blocks.{L}.hook_resid_post"):
            out = torch.zeros(B, N, d_f, dtype=torch.float64)
            name = self.read_hook.split(".", 2)[-1]
            if p.layer == L and name in (f"mlp.hook_{self.hook}", "mlp.hook_post"):
                g = torch.ones(B, N, dtype=torch.float64) if name == f"mlp.hook_{self.hook}" else self.dpost(neurons).double()
                out[:, torch.arange(N), n] = g  # its own coordinate only
            return out
        moved = self.dpost(neurons).double()[..., None] * self.w_out[n].double().cpu()[None]  # B × N × d_model
        if self._jacobian is None and self._pushed + N <= d_f:  # ski rental: pushes until they would cost more
            self._pushed += N  # than the Jacobian's d_f rows (every later unit of the worker's layer reads it)
            return self.pushforward(moved)
        return torch.einsum("bfd,bnd->bnf", self.resid_jacobian(), moved)

    def pushforward(self, moved: torch.Tensor) -> torch.Tensor:
        """B × N × d_f: d (read hook's value) / d (residual after block L) applied to `moved[:, n]` (B × N × d_model),
        by forward-mode autodiff through the one-position suffix: the N directions ride as alternatives, as in
        `features` (a unit's few neurons cost N forward passes, not the d_f backward ones of `resid_jacobian`)."""
        import torch.autograd.forward_ad as fwAD

        resid = self.base[f"blocks.{self.layer}.hook_resid_post"].detach()
        B, N, _ = moved.shape
        step, out = self.neurons_per_step(2), []
        for lo in range(0, N, step):
            tangent = moved[:, lo : lo + step].to(resid.device, resid.dtype)
            with fwAD.dual_level(), torch.no_grad():
                x = fwAD.make_dual(resid[:, None].expand_as(tangent).contiguous(), tangent)
                out.append(fwAD.unpack_dual(self._suffix(x)).tangent.double().cpu())
        return torch.cat(out, 1)

    def resid_jacobian(self) -> torch.Tensor:
        """B × d_f × d_model: d (read hook's value) / d (residual after block L) at the last position, through
        the same one-position suffix (one backward per feature dimension, computed once)."""
        if self._jacobian is None:
            x = self.base[f"blocks.{self.layer}.hook_resid_post"].detach()[:, None].clone().requires_grad_()
            with torch.enable_grad():
                f = self._suffix(x)[:, 0]  # B × d_f
                B, d_f = f.shape
                rows = []
                for lo in range(0, d_f, 64):  # 64 backward passes at a time (vmapped): few, large operations
                    eye = torch.eye(d_f, dtype=f.dtype, device=f.device)[lo : lo + 64, None, :].expand(-1, B, -1)
                    rows.append(torch.autograd.grad(f, x, grad_outputs=eye, is_grads_batched=True,
                                                    retain_graph=lo + 64 < d_f)[0][:, :, 0])
            self._jacobian = torch.cat(rows).transpose(0, 1).double().cpu()  # B × d_f × d_model
        return self._jacobian
