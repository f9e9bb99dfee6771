"""Weights prepared once for the CPU GEMM (issue 30, item 3 "an efficient step").

:func:`prepare_linears` replaces the ``nn.Linear`` modules of a span's layers (any family) by
:class:`PreparedLinear`, its weight packed once for one of two GEMMs (:class:`_Gemm`):

- **panels** (fp32, where the fused CPU kernels are built: :func:`~.cpu_kernels.cpu_kernels`): the
  weight in panels of 32 output columns, multiplied by the kernels' ``panel_linear`` (:class:`_Panels`),
  which streams each panel once for up to 12 rows. A decode iteration's few rows then cost about what
  reading the weights costs, with one copy for every row count, and a row's output does not depend on
  the other rows of its batch, bit for bit. This machine, one thread, SmolLM2's GEMMs ×30 of distinct
  weights, medians of five interleaved: 22.5 ms against oneDNN's 30.1 at one row, 22.2 against 39.7 at
  8, 39.9 against 48.9 at 16, 136 against 143 at 64 (a prefill chunk).
- **oneDNN** (bf16 where this CPU supports it; fp32 without the kernels, or with ``kernels=False``):
  the weight reordered into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the
  packing ``torch.compile``'s freezing uses on CPU) and multiplied by
  ``torch.ops.mkldnn._linear_pointwise`` (:class:`_OneDnn`). Measured on this 2-core machine, one
  thread, B decode rows: SmolLM2's seven GEMMs per layer ×30 take 1.1x less time than ``F.linear`` at
  B = 1 and 1.6–1.8x less at B = 4..16 (merging adds 5–10 %); its output within 4e-6 of the plain
  span's (relative to its scale). A lone row and two or three rows take the paths described below.

Sibling linears of one module reading the same input (q/k/v, gate/up: whichever the family's forward
feeds one tensor) are merged into one GEMM. Which siblings those are is *learnt*, not named: the
linears of one module with the same input width start as plain ``F.linear`` and note the tensor each
reads; when one of them is called a second time (the next forward), those that read one tensor object
share one packed weight (their rows concatenated), the first of them called on an input computes
all their outputs and the others return their slice (:class:`_Merged`); the rest are packed alone.

On oneDNN's path, a lone row (one token of one session: a decode at batch 1) multiplies an fp32 weight
kept a second time, transposed to ``[in, out]`` (:meth:`_OneDnn.lone_row`, a non-persistent buffer):
that GEMV beats the reordered GEMM at one row, which wins from two rows on (issue 30; this machine, one
thread, SmolLM2's GEMMs ×30: 30 ms against 35 at one row, 44 against 49 (transposed) at two). The price
is a second copy of each prepared fp32 weight (SmolLM2's 30 blocks: ~350 MB more resident). Two or three rows are padded
with zero rows to :data:`MIN_ROWS`: oneDNN's GEMM on the reordered weight is slow at one or two rows and
fast from three, and a row's output is the same bits padded or not (issue 30; this machine, one thread,
SmolLM2's GEMMs ×30, medians of 11 interleaved: two rows 36.4 ms, padded to four 25.8, transposed 38.9;
one row 30.0, padded 25.5, transposed 26.7 there, yet whole 30-block iterations at one row took a median
45.3 ms padded against 41.5 on the transposed copy, five alternating processes, so one row keeps it).

Only fp32 and bf16 (as above), with plain tensors as weights: CUDA, fp16, torchao's int8 tensors,
subclasses of ``nn.Linear`` (their own ``forward``, e.g. Falcon's), tied weights (:func:`prepare_alone`
prepares one on a copy: the orchestrator's LM head) and every other module are left as they are.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from chainserve.runtime.backends.cpu_kernels import cpu_kernels

#: Two or three rows are padded up to this many for the reordered GEMM (one row has its transposed copy).
MIN_ROWS = 4

__all__ = ["MIN_ROWS", "PreparedLinear", "prepare_alone", "prepare_linears", "merged_output", "prepared_dtypes"]


def prepared_dtypes(kernels: bool = True) -> frozenset[torch.dtype]:
    """The dtypes whose CPU GEMMs run on prepared weights here: oneDNN's (none without it in this build
    of torch), and fp32 wherever the panel kernel is built (``kernels``)."""
    panels = {torch.float32} if kernels and cpu_kernels() is not None else set()
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return frozenset(panels)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return frozenset({torch.float32, torch.bfloat16} if bf16 else {torch.float32}) | panels


def prepare_linears(layers: nn.Module, kernels: bool = True) -> int:
    """Replace each eligible ``nn.Linear`` under ``layers`` by a :class:`PreparedLinear` (in place; fp32
    on panels where ``kernels`` and they are built); returns how many were replaced. Eligible: on the CPU,
    a plain tensor weight in one of :func:`prepared_dtypes`, held by no other module in ``layers`` (a
    tied weight is left alone)."""
    dtypes = prepared_dtypes(kernels)
    uses = Counter(id(p) for _, p in layers.named_parameters(remove_duplicate=False))
    replaced = 0
    for parent in list(layers.modules()):
        siblings: defaultdict[tuple, list[tuple[str, nn.Linear]]] = defaultdict(list)
        for name, child in parent.named_children():
            if _can_prepare(child, dtypes) and uses[id(child.weight)] == 1:
                siblings[(child.in_features, child.weight.dtype)].append((name, child))
        for found in siblings.values():
            group = _Siblings() if len(found) > 1 else None
            for name, linear in found:
                setattr(parent, name, PreparedLinear(linear, group, _gemm_for(linear.weight.dtype, kernels)))
                replaced += 1
    return replaced


def prepare_alone(linear: nn.Module, kernels: bool = True) -> nn.Module:
    """``linear`` as a :class:`PreparedLinear` of its own (no siblings), or ``linear`` itself where it
    cannot be prepared. Its weight is packed into a new tensor: a tied one (an LM head sharing the
    input embedding, issue 30) stays as it is for the module it is tied to."""
    if not _can_prepare(linear, prepared_dtypes(kernels)):
        return linear
    return PreparedLinear(linear, None, _gemm_for(linear.weight.dtype, kernels))


def merged_output(linears: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor | None:
    """``linears``' outputs on ``x`` side by side, from their merged GEMM run once, where they are
    exactly its members in its order (no per-member bookkeeping, no copies: :mod:`.lean`, issue 30);
    else ``None``."""
    merged = getattr(linears[0], "merged", None)
    if merged is None or [merged.index.get(id(m)) for m in linears] != list(range(len(merged.sizes))):
        return None
    return merged.gemm(x, merged.weight, merged.lone_row, merged.bias, merged.out_features)


def _can_prepare(module: nn.Module, dtypes: frozenset[torch.dtype]) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and type(weight.data) is torch.Tensor
        and weight.device.type == "cpu"
        and weight.dtype in dtypes
    )


class PreparedLinear(nn.Module):
    """``y = x Wᵀ + b`` of one former ``nn.Linear`` on a weight prepared by ``gemm`` (oneDNN's layout or
    panels), alone or as a slice of its siblings' merged GEMM (see the module's docstring). Its weights
    stay parameters (the merged ones those of the shared :class:`_Merged`), so the span's parameters
    count the model's weights once (padded to whole panels; the lone-row copy is a buffer)."""

    def __init__(self, linear: nn.Linear, siblings: _Siblings | None, gemm: _Gemm):
        super().__init__()
        self.in_features, self.out_features, self.gemm = linear.in_features, linear.out_features, gemm
        self.siblings, self.packed, self.merged = siblings, siblings is None, None
        self.weight = gemm.pack(linear.weight) if self.packed else linear.weight
        self.bias = linear.bias
        self.register_buffer("lone_row", gemm.lone_row(linear.weight) if self.packed else None, persistent=False)
        if siblings is not None:
            siblings.members.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return self.merged.run(self, x)
        if self.packed:
            return self.gemm(x, self.weight, self.lone_row, self.bias, self.out_features)
        if self.siblings.note(self, x):
            return self(x)
        return F.linear(x, self.weight, self.bias)

    @property
    def mode(self) -> str:
        """``learning`` (its siblings not yet known), ``merged`` (a slice of a merged GEMM) or ``packed`` (alone)."""
        return "merged" if self.merged is not None else "packed" if self.packed else "learning"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


