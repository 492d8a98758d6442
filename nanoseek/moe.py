"""DeepSeekMoE routing and token dispatch (V3 paper 2.1.2), shared by the training model and the inference engine.

- `select_experts`: the V3 gate's choice: sigmoid affinities, a bias that steers selection only, group-limited top-k.
- `dispatch`: sort the N*K (token, expert) pairs by expert, run every expert on its rows, scale each row by its
  routing weight and add it back to its token.
- `grouped_swiglu` / `looped_swiglu`: the routed experts' SwiGLU on rows grouped by expert: one F.grouped_mm per
  projection for 3-D expert stacks, or a loop over per-expert weights (any weight type with a linear function: the
  engine's quantised experts, or devices without grouped_mm).
- `gathered_swiglu`: every (token, expert) pair with its own expert's weights gathered, one batched matmul: no
  data-dependent shapes, for torch.compile and for a few tokens on an accelerator without grouped_mm.

Host syncs: on CUDA nothing in the routing, the counting or grouped_swiglu's F.grouped_mm (bf16, compute capability
9.x/10.x: torch's CUTLASS kernel) reads a value back to the host, so a layer's kernels queue without waiting for the
GPU. The counts are a scatter-add, not torch.bincount (which reads the largest index to the host to size its output),
and grouped_mm's offsets are their cumulative sum on the device. Only looped_swiglu reads the counts to the host (one
sync per layer): the CPU's path for few experts and quantised weights, and the accelerator's fallback where
grouped_mm has no fused kernel (docs/gpu.md).

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


def expert_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Rows routed to each expert [E] (int64) for the expert index of each row flat [R]: a scatter-add into E
    zeros, which stays on the device (torch.bincount on CUDA reads the largest index to the host first)."""
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _aligned(t: torch.Tensor) -> bool:
    """Every base address and every non-unit stride a multiple of 16 bytes, as grouped_mm's kernels require (they
    reject e.g. rows of 10 fp32 values)."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)


def grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes these operands with a kernel of its own, without a host sync.

    CPU (torch >= 2.10): any float dtype, 16-byte aligned. CUDA: bf16 on compute capability 9.x or 10.x (H100, H200,
    B200: torch's CUTLASS grouped GEMM, offsets read on the device), 16-byte aligned; on other GPUs torch runs a loop
    of matmuls after copying the offsets to the host, so the callers take their own paths there. `meta` tensors
    (the tests' stand-in for an accelerator: any read back to the host fails on them) follow the CUDA rule without
    the capability check."""
    if not hasattr(F, "grouped_mm") or not tensors:
        return False
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return False
    if device.type == "cpu":
        return all(_aligned(t) for t in tensors)
    if device.type not in ("cuda", "meta") or any(t.dtype != torch.bfloat16 for t in tensors):
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    return device.type == "meta" or all(_aligned(t) for t in tensors)


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
    counts = expert_counts(flat, n_experts)  # [E], on x's device
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
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group, computed on the device
        gate, up = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [R, D]
    # unbind: one cheap stack in backward, instead of an index-backward copy of the whole stack per expert
    return looped_swiglu(xs, counts, gate_up.unbind(0), down.unbind(0))


def looped_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate_up: Sequence[Any], down: Sequence[Any],
                  linear: Callable[[torch.Tensor, Any], torch.Tensor] = F.linear) -> torch.Tensor:
    """SwiGLU of rows xs [R,D] grouped by expert, one matmul pair per expert that has rows: gate_up[e] [2I,D] and
    down[e] [D,I] are any weights `linear(x, w)` takes (tensors, or the engine's quantised weights). Reads the
    counts to the host: one sync per call on an accelerator."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
            outs.append(linear(F.silu(gate) * up, down[e]))
            start += n
    return torch.cat(outs)


def gathered_swiglu(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Routed experts for x [N,D] without data-dependent shapes or host syncs: each (token, expert) pair gathers
    its expert's weights, [N*K, 2I, D] and [N*K, D, I], for one batched matrix-vector product; the outputs, scaled
    by the routing weights [N,K], are added to `out` [N,D] (returned). Costs N*K copies of an expert's weights in
    eager mode (inductor fuses the gather into the product instead), so it is for a few tokens: the compiled
    decode graphs, and the decode step on an accelerator without grouped_mm. The pairs are sorted by expert, so
    pairs that share an expert read its weights while they are in cache."""
    k = indices.shape[1]
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    token_of = order // k  # source token of each (token, expert) pair, grouped by expert
    experts = flat[order]
    g, u = torch.bmm(gate_up[experts], x[token_of, :, None]).squeeze(-1).chunk(2, dim=-1)
    ys = torch.bmm(down[experts], (F.silu(g) * u)[:, :, None]).squeeze(-1)  # [N*K, D]
    return out.index_add_(0, token_of, ys * weights.flatten()[order, None].to(x.dtype))
