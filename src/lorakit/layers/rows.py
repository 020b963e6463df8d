"""Mixed-adapter batches: row ``i`` of a batch adds adapter ``names[i]``, as one plan per call.

Which adapter each row uses is one :class:`RowPlan`, built once per call of
``lorakit.adapter_per_row`` and read by every layer; no layer stores anything per call, so building
a plan costs the same for 30 layers as for 3, and a server can change the rows' adapters at every
decoding step. A plan numbers the rows by the model's :class:`SlotTable` (slot 0 the base, slot
``i + 1`` the model's i-th adapter), which is kept while the model's adapters do not change.

The plan in force is per thread (``threading.local``): two threads running forwards on one model
with different plans each get their own rows' results. It is also per model: each adapted model
has its own slot table, shared by its layers, and plans are looked up by that table.

Two ways to add the rows' updates (``MixedRows``):

* grouped, for a few distinct adapters (``GROUPED_MAX_ADAPTERS``) on a linear-like layer: each
  adapter's rows gathered and updated by two plain matmuls from the parameters themselves;
* stacked, otherwise: the layer's adapters stacked in slot order and zero-padded to a common rank
  (padding and absent adapters contribute nothing), each row gathering its own by index, one
  batched matmul per layer (Punica's BGMV, S-LoRA).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import AdapterError, MergeError


class SlotTable:
    """A model's adapters in a fixed order: slot 0 is the base, slot ``i + 1`` adapter ``i``.

    One per adapted model, shared by its layers; renumbered (``version`` moves on) only when the
    model's adapters are added or deleted, so plans and the layers' stacks stay valid meanwhile.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.slots: dict[str, int] = {}
        self.version = 0

    def renumber(self, names: Sequence[str]) -> None:
        if tuple(names) != self.names:
            self.names = tuple(names)
            self.slots = {n: i + 1 for i, n in enumerate(self.names)}
            self.version += 1


class RowPlan:
    """Which adapter each row of a batch uses: slot per row, and the rows of each adapter.

    ``names`` the rows' adapters (None: the base); ``slots`` (rows,) their slots in ``table``;
    ``groups`` (adapter, row indices) per distinct adapter, in order of first use. Device copies
    are made once per plan; the per-layer picks kept for generation live here too and go with
    the plan.
    """

    def __init__(self, table: SlotTable, names: Sequence[str | None]) -> None:
        self.table = table
        self.names = tuple(names)
        slot_of = table.slots
        self.slots = torch.tensor([slot_of.get(n, 0) if n else 0 for n in self.names])
        rows: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            if n is not None:
                rows.setdefault(n, []).append(i)
        self.groups = tuple((n, torch.tensor(ix)) for n, ix in rows.items())
        self.any_adapter = bool(rows)
        #: the row count of each group when the groups are consecutive blocks covering every
        #: row in order (a many-adapter training batch): then a layer splits the batch into
        #: views and joins the results, with no gathered copies (their backward is one cat)
        self.blocks = _blocks(self.names, rows)
        self._on: dict[torch.device, tuple] = {}
        self.picks: dict[int, tuple] = {}  # id(layer) -> (stack A, A per row, B per row)
        #: the plan of the kept tokens while an output head sees only some tokens of every row,
        #: flattened to (tokens, features) (``kept_tokens``); None otherwise
        self.tokens: RowPlan | None = None

    def __len__(self) -> int:
        return len(self.names)

    def for_input(self, x: torch.Tensor) -> RowPlan:
        """The plan whose entries are ``x``'s first axis: the kept tokens' plan when ``x`` is
        (kept tokens, features) inside ``kept_tokens``, else this one (one entry per row)."""
        tokens = self.tokens
        if tokens is not None and x.dim() == 2 and x.shape[0] == len(tokens):
            return tokens
        return self

    def on(self, device: torch.device) -> tuple[torch.Tensor, tuple]:
        """``(slots, groups)`` on ``device``, copied once per plan."""
        moved = self._on.get(device)
        if moved is None:
            if device.type == "cpu":
                moved = self.slots, self.groups
            else:
                groups = tuple((n, ix.to(device)) for n, ix in self.groups)
                moved = self.slots.to(device), groups
            self._on[device] = moved
        return moved


