"""`prunekit` command line: prune (run a recipe), eval, bench, report.

    prunekit prune  --model fashion-mnist-cnn --data fashion-mnist --recipe recipe.yaml --out runs/x [--resume]
    prunekit eval   --model fashion-mnist-cnn --data fashion-mnist [--pruned runs/x/model]
    prunekit bench  --model fashion-mnist-cnn --data fashion-mnist [--pruned runs/x/model] [--batch-sizes 1,16]
    prunekit report runs/x [--out runs/x/report]
    prunekit export --format gguf --model runs/x/model --out model.gguf [--quant q8_0] [--tokenizer src.gguf]

Models: a zoo name, a local Hugging Face directory, a .safetensors file with --factory, or
"package.module:factory". Data: a built-in name (prunekit.data.available()) or "package.module:function".
Errors in the user's input print one line naming what is wrong and exit with status 2; a diverged recovery
exits with 3 (the last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional

from prunekit import data as pkdata
from prunekit import io as pkio
from prunekit.batch import split_batch
from prunekit.errors import DataError, LoadError, PrunekitError
from prunekit.evaluate.core import evaluate
from prunekit.export.gguf import FTYPES, export_gguf
from prunekit.measure.counts import count_params
from prunekit.measure.latency import measure_latency
from prunekit.report.write import write_report
from prunekit.run.pipeline import load_recipe, run_pipeline
from prunekit.zoo import GGUF_SOURCES, ZOO, resolve_model, resolve_tokenizer

EXIT_USAGE, EXIT_DIVERGED = 2, 3


class CLIError(PrunekitError, ValueError):
    """A command-line argument problem; main() prints the message and exits with status 2 (like any
    PrunekitError)."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunekit", description="Prune PyTorch models into smaller dense models, "
                                "recover, evaluate, benchmark and report.")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors too")
    sub = p.add_subparsers(dest="command", metavar="{prune,eval,bench,report,export}")
    _add = sub.add_parser

    def add_parser(*args, **kw):
        sp = _add(*args, **kw)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors too")
        return sp
    sub.add_parser = add_parser

    def model_args(sp):
        sp.add_argument("--model", required=True, help="zoo name, HF directory, weights.safetensors (+--factory), "
                        "or package.module:factory")
        sp.add_argument("--factory", help="package.module:function building the architecture of a .safetensors")

    pr = sub.add_parser("prune", help="run a pruning recipe into a run directory")
    model_args(pr)
    pr.add_argument("--data", required=True, help="dataset name or package.module:function (its test split "
                    "evaluates; its train split calibrates and recovers unless --train-data is given)")
    pr.add_argument("--train-data", help="dataset for calibration and recovery (train split), e.g. austen-lm for "
                    "a causal LM evaluated on --data lm-slices")
    pr.add_argument("--recipe", required=True, help="recipe YAML/JSON file (see prunekit.pipeline)")
    pr.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    pr.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="evaluate a (pruned) model on a dataset's test split")
    model_args(ev)
    ev.add_argument("--data", required=True)
    ev.add_argument("--pruned", help="directory written by pk.save / a run's model/ (shapes rebuilt on --model)")
    ev.add_argument("--metric", default="accuracy", choices=["accuracy", "perplexity"])
    ev.add_argument("--limit", type=int, default=None, help="evaluate on the first N test examples")
    ev.add_argument("--batch-size", type=int, default=256)

    be = sub.add_parser("bench", help="time dense vs pruned forward passes (interleaved, pinned threads)")
    model_args(be)
    be.add_argument("--data", help="dataset whose first test example is the input (or use --input-shape)")
    be.add_argument("--input-shape", help="comma-separated shape of one random float input, e.g. 1,1,28,28")
    be.add_argument("--pruned", help="directory written by pk.save / a run's model/")
    be.add_argument("--batch-sizes", default="1,16")
    be.add_argument("--threads", type=int, default=1)
    be.add_argument("--reps", type=int, default=30)
    be.add_argument("--json", help="also write the result as JSON here")

    re_ = sub.add_parser("report", help="write report.html / report.md for a run directory")
    re_.add_argument("run_dir")
    re_.add_argument("--out", help="output directory (default: RUN_DIR/report)")

    ex = sub.add_parser("export", help="write a pruned model for a serving engine (GGUF for llama.cpp)")
    ex.add_argument("--format", required=True, choices=["gguf"])
    ex.add_argument("--model", required=True, help="directory written by pk.save (a run's model/)")
    ex.add_argument("--out", required=True, help="file to write, e.g. model.gguf")
    ex.add_argument("--quant", default="f16", choices=sorted(FTYPES), help="weight type (default f16)")
    ex.add_argument("--tokenizer", help="source .gguf or Hugging Face tokenizer directory (default: --model's)")
    ex.add_argument("--tokenizer-pre", default="default", help="llama.cpp pre-tokenizer name for an HF tokenizer")
    return p