class _Siblings:
    """The linears of one module with one input width, while it is learnt which read the same tensor."""

    def __init__(self):
        self.members: list[PreparedLinear] = []
        self.inputs: dict[int, torch.Tensor] = {}  # member index → the tensor it read first

    def note(self, member: PreparedLinear, x: torch.Tensor) -> bool:
        """Note ``member``'s input; on a member's second call merge, reorder, and return True."""
        index = self.members.index(member)
        if index not in self.inputs:
            self.inputs[index] = x
            return False
        readers: defaultdict[int, list[PreparedLinear]] = defaultdict(list)
        for i, seen in self.inputs.items():
            readers[id(seen)].append(self.members[i])  # ids are unique: ``inputs`` holds the tensors
        alone = [m for i, m in enumerate(self.members) if i not in self.inputs]
        for group in readers.values():
            if len(group) > 1:
                _Merged(group)
            else:
                alone += group
        for m in alone:
            m.lone_row = m.gemm.lone_row(m.weight)
            m.weight, m.packed = m.gemm.pack(m.weight), True
        for m in self.members:
            m.siblings = None
        self.inputs.clear()
        return True


class _Merged(nn.Module):
    """One GEMM for sibling linears that read the same input (their weights' rows concatenated): the
    first called on a tensor computes every member's output; each member takes its slice until all
    have (then the outputs are dropped)."""

    def __init__(self, members: list[PreparedLinear]):
        super().__init__()
        weights, biases = [m.weight for m in members], [m.bias for m in members]
        bias = None
        if any(b is not None for b in biases):
            zeros = [w.new_zeros(w.shape[0]) for w in weights]
            bias = nn.Parameter(torch.cat([z if b is None else b for z, b in zip(zeros, biases, strict=True)]), False)
        merged, self.gemm = torch.cat(weights), members[0].gemm
        self.weight, self.bias = self.gemm.pack(merged), bias
        self.register_buffer("lone_row", self.gemm.lone_row(merged), persistent=False)
        self.sizes = [w.shape[0] for w in weights]
        self.out_features = merged.shape[0]
        self.index = {id(m): i for i, m in enumerate(members)}
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = []
        for m in members:
            del m.weight, m.bias
            m.merged = self

    def run(self, member: PreparedLinear, x: torch.Tensor) -> torch.Tensor:
        i = self.index[id(member)]
        if x is not self.input or self.outputs[i] is None:
            y = self.gemm(x, self.weight, self.lone_row, self.bias, self.out_features)
            self.input, self.outputs = x, [part.contiguous() for part in y.split(self.sizes, dim=-1)]
        out, self.outputs[i] = self.outputs[i], None
        if all(o is None for o in self.outputs):
            self.input, self.outputs = None, []
        return out


