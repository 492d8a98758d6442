"""FP8 block-wise emulation: e4m3 rounding bounds, tile independence, GEMMs close to fp32 in both directions."""

import torch
import torch.nn.functional as F

from nanoseek.fp8 import fp8_linear, quantize_blocks, quantize_tiles


def test_tile_quantisation_error_is_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    dq = quantize_tiles(x)
    scale = x.view(16, 2, 128).abs().amax(-1, keepdim=True) / 448
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal numbers (|x|/scale >= 2^-6)
    normal = (x.view(16, 2, 128).abs() / scale >= 2**-6).view(16, 256)
    rel = ((dq - x).abs() / x.abs())[normal]
    assert rel.max().item() <= 2**-4 + 1e-6
    assert not torch.equal(dq, x)


def test_one_outlier_token_does_not_hurt_the_others():
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    y = x.clone()
    y[0, 3] = 1e4  # outlier in token 0 only
    assert torch.equal(quantize_tiles(y)[1:], quantize_tiles(x)[1:])


def test_block_quantisation_ragged_shapes():
    torch.manual_seed(0)
    w = torch.randn(200, 70) * 0.02
    dq = quantize_blocks(w)
    assert dq.shape == w.shape
    assert ((dq - w).norm() / w.norm()).item() < 0.05


def test_fp8_linear_matches_fp32_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 256, requires_grad=True)
    w = (torch.randn(192, 256) * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    ref = F.linear(x, w)
    assert y.shape == ref.shape
    assert ((y - ref).norm() / ref.norm()).item() < 0.05
    g = torch.randn_like(ref)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (ref * g).sum().backward()
    assert ((gx - x.grad).norm() / x.grad.norm()).item() < 0.05
    assert ((gw - w.grad).norm() / w.grad.norm()).item() < 0.05
