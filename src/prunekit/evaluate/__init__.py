"""Step 6: evaluate per slice and compare a pruned model with its reference slice by slice.

core     `evaluate(model, data, metric, slices)`
metrics  accuracy / perplexity / embedding similarity / callables, per example
result   EvalResult
compare  paired bootstrap per slice, flags slices that degrade far more than the average
"""
from prunekit.evaluate.compare import SliceComparison, compare_slices
from prunekit.evaluate.core import evaluate
from prunekit.evaluate.metrics import Metric, TokenWindows, embed, from_callable
from prunekit.evaluate.result import EvalResult

__all__ = ["SliceComparison", "compare_slices", "evaluate", "Metric", "TokenWindows", "embed", "from_callable", "EvalResult"]
