"""The model surface on tiny random GPT-2, GPT-NeoX (Pythia) and Llama models, each number against an
independent computation: plain `transformers` forwards with native hooks on module names written
here by hand, and TransformerLens' own TransformerBridge."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES
from safetensors.torch import load_file
from scipy import stats

from nsr_sweep.cli import main
from nsr_sweep.core.cache import ActivationCache, CacheSpec, pad_batch
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import run_trial, sequences
from nsr_sweep.results.records import save_trial


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval().requires_grad_(False)


def hf_blocks(hf):
    """Independent of nsr_sweep.core.surface: each family's module names, written out by hand."""
    for owner, blocks, final in (("transformer", "h", "ln_f"), ("gpt_neox", "layers", "final_layer_norm"),
                                 ("model", "layers", "norm")):
        if hasattr(hf, owner):
            return getattr(getattr(hf, owner), blocks), getattr(getattr(hf, owner), final)
    raise AssertionError(type(hf))


def neuron_module(hf, layer: int, hook: str):
    """(module, 'in'|'out') whose value is the neuron's hook_pre / hook_post, by hand for each family."""
    mlp = hf_blocks(hf)[0][layer].mlp
    if hasattr(mlp, "gate_proj"):  # Llama: post = act(gate)·up enters down_proj; pre = the gate
        return (mlp.gate_proj, "out") if hook == "pre" else (mlp.down_proj, "in")
    fc = getattr(mlp, "c_fc", None) or mlp.dense_h_to_4h
    return (fc, "out") if hook == "pre" else (mlp.act, "out")


class Hooks:
    """Native forward hooks that record (and optionally overwrite) module inputs/outputs."""

    def __init__(self):
        self.seen, self.handles = {}, []

    def read(self, name, module, side, fn=None):
        def hook(m, args, out):
            x = args[0] if side == "in" else (out[0] if isinstance(out, tuple) else out)
            self.seen[name] = fn(x) if fn else x
        self.handles.append(module.register_forward_hook(hook))

    def patch(self, module, side, rows, pos, neuron, value):
        def set_(x):
            x = x.clone()
            x[rows, pos, neuron] = value
            return x
        if side == "in":
            self.handles.append(module.register_forward_pre_hook(lambda m, a: (set_(a[0]),) + tuple(a[1:])))
        else:
            self.handles.append(module.register_forward_hook(lambda m, a, o: set_(o)))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", ["post", "pre"])
