"""What one trial costs.

    python benchmarks/trial_costs.py [--model nsr-tiny] [--init pretrained] [--layer 1]

- seconds per `none` trial from the cache (one at a time, and per neuron when a whole layer's
  probes are fit as one batched computation);
- one `after_target` training step (blocks L+1… and ln_final, from the cached residual) vs one
  full-model fine-tuning step (every block) at the same batch and head; target ratio
  ≤ 1.3 × (trainable blocks / all blocks).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _families import family_model

from nsr_sweep.core.cache import ActivationCache, CacheSpec, pad_batch
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.fit import fit_probes
from nsr_sweep.core.models import ModelSpec, load_model
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import recipe, run_trial, split_indices


def step_seconds(model, cache, layer: int, after: bool, batch: int, steps: int) -> float:
    start = layer + 1 if after else 0
    net = model.surface.trainable_from(start)
    head = torch.randn(model.d_model, 1, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(net.trainable().values(), lr=1e-4)
    idx = np.arange(batch)
    T = max(len(cache.tokens[i]) for i in idx)
    ids, _ = pad_batch([cache.tokens[i] for i in idx], model.tokenizer.pad_token_id, model.device)
    resid = torch.from_numpy(np.asarray(cache.resid[layer][idx, :T])).to(model.device)
    pos = torch.as_tensor(cache.positions[idx], device=model.device)
    y = torch.randn(batch, device=model.device)

    def step():
        x = resid if after else net.embed_ids(ids)
        out = net.ln_final(net.run(x, start))[torch.arange(batch), pos] @ head.to(x.device)
        loss = ((out[:, 0] - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nsr-tiny", help="bundled name, HF directory, or a family: gpt2|neox|llama "
                    "(a random model of nsr-tiny's shape)")
    ap.add_argument("--init", default="pretrained")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--n-texts", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model = load_model(ModelSpec(name=family_model(args.model), init=args.init, device=args.device))
    cache = ActivationCache.compute(model, load_corpus(n_texts=args.n_texts),
                                    CacheSpec(layers=(args.layer,), store_resid=True), progress=False)
    spec = TrialSpec(layer=args.layer, neuron=0, features={"hook": cache.meta["spec"]["features"]}, training={"epochs": 20, "patience": 20, "lr": 1e-2}, analysis={"enabled": False})
    per_trial = {}
    for analyses in (False, True):
        t0 = time.perf_counter()
        for n in range(5):
            run_trial(cache, model, spec.model_copy(update={"neuron": n, "analysis": spec.analysis.model_copy(update={"enabled": analyses})}))
        per_trial[analyses] = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    fit_probes(cache.features, np.asarray(cache.acts[args.layer], np.float64), "regression", recipe(spec),
               split_indices(cache.n_texts))
    per_neuron_batched = (time.perf_counter() - t0) / model.d_mlp

    after = step_seconds(model, cache, args.layer, True, args.batch, args.steps)
    full = step_seconds(model, cache, args.layer, False, args.batch, args.steps)
    trainable, total = model.n_layers - args.layer - 1, model.n_layers
    target = 1.3 * trainable / total
    print(f"model {args.model} ({args.init}), {model.n_layers} layers, d_model {model.d_model}, layer {args.layer}, "
          f"{cache.n_texts} texts, device {args.device}, {torch.get_num_threads()} threads")
    print(f"none trial from the cache (regression, 20 epochs): {per_trial[False]:.3f} s/trial one at a time "
          f"({per_trial[True]:.3f} s with the analyses: cosines, projections, 7-point patching); "
          f"{per_neuron_batched * 1000:.2f} ms/neuron batched over all {model.d_mlp} neurons of the layer")
    print(f"after_target step {after * 1000:.1f} ms vs full fine-tuning step {full * 1000:.1f} ms at batch "
          f"{args.batch}: ratio {after / full:.3f} (target ≤ 1.3 × {trainable}/{total} = {target:.3f}) "
          f"{'OK' if after / full <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
