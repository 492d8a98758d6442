"""Weight-only quantisation for CPU inference: int8 per output channel, int4 in groups along the input dim.

  int8: w[n, k] ~= q[n, k] * s[n]                    q int8 in [-127, 127], symmetric, s = max_k |w[n, k]| / 127
  int4: w[n, k] ~= (q[n, k] - 8) * s[n, g] + z[n, g]  q in [0, 15] for each group g of `group_size` input columns,
        asymmetric (min/max): s = (max - min) / 15, z = min + 8 s, so q = 0 is the group minimum

Only the weights are quantised; activations stay in the engine's dtype outside the matmul. The matmuls are
PyTorch's CPU weight-only kernels, `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu`. Both take
bf16 activations on their fast path (with fp32 activations they run a reference loop ~10x slower than fp32
F.linear; measured in docs/engine.md), so fp32 inputs are cast to bf16 for the kernel and the output cast back.
Scales (and int4 zeros) are stored in bf16 as the kernels want them, and the weights are quantised against the
rounded bf16 scales, so dequantising gives exactly the values the kernel multiplies by.

The int4 kernel needs group_size in {32, 64, 128}, in_features divisible by group_size and out_features divisible
by 16; a weight that does not fit falls back to int8 (`quantize(w, "int4")` says which it returned).
"""

from __future__ import annotations

import torch

from nanoseek.errors import NanoseekError

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


class Int8Weight:
    """A [N, K] weight as int8 [N, K] + one bf16 scale per output channel [N]."""

    bits = 8

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.scale = (w.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16)  # [N]
        self.q = (w / self.scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)  # [N, K]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N] in x's dtype."""
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.q, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


class Int4Weight:
    """A [N, K] weight as packed 4-bit codes (uint8 [N, K/2]) + bf16 scales and zeros [K/group_size, N, 2]."""

    bits = 4

    def __init__(self, weight: torch.Tensor, group_size: int = 32):
        w = weight.detach().float()
        n, k = w.shape
        self.out_features, self.in_features, self.group_size = n, k, group_size
        g = w.view(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)  # [N, K/G]
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # the kernel computes (q - 8) * scale + zero
        q = ((g - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(n, k), 1)  # uint8 [N, K/2]
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2] bf16

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed,
                                              self.group_size, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32: the kernel applied to the identity (exact: each output is one code times its scale, plus
        the zero, rounded to bf16 as the kernel's output always is)."""
        return self.linear(torch.eye(self.in_features, dtype=torch.bfloat16)).float().t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


QuantizedWeight = Int8Weight | Int4Weight


def int4_fits(weight: torch.Tensor, group_size: int) -> bool:
    n, k = weight.shape
    return k % group_size == 0 and n % 16 == 0


def quantize(weight: torch.Tensor, mode: str, group_size: int = 32) -> QuantizedWeight:
    """One [N, K] weight -> Int8Weight, or Int4Weight (Int8Weight when the int4 kernel cannot take its shape)."""
    check_mode(mode, group_size)
    if mode == "int4" and int4_fits(weight, group_size):
        return Int4Weight(weight, group_size)
    return Int8Weight(weight)


def check_mode(mode: str | None, group_size: int = 32) -> None:
    if mode is not None and mode not in MODES:
        raise NanoseekError(f"engine: unknown quant mode {mode!r}; choose one of {', '.join(MODES)} (or None)")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise NanoseekError(f"engine: int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    missing = [op for op in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu",
                             "_convert_weight_to_int4pack_for_cpu") if mode is not None and not hasattr(torch, op)]
    if missing:
        raise NanoseekError(f"engine: quant={mode!r} needs torch.{missing[0]} (PyTorch >= 2.6), not in torch "
                            f"{torch.__version__}")


def weight_bytes(weights: object) -> int:
    """Bytes held by the tensors / quantised weights in a (nested) list or dict, each tensor storage counted once
    (views, such as the per-expert slices of a 3-D expert tensor, share their storage)."""
    seen: set[int] = set()

    def walk(w: object) -> int:
        if isinstance(w, (Int8Weight, Int4Weight)):
            return w.nbytes
        if isinstance(w, torch.Tensor):
            storage = w.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(w, dict):
            return sum(walk(v) for v in w.values())
        if isinstance(w, (list, tuple)):
            return sum(walk(v) for v in w)
        return 0

    return walk(weights)