# --------------------------------------------------------------------------------------------- helpers


def _model(spec: str, factory: Optional[str]):
    looks_like_path = "/" in spec or spec.startswith(".") or spec.endswith(".safetensors")
    if spec not in ZOO and looks_like_path and ":" not in spec and not Path(spec).exists():
        raise CLIError(f"--model: path '{spec}' does not exist (give a zoo name {sorted(ZOO)}, a Hugging Face "
                       f"directory, weights.safetensors with --factory, or package.module:factory)")
    try:
        return resolve_model(spec, factory)
    except (ValueError, FileNotFoundError, ImportError, AttributeError, TypeError) as e:
        raise CLIError(f"--model '{spec}': {e}") from e


def _data(spec: str, split: str, batch_size: Optional[int] = None, limit: Optional[int] = None, tokenizer=None,
          flag: str = "--data"):
    """A dataset's split; text datasets that cut token windows get the model's tokenizer (and their own default
    batch size: an LM's logits over a big batch of long windows would not fit in memory)."""
    kw = {"tokenizer": tokenizer} if tokenizer is not None and pkdata.takes_tokenizer(spec) else {}
    try:
        return pkdata.load(spec, split, batch_size=None if kw else batch_size, limit=limit, **kw)
    except (DataError, FileNotFoundError, ImportError) as e:
        raise CLIError(f"{flag} '{spec}': {e}") from e


def _tokenizer(spec: str, *data_specs: str):
    """The model's own tokenizer (zoo LLM or Hugging Face directory), or None; checked before anything loads
    when a dataset needs one to cut token windows."""
    try:
        tok = resolve_tokenizer(spec)
    except (OSError, ValueError, ImportError) as e:
        raise CLIError(f"--model '{spec}': its tokenizer does not load ({e}); fix or remove the tokenizer files") from e
    needs = [d for d in data_specs if d and pkdata.takes_tokenizer(d)]
    if needs and tok is None:
        raise CLIError(f"--data '{needs[0]}' is text cut into token windows, but --model '{spec}' has no tokenizer "
                       f"(no tokenizer files in its directory); give a language model saved with its tokenizer")
    return tok


def _load_pruned(model, path: str):
    if not Path(path).is_dir():
        raise CLIError(f"--pruned: directory '{path}' does not exist (expected a folder written by pk.save, e.g. "
                       f"runs/x/model)")
    try:
        return pkio.load(path, model=model)
    except LoadError as e:
        raise CLIError(f"--pruned '{path}': {e}") from e


# --------------------------------------------------------------------------------------------- commands


def _positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise CLIError(f"{flag} must be an int >= 1, got {value}")