@contextlib.contextmanager
def kept_tokens(table: SlotTable, keep: torch.Tensor) -> Iterator[None]:
    """Within the block, a layer of the model of ``table`` that sees the tokens ``keep`` selects
    ((rows, seq) boolean mask), flattened to (kept tokens, features), gives each token its row's
    adapter: the output head under transformers' boolean ``logits_to_keep``, which projects
    ``hidden[keep]`` only. Without a plan in force for the model this does nothing.

    A 2-D input of exactly that many entries is taken to be those tokens (the output head); one of
    (rows × seq) entries (a layer that flattens every token, as OPT's MLP does) is not, since the
    last position of a row is never kept; inputs with a row axis are unaffected.
    """
    plan = active_plan(table)
    if plan is None:
        yield
        return
    if keep.dim() != 2 or keep.shape[0] != len(plan):
        raise AdapterError(
            f"kept_tokens: a ({len(plan)}, seq) mask was expected for the plan's {len(plan)} "
            f"rows, got shape {tuple(keep.shape)}"
        )
    rows = keep.nonzero()[:, 0].tolist()  # the row of each kept token, in row-major order
    previous, plan.tokens = plan.tokens, RowPlan(table, [plan.names[r] for r in rows])
    try:
        yield
    finally:
        plan.tokens = previous


def _blocks(names: tuple, rows: dict[str, list[int]]) -> tuple[int, ...] | None:
    sizes, start = [], 0
    for ix in rows.values():
        if ix != list(range(start, start + len(ix))):
            return None
        sizes.append(len(ix))
        start += len(ix)
    return tuple(sizes) if start == len(names) else None


def _out_last(b: torch.Tensor) -> torch.Tensor:
    """``b`` (N, out, R) with the same values, stored as (N, R, out): ``b.transpose(1, 2)`` is
    then contiguous, the layout in which a batched ``x A · Bᵀ`` product runs about twice as
    fast on the CPU for small ranks (measured: 8 us against 19 us for 16 rows, r=16, out 576)."""
    return b.transpose(1, 2).contiguous().transpose(1, 2)


_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")
_scale = operator.attrgetter("scale")

_local = threading.local()  # .plans: {id(SlotTable): RowPlan}, the plans in force in this thread


def active_plan(table: SlotTable | None) -> RowPlan | None:
    """The plan in force for the model of ``table`` in this thread, or None."""
    plans = getattr(_local, "plans", None)
    if not plans or table is None:
        return None
    return plans.get(id(table))


@contextlib.contextmanager
def rows_in_force(plan: RowPlan) -> Iterator[RowPlan]:
    """Within the block (and this thread) the plan's model uses the plan."""
    plans = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = {}
    key = id(plan.table)
    previous = plans.get(key)
    plans[key] = plan
    try:
        yield plan
    finally:
        if previous is None:
            del plans[key]
        else:
            plans[key] = previous


