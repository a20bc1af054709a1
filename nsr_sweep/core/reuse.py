"""What a model worker keeps between its units of work: the patching engines and the SVDs of the features its
probes read. Owned by the worker (`sweep.workers.ModelWorker` holds one) and handed to `trial.run_trials`; bound
to one cache and one model, so a key names what the features or texts are — never their bytes, hashed per call.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

from .fit import thin_svd

T = TypeVar("T")
ENGINES = 2  # units come layer by layer: the last two layers' patching engines
SVDS = 4  # this model's features, the other model's, the token counts, one spare


class Reuse:
    """Memos for one worker: `engine(key, build)` and `svd(key)`, each keeping the last few; `bind` drops them
    when the cache or the model is another one."""

    def __init__(self) -> None:
        self._bound: tuple[object, object] | None = None
        self.engines: dict[Hashable, object] = {}
        self.svds: dict[Hashable, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def bind(self, cache: object, model: object) -> Reuse:
        """The memos for this cache and model (held here, so their ids stay theirs): a new pair starts afresh."""
        if self._bound is None or self._bound[0] is not cache or self._bound[1] is not model:
            self._bound = (cache, model)
            self.engines.clear()
            self.svds.clear()
        return self

    def engine(self, key: Hashable, build: Callable[[], T]) -> T:
        """The patching engine `key` names (what it recomputes: layer, hooks, which texts), built once."""
        return _kept(self.engines, ENGINES, key, build)  # type: ignore[arg-type]

    def svd(self, key: Hashable) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`thin_svd`, remembered under `key` (which features, which train texts): every head, both solvers and
        every unit of the same features read one SVD."""
        return lambda Xc: _kept(self.svds, SVDS, key, lambda: thin_svd(Xc))


def _kept(store: dict, limit: int, key: Hashable, build: Callable[[], T]) -> T:
    if key not in store:
        store[key] = build()
        while len(store) > limit:
            store.pop(next(iter(store)))
    return store[key]
