"""Which module attributes a class's own code passes as sizes to shape-taking calls.

A reshape with a literal size (`x.reshape(n, self.hidden_dim, -1)`) must see the attribute updated after a
cut, but a module often holds other ints with the same value (torchvision's ViT: `image_size == hidden_dim ==
32` at small sizes). Reading the class's source tells which attribute the code actually passes; with no
source (or no match) the caller keeps every candidate."""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import FrozenSet, Optional

SHAPE_CALLS = {"reshape", "view", "expand", "unflatten", "split", "chunk", "repeat", "new_zeros", "new_ones",
               "new_empty", "new_full", "zeros", "ones", "empty", "full", "randn", "rand", "arange", "tile",
               "view_as", "narrow", "tensor_split"}


def _self_attrs(node: ast.AST, aliases) -> set:
    """`self.X` names read in `node`, through local names assigned from them (one level)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
            out.add(n.attr)
        elif isinstance(n, ast.Name) and n.id in aliases:
            out |= aliases[n.id]
    return out


@functools.lru_cache(maxsize=None)
def shape_attrs(cls: type) -> Optional[FrozenSet[str]]:
    """Attributes of `cls` (and its bases up to nn.Module) read in the arguments of shape-taking calls; None
    when no source is available."""
    names, found_source = set(), False
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn"):
            break
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        found_source = True
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            aliases = {}
            for n in ast.walk(fn):
                if isinstance(n, ast.Assign):
                    attrs = _self_attrs(n.value, aliases)
                    for t in n.targets:
                        for name in (x.id for x in ast.walk(t) if isinstance(x, ast.Name)):
                            aliases[name] = aliases.get(name, set()) | attrs
            for n in ast.walk(fn):
                if isinstance(n, ast.Call):
                    f = n.func
                    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                    if called in SHAPE_CALLS:
                        for a in list(n.args) + [k.value for k in n.keywords]:
                            names |= _self_attrs(a, aliases)
    return frozenset(names) if found_source else None
