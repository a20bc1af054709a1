"""The analyses' forward passes: a trial's final model and head as one function of texts.

`TrialModel.run(idx, patch)` runs texts `idx` through the trial's final model (the base model for
a probe, the trained surface for an unfrozen trial), reads the head's feature point at the answer
position and any other points at the target position (the text's last token), all in the same
forward that carries the neuron patch — one surface, one copy of the weights. Blocks below L cannot
see a patch at layer L, so the residual entering block L (and any point read before it) is computed
once per set of texts and every patched forward runs blocks L… only.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import pad_batch
from .heads import LinearHead
from .surface import Surface


class TrialModel:
    def __init__(self, surface: Surface, head: LinearHead, read_hook: str, seqs: list[list[int]],
                 answer_pos: np.ndarray, target_pos: np.ndarray, layer: int, hook: str, neuron: int, pad_id: int):
        self.surface, self.head, self.read_hook, self.seqs = surface, head, read_hook, seqs
        self.answer_pos, self.target_pos = np.asarray(answer_pos), np.asarray(target_pos)
        self.layer, self.hook, self.neuron, self.pad_id = layer, hook, neuron, pad_id
        self._prefix: dict[bytes, tuple[torch.Tensor, dict]] = {}

    def _split(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Points before block L (read once, in the prefix) and the rest (read in the patched forward)."""
        early = [n for n in names if (p := self.surface.point(n)).layer is not None and p.layer < self.layer]
        return early, [n for n in names if n not in early]

    @torch.no_grad()
    def run(self, idx: np.ndarray, patch_value=None, reads: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
        """Head outputs (n × n_out) and the `reads` at the target position, for texts `idx`."""
        s = self.surface
        names = list(dict.fromkeys([self.read_hook, *reads]))
        early, late = self._split(names)
        pos = {n: torch.as_tensor(self.target_pos[idx]) for n in names}
        pos[self.read_hook] = torch.as_tensor(self.answer_pos[idx])
        x, got_early = self._prefix_of(idx, early, pos)
        target = torch.as_tensor(self.target_pos[idx], device=s.device)
        with s.patch(self.layer, self.hook, target, self.neuron, patch_value), s.reading(late, pos) as got:
            s.ln_final(s.run(x, self.layer))
        got = {**got_early, **got}
        return self.head(got[self.read_hook]).cpu(), {n: got[n].double().cpu() for n in reads}

    def _prefix_of(self, idx: np.ndarray, early: list[str], pos: dict) -> tuple[torch.Tensor, dict]:
        """The residual entering block L for texts `idx` (and the `early` points), computed once."""
        key = np.asarray(idx).tobytes() + repr(early).encode()
        if key not in self._prefix:
            s = self.surface
            ids, _ = pad_batch([self.seqs[i] for i in idx], self.pad_id, s.device)
            with torch.no_grad(), s.reading(early, pos) as got:
                x = s.run(s.embed_ids(ids), 0, self.layer)
            self._prefix[key] = (x, dict(got))
        return self._prefix[key]

    def batched(self, idx: np.ndarray, reads: tuple[str, ...] = (), size: int = 64) -> tuple[torch.Tensor, dict]:
        """`run` over many texts in batches, unpatched (no prefix kept)."""
        outs: list[torch.Tensor] = []
        got: dict[str, list[torch.Tensor]] = {n: [] for n in reads}
        for s in range(0, len(idx), size):
            part = idx[s : s + size]
            out, r = self.run(part, None, reads)
            self._prefix.clear()
            outs.append(out)
            for n in reads:
                got[n].append(r[n])
        return torch.cat(outs), {n: torch.cat(v) for n, v in got.items()}


@torch.no_grad()
def read_points(surface: Surface, seqs: list[list[int]], positions: np.ndarray, names: list[str], pad_id: int,
                size: int = 64) -> dict[str, np.ndarray]:
    """Points at one position per text, from the tokens (the forward stops after the last point needed)."""
    out: dict[str, list] = {n: [] for n in names}
    for s in range(0, len(seqs), size):
        ids, _ = pad_batch(seqs[s : s + size], pad_id, surface.device)
        got = surface.read(ids, names, torch.as_tensor(positions[s : s + size], device=surface.device))
        for n in names:
            out[n].append(got[n].double().cpu())
    return {n: torch.cat(v).numpy() for n, v in out.items()}


@torch.no_grad()
def resid_after(surface: Surface, seqs: list[list[int]], layer: int, pad_id: int, size: int = 64) -> torch.Tensor:
    """Residual after block `layer` at every position (zero at padding), computed once under no_grad."""
    T = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), T, surface.config.hidden_size)
    for s in range(0, len(seqs), size):
        ids, mask = pad_batch(seqs[s : s + size], pad_id, surface.device)
        x = surface.run(surface.embed_ids(ids), 0, layer + 1)
        out[s : s + size, : ids.shape[1]] = (x * mask[..., None]).cpu()
    return out
