"""FP8 block-wise emulation: e4m3 rounding bounds, tile independence, GEMMs close to fp32 in both directions; the
model switch (enable_fp8), its exact per-GEMM numerics, fp8-off parity, and `nanoseek pretrain --fp8`."""

import json
import math

import torch
import torch.nn.functional as F

from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.data import corpus_dir
from nanoseek.fp8 import (
    fp8_grouped_linear,
    fp8_linear,
    quantize_blocks,
    quantize_group_tiles,
    quantize_tiles,
)
from nanoseek.model import Gate, RMSNorm, Transformer, enable_fp8


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


# --- the model switch ----------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_preset("test"))


def switched(model: Transformer) -> set[str]:
    return {name for name, m in model.named_modules() if getattr(m, "fp8", False)}


def test_enable_fp8_switches_exactly_the_projections_and_experts(one_thread):
    model = tiny_model()
    assert switched(model) == set()
    # test preset: 2 layers (dense, MoE) + 1 MTP block (MoE); q_lora on
    assert enable_fp8(model) == 29  # 3 MLA x 5 + dense MLP 3 + 2 MoE x (shared 3 + routed 2) + eh_proj 1
    mla = {f"self_attn.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    mlp = {f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    moe = {"mlp"} | {f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    expected = ({f"layers.0.{n}" for n in mla | mlp} | {f"layers.1.{n}" for n in mla | moe}
                | {f"mtp.0.{n}" for n in mla | moe} | {"mtp.0.eh_proj"})
    assert switched(model) == expected
    # high precision: embedding, output head, gate, norms (none is a model.Linear / MoE)
    assert type(model.lm_head) is torch.nn.Linear and type(model.embed_tokens) is torch.nn.Embedding
    assert not any(getattr(m, "fp8", False) for m in model.modules() if isinstance(m, (Gate, RMSNorm)))
    # and behaviourally: head and gate give bit-identical outputs with fp8 on
    h = torch.randn(10, 64)
    plain = tiny_model()
    assert torch.equal(model.lm_head(h), plain.lm_head(h))
    for a, b in zip(model.layers[1].mlp.gate(h), plain.layers[1].mlp.gate(h), strict=True):
        assert torch.equal(a, b)
    assert enable_fp8(model, enabled=False) == 29 and switched(model) == set()


def test_fp8_forward_differs_from_fp32_but_is_close(one_thread):
    model = tiny_model()
    x = torch.randint(0, 512, (2, 64))
    ref, loss_ref = model(x), model.compute_loss(x[:, :-1], x[:, 1:], mtp_lambda=0.3)[0]
    enable_fp8(model)
    y, loss = model(x), model.compute_loss(x[:, :-1], x[:, 1:], mtp_lambda=0.3)[0]
    rel = ((y - ref).norm() / ref.norm()).item()
    # e4m3 rounding (<= 2^-4 per element) through 3 blocks: measured 0.8-0.9% relative on the logits
    assert 1e-3 < rel < 0.03
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 1e-3  # measured 1e-7 - 3e-5


def test_switched_layer_output_and_gradients_equal_hand_quantised_gemms(one_thread):
    model = tiny_model()
    enable_fp8(model)
    layer = model.layers[0].self_attn.o_proj  # Linear(32 -> 64): K = 32 < 128, a ragged single tile
    w = layer.weight
    x = torch.randn(2, 80, 32, requires_grad=True)  # N = 160 tokens: two token tiles in the wgrad, one ragged
    g = torch.randn(2, 80, 64)
    y = layer(x)
    y.backward(g)
    xf, gf = x.detach().reshape(-1, 32), g.reshape(-1, 64)
    wq = quantize_blocks(w.detach())
    assert torch.equal(y.detach().reshape(-1, 64), quantize_tiles(xf) @ wq.t())
    assert torch.equal(x.grad.reshape(-1, 32), quantize_tiles(gf) @ wq)  # dgrad: dy tiles along M
    assert torch.equal(w.grad, quantize_tiles(gf.t()) @ quantize_tiles(xf.t()).t())  # wgrad: 128x1 token tiles
    assert w.grad.dtype == torch.float32 and w.dtype == torch.float32  # master weights and grads stay fp32


def test_group_tiles_restart_at_every_expert():
    torch.manual_seed(0)
    counts = [130, 0, 7, 300, 1]
    x = torch.randn(sum(counts), 40)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    ref = torch.cat([quantize_tiles(part.t()).t() for part in x.split(counts)])
    assert torch.equal(quantize_group_tiles(x, offs), ref)


