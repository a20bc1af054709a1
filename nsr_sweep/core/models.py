"""The one way nsr-sweep loads a base model, for every stage.

`load_model` resolves a bundled name (`nsr-tiny`), a local HF-format directory or a hub
name (from the local Hugging Face cache first; the network only when allowed), and returns a
`LoadedModel` holding the plain `transformers` model (eager attention), its tokenizer, and its
`surface` (`nsr_sweep.core.surface`): the one view of the weights that every stage reads, trains and
patches through, with module names from TransformerLens 4's architecture adapter. Weights are
never processed (no LayerNorm folding): weight analyses state their basis instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from .errors import NsrError
from .spec import Init, ModelCfg, Processing

if TYPE_CHECKING:
    import torch

MODELS_DIR = Path(__file__).parents[1] / "models"
BUNDLED = "nsr-tiny"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
PROCESSING = get_args(Processing)
INITS = ("pretrained", "random")


def bundled_models() -> dict[str, Path]:
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


@dataclass(frozen=True)
class ModelSpec:
    name: str = BUNDLED
    init: Init = "pretrained"
    processing: Processing = "none"
    device: str = "cpu"
    seed: int = 0  # for init: random

    @classmethod
    def of(cls, model: ModelCfg, device: str = "cpu") -> ModelSpec:
        """The model a sweep file's `model` section names, on `device`."""
        return cls(name=model.name, init=model.init, processing=model.processing, seed=model.seed, device=device)

    def __post_init__(self):
        if self.init not in INITS:
            raise NsrError(f"model init {self.init!r} is not allowed; allowed: {', '.join(INITS)}")
        if self.processing not in PROCESSING:
            raise NsrError(f"model processing {self.processing!r} is not allowed; allowed: none (compat was removed: "
                           "cosines are reported in the neuron's effective residual basis instead)")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot of a hub model, downloading only when the hub is not marked offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, etag_timeout=5))
    except Exception:
        return None


def resolve_model_dir(name: str, *, need_weights: bool = True) -> Path | None:
    """Directory of an HF-format model, or an NsrError naming what was not found and suggesting nsr-tiny."""
    bundled = bundled_models()
    if name in bundled:
        return bundled[name]
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NsrError(f"model directory {name} has no config.json (not an HF-format model directory)")
        if not _has_tokenizer(path):
            raise NsrError(
                f"model directory {name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer beside the model (tokenizer.save_pretrained)"
            )
        return path
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise NsrError(f"model {name!r}: no such directory")
    snapshot = _hub_snapshot(name)
    if snapshot is None:
        if not need_weights:
            return None
        raise model_not_found(name)
    return snapshot


def model_not_found(name: str) -> NsrError:
    """The one message for a model name that resolves to nothing."""
    return NsrError(
        f"model {name!r} was not found locally (not a bundled model [{', '.join(bundled_models())}], not a "
        f"directory, not in the Hugging Face cache) and could not be downloaded; offline, use model: {BUNDLED}"
    )


def _random_hf_model(name: str, seed: int):
    """The named architecture with random weights; GPT-2 small's config is GPT2Config()'s default."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    path = resolve_model_dir(name, need_weights=False)
    if path is not None:
        config = AutoConfig.from_pretrained(path)
    elif name in ("gpt2", "openai-community/gpt2"):
        config = GPT2Config()
    else:
        raise NsrError(
            f"model {name!r} with init: random needs its config.json locally; offline, only "
            f"'openai-community/gpt2' and bundled models [{', '.join(bundled_models())}] are known"
        )
    config._attn_implementation = "eager"
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.config.architectures = model.config.architectures or [type(model).__name__]  # GPT2Config() names none
    return model, path


def _load_tokenizer(path: Path | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path if path is not None else bundled_models()[BUNDLED])
    if len(tok) < 2 or not tok.encode("hello world", add_special_tokens=False):
        raise NsrError(f"tokenizer at {path} is empty (encodes 'hello world' to nothing)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name: str):
    """A model's tokenizer alone (no weights), or None for a hub model not in the local cache."""
    path = resolve_model_dir(name, need_weights=False)
    return None if path is None else _load_tokenizer(path if _has_tokenizer(path) else None)


