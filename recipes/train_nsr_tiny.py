"""Recipe for `nsr-tiny`, the bundled offline base model. Anyone can rerun it:

    python recipes/train_nsr_tiny.py --out nsr_sweep/models/nsr-tiny
    python recipes/train_nsr_tiny.py --out nsr_sweep/models/nsr-tiny-seed1 --seed 1   # the seed sibling

Text: the built-in corpus (`pydoc_data.topics` + stdlib docstrings read with `ast`), so the
recipe needs nothing but a Python installation. Byte-level BPE (vocab 4096, ' 0'…' 9'
single tokens, checked), a 4-layer GPT-2 with d_model 128, trained from scratch with AdamW.
Writes config.json, model.safetensors, tokenizer files and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsr_sweep.core.corpus import python_docs_passages  # noqa: E402

EOS = "<|endoftext|>"
SIBLING = """
This is a **seed sibling** of nsr-tiny: the same recipe, text and architecture with another seed (which also
shuffles the passages, so the BPE tokenizer differs slightly). It is the offline `cross_model` control: another
model, trained on the same data, predicting nsr-tiny's neurons.
"""


def train_tokenizer(passages: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(passages, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    for d in "0123456789":
        if len(tok.encode(" " + d)) != 1:
            raise SystemExit(f"tokenizer: ' {d}' is not a single token; raise the vocab size")
    return tok


def token_stream(tok, passages: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for p in passages:
        ids.append(tok.eos_token_id)  # every passage starts after BOS, as the bridge feeds it
        ids.extend(tok.encode(p))
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, block: int) -> float:
    model.eval()
    n = (len(stream) - 1) // block
    x = stream[: n * block].view(n, block)
    losses = [model(x[i : i + 64], labels=x[i : i + 64]).loss.item() for i in range(0, n, 64)]
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def alive_share(model, tok, passages: list[str]) -> tuple[float, list[float]]:
    """Share of MLP neurons whose post-GELU activation has std > 1e-3 over real tokens."""
    acts = {i: [] for i in range(model.config.n_layer)}
    hooks = [
        blk.mlp.act.register_forward_hook(lambda m, i, o, L=L: acts[L].append(o.reshape(-1, o.shape[-1])))
        for L, blk in enumerate(model.transformer.h)
    ]
    model.eval()
    for p in passages:
        model(torch.tensor([[tok.eos_token_id] + tok.encode(p)[:63]]))
    for h in hooks:
        h.remove()
    per_layer = [float((torch.cat(a).std(0) > 1e-3).float().mean()) for a in acts.values()]
    return float(np.mean(per_layer)), per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="nsr_sweep/models/nsr-tiny")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    passages = python_docs_passages()
    random.Random(args.seed).shuffle(passages)
    n_held = len(passages) // 20
    held, train = passages[:n_held], passages[n_held:]
    tok = train_tokenizer(train, args.vocab)
    train_ids, held_ids = token_stream(tok, train), token_stream(tok, held)
    print(f"corpus: {len(passages)} passages, {len(train_ids)} train / {len(held_ids)} held-out tokens")

    config = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, n_inner=4 * args.d_model, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    n_blocks = (len(train_ids) - 1) // args.block
    steps = int(args.epochs * n_blocks / args.batch)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    blocks = train_ids[: n_blocks * args.block].view(n_blocks, args.block)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(steps):
        x = blocks[torch.randint(n_blocks, (args.batch,), generator=gen)]
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    train_time = time.time() - t0
    loss = heldout_loss(model, held_ids, args.block)
    alive, per_layer = alive_share(model, tok, held[:400])
    print(f"held-out loss {loss:.3f}, alive neurons {alive:.1%}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    stats = {
        "passages": len(passages), "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "train_seconds": round(train_time), "steps": steps, "heldout_loss": round(loss, 4),
        "alive_share": round(alive, 4), "alive_per_layer": [round(a, 4) for a in per_layer],
        "n_params": n_params, "python": sys.version.split()[0], "args": vars(args),
    }
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(
        f"""# {out.name}

The bundled offline base model of nsr-sweep: a GPT-2-architecture language model small enough
to ship inside the package and to train on two CPU cores.

| | |
|---|---|
| architecture | GPT-2, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_mlp {4 * args.d_model}, GELU, 256 positions |
| parameters | {n_params:,} (tied embeddings), float32 safetensors |
| tokenizer | byte-level BPE, vocab {len(tok)}, `<|endoftext|>` = BOS = EOS = pad; ' 0'…' 9' single tokens |
| training text | `pydoc_data.topics` + standard-library docstrings (Python {stats['python']}), read with `ast`: {len(passages):,} passages, {len(train_ids):,} training tokens, {len(held_ids):,} held-out tokens (5% of passages) |
| recipe | `python recipes/train_nsr_tiny.py --out {args.out} --seed {args.seed}` — AdamW lr {args.lr}, batch {args.batch}×{args.block} tokens, {steps} steps ({args.epochs} epochs), cosine schedule, seed {args.seed} |
| training time | {train_time / 60:.1f} min on 2 CPU cores |
| held-out loss | {loss:.3f} nats/token (perplexity {math.exp(loss):.1f}) |
| alive neurons | {alive:.1%} (std of post-GELU activation > 1e-3 over held-out tokens; per layer {', '.join(f'{a:.1%}' for a in per_layer)}) |

Not a good language model, and not meant to be: it is a real trained transformer whose neurons
carry structure, so every nsr-sweep command works without the network.
{SIBLING if args.seed != 0 else ""}"""
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
