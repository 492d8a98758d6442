"""FP8 mixed-precision training as in DeepSeek-V3 (paper section 3.3), emulated exactly on any device.

Every GEMM of a linear layer (forward, input-gradient and weight-gradient) reads its operands quantised to
`torch.float8_e4m3fn` with fine-grained scales, and accumulates in fp32:
  - activations and output-gradients: 1 x 128 tiles along the GEMM's inner dimension (one scale per token per
    128 channels), so one outlier token does not crush the resolution of the others;
  - weights: 128 x 128 blocks;
  - scale = max(amax, 1e-4) / 448 (448 = largest e4m3 value), computed online from the current tensor;
  - E4M3 for every tensor (V3 dropped the E5M2 gradients of earlier FP8 recipes thanks to the small tiles).
Master weights, optimizer state and gradients stay fp32; embedding, output head, MoE gate and norms are not
quantised (the caller simply does not route them through `fp8_linear`).

On CPU this is quantise -> dequantise emulation of those numerics (the matmul itself then runs in fp32); on a GPU
with FP8 tensor cores the same tiling feeds `torch._scaled_mm`, which is not needed to reproduce the numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    tiles = xp.view(*xp.shape[:-1], -1, BLOCK)  # [..., K/128, 128]
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / E4M3_MAX
    q = (tiles / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).view(xp.shape)[..., :k]


def quantize_blocks(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise a weight [M, K] in 128 x 128 blocks: returns dequantised fp32 of the same shape."""
    m, k = w.shape
    wp = _pad_to(_pad_to(w.float(), 0, BLOCK), 1, BLOCK)
    blocks = wp.view(wp.shape[0] // BLOCK, BLOCK, wp.shape[1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / E4M3_MAX
    q = (blocks / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).view(wp.shape)[:m, :k]


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs on e4m3-quantised operands (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # x [N, K], weight [M, K]
        ctx.save_for_backward(x, weight)
        return quantize_tiles(x) @ quantize_blocks(weight).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # grad_out [N, M]
        x, weight = ctx.saved_tensors
        # dgrad: inner dim M -> dy in 1x128 tiles along M; W^T in 128x128 blocks
        grad_x = quantize_tiles(grad_out) @ quantize_blocks(weight)
        # wgrad: inner dim N (tokens) -> both operands in 128x1 tiles along N (1x128 tiles of the transposes)
        grad_w = quantize_tiles(grad_out.t()) @ quantize_tiles(x.t()).t()
        return grad_x.to(x.dtype), grad_w.to(weight.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Drop-in for F.linear(x, weight) (no bias) with DeepSeek-V3 FP8 numerics. x [..., K] -> [..., M]."""
    with torch.autocast(x.device.type, enabled=False):
        y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]).float(), weight)
    return y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