def test_routed_experts_equal_per_expert_hand_quantised_gemms(one_thread):
    """fp8_grouped_linear for gate_up_proj (n_split=2: gate and up quantised as separate weights) against each
    expert's three GEMMs done by hand, including an expert with no tokens and one with > 128 tokens."""
    torch.manual_seed(0)
    e, m, k = 4, 2 * 40, 72
    counts = [150, 0, 9, 20]
    xs = torch.randn(sum(counts), k, requires_grad=True)
    w = (torch.randn(e, m, k) * 0.05).requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.randn(sum(counts), m)
    y = fp8_grouped_linear(xs, w, offs, n_split=2)
    y.backward(g)
    ys, gxs, gws = [], [], []
    for x_e, g_e, w_e in zip(xs.detach().split(counts), g.split(counts), w.detach(), strict=True):
        halves = [(quantize_blocks(w_h), g_h) for w_h, g_h in zip(w_e.chunk(2), g_e.chunk(2, dim=1), strict=True)]
        ys.append(torch.cat([quantize_tiles(x_e) @ wq.t() for wq, _ in halves], dim=1))
        gxs.append(sum(quantize_tiles(g_h) @ wq for wq, g_h in halves))
        gws.append(quantize_tiles(g_e.t()) @ quantize_tiles(x_e.t()).t())
    assert torch.equal(y.detach(), torch.cat(ys))
    torch.testing.assert_close(xs.grad, torch.cat(gxs), rtol=1e-6, atol=1e-6)  # gate + up summed in one GEMM
    assert torch.equal(w.grad, torch.stack(gws))
    assert not w.grad[1].any()  # no tokens, no gradient