class _Gemm:
    """How a prepared weight is stored (``pack``, ``lone_row``: an optional second copy) and multiplied."""

    def pack(self, weight: torch.Tensor) -> nn.Parameter:
        raise NotImplementedError

    def lone_row(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(
        self, x: torch.Tensor, packed: torch.Tensor, lone_row: torch.Tensor | None, bias: torch.Tensor | None, out: int
    ) -> torch.Tensor:
        raise NotImplementedError


class _OneDnn(_Gemm):
    """oneDNN's reordered weight, and for fp32 a transposed copy for a lone row (module docstring)."""

    def pack(self, weight: torch.Tensor) -> nn.Parameter:
        with torch.no_grad():
            return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()), False)

    def lone_row(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``[in, out]``, contiguous, for an fp32 weight (measured only there); ``None`` for other dtypes."""
        if weight.dtype != torch.float32:
            return None
        with torch.no_grad():
            return weight.detach().t().contiguous()

    def __call__(self, x, packed, lone_row, bias, out):
        """``x Wᵀ + b``: on the transposed copy for a lone row where there is one, else on the reordered
        weight, fewer than :data:`MIN_ROWS` rows padded with zeros up to it."""
        width = x.shape[-1]
        rows = x.numel() // width
        if lone_row is not None and rows == 1:
            y = x @ lone_row
            return y if bias is None else y.add_(bias)
        if rows >= MIN_ROWS or rows == 0:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        padded = F.pad(x.reshape(rows, width), (0, 0, 0, MIN_ROWS - rows))
        y = torch.ops.mkldnn._linear_pointwise(padded, packed, bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], -1)


class _Panels(_Gemm):
    """fp32 in panels of 32 output columns, multiplied by the fused kernels' ``panel_linear``."""

    def __init__(self, kernels):
        self.kernels = kernels

    def pack(self, weight: torch.Tensor) -> nn.Parameter:
        with torch.no_grad():
            return nn.Parameter(self.kernels.pack_panels(weight.detach()), False)

    def __call__(self, x, packed, lone_row, bias, out):
        return self.kernels.panel_linear(x, packed, out, bias)


def _gemm_for(dtype: torch.dtype, kernels: bool) -> _Gemm:
    built = cpu_kernels() if kernels and dtype == torch.float32 else None
    return _ONEDNN if built is None else _Panels(built)


_ONEDNN = _OneDnn()
