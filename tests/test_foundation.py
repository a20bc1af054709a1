"""Foundation: corpus, model loading, the activation cache and its identity, each against an independent computation."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_gpt2

from nsr_sweep.cli import main
from nsr_sweep.core import models as models_mod
from nsr_sweep.core.cache import ActivationCache, CacheSpec, check_identity, pad_batch, tokenize
from nsr_sweep.core.corpus import Corpus, load_corpus
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.models import ModelSpec, load_model

# -- corpus --------------------------------------------------------------------------------


def test_builtin_corpus_is_seeded_deduplicated_and_reported():
    a, b, c = load_corpus(n_texts=200, seed=0), load_corpus(n_texts=200, seed=0), load_corpus(n_texts=200, seed=1)
    assert a.texts == b.texts and a.hash == b.hash
    assert a.texts != c.texts
    assert len(set(a.texts)) == 200
    r = a.report
    assert r["n_selected"] == 200 and r["n_dropped_duplicate"] > 0 and r["n_dropped_short"] > 0
    assert r["n_read"] == r["n_available"] + r["n_dropped_duplicate"] + r["n_dropped_short"]


def test_builtin_passages_are_bundled_and_do_not_depend_on_the_installed_python(monkeypatch, tmp_path):
    """builtin:python-docs reads the bundled passages: the same texts whatever standard library is installed
    (here: none at all), and — on the Python that made the file — exactly what parsing its stdlib gives."""
    import sys

    import pyarrow.parquet as pq

    from nsr_sweep.core import corpus

    before = load_corpus(n_texts=300, seed=4)
    corpus._bundled_passages.cache_clear()
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})  # an empty stdlib
    after = load_corpus(n_texts=300, seed=4)
    assert after.texts == before.texts and after.hash == before.hash
    made_on = pq.read_schema(corpus.BUNDLED).metadata[b"python"].decode()
    monkeypatch.undo()
    assert made_on.startswith("3.11") and len(corpus.python_docs_passages()) == 18969
    if sys.version.split()[0] == made_on:  # the file is what the documented recipe produces
        assert corpus.parse_python_docs() == tuple(corpus.python_docs_passages())
    else:
        assert len(corpus.parse_python_docs()) > 10000  # the recipe still runs; this stdlib differs


def test_file_sources_agree(tmp_path):
    rows = [f"text number {i} about functions and classes" for i in range(40)]
    (tmp_path / "t.txt").write_text("\n".join(rows + rows[:5] + ["short"]) + "\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows) + "\n")
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "t.parquet")
    got = [load_corpus(str(tmp_path / f"t.{ext}"), seed=3) for ext in ("txt", "jsonl", "parquet")]
    assert got[0].texts == got[1].texts == got[2].texts
    assert sorted(got[0].texts) == sorted(rows)
    assert got[0].report["n_dropped_duplicate"] == 5 and got[0].report["n_dropped_short"] == 1


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"\xff\xfe bad bytes here\n", "not UTF-8")])
def test_bad_corpus_files(tmp_path, content, needle):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(NsrError, match=needle):
        load_corpus(str(p))


def test_missing_corpus_names_the_allowed_sources():
    with pytest.raises(NsrError, match="builtin:python-docs"):
        load_corpus("/nope/missing.txt")
    with pytest.raises(NsrError, match="not a built-in corpus"):
        load_corpus("builtin:wikipedia")


# -- model loading -------------------------------------------------------------------------


def test_bundled_model_shape_and_tokenizer():
    m = load_model("nsr-tiny")
    assert (m.n_layers, m.d_mlp, m.d_mlp // m.d_model) == (4, 512, 4)
    tok = m.tokenizer
    for d in "0123456789":
        assert len(tok.encode(" " + d, add_special_tokens=False)) == 1
    assert os.path.getsize(m.path / "model.safetensors") <= 10 * 2**20
    card = (m.path / "MODEL_CARD.md").read_text()
    assert "held-out loss" in card and "alive neurons" in card


def test_hub_name_loads_offline_from_the_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--someorg--tiny-gpt2" / "snapshots" / "0123abc"
    save_tiny_gpt2(snap, seed=5)
    (hub / "models--someorg--tiny-gpt2" / "refs").mkdir()
    (hub / "models--someorg--tiny-gpt2" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    m = models_mod.LoadedModel(ModelSpec("someorg/tiny-gpt2"))
    assert Path(m.path) == snap and m.n_layers == 2
    direct = models_mod.LoadedModel(ModelSpec(str(snap)))
    assert m.weights_hash == direct.weights_hash


def test_unknown_model_error_suggests_nsr_tiny():
    with pytest.raises(NsrError, match="'nobody/no-such-model' was not found locally.*nsr-tiny"):
        load_model("nobody/no-such-model")


def test_directory_without_tokenizer_is_an_error(tmp_path):
    save_tiny_gpt2(tmp_path / "m", tokenizer=False)
    with pytest.raises(NsrError, match="no tokenizer files"):
        load_model(str(tmp_path / "m"))


def test_random_init_is_seeded_and_differs_from_pretrained(tiny_dir):
    a = models_mod.LoadedModel(ModelSpec(str(tiny_dir), init="random", seed=1))
    b = models_mod.LoadedModel(ModelSpec(str(tiny_dir), init="random", seed=1))
    c = models_mod.LoadedModel(ModelSpec(str(tiny_dir), init="random", seed=2))
    p = load_model(str(tiny_dir))
    assert a.weights_hash == b.weights_hash != c.weights_hash != p.weights_hash


def test_random_gpt2_small_builds_offline_from_gpt2config():
    from transformers import GPT2Config

    m, path = models_mod._random_hf_model("openai-community/gpt2", seed=0)
    assert path is None and m.config.n_layer == GPT2Config().n_layer == 12 and m.config.n_embd == 768


# -- the cache -----------------------------------------------------------------------------


def test_padded_batch_equals_per_text_runs(texts):
    m = load_model("nsr-tiny")
    corpus = Corpus(texts[:40], "test")
    spec = CacheSpec(layers=(0, 3), store_resid=True)
    batched = ActivationCache.compute(m, corpus, spec, batch_size=16, progress=False)
    alone = ActivationCache.compute(m, corpus, spec, batch_size=1, progress=False)
    assert len({len(t) for t in batched.tokens}) > 5  # lengths really differ, so padding is exercised
    for L in (0, 3):
        np.testing.assert_allclose(batched.acts[L], alone.acts[L], atol=1e-5)
        np.testing.assert_allclose(batched.resid[L], alone.resid[L], atol=1e-5)
    np.testing.assert_allclose(batched.features, alone.features, atol=1e-5)


def test_neuron_identity_with_random_layernorm(tiny_dir, texts):
    m = models_mod.LoadedModel(ModelSpec(str(tiny_dir)))
    ln = m.hf.transformer.h[1].ln_2
    assert ln.weight.std() > 0.2 and ln.bias.abs().mean() > 0.1  # the affine is far from identity
    seqs, _ = tokenize(m, texts[:12], 48)
    got = check_identity(m, seqs, 1)
    assert got["pre_max_abs_err"] <= 1e-4 and got["pre_r"] > 0.99999 and got["post_max_abs_err"] <= 1e-5


def test_identity_check_catches_the_missing_affine(tiny_dir, texts):
    """Control: feeding the normalised residual without LN2's affine to W_in is visibly wrong."""
    m = models_mod.LoadedModel(ModelSpec(str(tiny_dir)))
    seqs, _ = tokenize(m, texts[:8], 48)
    ids, mask = pad_batch(seqs, m.tokenizer.pad_token_id, "cpu")
    got = m.surface.read(ids, ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre"], None)
    mlp = m.hf.transformer.h[1].mlp.c_fc
    wrong = got["blocks.1.ln2.hook_normalized"] @ mlp.weight + mlp.bias
    assert (wrong - got["blocks.1.mlp.hook_pre"])[mask.bool()].abs().max() > 1e-2


def test_cache_records_identity_and_round_trips_bit_exactly(tiny_dir, texts, tmp_path):
    m = load_model(str(tiny_dir))
    corpus = Corpus(texts[:50], "test")
    spec = CacheSpec(layers=(0, 1), hook="pre", store_resid=True)
    built = ActivationCache.build(m, corpus, spec, root=tmp_path, progress=False)
    for ident in built.meta["identity"]:
        assert ident["pre_max_abs_err"] < 1e-4 and ident["pre_r"] > 0.99999
    assert built.meta["model"]["weights_hash"] == m.weights_hash and built.meta["corpus"]["hash"] == corpus.hash
    loaded = ActivationCache.build(m, corpus, spec, root=tmp_path, progress=False)  # a second build is a load
    assert loaded.path == built.path and list(tmp_path.iterdir()) == [built.path]
    for L in (0, 1):
        assert loaded.acts[L].dtype == np.float32 and np.array_equal(loaded.acts[L], built.acts[L])
        assert np.array_equal(loaded.resid[L], built.resid[L])
    assert np.array_equal(loaded.features, built.features)
    assert loaded.tokens == built.tokens and np.array_equal(loaded.positions, built.positions)
    assert loaded.texts == built.texts
    other = ActivationCache.key_for(m, corpus, CacheSpec(layers=(0, 1), hook="post"))
    assert other != built.key


def test_features_at_a_stored_residual_are_its_target_positions(tiny_dir, texts):
    """features.hook = the residual the after_target start stores whole: the features are still one row per
    text, equal to an independent HF forward's hidden state at the text's last token."""
    from transformers import AutoModelForCausalLM

    m = load_model(str(tiny_dir))
    corpus = Corpus(texts[:30], "test")
    spec = CacheSpec(layers=(0, 1), features="blocks.0.hook_resid_post", store_resid=True, max_tokens=24)
    cache = ActivationCache.compute(m, corpus, spec, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    seqs, _ = tokenize(m, corpus.texts, 24)
    for i in (0, 7, 29):
        with torch.no_grad():
            hidden = hf(torch.tensor([seqs[i]]), output_hidden_states=True).hidden_states[1][0, -1]
        assert np.allclose(cache.features[i], hidden.numpy(), atol=1e-5)
    at_target = cache.resid[0][np.arange(30), cache.positions]
    assert cache.features.shape == (30, m.d_model) and np.array_equal(cache.features, at_target)


def test_unknown_feature_hook_is_rejected():
    with pytest.raises(NsrError, match="features.hook"):
        CacheSpec(layers=(0,), features="not a hook")
    with pytest.raises(NsrError, match="target.hook"):
        CacheSpec(layers=(0,), hook="mlp_out")


# -- CLI -----------------------------------------------------------------------------------


def test_activations_cli_equals_raw_hf_forward_hooks(tmp_path, texts):
    from transformers import AutoModelForCausalLM

    (tmp_path / "t.txt").write_text("\n".join(texts[:25]) + "\n")
    out = tmp_path / "a.parquet"
    r = CliRunner().invoke(main, ["activations", "--layer", "2", "--neuron", "7", "--texts",
                                  str(tmp_path / "t.txt"), "--out", str(out), "--max-tokens", "32"])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.schema.field("tokens").type.value_type.bit_width == 64
    assert str(table.schema.field("activation").type) == "double"
    df = table.to_pandas()
    assert list(df.columns) == ["text", "tokens", "position", "activation"] and len(df) == 25
    hf = AutoModelForCausalLM.from_pretrained(models_mod.bundled_models()["nsr-tiny"]).eval()
    seen = {}
    hf.transformer.h[2].mlp.act.register_forward_hook(lambda m, i, o: seen.__setitem__("post", o))
    for _, row in df.iterrows():
        assert row["tokens"][0] == hf.config.bos_token_id and len(row["tokens"]) <= 32
        with torch.no_grad():
            hf(torch.tensor([list(row["tokens"])]))
        assert row["position"] == len(row["tokens"]) - 1
        assert abs(seen["post"][0, row["position"], 7].item() - row["activation"]) <= 1e-4


def test_models_json():
    r = CliRunner().invoke(main, ["models", "--json"])
    rows = json.loads(r.output)
    assert r.exit_code == 0 and rows[0]["name"] == "nsr-tiny"
    assert {k: rows[0][k] for k in ("n_layers", "d_model", "d_mlp", "d_vocab")} == \
        {"n_layers": 4, "d_model": 128, "d_mlp": 512, "d_vocab": 4096}


def test_neurons_ranks_by_variance_against_numpy(tmp_path):
    r = CliRunner().invoke(main, ["neurons", "--layer", "1", "--top", "3", "--n-texts", "100", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    m = load_model("nsr-tiny")
    cache = ActivationCache.build(m, load_corpus(n_texts=100), CacheSpec(layers=(1,)), progress=False)
    var = cache.acts[1].astype(np.float64).var(0)
    assert [g["neuron"] for g in got] == list(np.argsort(-var)[:3])


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models_mod.LoadedModel, "__init__", refuse)


@pytest.mark.parametrize("args, needle", [
    (["--layer", "4", "--neuron", "1"], "--layer 4 is out of range for nsr-tiny: allowed 0..3"),
    (["--layer", "-1", "--neuron", "1"], "--layer -1 is out of range"),
    (["--layer", "1", "--neuron", "512"], "--neuron 512 is out of range for nsr-tiny: allowed 0..511"),
    (["--layer", "1", "--neuron", "1", "--model", "nobody/none"], "not found locally"),
    (["--layer", "1", "--neuron", "1", "--texts", "/nope.txt"], "no such file"),
    (["--layer", "1", "--neuron", "1", "--max-tokens", "1000"], "--max-tokens 1000 is out of range for nsr-tiny: "
                                                                 "allowed 2..256"),
])
def test_activations_bad_input_fails_before_loading(tmp_path, no_model_loading, args, needle):
    (tmp_path / "t.txt").write_text("some text to read a neuron on\n")
    if "--texts" not in args:
        args = args + ["--texts", str(tmp_path / "t.txt")]
    r = CliRunner().invoke(main, ["activations", "--out", str(tmp_path / "o.parquet")] + args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("content, needle", [(b"\n\n", "is empty"), (b"caf\xe9 au lait\n", "not UTF-8")])
def test_activations_bad_texts_file(tmp_path, no_model_loading, content, needle):
    (tmp_path / "t.txt").write_bytes(content)
    r = CliRunner().invoke(main, ["activations", "--layer", "1", "--neuron", "1", "--texts",
                                  str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.parquet")])
    assert r.exit_code == 2 and needle in r.output


def test_unknown_hook_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["activations", "--layer", "1", "--neuron", "1", "--hook", "mlp_out",
                                  "--texts", "x", "--out", "y"])
    assert r.exit_code == 2 and "'post', 'pre'" in r.output


def test_model_dir_without_tokenizer_cli(tmp_path):
    save_tiny_gpt2(tmp_path / "m", tokenizer=False)
    (tmp_path / "t.txt").write_text("some text to read a neuron on\n")
    r = CliRunner().invoke(main, ["activations", "--model", str(tmp_path / "m"), "--layer", "0", "--neuron", "1",
                                  "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o.parquet")])
    assert r.exit_code == 2 and "no tokenizer files" in r.output