def test_fp8_moe_layer_matches_per_expert_fp8_linear(one_thread):
    """The model's fp8 MoE path (grouped) against routing by hand through fp8_linear per expert."""
    model = tiny_model()
    moe = model.layers[1].mlp
    enable_fp8(model)
    x = torch.randn(96, 64)
    weights, indices, _ = moe.gate(x)
    y = moe.experts(x, weights, indices)
    ref = torch.zeros_like(x)
    i = model.config.moe_intermediate_size
    for t in range(x.shape[0]):
        for w_t, e in zip(weights[t], indices[t].tolist(), strict=True):
            gate = fp8_linear(x[t:t + 1], moe.gate_up_proj[e, :i])  # gate rows, then up rows: two V3 weights
            up = fp8_linear(x[t:t + 1], moe.gate_up_proj[e, i:])
            ref[t] += w_t * fp8_linear(F.silu(gate) * up, moe.down_proj[e])[0]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_fp8_off_is_bit_identical(one_thread):
    """Never switched, and switched on then off again: the same loss and gradients bit for bit; a Linear with fp8
    off is nn.Linear (parity with transformers is tests/test_model.py)."""
    x = torch.randint(0, 512, (2, 33))
    results = []
    for toggle in (False, True):
        model = tiny_model()
        if toggle:
            enable_fp8(model)
            model(x)
            enable_fp8(model, enabled=False)
        loss, _ = model.compute_loss(x[:, :-1], x[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    lin = tiny_model().layers[0].self_attn.q_a_proj
    h = torch.randn(3, 64)
    assert torch.equal(lin(h), torch.nn.functional.linear(h, lin.weight))


def test_cli_pretrain_fp8_records_precision_and_resume_checks_it(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text((corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:14000])
    out = tmp_path / "run"
    common = ["pretrain", "--preset", "test", "--data", str(data), "--vocab-size", "300", "--batch-size", "4",
              "--seq-len", "32", "--threads", "1", "--warmup-steps", "1", "--eval-every", "3", "--eval-iters", "1",
              "--sample-every", "0", "--out", str(out)]
    main([*common, "--steps", "3", "--fp8"])
    printed = capsys.readouterr().out
    assert "fp8: 29 weight tensors compute with DeepSeek-V3 FP8 GEMMs" in printed
    rec = json.loads((out / "run.json").read_text())
    assert rec["dtype"] == "fp8-e4m3 (emulated) + float32" and rec["steps"] == 3
    assert math.isfinite(rec["final_train_loss"]) and math.isfinite(rec["final_val_loss"])
    # resuming without --fp8 is a different run: the note names the flag
    main([*common, "--steps", "4", "--resume"])
    assert "fp8 True -> False" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["dtype"] == "float32"


def test_grouped_loop_fallback_equals_grouped_mm(monkeypatch):
    """Off CPU (or without F.grouped_mm) the routed experts loop over the groups: same numbers."""
    torch.manual_seed(0)
    counts = [140, 0, 5]
    xs, w = torch.randn(sum(counts), 64, requires_grad=True), torch.randn(3, 48, 64, requires_grad=True)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    g = torch.randn(sum(counts), 48)
    outs = []
    for loop in (False, True):
        if loop:
            monkeypatch.delattr(F, "grouped_mm")
        xs.grad = w.grad = None
        y = fp8_grouped_linear(xs, w, offs, n_split=2)
        y.backward(g)
        outs.append((y.detach(), xs.grad, w.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --- the FP8 tensor-core path (torch._scaled_mm), checked on CPU against the emulation ----------------------------
def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to fp32 summation order (the kernel path multiplies zero-padded operands)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_scaled_mm_operands_define_the_emulated_gemms():
    """The operands and scales handed to torch._scaled_mm (torch's layouts: checked by scaled_mm_reference as torch
    checks them) multiply out to the emulation's three GEMMs, on shapes that are not multiples of 128."""
    from nanoseek.fp8 import dgrad_operands, forward_operands, quantize_blocks_e4m3, scaled_mm, wgrad_operands
    torch.manual_seed(0)
    x, w, dy = torch.randn(200, 320), torch.randn(272, 320) * 0.05, torch.randn(200, 272)
    wq, ws = quantize_blocks_e4m3(w)
    assert close(scaled_mm(forward_operands(x, wq, ws, 272), torch.float32), quantize_tiles(x) @ quantize_blocks(w).t())
    assert close(scaled_mm(dgrad_operands(dy, wq, ws, 320), torch.float32), quantize_tiles(dy) @ quantize_blocks(w))
    assert close(scaled_mm(wgrad_operands(dy, x), torch.float32),
                 quantize_tiles(dy.t()) @ quantize_tiles(x.t()).t())


def test_scaled_mm_reference_refuses_what_torch_refuses():
    import pytest

    from nanoseek.fp8 import forward_operands, quantize_blocks_e4m3, scaled_mm_reference
    torch.manual_seed(0)
    wq, ws = quantize_blocks_e4m3(torch.randn(256, 256))
    ops = forward_operands(torch.randn(64, 256), wq, ws, 256)
    with pytest.raises(ValueError, match="fits no block scaling"):  # 1x128 scales must be column-major
        scaled_mm_reference(ops.a, ops.b, ops.scale_a.contiguous(), ops.scale_b)
    with pytest.raises(ValueError, match="column-major"):
        scaled_mm_reference(ops.a, ops.b.contiguous(), ops.scale_a, ops.scale_b)


def test_tensor_core_linear_equals_the_emulation_forward_and_backward():
    """_ScaledLinear (what a Hopper GPU runs) on CPU, with the reference product and fp32 outputs: the same output
    and gradients as _FP8Linear."""
    from nanoseek.fp8 import _FP8Linear, _ScaledLinear
    torch.manual_seed(0)
    x = torch.randn(150, 192, requires_grad=True)
    w = (torch.randn(80, 192) * 0.05).requires_grad_()
    g = torch.randn(150, 80)
    results = []
    for fn in (lambda: _FP8Linear.apply(x, w), lambda: _ScaledLinear.apply(x, w, torch.float32)):
        x.grad = w.grad = None
        y = fn()
        (y * g).sum().backward()
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for emulated, kernel in zip(*results, strict=True):
        assert close(kernel, emulated)


def test_tensor_core_experts_equal_the_emulation_forward_and_backward():
    """_ScaledGroupedLinear: one scaled_mm per expert (an expert with no rows, one crossing a 128-row tile), gate
    and up blocked separately: the same as _FP8GroupedLinear."""
    from nanoseek.fp8 import _FP8GroupedLinear, _ScaledGroupedLinear
    torch.manual_seed(0)
    xs = torch.randn(200, 160, requires_grad=True)
    w = (torch.randn(3, 256, 160) * 0.05).requires_grad_()  # gate_up: 2 x 128 rows per expert
    offs = torch.tensor([130, 130, 200], dtype=torch.int32)
    g = torch.randn(200, 256)
    results = []
    for fn in (lambda: _FP8GroupedLinear.apply(xs, w, offs, 2),
               lambda: _ScaledGroupedLinear.apply(xs, w, offs, 2, torch.float32)):
        xs.grad = w.grad = None
        y = fn()
        (y * g).sum().backward()
        results.append((y.detach(), xs.grad.clone(), w.grad.clone()))
    for emulated, kernel in zip(*results, strict=True):
        assert close(kernel, emulated)
    assert results[1][2][1].abs().max() == 0  # the expert without rows gets no gradient
