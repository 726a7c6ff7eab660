"""From a trace's id graph to pruning groups.

A *unit* is one connected component of ids: the parameter slices that must go together (output channel c
of a conv + its BN entries + input column c of every consumer + every tensor added to it on a residual).
A *group* gathers the units that touch the same set of parameter dims (all channels of one coupled layer
set), so a score and a keep-count are decided per group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from prunekit.graph.tracer import Trace, trace


@dataclass
class Member:
    """One parameter dim inside a group: positions along `dim` and the unit each position belongs to."""
    name: str
    dim: int
    is_buffer: bool
    pos: torch.Tensor   # (P,) indices along `dim`
    unit: torch.Tensor  # (P,) unit index in the group


@dataclass
class Group:
    index: int
    n_units: int
    members: List[Member]
    exact: bool = True          # False when a norm's statistics span these channels (LayerNorm/GroupNorm)
    norms: List[str] = field(default_factory=list)   # modules taking those statistics ('' = top level)
    unit_size: int = 1          # positions per unit on the first weight member (e.g. head_dim for heads)
    comps: Optional[np.ndarray] = None   # component label of each unit

    producers: List[str] = field(default_factory=list)   # modules whose outputs these channels are

    @property
    def modules(self) -> List[str]:
        return sorted({m.name.rpartition(".")[0] for m in self.members})

    def describe(self) -> str:
        names = ", ".join(f"{m.name}[{m.dim}]" for m in self.members[:6])
        more = f" +{len(self.members) - 6}" if len(self.members) > 6 else ""
        return f"group {self.index}: {self.n_units} units x {self.unit_size}: {names}{more}"


def enforce_rectangular(tr: Trace):
    """A channel dim split by a reshape into a grid (heads x head_dim, shuffle groups x channels) must stay a
    product: the kept set is K_a x everything along one axis a. Where the coupling found so far does not
    already make every slab along some axis one unit, merge the slabs along the longest axis."""
    if not tr.grids:
        return
    labels = tr.space.components()
    for g in tr.grids:
        ids = g.numpy()
        comp = np.where(ids >= 0, labels[np.where(ids >= 0, ids, 0)], -1)
        k = comp.ndim
        consistent = []
        for a in range(k):
            moved = np.moveaxis(comp, a, 0).reshape(comp.shape[a], -1)
            ok = all(len(set(row[row >= 0].tolist())) <= 1 for row in moved)
            if ok:
                consistent.append(a)
        if consistent:
            continue
        a = int(np.argmax(comp.shape))
        slabs = g.movedim(a, 0).reshape(g.shape[a], -1)
        tr.space.union(slabs[:, :1].expand_as(slabs), slabs)


class DependencyGraph:
    """Groups of coupled parameter slices of `model`, found by running it on `example_inputs`."""

    def __init__(self, model: nn.Module, example_inputs, ignore: Sequence[str] = (), gqa: str = "groups",
                 uniform_scalars: bool = True):
        self.model = model
        self.trace: Trace = trace(model, example_inputs, ignore=ignore, gqa=gqa, uniform_scalars=uniform_scalars)
        self.params = dict(model.named_parameters(remove_duplicate=True))
        self.buffers = dict(model.named_buffers(remove_duplicate=True))
        self._build()

    def _build(self):
        tr = self.trace
        enforce_rectangular(tr)
        labels = tr.space.components()
        self.comp_of_id = labels
        pin = labels[0]
        slot_of, pos_of, comp_of = [], [], []
        for s, slot in enumerate(tr.slots):
            n = slot.ids.numel()
            slot_of.append(np.full(n, s, dtype=np.int64))
            pos_of.append(np.arange(n, dtype=np.int64))
            comp_of.append(labels[slot.ids.numpy()])
        slot_of = np.concatenate(slot_of) if slot_of else np.zeros(0, np.int64)
        pos_of = np.concatenate(pos_of) if pos_of else np.zeros(0, np.int64)
        comp_of = np.concatenate(comp_of) if comp_of else np.zeros(0, np.int64)
        free = comp_of != pin
        slot_of, pos_of, comp_of = slot_of[free], pos_of[free], comp_of[free]
        order = np.lexsort((pos_of, slot_of, comp_of))
        slot_of, pos_of, comp_of = slot_of[order], pos_of[order], comp_of[order]
        bounds = np.flatnonzero(np.diff(comp_of)) + 1
        starts = np.concatenate([[0], bounds]) if len(comp_of) else np.zeros(0, np.int64)
        ends = np.concatenate([bounds, [len(comp_of)]]) if len(comp_of) else np.zeros(0, np.int64)
        norms_of_comp: Dict[int, set] = {}      # component -> modules taking a statistic over it
        for ids, mod in zip(tr.stat_ids, tr.stat_modules):
            for c in np.unique(labels[ids[ids >= 0].numpy()]).tolist():
                norms_of_comp.setdefault(c, set()).add(mod)
        n_all = len(starts)
        counts = ends - starts
        elem_unit = np.repeat(np.arange(n_all), counts)
        # distinct slots of each unit (elements are sorted by slot within a unit)
        first = np.ones(len(slot_of), dtype=bool)
        if len(slot_of):
            first[1:] = (slot_of[1:] != slot_of[:-1]) | (elem_unit[1:] != elem_unit[:-1])
        u_first, s_first = elem_unit[first], slot_of[first]
        cuts = np.flatnonzero(np.diff(u_first)) + 1
        sig_of_unit = dict(zip(u_first[np.concatenate([[0], cuts])].tolist() if len(u_first) else [],
                               [tuple(x.tolist()) for x in np.split(s_first, cuts)] if len(u_first) else []))
        by_sig: Dict[Tuple, List[int]] = {}
        for u in range(n_all):
            if counts[u] < 2:
                continue   # an id no op ever coupled to anything: not a channel any rule understood
            by_sig.setdefault(sig_of_unit[u], []).append(u)
        # group id and local unit index of every element, then one sort gives every member's positions
        gid = np.full(n_all, -1, dtype=np.int64)
        local = np.zeros(n_all, dtype=np.int64)
        sigs = [(sig, units) for sig, units in by_sig.items() if len(units) >= 2]
        for g_i, (sig, units) in enumerate(sigs):
            gid[units] = g_i
            local[units] = np.arange(len(units))
        e_gid, e_local = gid[elem_unit], local[elem_unit]
        keep = e_gid >= 0
        e_gid, e_local, e_slot, e_pos = e_gid[keep], e_local[keep], slot_of[keep], pos_of[keep]
        order = np.lexsort((e_pos, e_local, e_slot, e_gid))
        e_gid, e_local, e_slot, e_pos = e_gid[order], e_local[order], e_slot[order], e_pos[order]
        key_cuts = np.flatnonzero((np.diff(e_gid) != 0) | (np.diff(e_slot) != 0)) + 1
        seg_start = np.concatenate([[0], key_cuts]) if len(e_gid) else np.zeros(0, np.int64)
        seg_end = np.concatenate([key_cuts, [len(e_gid)]]) if len(e_gid) else np.zeros(0, np.int64)
        members_of: Dict[int, List[Member]] = {}
        for a, b in zip(seg_start, seg_end):
            slot = tr.slots[int(e_slot[a])]
            members_of.setdefault(int(e_gid[a]), []).append(
                Member(slot.name, slot.dim, slot.is_buffer, torch.from_numpy(e_pos[a:b].copy()),
                       torch.from_numpy(e_local[a:b].copy())))
        self.groups: List[Group] = []
        for g_i, (sig, units) in enumerate(sigs):
            members = members_of[g_i]
            comps = np.array([comp_of[starts[u]] for u in units])
            producers = sorted({m.name.rpartition(".")[0] for m in members if not m.is_buffer
                                and not self.is_consumer(m)})
            norms = sorted(set().union(*[norms_of_comp.get(c, set()) for c in set(comps.tolist())]))
            g = Group(len(self.groups), len(units), members, exact=not norms, norms=norms, comps=comps,
                      producers=producers)
            w = [m for m in members if not m.is_buffer and self._tensor(m.name).dim() >= 2] or members
            g.unit_size = int(w[0].pos.numel() // len(units))
            self.groups.append(g)
        self.pin_comp = pin

    def is_consumer(self, member: Member) -> bool:
        """True for the input side of a Linear/Conv weight: zeroing it does not silence the channel."""
        mod_name, _, attr = member.name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        if attr == "weight" and isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            return member.dim == (0 if getattr(mod, "transposed", False) else 1)
        return False

    def _tensor(self, name) -> torch.Tensor:
        return self.params[name] if name in self.params else self.buffers[name]

    # ---------------------------------------------------------------- resource model
    def removed_comps(self, removed: Dict[int, torch.Tensor]) -> np.ndarray:
        """Boolean per component: removed by `removed` (group index -> bool mask over units)."""
        flag = np.zeros(int(self.comp_of_id.max()) + 1 if len(self.comp_of_id) else 1, dtype=bool)
        for gi, mask in removed.items():
            g = self.groups[gi]
            flag[g.comps[mask.numpy().astype(bool)]] = True
        return flag

    def _kept_fraction(self, ids: torch.Tensor, flag: np.ndarray) -> float:
        """Fraction of positions that survive; `ids` is (positions,) or (positions, elements per position)."""
        if ids.numel() == 0:
            return 1.0
        a = ids.numpy()
        a2 = a.reshape(a.shape[0], -1)
        alive = ~flag[self.comp_of_id[np.where(a2 >= 0, a2, 0)]] | (a2 < 0)
        return float(alive.any(1).mean())

    def macs(self, removed: Optional[Dict[int, torch.Tensor]] = None) -> int:
        flag = self.removed_comps(removed or {})
        total = 0.0
        for c in self.trace.costs:
            f = 1.0
            for ids in c.factors:
                f *= self._kept_fraction(ids, flag)
            total += c.base * f
        return int(round(total))

    def param_count(self, removed: Optional[Dict[int, torch.Tensor]] = None) -> int:
        flag = self.removed_comps(removed or {})
        per: Dict[str, float] = {}
        for slot in self.trace.slots:
            if slot.is_buffer:
                continue
            per.setdefault(slot.name, 1.0)
            per[slot.name] *= self._kept_fraction(slot.ids, flag)
        return int(round(sum(self.params[n].numel() * f for n, f in per.items() if n in self.params)))

    def kept_indices(self, removed: Dict[int, torch.Tensor]) -> Dict[str, Dict[int, List[int]]]:
        """{param_or_buffer_name: {dim: kept indices}} for every dim that loses something."""
        drop: Dict[Tuple[str, int], List[torch.Tensor]] = {}
        for gi, mask in removed.items():
            g = self.groups[gi]
            for m in g.members:
                gone = m.pos[mask[m.unit]]
                if gone.numel():
                    drop.setdefault((m.name, m.dim), []).append(gone)
        out: Dict[str, Dict[int, List[int]]] = {}
        for (name, dim), parts in drop.items():
            size = self._tensor(name).shape[dim]
            keep = torch.ones(size, dtype=torch.bool)
            keep[torch.cat(parts)] = False
            out.setdefault(name, {})[dim] = torch.nonzero(keep).flatten().tolist()
        return out

    def summary(self) -> str:
        return "\n".join(g.describe() for g in self.groups)
