"""Exact patching at the last position equals a full re-forward, for every family and both hooks.

The independent computation is a plain `transformers` forward of each text alone, every position
recomputed, with one native hook on the MLP that sets the neuron at the last token — no nsr-sweep code
between the model and the number.
"""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, save_tiny

from nsr_sweep.core.analyses import patch_grid
from nsr_sweep.core.cache import ActivationCache, CacheSpec, tokenize
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import load_model
from nsr_sweep.core.patching import LastPosition
from nsr_sweep.core.trial import TrialSpec, run_trials, split_indices

MLP = {  # the HF modules around the neuron: (block list, the module whose output is hook_pre, whose input is hook_post)
    "gpt2": ("transformer.h", "mlp.c_fc", "mlp.c_proj"),
    "neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "llama": ("model.layers", "mlp.gate_proj", "mlp.down_proj"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def reforward(model, family: str, seq: list[int], layer: int, hook: str, neuron: int, value: float | None):
    """The final norm's output at the last token (HF's last hidden state), with the neuron set to `value`."""
    blocks, pre, post = MLP[family]
    block = _get(model.hf, blocks)[layer]
    last = len(seq) - 1

    def set_output(mod, args, out):
        out = out.clone()
        out[0, last, neuron] = value
        return out

    def set_input(mod, args):
        x = args[0].clone()
        x[0, last, neuron] = value
        return (x,) + tuple(args[1:])

    handle = None
    if value is not None:
        handle = (_get(block, pre).register_forward_hook(set_output) if hook == "pre"
                  else _get(block, post).register_forward_pre_hook(set_input))
    try:
        with torch.no_grad():
            out = model.hf(torch.tensor([seq]), output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    return out.hidden_states[-1][0, last].double()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {f: load_model(str(save_tiny(tmp_path_factory.mktemp(f"p-{f}"), f, seed=11))) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", ["post", "pre"])
def test_the_last_position_engine_equals_a_full_reforward(families, family, hook):
    model = families[family]
    seqs, _ = tokenize(model, load_corpus(n_texts=60, seed=4).texts[:6], 40)
    engine = LastPosition(model.surface, seqs, 1, hook, "ln_final.hook_out", model.tokenizer.pad_token_id)
    neurons = np.array([2, 30])
    values = torch.tensor([[-1.5, 0.25, 3.0], [0.5, -0.75, 1.0]], dtype=torch.float64)[None].expand(len(seqs), -1, -1)
    feats, base = engine.features(neurons, values)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(base[b].double(), reforward(model, family, seq, 1, hook, 0, None), atol=2e-5, rtol=0)
        for j, n in enumerate(neurons):
            for g in range(values.shape[-1]):
                want = reforward(model, family, seq, 1, hook, int(n), float(values[b, j, g]))
                torch.testing.assert_close(feats[b, j, g].double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("hook", ["post", "pre"])
def test_every_probe_of_a_batch_has_the_full_reforward_patch_slope(hook):
    """run_trials on a batch (two heads, real and shuffled, four neurons): each probe's patch_slope is the slope
    of Δprediction on Δactivation that full re-forwards give, to 1e-5."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=400, seed=5), CacheSpec(layers=(1,), hook=hook),
                                  progress=False)
    kw = dict(layer=1, analysis={"n_grid": 4, "patch_texts": 12})
    specs = [TrialSpec(neuron=n, head=h, control=c, **kw) for n in (3, 77, 200, 501)
             for h in ("regression", "classification") for c in (None, "shuffled")]
    results = run_trials(cache, model, specs)
    splits = split_indices(cache.n_texts)
    sample = splits["test"][:12]
    checked = 0
    for spec, r in zip(specs, results):
        assert r.status == "ok" and np.isfinite(r.metrics["patch_slope"])
        if spec.neuron not in (3, 200):
            continue
        w, b = r.head["weight"].double(), r.head["bias"].double()
        acts = np.asarray(cache.activations(1, spec.neuron), np.float64)
        grid = patch_grid(acts[splits["train"]], "quantiles", 4, ())
        dx, dy = [], []
        for i in sample:
            seq = cache.tokens[i]
            base = reforward(model, "gpt2", seq, 1, hook, spec.neuron, None)
            for g in grid:
                dx.append(g - acts[i])
                dy.append(_predict(r, reforward(model, "gpt2", seq, 1, hook, spec.neuron, float(g)), w, b)
                          - _predict(r, base, w, b))
        slope = np.polyfit(dx, dy, 1)[0]
        assert r.metrics["patch_slope"] == pytest.approx(slope, abs=1e-5), (spec, slope)
        checked += 1
    assert checked == 8


def _predict(result, features, w, b) -> float:
    out = features @ w.T + b
    if "mu" in result.head:
        return float(result.head["mu"]) + float(result.head["sigma"]) * float(out[0])
    return float(torch.softmax(out, -1) @ result.head["bin_values"].double())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("read_hook", ["ln_final.hook_out", "blocks.2.hook_resid_post"])
def test_the_pushforward_of_a_few_neurons_is_their_column_of_the_resid_jacobian(families, family, read_hook):
    """`feature_gradient` of a unit's few neurons (forward-mode, N directions) equals the einsum with the memoised
    backward Jacobian (d_f directions) that it stands in for, and the engine switches to the Jacobian once pushing
    forward would cost more than building it."""
    model = families[family]
    seqs, _ = tokenize(model, load_corpus(n_texts=60, seed=4).texts[:6], 40)
    engine = LastPosition(model.surface, seqs, 1, "pre", read_hook, model.tokenizer.pad_token_id)
    neurons = np.array([2, 30, 60])
    pushed = engine.feature_gradient(neurons)
    assert engine._jacobian is None  # 3 neurons: three forward directions, no Jacobian
    moved = engine.dpost(neurons).double()[..., None] * engine.w_out[torch.as_tensor(neurons)].double()[None]
    want = torch.einsum("bfd,bnd->bnf", engine.resid_jacobian(), moved)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(pushed, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
    many = np.arange(engine.base[read_hook].shape[-1] + 1)  # more directions than the Jacobian has rows
    torch.testing.assert_close(engine.feature_gradient(many)[:, neurons], want)
