"""The validation pass: everything that can be checked before Ray starts, in the caller's process — the sweep
file's values (the schema, `core.spec`), then what depends on the model (its config.json, the hooks its surface
knows, the cross-model's positions), the corpus source, and the directories and devices a launch will use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import NsrError
from ..core.spec import NeuronSelect, SweepSpec, load_sweep, parse_sweep

if TYPE_CHECKING:
    from .options import LaunchOptions


def checked_sweep(sweep: str | Path | dict[str, Any]) -> SweepSpec:
    """A sweep file (or its dict) through the whole model-dependent validation, each error naming its source."""
    source = "sweep" if isinstance(sweep, dict) else str(sweep)
    spec = parse_sweep(sweep, source=source) if isinstance(sweep, dict) else load_sweep(sweep)
    try:
        check_model(spec)
    except NsrError as e:
        raise NsrError(f"{source}: {e}") from None
    from .inputs import check_cross_model  # (the cache spec's own checks are the schema's: nothing to repeat)

    check_cross_model(spec)
    return spec


def check_model(spec: SweepSpec) -> dict:
    """Layers, neurons and feature-hook layer against the model's config.json (no weights loaded)."""
    from ..core.models import model_shape

    shape = model_shape(spec.model.name)  # raises NsrError for an unknown model
    if spec.model.init == "pretrained":
        check_weights(spec.model.name)
    if not shape:
        return shape
    n_layers, d_mlp = shape["n_layers"], shape["d_mlp"]
    for L in spec.layers:
        if L >= n_layers:
            raise NsrError(f"layers: {L} is out of range for {spec.model.name}: allowed 0..{n_layers - 1}")
    for n in spec.neurons:
        if isinstance(n, int) and n >= d_mlp:
            raise NsrError(f"neurons: {n} is out of range for {spec.model.name}: allowed 0..{d_mlp - 1} (d_mlp)")
        if isinstance(n, NeuronSelect) and n.k is not None and n.k > d_mlp:
            raise NsrError(f"neurons: select k={n.k} exceeds d_mlp={d_mlp} of {spec.model.name}")
    from ..core.families import check_hook

    check_hook(spec.features.hook, shape["family"], shape["parallel"], n_layers)
    if shape.get("n_ctx") and spec.corpus.max_tokens > shape["n_ctx"]:
        raise NsrError(f"corpus.max_tokens {spec.corpus.max_tokens} exceeds the {shape['n_ctx']} positions of "
                       f"{spec.model.name}")
    from ..core.corpus import check_source

    check_source(spec.corpus.source)
    if spec.cross_model is not None:
        try:
            other = model_shape(spec.cross_model)
            check_weights(spec.cross_model)  # the other model is always loaded with its trained weights
            check_hook(spec.features.hook, other["family"], other["parallel"], other["n_layers"])
        except NsrError as e:
            raise NsrError(f"controls: cross_model: {e}") from None
    return shape


def check_weights(name: str) -> None:
    """The model's weights are here (bundled, a directory, the Hugging Face cache, or downloaded now when the hub
    may be reached) in a format that loads: what a model worker will need, known before Ray starts."""
    from ..core.models import check_weights_file, model_not_found, resolve_model_dir

    path = resolve_model_dir(name)
    if path is None:
        raise model_not_found(name)
    check_weights_file(path)


def preflight(options: LaunchOptions) -> SweepSpec:
    """The whole validation pass (`launch` and `--dry-run`): the sweep file, the model and its weights, the results
    root and its room for what the sweep will write, and — for a local cluster, whose disk and devices are this
    machine's — the cache root and the device."""
    spec = checked_sweep(options.sweep_file)
    sweep_dir = Path(options.out) / spec.name
    _check_writable(sweep_dir, "--out")
    from .disk import check_room

    check_room(spec, sweep_dir, options.storage)
    if options.address or os.environ.get("RAY_ADDRESS"):
        return spec  # a cluster's workers have their own disks and devices: they check them
    from ..core.cache import default_root

    root = options.cache_root
    _check_writable(Path(root) if root else default_root(), "--cache-root (or $NSR_CACHE_DIR)")
    if spec.resources.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise NsrError("resources.device is cuda but this machine has no CUDA device; use auto or cpu")
    return spec


def _check_writable(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise NsrError(f"{what}: {path} is not writable ({p} is {'not a directory' if not p.is_dir() else 'read-only'})")


