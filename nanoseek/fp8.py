"""FP8 mixed-precision training as in DeepSeek-V3 (paper section 3.3), emulated exactly on any device.

Every GEMM of a linear layer (forward, input-gradient and weight-gradient) reads its operands quantised to
`torch.float8_e4m3fn` with fine-grained scales, and accumulates in fp32:
  - activations and output-gradients: 1 x 128 tiles along the GEMM's inner dimension (one scale per token per
    128 channels), so one outlier token does not crush the resolution of the others;
  - weights: 128 x 128 blocks;
  - scale = max(amax, 1e-4) / 448 (448 = largest e4m3 value), computed online from the current tensor;
  - E4M3 for every tensor (V3 dropped the E5M2 gradients of earlier FP8 recipes thanks to the small tiles).
Master weights, optimizer state and gradients stay fp32; embedding, output head, MoE gate, norms and the attention
core are not quantised (the model only routes its `model.Linear` projections and routed experts through here).

On CPU this is quantise -> dequantise emulation of those numerics (the matmul itself then runs in fp32); on a GPU
with FP8 tensor cores the same tiling feeds `torch._scaled_mm`, which is not needed to reproduce the numerics.

`model.enable_fp8(model)` switches a Transformer's projections and experts to these numerics (`nanoseek pretrain
--fp8`); this module holds only the numerics, so it imports nothing of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.moe import grouped_mm_ok

E4M3_MAX = 448.0
BLOCK = 128


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = -x.shape[dim] % multiple
    if not pad:
        return x
    widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
    return F.pad(x, widths)


def quantize_tiles(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantise x [..., K] in 1 x 128 tiles along the last dim: returns dequantised fp32 of the same shape."""
    k = x.shape[-1]
    xp = _pad_to(x.float(), -1, BLOCK)
    tiles = xp.view(*xp.shape[:-1], xp.shape[-1] // BLOCK, BLOCK)  # [..., K/128, 128]
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / E4M3_MAX
    q = (tiles / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).view(xp.shape)[..., :k]


def quantize_blocks(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise weights [..., M, K] in 128 x 128 blocks of each [M, K] matrix: dequantised fp32, same shape."""
    *lead, m, k = w.shape
    wp = _pad_to(_pad_to(w.float(), -2, BLOCK), -1, BLOCK)
    blocks = wp.view(*lead, wp.shape[-2] // BLOCK, BLOCK, wp.shape[-1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-4) / E4M3_MAX
    q = (blocks / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).view(wp.shape)[..., :m, :k]


def quantize_group_tiles(x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Fake-quantise x [R, C] in 128 x 1 tiles down the rows, the tiles restarting at every group boundary.

    Rows offs[g-1]:offs[g] (offs [G] = end row of each group, offs[-1] = R) are group g: one expert's tokens. For
    each group this equals quantize_tiles(x[group].t()).t(), i.e. the token tiles of that expert's own wgrad GEMM,
    computed for all groups at once: per column, the amax over each tile's rows via a scatter.
    """
    r, c = x.shape
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [G] rows per group
    starts = ends - counts
    tiles = (counts + BLOCK - 1) // BLOCK  # [G] tiles per group
    group = torch.repeat_interleave(torch.arange(len(ends), device=x.device), counts)  # [R] group of each row
    tile = (tiles.cumsum(0) - tiles)[group] + (torch.arange(r, device=x.device) - starts[group]) // BLOCK  # [R]
    xf = x.float()
    amax = xf.new_zeros(int(tiles.sum()), c).scatter_reduce_(0, tile[:, None].expand(r, c), xf.abs(), "amax")
    scale = (amax.clamp(min=1e-4) / E4M3_MAX).index_select(0, tile)  # [R, C] the scale of each element's tile
    return (xf / scale).to(torch.float8_e4m3fn).float() * scale


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs on e4m3-quantised operands (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # x [N, K], weight [M, K]
        wq = quantize_blocks(weight)
        ctx.save_for_backward(x, wq)  # the dgrad GEMM reads the same blocks: keep them rather than re-quantise
        ctx.weight_dtype = weight.dtype
        return quantize_tiles(x) @ wq.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # grad_out [N, M]
        x, wq = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):  # fp32 GEMMs even if backward runs in autocast
            # dgrad: inner dim M -> dy in 1x128 tiles along M; W^T in 128x128 blocks
            grad_x = quantize_tiles(grad_out) @ wq
            # wgrad: inner dim N (tokens) -> both operands in 128x1 tiles along N (1x128 tiles of the transposes)
            grad_w = quantize_tiles(grad_out.t()) @ quantize_tiles(x.t()).t()
        return grad_x.to(x.dtype), grad_w.to(ctx.weight_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Drop-in for F.linear(x, weight) (no bias) with DeepSeek-V3 FP8 numerics. x [..., K] -> [..., M]."""
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]).float(), weight)
    return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


# --- routed experts: every expert's GEMMs in one grouped call -------------------------------------------------------
def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm(a, b, offs=offs) in fp32: a [R, K] @ b [G, K, M] -> [R, M] (rows grouped), or a [M, R] @
    b [R, K] -> [G, M, K] (inner dim grouped). F.grouped_mm's CPU kernel wants 16-byte aligned rows; elsewhere
    (or unaligned) a loop over the groups computes the same products."""
    if grouped_mm_ok(a, b):
        return F.grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    spans = zip([0] + ends[:-1], ends, strict=True)
    if b.dim() == 3:
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(spans)])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in spans])