def weights_hash(model: torch.nn.Module) -> str:
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LoadedModel:
    """A base model resident in memory: the plain HF model, its surface, tokenizer and identity."""

    def __init__(self, spec: ModelSpec):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        if spec.init == "random":
            self.hf, self.path = _random_hf_model(spec.name, spec.seed)
        else:
            self.path = resolve_model_dir(spec.name)
            check_weights_file(self.path)
            from .families import check_architecture

            check_architecture(_config_architecture(self.path), spec.name)
            self.hf = AutoModelForCausalLM.from_pretrained(self.path, attn_implementation="eager")
        # a random-init model without local tokenizer files borrows nsr-tiny's (ids stay in range)
        tok_path = self.path if self.path is not None and _has_tokenizer(self.path) else None
        self.tokenizer = _load_tokenizer(tok_path)
        self.tokenizer_source = str(tok_path) if tok_path else f"{BUNDLED} (stand-in)"
        if len(self.tokenizer) > self.hf.config.vocab_size:
            raise NsrError(f"tokenizer has {len(self.tokenizer)} tokens but model {spec.name!r} only {self.hf.config.vocab_size}")
        self.hf.to(spec.device).eval().requires_grad_(False)
        import torch

        self.device = torch.device(spec.device)
        from .surface import Surface, architecture

        self.surface = Surface(self.hf, architecture(self.hf.config))

    # -- shape -------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_mlp(self) -> int:
        c = self.config
        return getattr(c, "n_inner", None) or getattr(c, "intermediate_size", None) or 4 * c.hidden_size

    @property
    def d_vocab(self) -> int:
        return self.config.vocab_size

    @cached_property
    def weights_hash(self) -> str:
        return weights_hash(self.hf)

    @property
    def identity(self) -> dict:
        return {
            "name": self.spec.name,
            "path": str(self.path) if self.path else None,
            "init": self.spec.init,
            "seed": self.spec.seed if self.spec.init == "random" else None,
            "processing": self.spec.processing,
            "weights_hash": self.weights_hash,
            "tokenizer": self.tokenizer_source,
            "architecture": self.config.architectures[0] if self.config.architectures else type(self.hf).__name__,
            "n_layers": self.n_layers, "d_model": self.d_model, "d_mlp": self.d_mlp, "d_vocab": self.d_vocab,
        }

    def check_layer(self, layer: int, field: str = "layer") -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise NsrError(f"{field} {layer!r} is out of range for {self.spec.name}: allowed 0..{self.n_layers - 1}")

    def check_neuron(self, neuron: int, field: str = "neuron") -> None:
        if not isinstance(neuron, int) or not 0 <= neuron < self.d_mlp:
            raise NsrError(f"{field} {neuron!r} is out of range for {self.spec.name}: allowed 0..{self.d_mlp - 1} (d_mlp)")


_RESIDENT: dict[ModelSpec, LoadedModel] = {}


def load_model(spec: ModelSpec | str, **kw) -> LoadedModel:
    """Load (once per process) the base model described by `spec`."""
    if isinstance(spec, str):
        spec = ModelSpec(name=spec, **kw)
    if spec not in _RESIDENT:
        _RESIDENT[spec] = LoadedModel(spec)
    return _RESIDENT[spec]


def _config_architecture(path: Path) -> str | None:
    import json

    archs = json.loads((path / "config.json").read_text()).get("architectures") or [None]
    return archs[0]


def check_weights_file(path: Path) -> None:
    """Weights must be safetensors: a pickle checkpoint is never loaded (it can run code)."""
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise NsrError(f"model directory {path} has only a pickle checkpoint (pytorch_model.bin), which nsr-sweep "
                       "never loads; convert it: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
                       "safe_serialization=True)")
    raise NsrError(f"model directory {path} has no weights (*.safetensors)")


def model_shape(name: str) -> dict:
    """n_layers / d_model / d_mlp / d_vocab / family from config.json alone (no weights loaded), for early checks."""
    import json

    path = resolve_model_dir(name, need_weights=False)
    if path is None:
        if name in ("gpt2", "openai-community/gpt2"):  # GPT2Config() defaults: known offline
            return {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50257, "family": "gpt2",
                    "parallel": False, "n_ctx": 1024}
        raise model_not_found(name)
    c = json.loads((path / "config.json").read_text())
    from .families import check_architecture

    family = check_architecture((c.get("architectures") or [None])[0], name)
    d_model = c.get("n_embd") or c.get("hidden_size")
    return {"family": family, "parallel": family == "neox" and c.get("use_parallel_residual", True),
        "n_layers": c.get("n_layer") or c.get("num_hidden_layers"),
        "d_model": d_model,
        "d_mlp": c.get("n_inner") or c.get("intermediate_size") or 4 * d_model,
        "d_vocab": c.get("vocab_size"),
        "n_ctx": c.get("n_positions") or c.get("max_position_embeddings"),
    }


def check_loadable(name: str) -> None:
    """Before Ray: a local or cached model directory must hold safetensors weights and a tokenizer."""
    path = resolve_model_dir(name, need_weights=False)
    if path is not None:
        check_weights_file(path)
