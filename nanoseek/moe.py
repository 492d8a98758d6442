"""DeepSeekMoE routing and token dispatch (V3 paper 2.1.2), shared by the training model and the inference engine.

- `select_experts`: the V3 gate's choice: sigmoid affinities, a bias that steers selection only, group-limited top-k.
- `dispatch`: sort the N*K (token, expert) pairs by expert, run every expert on its rows, scale each row by its
  routing weight and add it back to its token.
- `grouped_swiglu` / `looped_swiglu`: the routed experts' SwiGLU on rows grouped by expert: one F.grouped_mm per
  projection for 3-D expert stacks, or a loop over per-expert weights (any weight type with a linear function: the
  engine's quantised experts, or devices without grouped_mm).

Shapes: N tokens, K experts per token, E routed experts, D hidden, I expert width, R = N*K rows sorted by expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig


def select_experts(scores: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N,E] sigmoid affinities (fp32) -> routing weights [N,K], expert indices [N,K].

    The bias only picks experts (group scores = sum of each group's top-2 biased scores; keep topk_group groups;
    top-K experts among them); the weights are the unbiased scores, normalised and scaled.
    """
    s_sel = scores.detach() + bias
    if cfg.n_group > 1:
        n = s_sel.shape[0]
        grouped = s_sel.view(n, cfg.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N,n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
        s_sel = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(n, -1)
    indices = s_sel.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


def grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether F.grouped_mm's CPU kernel (torch >= 2.10) takes these operands: every base address and every
    non-unit stride must be a multiple of 16 bytes (it rejects e.g. rows of 10 fp32 values)."""
    if not hasattr(F, "grouped_mm"):
        return False
    return all(t.device.type == "cpu" and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1) for t in tensors)


def dispatch(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, n_experts: int,
             experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts for x [N,D]: experts(xs [R,D] sorted by expert, counts [E] rows per expert) -> ys [R,D].

    The rows go to the experts in `dtype` (default x's: the training model passes autocast's, as grouped_mm is not
    autocast-aware). Each output row is scaled by its routing weight (weights [N,K], cast to x's dtype) and added to
    its token's row of `out` (default zeros like x; the engine passes its shared-expert output to save an add).
    """
    k = indices.shape[1]
    flat = indices.flatten()  # [R]
    order = flat.argsort(stable=True)
    token_of = order // k  # source token of each sorted pair
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    xs = x.to(dtype or x.dtype).index_select(0, token_of)  # index_select: its backward is a fast index_add_
    ys = experts(xs, counts) * weights.flatten()[order, None].to(x.dtype)
    out = torch.zeros_like(x) if out is None else out
    return out.index_add_(0, token_of, ys.to(out.dtype))


def grouped_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                   ) -> torch.Tensor:
    """SwiGLU of rows xs [R,D] grouped by expert with stacked weights gate_up [E,2I,D] (gate rows, then up rows) and
    down [E,D,I]: one F.grouped_mm per projection when its kernel takes the operands (~1.5x faster forward+backward
    than a loop of F.linear on CPU, and the weight gradient is written once into [E,...]), else the loop."""
    if grouped_mm_ok(xs, gate_up, down):
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        gate, up = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [R, D]
    # unbind: one cheap stack in backward, instead of an index-backward copy of the whole stack per expert
    return looped_swiglu(xs, counts, gate_up.unbind(0), down.unbind(0))


def looped_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate_up: Sequence[Any], down: Sequence[Any],
                  linear: Callable[[torch.Tensor, Any], torch.Tensor] = F.linear) -> torch.Tensor:
    """SwiGLU of rows xs [R,D] grouped by expert, one matmul pair per expert that has rows: gate_up[e] [2I,D] and
    down[e] [D,I] are any weights `linear(x, w)` takes (tensors, or the engine's quantised weights)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
            outs.append(linear(F.silu(gate) * up, down[e]))
            start += n
    return torch.cat(outs)
