"""What a model's config.json says about its surface, without torch: its family and the hook names nsr-sweep reads
and patches through (`surface` builds the surface itself; the launch's own process checks a sweep file with these
alone and never imports torch)."""

from __future__ import annotations

import re

from .errors import NsrError

# HF architecture → family. Each family is tested offline on a tiny random model (tests/).
FAMILIES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
FAMILY_NAMES = "GPT-2 (GPT2LMHeadModel), GPT-NeoX/Pythia (GPTNeoXForCausalLM), Llama-style " \
               "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"


def check_architecture(architecture: str | None, model: str) -> str:
    """The family of an HF architecture name, or a one-line error naming it and the supported families."""
    if architecture not in FAMILIES:
        raise NsrError(f"model {model!r}: architecture {architecture or 'unknown'} is not supported; "
                       f"supported families: {FAMILY_NAMES}")
    return FAMILIES[architecture]


def hook_names(layer: int | str, parallel: bool, gated: bool) -> list[str]:
    """The TransformerLens hook names a surface reads (and patches through), for block `layer` and the final norm."""
    names = ["hook_resid_pre", "ln1.hook_normalized", "ln1.hook_out", "hook_attn_out"]
    names += [] if parallel else ["hook_resid_mid"]
    names += ["ln2.hook_normalized", "ln2.hook_out", "mlp.hook_pre"]
    names += ["mlp.hook_pre_linear"] if gated else []
    names += ["mlp.hook_post", "hook_resid_post"]
    return [f"blocks.{layer}.{n}" for n in names] + ["ln_final.hook_in", "ln_final.hook_normalized",
                                                     "ln_final.hook_out"]


def check_hook(name: str, family: str, parallel: bool, n_layers: int, field: str = "features.hook") -> None:
    """A hook name against a family's surface, from config.json alone (before any model is loaded)."""
    m = re.match(r"^blocks\.(\d+)\.", name)
    layer = int(m.group(1)) if m else "L"
    if m and int(m.group(1)) >= n_layers:
        raise NsrError(f"{field} {name!r}: layer out of range, allowed 0..{n_layers - 1}")
    known = hook_names(layer, parallel, family == "llama")
    if name not in known:
        raise NsrError(f"{field} {name!r} is not a hook nsr-sweep can read and patch through for {family} "
                       f"models; allowed: {', '.join(hook_names('L', parallel, family == 'llama'))}")
