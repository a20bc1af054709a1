"""`nsr-sweep` command line. Every bad input ends in one line naming the field and what is allowed."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .core.errors import NsrError


def friendly(fn):
    """Turn NsrError into `error: …` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except NsrError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nsr-sweep")
def main():
    """Neuron self-report sweeps: train a model (or a head) to predict its own MLP neurons."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@friendly
def models(as_json):
    """List the bundled models (they work offline)."""
    from .core.models import bundled_models, model_shape

    rows = [{"name": n, "path": str(p), **model_shape(n)} for n, p in bundled_models().items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<12} {r['family']:<6} layers={r['n_layers']} d_model={r['d_model']} d_mlp={r['d_mlp']} "
                   f"d_vocab={r['d_vocab']}  {r['path']}")


def _checked_shape(model: str, layer: int, neuron: int | None = None, max_tokens: int | None = None) -> None:
    """Layer/neuron/max_tokens against config.json: fail before any weights are loaded."""
    from .core.models import model_shape

    shape = model_shape(model)
    if shape and max_tokens is not None and shape.get("n_ctx") and not 2 <= max_tokens <= shape["n_ctx"]:
        raise NsrError(f"--max-tokens {max_tokens} is out of range for {model}: allowed 2..{shape['n_ctx']} "
                       "(its positions)")
    if shape and not 0 <= layer < shape["n_layers"]:
        raise NsrError(f"--layer {layer} is out of range for {model}: allowed 0..{shape['n_layers'] - 1}")
    if shape and neuron is not None and not 0 <= neuron < shape["d_mlp"]:
        raise NsrError(f"--neuron {neuron} is out of range for {model}: allowed 0..{shape['d_mlp'] - 1} (d_mlp)")


def _read_texts(path: str) -> list[str]:
    from .core.corpus import _read_lines

    p = Path(path)
    if not p.is_file():
        raise NsrError(f"--texts {path}: no such file")
    texts = [t for t in _read_lines(p) if t.strip()]
    if not texts:
        raise NsrError(f"--texts {path} is empty: give one text per line")
    return texts


@main.command()
@click.option("--model", default="nsr-tiny", show_default=True, help="Bundled name, HF directory or hub name.")
@click.option("--layer", type=int, required=True)
@click.option("--neuron", type=int, required=True)
@click.option("--texts", "texts_file", required=True, help="Text file, one text per line.")
@click.option("--hook", type=click.Choice(["post", "pre"]), default="post", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--processing", type=click.Choice(["none"]), default="none", show_default=True,
              help="Weights as trained (LayerNorm folding was removed).")
@click.option("--out", required=True, help="Output .parquet: text, tokens, position, activation.")
@friendly
def activations(model, layer, neuron, texts_file, hook, max_tokens, processing, out):
    """One neuron's activation at the last token of each text (the cache's public contract)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .core.cache import ActivationCache, CacheSpec
    from .core.corpus import Corpus
    from .core.files import atomic_write
    from .core.models import ModelSpec, load_model

    _checked_shape(model, layer, neuron, max_tokens)
    texts = _read_texts(texts_file)
    spec = CacheSpec(layers=(layer,), hook=hook, max_tokens=max_tokens)
    base = load_model(ModelSpec(name=model, processing=processing))
    cache = ActivationCache.compute(base, Corpus(texts, source=texts_file), spec, progress=False)
    table = pa.table({
        "text": pa.array(cache.texts, pa.string()),
        "tokens": pa.array(cache.tokens, pa.list_(pa.int64())),
        "position": pa.array(cache.positions, pa.int64()),
        "activation": pa.array(cache.activations(layer, neuron).astype("float64")),
    })
    atomic_write(Path(out), lambda tmp: pq.write_table(table, tmp))
    n_trunc = cache.meta["corpus"]["n_truncated"]
    click.echo(f"wrote {len(texts)} rows to {out} ({n_trunc} texts truncated to {max_tokens} tokens)", err=True)


