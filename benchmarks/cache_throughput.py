"""Cache build throughput vs a raw HF forward pass over the same batches.

    python benchmarks/cache_throughput.py [--model nsr-tiny] [--init pretrained|random] [--n-texts 2000]

Both sides see the same length-sorted, right-padded batches. "raw HF" is the plain
`transformers` model with no hooks, in its default attention (sdpa) and in eager attention
(what the cache and the bridge use). The cache side is `ActivationCache.compute`'s reading
loop, tokenisation included; the identity check (a fixed cost per build) is listed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _families import family_model
from transformers import AutoModelForCausalLM

from nsr_sweep.core.cache import ActivationCache, CacheSpec, pad_batch, tokenize
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import ModelSpec, load_model


@torch.no_grad()
def raw_forward(hf, batches) -> float:
    t0 = time.perf_counter()
    for ids, mask in batches:
        hf(input_ids=ids, attention_mask=mask)
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nsr-tiny", help="bundled name, HF directory, or a family: gpt2|neox|llama "
                    "(a random model of nsr-tiny's shape)")
    ap.add_argument("--init", default="pretrained")
    ap.add_argument("--n-texts", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = load_model(ModelSpec(name=family_model(args.model), init=args.init, device=args.device))
    corpus = load_corpus(n_texts=args.n_texts)
    spec = CacheSpec(layers=tuple(int(x) for x in args.layers.split(",")), max_tokens=args.max_tokens)
    seqs, _ = tokenize(model, corpus.texts, args.max_tokens)
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    batches = [pad_batch([seqs[i] for i in order[s : s + args.batch_size]], model.tokenizer.pad_token_id, model.device)
               for s in range(0, len(seqs), args.batch_size)]
    n_tokens = sum(len(s) for s in seqs)
    sdpa = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa").to(args.device).eval()
    sdpa.load_state_dict(model.hf.state_dict())

    raw_forward(model.hf, batches[:2])  # warm-up
    rows = {"raw HF forward (sdpa)": [], "raw HF forward (eager)": [], "nsr-sweep cache build": []}
    ident = []
    for _ in range(args.repeats):  # interleaved, so machine noise hits all three alike
        rows["raw HF forward (sdpa)"].append(raw_forward(sdpa, batches))
        rows["raw HF forward (eager)"].append(raw_forward(model.hf, batches))
        t0 = time.perf_counter()
        cache = ActivationCache.compute(model, corpus, spec, batch_size=args.batch_size, progress=False)
        ident.append(time.perf_counter() - t0 - cache.meta["build_seconds"])
        rows["nsr-sweep cache build"].append(cache.meta["build_seconds"])
    best = {k: min(v) for k, v in rows.items()}
    print(f"model {args.model} ({args.init}), {args.n_texts} texts, {n_tokens} tokens, batch {args.batch_size}, "
          f"layers {spec.layers}, device {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads); best of {args.repeats}")
    print(f"{'':<26}{'seconds':>9}{'tokens/s':>11}{'ratio':>8}")
    for k, s in best.items():
        print(f"{k:<26}{s:>9.3f}{n_tokens / s:>11.0f}{best['raw HF forward (sdpa)'] / s:>8.2f}")
    print(f"cache / raw eager ratio: {best['raw HF forward (eager)'] / best['nsr-sweep cache build']:.2f}; "
          f"identity check (per build, not in the loop): {min(ident):.2f} s")


if __name__ == "__main__":
    main()
