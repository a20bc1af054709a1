"""Shared fixtures. No test reaches the network: the hub is marked offline for the whole session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from nsr_sweep.core.models import bundled_models  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["NSR_CACHE_DIR"] = str(tmp_path_factory.mktemp("nsr-cache"))
    torch.set_num_threads(2)


def save_tiny_gpt2(path, *, n_layer=2, d_model=64, seed=0, random_ln=True, tokenizer=True):
    """A tiny GPT-2 in HF format, with random LayerNorm parameters so a missing affine shows."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(bundled_models()["nsr-tiny"])
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=d_model, n_layer=n_layer, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    if random_ln:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" in name or "ln_f" in name:
                    p.copy_((1.0 + 0.5 * torch.randn_like(p)) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path


def save_tiny(path, family: str, *, n_layer=3, d_model=64, seed=0):
    """A tiny random model of `family` (gpt2 | neox | llama) in HF format with nsr-tiny's tokenizer,
    norms with random affine parameters (so a missing γ or β shows)."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    if family == "gpt2":
        return save_tiny_gpt2(path, n_layer=n_layer, d_model=d_model, seed=seed)
    tok = AutoTokenizer.from_pretrained(bundled_models()["nsr-tiny"])
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=n_layer, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "neox":  # Pythia: rotary on part of each head, attention and MLP in parallel
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=4 * d_model, rotary_pct=0.25,
                                                 use_parallel_residual=True))
    else:  # Llama: RMSNorm, rotary, grouped-query attention, gated MLP
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=3 * d_model, num_key_value_heads=2,
                                             rms_norm_eps=1e-5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 + 0.5 * torch.randn_like(p)) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


FAMILIES = ("gpt2", "neox", "llama")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    return {f: save_tiny(tmp_path_factory.mktemp(f"tiny-{f}"), f, seed=7) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def texts():
    from nsr_sweep.core.corpus import load_corpus

    return load_corpus(n_texts=120, seed=1).texts