@main.command()
@click.option("--model", default="nsr-tiny", show_default=True)
@click.option("--layer", type=int, required=True)
@click.option("--top", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--by", type=click.Choice(["variance", "kurtosis", "max"]), default="variance", show_default=True)
@click.option("--corpus", "source", default="builtin:python-docs", show_default=True)
@click.option("--n-texts", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--hook", type=click.Choice(["post", "pre"]), default="post", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly
def neurons(model, layer, k, by, source, n_texts, max_tokens, hook, seed, as_json):
    """Rank the neurons of a layer on the corpus (the cache is built or loaded)."""
    from .core.cache import ActivationCache, CacheSpec
    from .core.corpus import load_corpus
    from .core.models import ModelSpec, load_model

    _checked_shape(model, layer, max_tokens=max_tokens)
    corpus = load_corpus(source, n_texts=n_texts, seed=seed)
    spec = CacheSpec(layers=(layer,), hook=hook, max_tokens=max_tokens)
    cache = ActivationCache.build(load_model(ModelSpec(name=model)), corpus, spec)
    ranked = cache.top_neurons(layer, by=by, k=k)
    if as_json:
        click.echo(json.dumps([{"neuron": n, by: s} for n, s in ranked]))
        return
    click.echo(f"layer {layer}, top {k} by {by} over {cache.n_texts} texts:")
    for n, s in ranked:
        click.echo(f"  neuron {n:>6}  {by} {s:.5g}")


@main.group()
def cache():
    """Activation caches."""


@cache.command("build")
@click.argument("sweep_file")
@click.option("--root", default=None, help="Cache root (default $NSR_CACHE_DIR or ~/.cache/nsr-sweep/activations).")
@friendly
def cache_build(sweep_file, root):
    """Build (or load) the activation cache a sweep needs."""
    from .sweep.inputs import build_cache
    from .sweep.validate import checked_sweep

    spec = checked_sweep(sweep_file)
    cache = build_cache(spec, root=root)
    m = cache.meta
    click.echo(f"cache {m['key']}: {m['n_texts']} texts, {m['n_tokens']} tokens, layers {sorted(cache.acts)} "
               f"→ {cache.path}")
    for ident in m["identity"]:
        click.echo(f"  identity layer {ident['layer']}: max |hook_pre − LN2·W_in − b_in| = "
                   f"{ident['pre_max_abs_err']:.2e}, r = {ident['pre_r']:.7f}")


@main.command()
@click.argument("sweep_file")
@click.option("--out", default="results", show_default=True, help="Results root: writes OUT/<name>/.")
@click.option("--address", default=None, help="Join a running Ray cluster (e.g. auto); default $RAY_ADDRESS or local.")
@click.option("--resume", is_flag=True, help="Finish an interrupted sweep; finished trials are never rerun.")
@click.option("--dry-run", is_flag=True, help="Print the expanded trial grid and exit.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True, help="Start the Ray dashboard (local Ray).")
@click.option("--dashboard-host", default="127.0.0.1", show_default=True)
@click.option("--cache-root", default=None, help="Activation cache root (default $NSR_CACHE_DIR).")
@click.option("--ray-network", type=click.Choice(["auto", "isolated", "host"]), default="auto",
              show_default=True, help="Local Ray in the launch's own network namespace (loopback only): "
              "isolated requires it, auto falls back to the host's network with a warning, host never isolates.")
@click.option("--storage", default=None, help="Where saved weights go (training.save_weights): a path shared by "
              "the nodes or a pyarrow.fs URI (s3://bucket/prefix, gs://…). Default: they travel to --out via Ray.")
@click.option("--optuna-storage", default=None, help="The studies' database URL (sqlite:///…, postgresql://…); "
              "default OUT/<name>/optuna.log, a journal file that `optuna-dashboard` opens.")
@click.option("--tensorboard", is_flag=True, help="Tune's TensorBoard logger into OUT/<name>/tune/.")
@click.option("--mlflow", default=None, is_flag=False, flag_value="", metavar="[URI]",
              help="Log every trial to MLflow at URI (alone: OUT/<name>/mlruns). Needs mlflow-skinny.")
@friendly
def launch(dry_run, **options):
    """Run a sweep: Ray model workers, Tune + Optuna trials, results/<name>/."""
    from .sweep.grid import dry_run_text
    from .sweep.launch import isolate_here
    from .sweep.launch import launch as run_launch
    from .sweep.options import LaunchOptions
    from .sweep.validate import preflight

    opts = LaunchOptions(**options)  # the launch's options, built once: every later step reads these
    if dry_run:
        from .sweep.disk import room_line

        spec = preflight(opts)
        click.echo(dry_run_text(spec) + "\n" + room_line(spec, Path(opts.out) / spec.name, opts.storage))
        return
    if isolate_here(opts):  # a local cluster, closed: launched from a child process of its own
        from .sweep.localray import DashboardForward, spawn_isolated

        sys.exit(spawn_isolated(opts, DashboardForward(opts.dashboard_host) if opts.dashboard else None))
    click.echo(f"results: {run_launch(opts, echo=click.echo)}")


@main.command()
@click.argument("sweep_dir")
@friendly
def report(sweep_dir):
    """Tables, figures and report.html of a sweep directory (running, partial or finished)."""
    from .report.build import build_report

    build_report(Path(sweep_dir), echo=click.echo)


@main.command()
@click.argument("sweep_dir")
@click.option("--layer", type=int, required=True)
@click.option("--neuron", type=int, required=True)
@click.option("--out", default=None, help="The page's path (default SWEEP_DIR/neurons/L<layer>-N<neuron>.html).")
@click.option("--top", type=click.IntRange(min=0), default=8, show_default=True, help="Top-activating test texts shown.")
@click.option("--sample", type=click.IntRange(min=0), default=8, show_default=True,
              help="Other test texts shown, drawn at random (seeded).")
@friendly
def neuron(sweep_dir, layer, neuron, out, top, sample):
    """One neuron's page: self vs outsiders in words, its texts with per-token activations beside every
    predictor's prediction, prediction vs actual, patch curves and cosines (one self-contained HTML file)."""
    from .report.neuron import write_neuron_page

    write_neuron_page(Path(sweep_dir), layer, neuron, out, top=top, sample=sample, echo=click.echo)


@main.command()
@click.argument("sweep_dir")
@click.option("--json", "as_json", is_flag=True)
@friendly
def status(sweep_dir, as_json):
    """Counts by status, best trials and elapsed time of a sweep directory, and each damaged file in a line (with
    what --resume will do about it: exit code 2)."""
    from .results.status import format_status, sweep_status

    st = sweep_status(Path(sweep_dir))
    click.echo(json.dumps(st, indent=2, default=str) if as_json else format_status(st))
    if st["damaged"]:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
