"""Shared fixtures. No test reaches the network: the hub is marked offline for the whole session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from nsr_sweep.models import bundled_models  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def texts():
    from nsr_sweep.corpus import load_corpus

    return load_corpus(n_texts=120, seed=1).texts