def _quantize_expert_blocks(weight: torch.Tensor, n_split: int) -> torch.Tensor:
    """weight [E, M, K] holding n_split stacked matrices per expert (gate_up_proj = [gate; up]) -> each matrix
    quantised in its own 128 x 128 blocks, as V3's separate w1 / w3 weights are."""
    e, m, k = weight.shape
    return quantize_blocks(weight.view(e, n_split, m // n_split, k)).reshape(e, m, k)


class _FP8GroupedLinear(torch.autograd.Function):
    """ys[rows of expert e] = xs[rows of e] W_e^T for all experts at once, every GEMM on e4m3-quantised operands.

    Exactly the numerics of one _FP8Linear per expert, because every tile lies inside one expert's GEMM operands:
      forward  xs tiles are 1x128 within a row (row-local, so quantising all sorted rows at once is the same);
               W_e is blocked within its own [M, K] matrix (batched over E);
      dgrad    dy tiles are 1x128 within a row (and within one of the n_split matrices); W_e as in the forward;
      wgrad    the inner dim is the expert's tokens: 128x1 tiles must start at the expert's first row, so they are
               counted per group (quantize_group_tiles), not over the concatenation of all experts.
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, n_split: int) -> torch.Tensor:
        wq = _quantize_expert_blocks(weight, n_split)  # [E, M, K]
        ctx.save_for_backward(xs, wq, offs)
        ctx.weight_dtype, ctx.n_split = weight.dtype, n_split
        return _grouped_mm(quantize_tiles(xs), wq.transpose(1, 2), offs)  # [R, K] x [E, K, M] -> [R, M]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # grad_out [R, M]
        xs, wq, offs = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            # dy tiles along M restart at each stacked matrix (gate / up), as in their separate dgrad GEMMs
            r, m = grad_out.shape
            dy = quantize_tiles(grad_out.reshape(r, ctx.n_split, m // ctx.n_split)).reshape(r, m)
            grad_x = _grouped_mm(dy, wq, offs)  # [R, M] x [E, M, K] -> [R, K] (summed over the stacked matrices)
            grad_w = _grouped_mm(quantize_group_tiles(grad_out, offs).t(), quantize_group_tiles(xs, offs),
                                 offs)  # [M, R] x [R, K] -> [E, M, K]
        return grad_x.to(xs.dtype), grad_w.to(ctx.weight_dtype), None, None


def fp8_grouped_linear(xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, n_split: int = 1) -> torch.Tensor:
    """Routed experts with DeepSeek-V3 FP8 numerics: F.grouped_mm(xs, weight.transpose(1, 2), offs=offs).

    xs [R, K] rows sorted by expert (expert e owns rows offs[e-1]:offs[e]; offs [E] int32, offs[-1] = R);
    weight [E, M, K], n_split matrices stacked along M, each quantised in its own blocks -> [R, M] in xs.dtype.
    """
    with torch.autocast(xs.device.type, enabled=False):
        y = _FP8GroupedLinear.apply(xs.float(), weight, offs, n_split)
    return y.to(xs.dtype)