def test_activations_cli_equals_plain_hf_hooks(family_dirs, texts, tmp_path, family, hook):
    d = family_dirs[family]
    (tmp_path / "t.txt").write_text("\n".join(texts[:20]) + "\n")
    out = tmp_path / "a.parquet"
    r = CliRunner().invoke(main, ["activations", "--model", str(d), "--layer", "2", "--neuron", "5", "--hook", hook,
                                  "--texts", str(tmp_path / "t.txt"), "--out", str(out), "--max-tokens", "32"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out)
    hf = hf_model(d)
    module, side = neuron_module(hf, 2, hook)
    hooks = Hooks()
    hooks.read("v", module, side)
    try:
        for row in df.itertuples():
            with torch.no_grad():
                hf(torch.tensor([list(row.tokens)]))
            assert abs(hooks.seen["v"][0, row.position, 5].item() - row.activation) <= 1e-4
    finally:
        hooks.close()
    assert df["activation"].std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_named_point_equals_transformer_lens(family_dirs, texts, family):
    """The surface's hook names mean what TransformerLens 4's bridge means by them (a padded batch)."""
    from transformer_lens.model_bridge import TransformerBridge

    m = load_model(str(family_dirs[family]))
    bridge = TransformerBridge.boot_transformers(str(family_dirs[family]), device="cpu")
    names = m.surface.hook_names(1)
    assert ("blocks.1.hook_resid_mid" in names) == (family != "neox")  # parallel blocks have none
    assert ("blocks.1.mlp.hook_pre_linear" in names) == (family == "llama")
    seqs = [[m.tokenizer.bos_token_id] + m.tokenizer.encode(t)[:30] for t in texts[:6]]
    ids, mask = pad_batch(seqs, m.tokenizer.pad_token_id, "cpu")
    _, want = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
    got = m.surface.read(ids, names, None)
    real = mask.bool()
    for n in names:
        torch.testing.assert_close(got[n][real], want[n][real], atol=1e-4, rtol=0, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_check_holds_for_every_family(family_dirs, family):
    m = load_model(str(family_dirs[family]))
    cache = ActivationCache.compute(m, load_corpus(n_texts=60), CacheSpec(layers=(0, 2)), progress=False)
    for ident in cache.meta["identity"]:
        assert ident["family"] == family
        assert ident["pre_max_abs_err"] < 1e-4 and ident["pre_r"] > 0.99999 and ident["post_max_abs_err"] < 1e-5
    norm = m.surface.ln2(2)
    assert norm.weight.std() > 0.2  # random affine: a missing γ would show


def test_unsupported_architecture_is_one_line_before_ray(tmp_path):
    import ray

    d = tmp_path / "bloom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"], "model_type": "bloom",
                                               "n_layer": 2, "hidden_size": 64, "vocab_size": 100}))
    (d / "tokenizer.json").write_text("{}")
    (tmp_path / "s.yaml").write_text(f"name: b\nmodel: {d}\nlayers: [0]\nneurons: [1]\nheads: [regression]\n"
                                     "freeze: [none]\n")
    r = CliRunner().invoke(main, ["launch", str(tmp_path / "s.yaml"), "--dry-run"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "BloomForCausalLM is not supported" in r.output and "GPT-NeoX" in r.output and "Llama" in r.output
    assert not ray.is_initialized()


# -- trials on each family -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_caches(family_dirs):
    out = {}
    for f in FAMILIES:
        m = load_model(str(family_dirs[f]))
        out[f] = (m, ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(1, 2), max_tokens=24,
                                                                                  store_resid=True), progress=False))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_pred_is_the_saved_models_own_answer(family_caches, family_dirs, tmp_path, family):
    """pred = Σ p(digit k)·value_k with p the fine-tuned model's own next-token distribution over the digits."""
    from transformer_lens.model_bridge import TransformerBridge

    m, cache = family_caches[family]
    spec = TrialSpec(layer=1, neuron=3, head="token", freeze="all", training={"epochs": 2, "batch_size": 16, "lr": 1e-3, "save_weights": True}, analysis={"enabled": False})
    r = run_trial(cache, m, spec)
    d = save_trial(r, tmp_path / "trial")
    ft = hf_model(d / "model")
    values = load_file(d / "head.safetensors")["bin_values"].double()
    seqs, answer, digit_ids = sequences(cache, spec, m)
    idx = np.arange(0, cache.n_texts, 7)
    with torch.no_grad():
        for i in idx:
            logits = ft(torch.tensor([seqs[i]])).logits[0, answer[i], digit_ids].double()
            want = float(torch.softmax(logits, -1) @ values)
            assert abs(r.preds.pred[i] - want) <= 1e-5
    bridge = TransformerBridge.boot_transformers(str(d / "model"), device="cpu")  # TransformerLens opens it too
    with torch.no_grad():
        got = bridge(torch.tensor([seqs[0]]))[0, answer[0], digit_ids].double()
    assert abs(float(torch.softmax(got, -1) @ values) - r.preds.pred[0]) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_after_target_at_the_last_layer_trains_the_final_norm(family_caches, tmp_path, family):
    m, cache = family_caches[family]
    last = m.n_layers - 1
    cache2 = ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(last,), max_tokens=24,
                                                                          store_resid=True), progress=False)
    r = run_trial(cache2, m, TrialSpec(layer=last, neuron=2, freeze="after_target", training={"epochs": 2, "lr": 1e-2, "save_weights": True}, analysis={"enabled": False}))
    assert r.status == "ok", r.reason
    saved = hf_model(save_trial(r, tmp_path / "t") / "model")
    base = hf_model(m.path)
    changed = {k for k, v in saved.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all("norm" in k or "ln_f" in k for k in changed), changed  # only the final norm trains


def _patch_slope_by_hand(hf, cache, spec, head, values_fn, layer_hook: str, feature):
    """Δpred/Δact over (text, grid value) with plain HF forwards: patch, then read the feature."""
    from nsr_sweep.core.analyses import patch_grid
    from nsr_sweep.core.trial import split_indices

    splits = split_indices(cache.n_texts, spec.splits.fractions, spec.seed)
    sample = splits["test"][: spec.analysis.patch_texts]
    acts = np.asarray(cache.acts[spec.layer])[:, spec.neuron]
    a = spec.analysis
    grid = patch_grid(acts[splits["train"]], a.patch_grid, a.n_grid, a.scales)
    ids, _ = pad_batch([cache.tokens[i] for i in sample], 0, "cpu")
    pos = torch.as_tensor(cache.positions[sample])
    rows = torch.arange(len(sample))
    module, side = neuron_module(hf, spec.layer, layer_hook)

    def predict(value):
        h = Hooks()
        if value is not None:
            h.patch(module, side, rows, pos, spec.neuron, value)
        feature(h)
        try:
            with torch.no_grad():
                hf(ids)
        finally:
            h.close()
        return values_fn(h.seen["f"][rows, pos].double() @ head["weight"].double().T + head["bias"].double())

    base = predict(None)
    dx, dy = [], []
    for g in grid:
        dy.append(predict(float(g)) - base)
        dx.append(g - acts[sample])
    return np.polyfit(np.concatenate(dx), np.concatenate(dy), 1)[0]


GPT2_POINTS = {  # hook name → how a plain GPT-2 forward exposes it (by hand)
    "blocks.2.hook_resid_pre": lambda b, f: ("in", b[2], None),
    "blocks.2.ln1.hook_normalized": lambda b, f: ("in", b[2].ln_1, lambda x: torch.nn.functional.layer_norm(
        x, x.shape[-1:], eps=b[2].ln_1.eps)),
    "blocks.2.ln1.hook_out": lambda b, f: ("out", b[2].ln_1, None),
    "blocks.2.hook_attn_out": lambda b, f: ("out", b[2].attn, None),
    "blocks.2.hook_resid_mid": lambda b, f: ("in", b[2].ln_2, None),
    "blocks.2.ln2.hook_out": lambda b, f: ("out", b[2].ln_2, None),
    "blocks.1.mlp.hook_post": lambda b, f: ("out", b[1].mlp.act, None),
    "blocks.2.mlp.hook_pre": lambda b, f: ("out", b[2].mlp.c_fc, None),
    "blocks.1.hook_resid_post": lambda b, f: ("out", b[1], None),
    "blocks.0.hook_resid_post": lambda b, f: ("out", b[0], None),
    "ln_final.hook_in": lambda b, f: ("in", f, None),
    "ln_final.hook_normalized": lambda b, f: ("in", f, lambda x: torch.nn.functional.layer_norm(
        x, x.shape[-1:], eps=f.eps)),
    "ln_final.hook_out": lambda b, f: ("out", f, None),
}


@pytest.mark.parametrize("feature", list(GPT2_POINTS))
def test_patching_reaches_every_accepted_feature_hook(family_dirs, feature):
    """The patch at blocks.1.mlp.hook_post reaches whatever the probe reads: slope = a plain-HF computation."""
    d = family_dirs["gpt2"]
    m = load_model(str(d))
    cache = ActivationCache.build(m, load_corpus(n_texts=200), CacheSpec(layers=(1,), features=feature,
                                                                        max_tokens=24), progress=False)
    spec = TrialSpec(layer=1, neuron=7, features={"hook": feature}, analysis={"patch_texts": 24})
    r = run_trial(cache, m, spec)
    head = {k: v for k, v in r.head.items()}
    hf = hf_model(d)
    blocks, final = hf_blocks(hf)
    side, module, fn = GPT2_POINTS[feature](blocks, final)
    want = _patch_slope_by_hand(hf, cache, spec, head, lambda out: (float(head["mu"]) + float(head["sigma"])
                                                                     * out[:, 0]).numpy(),
                                "post", lambda h: h.read("f", module, side, fn))
    got = r.metrics["patch_slope"]
    assert abs(got - want) <= 1e-4 and abs(got - want) <= 1e-3 * abs(want) + 1e-7, (got, want)
    if feature.startswith("blocks.0."):
        assert want == 0  # read before the patch: nothing moves
    else:
        assert abs(want) > 3e-4  # the patch really moves what is read downstream


def test_freeze_all_projections_are_each_in_their_own_model(family_caches, tmp_path):
    """Original columns: the original neuron in the original model; _ft: the fine-tuned neuron in the saved model."""
    m, cache = family_caches["llama"]
    spec = TrialSpec(layer=1, neuron=4, head="regression", freeze="all", training={"epochs": 3, "batch_size": 16, "lr": 3e-3, "save_weights": True}, analysis={"patch_texts": 16})
    r = run_trial(cache, m, spec)
    d = save_trial(r, tmp_path / "t")
    test = r.preds[r.preds.split == "test"]
    w, b = r.head["weight"][0].double(), r.head["bias"][0].double()
    for suffix, model in (("", hf_model(m.path)), ("_ft", hf_model(d / "model"))):
        blocks, final = hf_blocks(model)
        mlp = blocks[1].mlp
        h = Hooks()
        h.read("act", mlp.down_proj, "in")
        h.read("mlp_in", blocks[1].post_attention_layernorm, "out")
        h.read("resid", final, "in")
        h.read("feat", final, "out")
        rows = []
        with torch.no_grad():
            for i in test.text_id:
                model(torch.tensor([cache.tokens[i]]))
                p = cache.positions[i]
                rows.append([h.seen[k][0, p].double() for k in ("act", "mlp_in", "resid", "feat")])
        h.close()
        readout = np.array([float(r_[3] @ w + b) for r_ in rows])  # the frozen head's readout in this model
        act = np.array([r_[0][4].item() for r_ in rows])
        mlp_in = torch.stack([r_[1] for r_ in rows])
        resid = torch.stack([r_[2] for r_ in rows])
        ident = (mlp_in @ mlp.gate_proj.weight[4].double()).numpy()
        w_out = mlp.down_proj.weight[:, 4].double()
        wout = (resid @ (w_out / w_out.norm())).numpy()
        assert r.metrics[f"identity_r{suffix}"] == pytest.approx(stats.pearsonr(act, ident)[0], abs=1e-6)
        assert r.metrics[f"proj_wout_r{suffix}"] == pytest.approx(stats.pearsonr(act, wout)[0], abs=1e-6)
        assert r.metrics[f"proj_readout_r{suffix}"] == pytest.approx(stats.pearsonr(act, readout)[0], abs=1e-6)
        if suffix == "_ft":
            np.testing.assert_allclose(test.actual_ft.to_numpy(), act, atol=1e-5)
            cos = torch.nn.functional.cosine_similarity(mlp.up_proj.weight[4].double(),
                                                        torch.as_tensor(readout_direction(r)), dim=0)
            assert r.metrics["cos_win_ft"] == pytest.approx(float(cos), abs=1e-9)
    assert r.metrics["drift"] != 0 and r.metrics["identity_r_ft"] != r.metrics["identity_r"]


def readout_direction(r):
    return r.head["weight"][0].double().numpy()  # regression: the weight vector


def test_effective_cosines_use_the_norm_gain_and_centring(family_caches):
    """cos_win_eff = cos(centre(γ_f ⊙ d), centre(γ_2 ⊙ W_in[:, n])) for a probe after the final LayerNorm."""
    m, cache = family_caches["gpt2"]
    r = run_trial(cache, m, TrialSpec(layer=2, neuron=6, analysis={"patch_texts": 8}))
    hf = m.hf
    d = r.head["weight"][0].double()
    gf, g2 = hf.transformer.ln_f.weight.double(), hf.transformer.h[2].ln_2.weight.double()
    a = gf * d
    b = g2 * hf.transformer.h[2].mlp.c_fc.weight[:, 6].double()
    a, b = a - a.mean(), b - b.mean()
    assert r.metrics["cos_win_eff"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-9)
    raw = hf.transformer.h[2].mlp.c_fc.weight[:, 6].double()
    assert r.metrics["cos_win"] == pytest.approx(float(d @ raw / (d.norm() * raw.norm())), abs=1e-9)
    assert r.metrics["cos_win"] != pytest.approx(r.metrics["cos_win_eff"], abs=1e-3)


def test_status_and_report_import_neither_ray_nor_optuna():
    code = ("import sys, nsr_sweep.results.status, nsr_sweep.report.build; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
