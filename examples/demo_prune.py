"""The demo's pruning and recovery: MACs targets chosen by measured speedup, then embedding distillation."""
from __future__ import annotations

import re
import time
import warnings
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit as pk
from demo_settings import Progress, Settings
from demo_text import SENTENCE_MAX_TOKENS, background_sentences, embed_chunks, length_chunks, mean_pool

LATENCY_BATCH, LATENCY_TOKENS, LATENCY_THREADS = 32, 32, 1


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
    graph = pk.DependencyGraph(model, example)
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


def widths(plan: "pk.Plan") -> List[Dict[str, Any]]:
    """Per-layer kept widths from the plan, for the report: attention heads and FFN neurons of each encoder layer.

    A group whose units span several weight rows (unit_size = head_dim) is a group of attention heads; the
    others are FFN neurons. The report plots kept / original per layer, coloured by this kind."""
    out = []
    for g in plan.groups:
        m = re.search(r"encoder\.layer\.(\d+)\.(attention|intermediate)", g["modules"][0])
        kind = "heads" if g["unit_size"] > 1 else "FFN neurons"
        name = f"layer {m.group(1)} {kind.split()[0]}" if m else ",".join(g["modules"][:2])
        out.append({"name": name, "kind": kind, "original": g["units"], "kept": g["kept"]})
    return out



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

