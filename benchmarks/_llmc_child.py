"""llm-compressor side of benchmarks/llm.py (run with .venv-llmc/bin/python, see llmcompressor_env.sh).

Reads the exact calibration / evaluation token windows the parent wrote (safetensors: "calib" [n, 512],
"eval" [m, 512]), prunes the cached plain-Llama SmolLM2-135M with llm-compressor's SparseGPT or Wanda
modifier (optionally its OWL profile), and prints one JSON line: perplexity over the evaluation windows
(same formula as the parent), oneshot wall time and measured sparsity of the pruned Linear layers.
Not part of prunekit: a benchmark-only driver for the peer implementation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


@torch.no_grad()
def perplexity(model, evalw) -> float:
    nll, n = 0.0, 0
    for row in evalw:
        x = row.unsqueeze(0)
        nll += float(model(input_ids=x, labels=x).loss) * (x.shape[1] - 1)
        n += x.shape[1] - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--method", choices=["sparsegpt", "wanda", "dense"], required=True,
                    help="'dense': no pruning, only the perplexity (checks both environments load the same model)")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--owl", action="store_true")
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ids = load_file(a.ids)
    calib, evalw = ids["calib"], ids["eval"]
    model = LlamaForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    if a.method == "dense":
        print(json.dumps({"ppl": perplexity(model, evalw), "seconds": 0.0, "sparsity": 0.0,
                          "transformers": __import__("transformers").__version__}))
        return
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    kw = dict(sparsity=0.5, mask_structure="0:0" if a.pattern == "unstructured" else a.pattern,
              targets=[r"re:model\.layers\.\d+$"], ignore=[r"re:.*lm_head"])   # as in llm-compressor's examples:
    # targets are the decoder layers (the Linear modules inside them get pruned; OWL allocates per layer);
    # lm_head is tied to the input embedding here and must stay dense, like prunekit's default
    if a.owl:
        kw.update(sparsity_profile="owl", owl_m=a.owl_m, owl_lmbda=a.owl_lambda)
    modifier = (SparseGPTModifier if a.method == "sparsegpt" else WandaPruningModifier)(**kw)
    t = time.perf_counter()
    model = oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
                    max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t
    ppl = perplexity(model, evalw)
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    import llmcompressor
    head = model.get_output_embeddings().weight
    print(json.dumps({"ppl": ppl, "seconds": seconds, "sparsity": zeros / total,
                      "lm_head_sparsity": float((head == 0).float().mean()),
                      "llmcompressor": llmcompressor.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