def _writable_dir(path: str, flag: str) -> None:
    """Fail early, in one line, when `path` cannot be created or written (instead of a traceback later)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"{flag} '{path}' is not a writable directory ({e.strerror or e}); choose another "
                       f"location") from None


def cmd_prune(a) -> int:
    if not Path(a.recipe).is_file():
        raise CLIError(f"--recipe: file '{a.recipe}' does not exist")
    recipe = load_recipe(a.recipe)
    _writable_dir(a.out, "--out")
    tok = _tokenizer(a.model, a.data, a.train_data)
    model = _model(a.model, a.factory)
    train = _data(a.train_data or a.data, "train", recipe.batch_size, recipe.train_limit, tok,
                  "--train-data" if a.train_data else "--data")
    val = _data(a.data, "test", max(recipe.batch_size, 256), recipe.val_limit, tok)
    describe = {"model": a.model, "data": a.data, "train_data": a.train_data or a.data, "recipe": str(a.recipe)}
    if recipe.exports() and a.model in GGUF_SOURCES:      # a GGUF export copies the source GGUF's tokenizer
        describe["tokenizer"] = str(GGUF_SOURCES[a.model]())
    res = run_pipeline(model, recipe, train=train, val=val, out=a.out, resume=a.resume, quiet=a.quiet,
                       describe=describe)
    print(f"{res.status}: run directory {res.run_dir} (final model in {res.run_dir / 'model'})")
    if res.message:
        print(res.message)
    return EXIT_DIVERGED if res.status == "diverged" else 0


def cmd_eval(a) -> int:
    _positive(a.limit, "--limit")
    _positive(a.batch_size, "--batch-size")
    tok = _tokenizer(a.model, a.data)
    model = _model(a.model, a.factory)
    if a.pruned:
        model = _load_pruned(model, a.pruned)
    data = _data(a.data, "test", a.batch_size, a.limit, tok)
    res = evaluate(model, data, a.metric)
    out = {"metric": a.metric, "value": res.value, "params": count_params(model)}
    if len(res.slices) > 1:
        out["slices"] = {str(k): v["value"] for k, v in res.slices.items()}
    print(json.dumps(out))
    return 0


def cmd_bench(a) -> int:
    import copy

    import torch
    try:
        sizes = [int(s) for s in a.batch_sizes.split(",")]
    except ValueError:
        raise CLIError(f"--batch-sizes must be comma-separated ints, got '{a.batch_sizes}'") from None
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--batch-sizes must be ints >= 1, got '{a.batch_sizes}'")
    _positive(a.reps, "--reps")
    _positive(a.threads, "--threads")
    if a.json:
        _writable_dir(str(Path(a.json).parent), "--json's directory")
    if a.input_shape:
        try:
            shape = [int(s) for s in a.input_shape.split(",")]
            if min(shape) < 1:
                raise ValueError
        except ValueError:
            raise CLIError(f"--input-shape must be comma-separated ints >= 1, got '{a.input_shape}'") from None
    dense = _model(a.model, a.factory)
    if a.input_shape:
        x = torch.randn(*shape)
    elif a.data:
        x = split_batch(_data(a.data, "test", 1, 1)[0])[0]
    else:
        raise CLIError("bench needs an input: --data NAME (first test example) or --input-shape 1,3,224,224")
    models = {"dense": dense}
    if a.pruned:
        models["pruned"] = _load_pruned(copy.deepcopy(dense), a.pruned)
    res = measure_latency(models, x, batch_sizes=sizes, threads=a.threads, reps=a.reps)
    print(res.to_markdown())
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


def cmd_report(a) -> int:
    if not Path(a.run_dir).is_dir():
        raise CLIError(f"run directory '{a.run_dir}' does not exist")
    out = a.out or str(Path(a.run_dir) / "report")
    _writable_dir(out, "--out")
    paths = write_report(a.run_dir, out)
    print(f"wrote {paths['html']} and {paths['md']}")
    return 0


def cmd_export(a) -> int:
    _writable_dir(str(Path(a.out).parent), "--out's directory")
    info = export_gguf(a.model, a.out, dtype=a.quant, tokenizer=a.tokenizer, tokenizer_pre=a.tokenizer_pre)
    print(f"wrote {info['path']} ({info['architecture']}, {info['layers']} layers, {a.quant}, {info['bytes']} bytes)")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "export": cmd_export}


def main(argv: Optional[List[str]] = None) -> int:
    parser = _build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[a.command](a)
    except PrunekitError as e:              # bad input / failed check: one line; anything else is a bug
        if getattr(a, "debug", False):
            traceback.print_exc()
        print(f"prunekit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
