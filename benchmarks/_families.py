"""Random models of nsr-tiny's shape for each family (4 layers, d_model 128, nsr-tiny's tokenizer), built once."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def family_model(name: str) -> str:
    """`gpt2` | `neox` | `llama` → a directory holding that family's random model; anything else as given."""
    if name not in ("gpt2", "neox", "llama"):
        return name
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from nsr_sweep.core.models import bundled_models

    path = Path(tempfile.gettempdir()) / f"nsr-bench-{name}"
    if (path / "config.json").is_file():
        return str(path)
    tok = AutoTokenizer.from_pretrained(bundled_models()["nsr-tiny"])
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=256, **ids))
    elif name == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                                                 intermediate_size=512, rotary_pct=0.25, use_parallel_residual=True,
                                                 max_position_embeddings=256, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=384,
                                             max_position_embeddings=256, **ids))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
