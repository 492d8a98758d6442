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

On CPU (and any device without FP8 block-scaled GEMMs) this is quantise -> dequantise emulation of those numerics:
the matmul itself runs in fp32. On Hopper GPUs (compute capability 9.x, cuBLAS >= 12.9) the same e4m3 tiles and
scales feed `torch._scaled_mm` instead (the section at the end of this file): FP8 tensor cores, fp32 accumulation,
bf16 outputs. The emulation stays the reference: tests check that the operands handed to the kernel define exactly
the emulation's product (scaled_mm_reference), and scripts/gpu_check_ep_fp8.sh compares the kernel with it.

`model.enable_fp8(model)` switches a Transformer's projections and experts to these numerics (`nanoseek pretrain
--fp8`); this module holds only the numerics, so it imports nothing of the model.
"""

from __future__ import annotations

from typing import NamedTuple

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


def quantize_tiles_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] in 1 x 128 tiles along the last dim (zero-padded to Kp, a multiple of 128): the e4m3 values
    [..., Kp] and one fp32 scale per tile [..., Kp/128] (value = q * scale). What a scaled GEMM reads."""
    xp = _pad_to(x.float(), -1, BLOCK)
    tiles = xp.view(*xp.shape[:-1], xp.shape[-1] // BLOCK, BLOCK)  # [..., K/128, 128]
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / E4M3_MAX
    return (tiles / scale).to(torch.float8_e4m3fn).view(xp.shape), scale.squeeze(-1)


def quantize_tiles(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantise x [..., K] in 1 x 128 tiles along the last dim: returns dequantised fp32 of the same shape."""
    q, scale = quantize_tiles_e4m3(x)
    return (q.float().view(*scale.shape, BLOCK) * scale[..., None]).view(q.shape)[..., :x.shape[-1]]


def quantize_blocks_e4m3(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [..., M, K] in 128 x 128 blocks of each [M, K] matrix (zero-padded to Mp x Kp): the e4m3 values
    [..., Mp, Kp] and one fp32 scale per block [..., Mp/128, Kp/128]."""
    *lead, m, k = w.shape
    wp = _pad_to(_pad_to(w.float(), -2, BLOCK), -1, BLOCK)
    blocks = wp.view(*lead, wp.shape[-2] // BLOCK, BLOCK, wp.shape[-1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=1e-4) / E4M3_MAX
    return (blocks / scale).to(torch.float8_e4m3fn).view(wp.shape), scale[..., :, 0, :, 0]


def quantize_blocks(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise weights [..., M, K] in 128 x 128 blocks of each [M, K] matrix: dequantised fp32, same shape."""
    q, scale = quantize_blocks_e4m3(w)
    return (q.float() * _expand_blocks(scale))[..., :w.shape[-2], :w.shape[-1]]


def _expand_blocks(scale: torch.Tensor) -> torch.Tensor:
    """Block scales [..., Mp/128, Kp/128] -> one per element [..., Mp, Kp]."""
    return scale.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)


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
    """Drop-in for F.linear(x, weight) (no bias) with DeepSeek-V3 FP8 numerics. x [..., K] -> [..., M].

    On FP8 tensor cores (scaled_mm_available) the GEMMs run there (bf16 outputs), else emulated in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        if scaled_mm_available(x.device) and weight.shape[1] % 16 == 0:
            y = _ScaledLinear.apply(x2, weight, torch.bfloat16)
        else:
            y = _FP8Linear.apply(x2.float(), weight)
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
        m, k = weight.shape[1:]
        if scaled_mm_available(xs.device) and k % 16 == 0 and (n_split == 1 or m // n_split % BLOCK == 0):
            y = _ScaledGroupedLinear.apply(xs, weight, offs, n_split, torch.bfloat16)
        else:
            y = _FP8GroupedLinear.apply(xs.float(), weight, offs, n_split)
    return y.to(xs.dtype)


# --- on FP8 tensor cores: torch._scaled_mm with V3's block scales ---------------------------------------------------
# cuBLAS (>= 12.9) multiplies e4m3 operands with 1x128 and 128x128 fp32 scales on Hopper (compute capability 9.x):
# the pairs (1x128, 128x128) for the forward and input-gradient GEMMs and (1x128, 1x128) for the weight gradient, the
# same tiles as the emulation above, accumulating in fp32. The operands below are built from the same quantisers, so
# on a CPU scaled_mm_reference (the product those scales define, with torch's layout checks) reproduces the
# emulation: tests/test_fp8.py checks that; scripts/gpu_check_ep_fp8.sh compares the real kernel with it.
class ScaledOperands(NamedTuple):
    """One torch._scaled_mm call: a [M, K] e4m3 row-major, b [K, N] e4m3 column-major (K a multiple of 128, M and N
    of 16, zero padded), fp32 scales in the layouts torch checks (1x128 tiles of a: [M, K/128] column-major; of b:
    [K/128, N] row-major; 128x128 blocks of b: [K/128, N/128] column-major); the product's first `rows` x `cols`
    are kept."""

    a: torch.Tensor
    scale_a: torch.Tensor
    b: torch.Tensor
    scale_b: torch.Tensor
    rows: int
    cols: int


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def forward_operands(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, n: int) -> ScaledOperands:
    """y = x W^T: x [M, K] in 1x128 tiles; W's blocks wq [Np, Kp], ws [Np/128, Kp/128] (quantize_blocks_e4m3)."""
    xq, xs = quantize_tiles_e4m3(_pad_to(x, 0, 16))
    return ScaledOperands(xq, _col_major(xs), wq.t(), ws.t(), x.shape[0], n)


def dgrad_operands(dy: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, k: int) -> ScaledOperands:
    """dx = dy W: dy [M, N] in 1x128 tiles along N (zero-padded to Np, W's padded rows); W [Np, Kp] as the
    column-major right operand, its block scales transposed with it."""
    dq, ds = quantize_tiles_e4m3(_pad_to(dy, 0, 16))
    return ScaledOperands(dq, _col_major(ds), _col_major(wq), _col_major(ws), dy.shape[0], k)


def wgrad_operands(dy: torch.Tensor, x: torch.Tensor) -> ScaledOperands:
    """dW = dy^T x, inner dim the M tokens: both operands in 1x128 tiles along M (128x1 tiles of dy and x)."""
    dq, ds = quantize_tiles_e4m3(_pad_to(dy.t(), 0, 16))  # [N, Mp], [N, Mp/128]
    xq, xs = quantize_tiles_e4m3(x.t())  # [K, Mp], [K, Mp/128]
    return ScaledOperands(dq, _col_major(ds), xq.t(), xs.t().contiguous(), dy.shape[1], x.shape[1])


def scaled_mm_available(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes V3's block scales here: CUDA compute capability 9.x with cuBLAS >= 12.9."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.version.cuda:
        return False
    cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    return torch.cuda.get_device_capability(device)[0] == 9 and cuda >= (12, 9)


def _recipe(t: torch.Tensor, scale: torch.Tensor) -> str:
    """The block scaling torch infers for operand t [rows, K] (as seen row-major) and its scale, with its stride
    rules (a dimension of size 1 has no stride to check): '1x128' or '128x128'."""
    rows, kb = t.shape[0], -(-t.shape[1] // BLOCK)

    def fits(size: tuple[int, int], stride: tuple[int, int]) -> bool:
        return tuple(scale.shape) == size and all(n <= 1 or s == want
                                                  for n, s, want in zip(size, scale.stride(), stride, strict=True))

    if fits((rows, kb), (1, rows)):
        return "1x128"
    if fits((-(-rows // BLOCK), kb), (kb, 1)):
        return "128x128"
    raise ValueError(f"scale {tuple(scale.shape)} strides {scale.stride()} fits no block scaling of {tuple(t.shape)}")


def scaled_mm_reference(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor
                        ) -> torch.Tensor:
    """The fp32 product torch._scaled_mm(a, b, scale_a, scale_b) computes with block scales, written out: every
    operand value times its tile's or block's scale, then a matmul. Refuses, as torch does, scales in the wrong
    layout, a not row-major, b not column-major, and pairs cuBLAS lacks (128x128 on both operands)."""
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError("a must be row-major and b column-major")
    ra, rb = _recipe(a, scale_a), _recipe(b.t(), scale_b.t())
    if ra == rb == "128x128":
        raise ValueError("cuBLAS has no 128x128 x 128x128 block scaling")

    def expand(scale: torch.Tensor, recipe: str, shape: torch.Size) -> torch.Tensor:
        s = scale.repeat_interleave(BLOCK, 1)
        return (s.repeat_interleave(BLOCK, 0) if recipe == "128x128" else s)[:shape[0], :shape[1]]

    return (a.float() * expand(scale_a, ra, a.shape)) @ (b.t().float() * expand(scale_b.t(), rb, b.t().shape)).t()


def scaled_mm(ops: ScaledOperands, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm on CUDA (fp32 accumulation, no fast accumulation), scaled_mm_reference elsewhere."""
    if ops.a.is_cuda:
        y = torch._scaled_mm(ops.a, ops.b, ops.scale_a, ops.scale_b, out_dtype=out_dtype, use_fast_accum=False)
    else:
        y = scaled_mm_reference(ops.a, ops.b, ops.scale_a, ops.scale_b).to(out_dtype)
    return y[:ops.rows, :ops.cols]


class _ScaledLinear(torch.autograd.Function):
    """_FP8Linear on FP8 tensor cores: the three GEMMs as scaled_mm calls on the same e4m3 tiles and blocks. Outputs
    in out_dtype (bf16 on a GPU), the weight gradient in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        wq, ws = quantize_blocks_e4m3(weight)
        ctx.save_for_backward(x, wq, ws)
        ctx.weight_dtype, ctx.out_dtype = weight.dtype, out_dtype
        return scaled_mm(forward_operands(x, wq, ws, weight.shape[0]), out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, wq, ws = ctx.saved_tensors
        grad_x = scaled_mm(dgrad_operands(grad_out, wq, ws, x.shape[1]), ctx.out_dtype)
        grad_w = scaled_mm(wgrad_operands(grad_out, x), torch.float32)
        return grad_x.to(x.dtype), grad_w.to(ctx.weight_dtype), None


class _ScaledGroupedLinear(torch.autograd.Function):
    """_FP8GroupedLinear on FP8 tensor cores, one scaled_mm per expert that has rows (so every tile lies within one
    expert's GEMM, as in the emulation). Reads the offsets to the host: torch's grouped block-scaled GEMM needs a
    newer cuBLAS (CUDA >= 13.4, torch's _scaled_grouped_mm_v2) than the kernels this path was written for."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, n_split: int,
                out_dtype: torch.dtype) -> torch.Tensor:
        e, m, k = weight.shape
        wq, ws = quantize_blocks_e4m3(weight.view(e, n_split, m // n_split, k))  # each stacked matrix its own blocks
        wq, ws = wq.flatten(1, 2), ws.flatten(1, 2)  # [E, M, Kp], [E, M/128, Kp/128] ((m / n_split) % 128 == 0)
        ctx.save_for_backward(xs, wq, ws)
        ctx.spans = list(zip([0] + offs.tolist()[:-1], offs.tolist(), strict=True))
        ctx.weight_shape, ctx.weight_dtype, ctx.out_dtype = weight.shape, weight.dtype, out_dtype
        y = xs.new_zeros(xs.shape[0], m, dtype=out_dtype)
        for g, (s, t) in enumerate(ctx.spans):
            if t > s:
                y[s:t] = scaled_mm(forward_operands(xs[s:t], wq[g], ws[g], m), out_dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        xs, wq, ws = ctx.saved_tensors
        grad_x = torch.zeros_like(xs, dtype=ctx.out_dtype)
        grad_w = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=xs.device)
        for g, (s, t) in enumerate(ctx.spans):
            if t > s:
                grad_x[s:t] = scaled_mm(dgrad_operands(grad_out[s:t], wq[g], ws[g], xs.shape[1]), ctx.out_dtype)
                grad_w[g] = scaled_mm(wgrad_operands(grad_out[s:t], xs[s:t]), torch.float32)
        return grad_x.to(xs.dtype), grad_w.to(ctx.weight_dtype), None, None, None