def _no_autograd(out: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether autograd records nothing here, so the base output may be updated in place."""
    return not (torch.is_grad_enabled() and (out.requires_grad or a.requires_grad))


class MixedRows:
    """The mixed-batch half of ``LoraLayer`` (see the module docstring)."""

    #: a mixed batch with at most this many distinct adapters is computed group by group (rows
    #: gathered per adapter, two plain matmuls each, one index_add); more adapters use the padded
    #: stack and two batched matmuls. Few groups: no padding, no per-row copies of A and B.
    GROUPED_MAX_ADAPTERS = 4
    #: whether this kind's update is a plain pair of matmuls on the last axis (groupable), and
    #: may see the batch flattened to (rows × tokens, features), as OPT's MLP does
    linear_like = False

    def forward_rows(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        """Mixed batch: each row adds the adapter of its slot."""
        if self.merged_adapters:
            raise MergeError(f"{self._where()}: a mixed-adapter batch needs unmerged adapters")
        plan = plan.for_input(x)
        slots, groups = plan.on(out.device)
        n = len(plan)
        if x.shape[0] != n and not self._flattened_rows(x, n):
            raise AdapterError(
                f"{self._where()}: adapter_per_row was given {n} names but the batch has "
                f"{x.shape[0]} rows"
            )
        if self.disabled or not plan.any_adapter:
            return out
        if x.shape[0] != n:  # (rows × tokens, features): computed as (rows, tokens, features)
            rows_x, rows_out = x.reshape(n, -1, x.shape[-1]), out.reshape(n, -1, out.shape[-1])
            return self.add_rows(rows_x, rows_out, plan, slots, groups).reshape(out.shape)
        return self.add_rows(x, out, plan, slots, groups)

    def _flattened_rows(self, x: torch.Tensor, n: int) -> bool:
        return self.linear_like and x.dim() == 2 and x.shape[0] % n == 0

    def add_rows(self, x, out, plan: RowPlan, slots, groups) -> torch.Tensor:
        """``out`` plus each row's update; x and out have one entry per row on their first axis."""
        if self.linear_like and plan.blocks is not None:
            return self._block_rows(x, out, plan, groups)
        if self.linear_like and len(groups) <= self.GROUPED_MAX_ADAPTERS:
            return self._grouped_rows(x, out, groups)
        records = self.records
        if not any(n in records for n, _ in groups):  # none of the rows' adapters is here
            return out
        table = plan.table
        if self._M:  # DoRA adapters here: each row rescaled by its own adapter's g
            return self._stacked_dora(x, out, plan, slots, groups)
        if self.training and x.is_floating_point() and any(r.dropout for r in records.values()):
            # per-row dropout probabilities: drop with each row's own p
            p = [0.0] + [records[n].dropout if n in records else 0.0 for n in table.names]
            probs = torch.tensor(p, device=x.device)[slots]
            keep = 1.0 - probs.view(-1, *([1] * (x.dim() - 1)))
            mask = torch.rand_like(x, dtype=torch.float32) < keep
            x = x * mask.to(x.dtype) / keep.to(x.dtype)
        if self.linear_like and kernels.wanted(x) and not self._trains_adapters():
            from ..kernels.mixed import add_rows as kernel_rows  # SGMV, adapters unpadded

            return kernel_rows(self, x, out, table, slots)
        a, b = self.stacked(table)
        if a.requires_grad or torch.compiler.is_compiling():  # gathered afresh, differentiable
            return self.rows_forward(x, out, a[slots], b[slots], slots)
        # Inference: each row's A and B are gathered afresh on a plan's first call and freed after
        # it (a single forward keeps no activation-sized copies alive across layers); from the
        # second call on (generation steps) they are kept, in the plan, until the plan ends.
        kept = plan.picks.get(id(self))
        seen = kept is not None and kept[0] is a
        if seen and kept[1] is not None:
            return self.rows_forward(x, out, kept[1], kept[2], slots)
        picks = a[slots], b[slots]
        if seen and self.linear_like:  # kept: B laid out for the batched product's fast path
            picks = picks[0], _out_last(picks[1])
        plan.picks[id(self)] = (a, *picks) if seen else (a, None, None)
        return self.rows_forward(x, out, *picks, slots)

    def _trains_adapters(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._A.values())

    def _block_rows(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan, groups):
        """Each adapter's rows a consecutive block: split into views, updated, joined."""
        records, sizes = self.records, plan.blocks
        if not any(name in records for name, _ in groups):
            return out
        names = [name for name, _ in groups]
        inference = not self._trains_adapters()
        # at inference a few blocks are updated from the parameters themselves (no stack kept)
        batched = not inference or len(names) > self.GROUPED_MAX_ADAPTERS
        if batched and len(set(sizes)) == 1 and self._batched_blocks_fit(names, x, out):
            return self._batched_blocks(x, out, names, plan, inference)
        parts = []
        for (name, _), xs, part in zip(groups, x.split(sizes), out.split(sizes)):
            if name in records:
                part = self._group_update(name, xs, part)
            parts.append(part)
        return torch.cat(parts)

    def _batched_blocks_fit(self, names: list[str], x: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether ``_batched_blocks`` computes these blocks: plain LoRA adapters, no dropout in
        force, one dtype throughout (else each block is updated by itself)."""
        here = [self.records[n] for n in names if n in self.records]
        if any(r.variant is not None or (self.training and r.dropout > 0.0) for r in here):
            return False
        a = next(self._A[n] for n in names if n in self.records)
        return x.dtype == a.dtype == out.dtype

    def _batched_blocks(self, x, out, names: list[str], plan: RowPlan, inference: bool):
        """Equal consecutive blocks, one per adapter (a many-adapter training batch, or a
        decoding step with one row per adapter): all the blocks' updates in one batched matmul
        pair added to the base output by the same call, ``out_k + (x_k A_kᵀ)(s_k B_k)ᵀ`` per
        block k, with no per-block copies and no join.

        The blocks' A and B (adapter-sized, not activation-sized) are zero-padded to a common
        rank (padding adds 0 · 0), each B scaled by its adapter's scale; a block whose adapter
        this layer does not have gets zeros. Training builds them per call (differentiable);
        inference takes them from the layer's cached stack, once per plan."""
        if not inference or torch.compiler.is_compiling():
            a, b = self._block_stack(names)
        else:
            a, b = self._stack_blocks(plan, names)
        k = len(names)
        xa = torch.bmm(x.reshape(k, -1, x.shape[-1]), a.transpose(1, 2))  # (k, tokens, rank)
        if _no_autograd(out, a):  # into the base output itself
            return out.reshape(k, -1, out.shape[-1]).baddbmm_(xa, b.transpose(1, 2)).view(out.shape)
        summed = torch.baddbmm(out.reshape(k, -1, out.shape[-1]), xa, b.transpose(1, 2))
        return summed.view(out.shape)

    def _stack_blocks(self, plan: RowPlan, names: list[str]):
        """The blocks' (A, B) gathered from the cached stack, kept in the plan for its next
        calls (a generation's steps)."""
        a_all, b_all = self.stacked(plan.table)
        kept = plan.picks.get(id(self))
        if kept is not None and kept[0] is a_all:
            return kept[1], kept[2]
        slot_of = plan.table.slots
        index = torch.tensor([slot_of.get(n, 0) for n in names], device=a_all.device)
        picks = a_all[index], _out_last(b_all[index])
        plan.picks[id(self)] = (a_all, *picks)
        return picks

    def _block_stack(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' (A, B) built from the parameters: (k, rank, in), (k, out, rank)."""
        present = [n for n in names if n in self.records]
        rank = max(self._A[n].shape[0] for n in present)
        like_a, like_b = self._A[present[0]], self.effective_B(present[0])
        a_parts, b_parts = [], []
        for n in names:
            if n not in self.records:
                a_parts.append(like_a.new_zeros(rank, like_a.shape[1]))
                b_parts.append(like_b.new_zeros(like_b.shape[0], rank))
                continue
            r = self._A[n].shape[0]
            a_parts.append(F.pad(self._A[n], (0, 0, 0, rank - r)))
            b_parts.append(F.pad(self.effective_B(n) * self.records[n].scale, (0, rank - r)))
        return torch.stack(a_parts), torch.stack(b_parts)

    def _group_update(self, name: str, xs: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """The rows ``xs`` of one adapter: their base output ``part`` plus its update (a DoRA
        adapter's rescaled, layers/dora.py), as a new tensor."""
        record = self.records[name]
        dropped = xs
        if record.dropout > 0.0 and self.training:
            dropped = F.dropout(xs, record.dropout, True)
        a = self._A[name]
        delta = F.linear(F.linear(dropped.to(a.dtype), a), self.effective_B(name))
        # mixed precision: the sum formed in the adapter's dtype and rounded once
        summed = part.to(delta.dtype) + delta * record.scale
        if record.variant is None:
            return summed.to(part.dtype)
        g, c = self.dora_factors(name)
        summed = summed * g if c is None else summed * g + c
        if dropped is not xs:
            summed = summed + (g - 1.0) * self._linear_only(dropped - xs).to(g.dtype)
        return summed.to(part.dtype)

    def _grouped_rows(self, x: torch.Tensor, out: torch.Tensor, groups) -> torch.Tensor:
        """Few adapters: each adapter's rows gathered, updated by plain matmuls."""
        rows, deltas, replaced = [], [], []
        params_a, records = self._A, self.records
        for name, index in groups:
            if name not in records:  # an adapter this layer does not have adds nothing
                continue
            record = records[name]
            if record.variant is not None:  # DoRA rows: their whole output, copied in below
                new = self._group_update(name, x.index_select(0, index), out.index_select(0, index))
                replaced.append((index, new))
                continue
            xs = x.index_select(0, index)
            if record.dropout > 0.0 and self.training:
                xs = F.dropout(xs, record.dropout, True)
            a = params_a[name]
            b = self.effective_B(name)
            deltas.append(F.linear(F.linear(xs.to(a.dtype), a), b) * record.scale)
            rows.append(index)
        for index, new in replaced:  # the groups' rows are disjoint
            out = out.index_copy(0, index, new)
        if not rows:
            return out
        index = rows[0] if len(rows) == 1 else torch.cat(rows)
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        if delta.dtype == out.dtype:
            return out.index_add(0, index, delta)
        # mixed precision: each row's sum formed in the adapter's dtype and rounded once, as the
        # one-adapter path does (every row sits in one group, so the index has no repeats)
        summed = out.index_select(0, index).to(delta.dtype) + delta
        return out.index_copy(0, index, summed.to(out.dtype))

    def _stacked_dora(self, x, out, plan: RowPlan, slots, groups) -> torch.Tensor:
        """The stacked path with DoRA adapters among the rows': the plain rows' updates by the
        stack (DoRA slots zeroed in it), then each DoRA adapter's rows as a group."""
        plain = [(n, ix) for n, ix in groups if self.records.get(n, None) and n not in self._M]
        dora = [(n, ix) for n, ix in groups if n in self._M]
        if self.training and any(self.records[n].dropout for n, _ in plain):
            dora, plain = dora + plain, []  # per-row dropout: every adapter as its own group
        if plain:
            keep = torch.tensor([0] + [n not in self._M for n in plan.table.names])
            masked = slots * keep.to(slots.device)[slots]  # DoRA rows -> slot 0 (nothing)
            out = self._stacked_plain(x, out, plan.table, masked)
        for name, index in dora:
            new = self._group_update(name, x.index_select(0, index), out.index_select(0, index))
            out = out.index_copy(0, index, new)
        return out

    def _stacked_plain(self, x, out, table: SlotTable, slots) -> torch.Tensor:
        a, b = self.stacked(table)
        return self.rows_forward(x, out, a[slots], b[slots], slots)

    def stacked(self, table: SlotTable) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's adapters stacked in the table's slot order, zero-padded to a common rank.

        Returns ``A`` (n + 1, R, *a_rest) and ``B`` (n + 1, out, R) with each adapter's scale
        folded into its B; slot 0 and the slots of adapters this layer does not have are zero.
        Built from the parameters (differentiable), so the same stack serves inference and
        training several adapters at once.
        """
        params = [*self._A.values(), *self._B.values()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_stack(table.names)  # training: differentiable, built every call
        if torch.compiler.is_compiling():
            return self._build_stack(table.names)
        # Inference: reuse the stack while no adapter tensor changed (same object, storage and
        # in-place version), the scales are the same and the table has the same order.
        key = (  # map over C-level getters: this runs at every call of every layer
            table.names,
            tuple(map(id, params)),
            tuple(map(_data_ptr, params)),
            tuple(map(_version, params)),
            tuple(map(_scale, self.records.values())),
        )
        cached = self._stack_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            stack = self._build_stack(table.names)
        self._stack_cache = (key, stack)
        return stack

    def _build_stack(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        here = [n for n in names if n in self.records]
        rank = max(self._A[n].shape[0] for n in here)
        a0, b0 = self._A[here[0]], self.effective_B(here[0])
        zero_a = a0.new_zeros((rank, *a0.shape[1:]))
        zero_b = b0.new_zeros((b0.shape[0], rank, *b0.shape[2:]))
        a_list, b_list = [zero_a], [zero_b]
        for n in names:
            if n not in self.records:
                a_list.append(zero_a)
                b_list.append(zero_b)
                continue
            a, b = self._A[n], self.effective_B(n) * self.records[n].scale
            pad = rank - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))], 0)
                b = torch.cat([b, b.new_zeros((b.shape[0], pad, *b.shape[2:]))], 1)
            a_list.append(a)
            b_list.append(b)
        return torch.stack(a_list), torch.stack(b_list)

    def rows_forward(
        self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots
    ) -> torch.Tensor:
        """``out[i] + B_i A_i x[i]`` per row for linear-like layers; a (N, R, in), b (N, out, R)."""
        n = x.shape[0]
        xs = x.reshape(n, -1, x.shape[-1]).to(a.dtype)  # (N, tokens, in)
        xa = torch.bmm(xs, a.transpose(1, 2))  # (N, tokens, R)
        flat = out.reshape(n, -1, out.shape[-1])
        if flat.dtype == xa.dtype:  # the add fused into the batched GEMM: out is read once
            if _no_autograd(out, a):  # into the base output itself: no new (N, tokens, out)
                return flat.baddbmm_(xa, b.transpose(1, 2)).view(out.shape)
            return torch.baddbmm(flat, xa, b.transpose(1, 2)).view(out.shape)
        delta = torch.bmm(xa, b.transpose(1, 2))  # (N, tokens, out)
        # mixed precision: the sum formed in the adapter's dtype and rounded once into out's
        if _no_autograd(out, a):
            return flat.add_(delta).view(out.shape)
        return (flat + delta).to(out.dtype).view(out.shape)
