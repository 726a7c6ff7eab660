"""Op-name tables: which torch functions and Tensor methods fall into which generic channel rule.

An op whose name has an entry in `prunekit.graph.rules.RULES` uses that rule; otherwise the first table here
that holds its name decides (CREATION, UNARY, ELEMENTWISE, MOVEMENT, REDUCE, SPATIAL); IGNORED ops are
metadata reads that the tracer does not even count.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import get_testing_overrides
from torch.utils._pytree import tree_flatten

ELEMENTWISE = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "rsub", "sub_", "__isub__",
    "mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "__rtruediv__", "div_", "__itruediv__",
    "true_divide", "floor_divide", "__floordiv__", "remainder", "fmod", "pow", "__pow__", "__rpow__", "pow_",
    "maximum", "minimum", "max_elementwise", "where", "masked_fill", "masked_fill_", "addcmul", "addcdiv", "lerp",
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "__and__", "__or__", "bitwise_and", "bitwise_or", "atan2", "hypot",
    "copysign", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
}
UNARY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "celu", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold", "rrelu", "glu_",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "dropout_",
    "exp", "log", "log2", "log10", "log1p", "expm1", "sqrt", "rsqrt", "abs", "neg", "__neg__", "erf", "sin", "cos", "reciprocal",
    "square", "sign", "floor", "ceil", "round", "trunc", "frac", "logical_not", "__invert__", "isnan", "isinf",
    "nan_to_num", "float", "half", "double", "bfloat16", "long", "int", "short", "bool", "to", "type", "type_as", "contiguous", "clone", "detach",
    "detach_", "requires_grad_", "cpu", "cuda", "__pos__", "exp_", "sqrt_", "mul_scalar", "fill_", "zero_",
    "softmax", "log_softmax", "_softmax", "nan_to_num_", "bernoulli_", "uniform_", "normal_", "pin_memory",
}
MOVEMENT = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "transpose_", "t", "T", "mT", "unsqueeze",
    "squeeze", "unsqueeze_", "squeeze_", "split", "chunk", "unbind", "__getitem__", "narrow", "select",
    "index_select", "roll", "flip", "expand", "expand_as", "repeat", "repeat_interleave", "pad", "movedim",
    "moveaxis", "swapaxes", "swapdims", "view_as", "reshape_as", "pixel_shuffle", "pixel_unshuffle",
    "tensor_split", "split_with_sizes", "take_along_dim", "gather", "tile", "broadcast_to", "channel_shuffle",
    "native_channel_shuffle", "unfold", "cat", "concat", "concatenate", "stack",
}
CREATION = {
    "zeros", "ones", "empty", "full", "arange", "linspace", "randn", "rand", "randint", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "tensor", "as_tensor", "eye", "tril", "triu", "meshgrid", "bernoulli", "multinomial",
    "cumsum", "__len__", "tril_", "triu_", "one_hot", "bucketize",
    "searchsorted",
}
# creation ops whose result holds one value everywhere: as an operand of an elementwise op it acts like a scalar
UNIFORM = {"zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros",
           "new_ones", "new_empty", "new_full"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "all", "any",
          "var_mean", "std_mean", "nansum", "nanmean", "vector_norm", "linalg_vector_norm", "linalg_norm"}
STAT_REDUCE = {"mean", "var", "std", "norm", "logsumexp", "var_mean", "std_mean", "nanmean", "vector_norm",
               "linalg_vector_norm", "linalg_norm"}
# ops whose outputs the values decide (which entries, in which order, how many); verification compares their
# inputs (structured/watch.py). `where(cond)`, `max/min(dim)` and boolean-mask indexing join them by arguments.
DATA_DEPENDENT = {"topk", "kthvalue", "sort", "argsort", "msort", "cummax", "cummin", "nms", "roi_align",
                  "roi_pool", "ps_roi_align", "ps_roi_pool", "nonzero", "argwhere", "argmax", "argmin",
                  "masked_select"}
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "max_pool2d_with_indices", "max_pool1d_with_indices", "lp_pool2d", "lp_pool1d", "fractional_max_pool2d",
    "grid_sample", "local_response_norm",
}
IGNORED = {"size", "dim", "numel", "item", "tolist", "__bool__", "__format__", "__repr__", "__len__", "stride",
           "is_contiguous", "data_ptr", "element_size", "__index__", "__int__", "__float__", "storage_offset",
           "untyped_storage", "is_floating_point", "is_complex", "nelement", "ndimension", "get_device",
           "__hash__", "__iter__", "__reversed__", "__contains__", "__array__", "numpy", "has_names",
           "_has_compatible_shallow_copy_type", "__deepcopy__", "__reduce_ex__", "__setstate__", "data", "shape",
           "dtype", "device", "is_cuda", "requires_grad", "ndim", "grad", "names", "layout", "is_leaf", "grad_fn",
           "is_sparse", "is_quantized", "is_meta", "retain_grad", "register_hook", "_version", "is_nested",
           "_base", "output_nr", "is_mkldnn", "itemsize", "nbytes", "__eq__hash"}


def op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def arg(args, kwargs, i, name, default=None):
    """Argument `i` of a call, positional or by keyword `name`."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_signatures: Dict[Any, Optional[List[Tuple[str, Any]]]] = {}
_overrides: Dict[Any, Any] = {}


def _positional_params(func) -> Optional[List[Tuple[str, Any]]]:
    """(name, default or inspect.Parameter.empty) of the parameters `func` accepts by position: from the
    Python signature, else torch's table of dummy signatures for overridable functions and Tensor methods,
    else the ATen schema of the op of that name."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        if not _overrides:
            _overrides.update(get_testing_overrides())
        dummy = _overrides.get(func)
        sig = inspect.signature(dummy) if dummy is not None else None
    if sig is not None:
        return [(p.name, p.default) for p in sig.parameters.values() if p.kind in _POSITIONAL]
    schemas = torch._C._jit_get_schemas_for_operator(f"aten::{op_name(func)}")
    if not schemas:
        return None
    return [(a.name, a.default_value if a.has_default_value() else _EMPTY)
            for a in schemas[0].arguments if not a.kwarg_only]


def positional(func, args: tuple, kwargs: dict) -> tuple:
    """`args` extended with the keyword arguments that `func` would also take by position, in signature order
    (gaps take their defaults), so a rule can read `args[i]` however the caller wrote the call
    (`torch.baddbmm(x, batch1=q, batch2=k)` as BLOOM does). `kwargs` stays valid as well."""
    if not kwargs:
        return args
    try:
        params = _signatures[func]
    except KeyError:
        params = _signatures[func] = _positional_params(func)
    except TypeError:                       # an unhashable callable
        params = _positional_params(func)
    if params is None:
        return args
    last = max((i for i, (n, _) in enumerate(params) if n in kwargs), default=-1)
    out = list(args)
    for n, default in params[len(args):last + 1]:
        if n in kwargs:
            out.append(kwargs[n])
        elif default is not _EMPTY:
            out.append(default)
        else:
            return args
    return tuple(out)
