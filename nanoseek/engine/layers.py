"""One block of the serving forward over the latent cache: absorbed MLA attention, the MoE / dense FFN, and the small
products they are written in.

- `attention`: x -> [q_a ; c_kv ; k_pe] in one matmul; the new latents [kv_norm(c_kv) ; RoPE(k_pe)] are written to
  the layer's paged cache (through the block table: Batch.write_index); then the naive prefill (keys and values
  expanded from the latent, fused SDPA: causal over a fresh prompt, or masked over the slot's cached positions read
  through Batch.read_index, for a suffix or a chunk) or the absorbed form: q_lat = q_nope W_UK, scores =
  [q_lat ; q_pe] . cache^T * softmax_scale + mask (softmax in fp32), o = (p . kv_cache) W_UV^T -> o_proj, so
  per-head keys and values are never expanded (docs/engine.md);
- `moe_ffn`: the V3 router (nanoseek.moe.select_experts) and the routed experts, through nanoseek.moe's dispatch,
  or through two paths of the engine's own (static shapes for torch.compile; one matmul pair per (token, expert)
  pair for a token or two);
- `block`: pre-norm residual block, as model.Block.

`Batch` describes the rows being fed (slots, positions, RoPE angles, mask); forward.py builds it once per forward.
Its `matvec` field is the batch-1 mode of the compiled graphs: set only while tracing a graph for one row, it makes
`linear` and `bmm` write their products as multiply-and-sums, which inductor turns into loops fused with their
neighbours instead of library calls.

Shapes: B batch rows (slots), S new tokens per row, T attended cache length, D hidden, H heads, c kv_lora_rank,
r qk_rope_head_dim, N = B*S tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanoseek import moe
from nanoseek.config import ModelConfig
from nanoseek.engine.weights import LayerWeights
from nanoseek.model import apply_rope
from nanoseek.quant import QuantizedWeight

# an accelerator without grouped_mm runs the routed experts of up to this many (token, expert) pairs gathered (no host
# sync, but a copy of an expert's weights per pair in eager mode), and more (a prefill) in the per-expert loop
GATHER_PAIRS = 1024


class Batch(NamedTuple):
    """What every layer needs to feed [B,S] tokens to a run of slots (computed once per forward)."""

    start: int  # the first slot; the slots are start..start+B-1
    write_index: torch.Tensor  # [B*S] rows of cache.view(-1, c+r) to write the new latents to (via the block table)
    cos: torch.Tensor  # [B,S,1,r/2] fp32
    sin: torch.Tensor
    # additive [B, S*H, T] (absorbed), [B, 1, S, T] (expand); None = fresh causal prefill (naive mode); empty =
    # nothing to hide
    mask: torch.Tensor | None
    t: int  # cached positions attended (T)
    static: bool = False  # no data-dependent shapes or host syncs (a torch.compile'd graph): the gather MoE
    matvec: bool = False  # tracing a compiled graph for one row: products as multiply-and-sums (see linear)
    read_index: torch.Tensor | None = None  # [B,T] rows of cache.view(-1, c+r) holding positions 0..T-1 of each slot
    expand: bool = False  # a prefill over cached positions in naive mode: expanded keys / values, masked SDPA


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, matvec: bool = False) -> torch.Tensor:
    """Every projection goes through here: a plain tensor, or a weight-only quantised one (quant.py)."""
    if isinstance(weight, torch.Tensor):
        if matvec:
            # a compiled batch-1 graph (1 or 2 tokens): as a multiply-and-sum, inductor generates the matrix-vector
            # loop itself, fused with the norm or activation before it, instead of one MKL call per weight;
            # measured 2.4-2.6x eager decode against 1.5x with the MKL calls (docs/engine.md). For the 2-token
            # verify forward too: 2.2 ms against 3.3 ms with MKL (and 18 ms with the rows as the inner loop)
            return (x[..., None, :] * weight).sum(-1)
        return F.linear(x, weight)
    return weight.linear(x)


def bmm(a: torch.Tensor, b: torch.Tensor, matvec: bool = False) -> torch.Tensor:
    """a [G,M,K] @ b [G,K,N]. In a compiled batch-1 graph as a multiply-and-sum, so inductor writes the loop (fused
    with its neighbours) instead of calling the library: at batch 1 the attention's four bmm a layer are tiny, and
    as loops the decode step is 4.5% faster (median of 10 interleaved runs, docs/engine.md)."""
    if matvec:
        return (a[:, :, :, None] * b[:, None, :, :]).sum(-2)
    return torch.bmm(a, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; equal to the formula below up to rounding
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # as model.RMSNorm: normalise in fp32, cast back, then scale (the same rounding in bf16)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | QuantizedWeight, down: torch.Tensor | QuantizedWeight,
           matvec: bool = False) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2I, D] weight."""
    gate, up = linear(x, gate_up, matvec).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down, matvec)


def gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The cached latents at index [B,T] (rows of cache.view(-1, c+r): Batch.read_index) -> [B,T,c+r]. index_select:
    2.5x faster than advanced indexing here (75 vs 190 us for 16 slots x 200 positions)."""
    width = cache.shape[-1]
    return cache.view(-1, width).index_select(0, index.flatten()).view(*index.shape, width)


def expand_kv(kv_lat: torch.Tensor, lw: LayerWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-head keys and values from latents kv_lat [B,T,c+r] for the naive prefill: (k [B,H,T,qk], v' [B,H,T,qk],
    j) with the values in columns j..j+v of v'. CPU flash attention needs one head dim for q, k and v (5x faster
    than the math fallback at 1000 tokens), so v is widened to qk_head_dim: by the k_nope columns before it in
    kv_b_proj's output when there are enough (an output column depends on its own value column only, so what fills
    the others does not matter, and nothing is copied), else by zeros."""
    bsz, t, _ = kv_lat.shape
    h, nope, r, c, v, qk = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                            cfg.v_head_dim, cfg.qk_head_dim)
    kvx = linear(kv_lat[..., :c], lw.wkv_b).view(bsz, t, h, nope + v).transpose(1, 2)  # [B,H,T,nope+v]
    k = kvx.new_empty(bsz, h, t, qk)
    k[..., :nope] = kvx[..., :nope]
    k[..., nope:] = kv_lat[:, None, :, c:]  # the shared RoPE key, for every head
    if v >= qk:
        return k, kvx[..., nope:], 0
    if v >= r:  # the last qk columns of [k_nope ; v]: v at their end
        return k, kvx[..., nope + v - qk:], qk - v
    return k, F.pad(kvx[..., nope:], (0, qk - v)), 0


def attention(x: torch.Tensor, lw: LayerWeights, cache: torch.Tensor, b: Batch, cfg: ModelConfig) -> torch.Tensor:
    """x [B,S,D] (normed) for slots b.start.. of this layer's paged cache [num_blocks, bs, c+r] -> [B,S,D]; writes
    the new tokens' latents to the cache."""
    bsz, seqlen, _ = x.shape
    h, nope, r, c, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                        cfg.v_head_dim)
    a = linear(x, lw.wq_a_kv_a, b.matvec)
    if lw.wq_b is None:
        q, kv, k_pe = a.split([h * cfg.qk_head_dim, c, r], dim=-1)
    else:
        q_a, kv, k_pe = a.split([cfg.q_lora_rank, c, r], dim=-1)
        q = linear(rms_norm(q_a, lw.q_norm, cfg.rms_norm_eps), lw.wq_b, b.matvec)
    q_nope, q_pe = q.view(bsz, seqlen, h, cfg.qk_head_dim).split([nope, r], dim=-1)
    # one RoPE call for the H query heads and the shared key head: [B,S,H+1,r]
    pe = apply_rope(torch.cat([q_pe, k_pe[:, :, None]], dim=2), b.cos, b.sin, cfg.rope_interleave)
    q_pe, k_pe = pe.split([h, 1], dim=2)
    latent = torch.cat([rms_norm(kv, lw.kv_norm, cfg.rms_norm_eps), k_pe.squeeze(2)], dim=-1)  # [B,S,c+r]
    cache.view(-1, c + r).index_copy_(0, b.write_index, latent.view(-1, c + r))
    if b.mask is None or b.expand:
        # naive prefill: expand keys/values from the latent and run fused attention: causal over a fresh prompt
        # (right padding never leaks back), or over the slot's cached positions 0..T-1 with the mask (a suffix
        # over a cached prefix, a prompt's next chunk; masked SDPA measured 2-3x faster than the absorbed form)
        kv_lat = latent if not b.expand else gather(cache, b.read_index)  # [B,S or T,c+r]
        qf = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B,H,S,qk]
        kf, vf, first = expand_kv(kv_lat, lw, cfg)
        o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=b.mask, is_causal=b.mask is None,
                                           scale=cfg.softmax_scale)[..., first:first + v]
        return linear(o.transpose(1, 2).reshape(bsz, seqlen, h * v), lw.wo)
    # absorb W_UK into the query: q_lat[h] = q_nope[h] W_UK[h]   [H, N, nope] @ [H, nope, c] -> [H, N, c]
    q_lat = bmm(q_nope.reshape(bsz * seqlen, h, nope).transpose(0, 1), lw.w_uk, b.matvec)
    q_full = torch.cat([q_lat.transpose(0, 1).view(bsz, seqlen, h, c), q_pe], dim=-1).view(bsz, seqlen * h, c + r)
    keys = gather(cache, b.read_index)  # [B,T,c+r] = [kv_cache ; pe_cache], through the block table
    if b.mask.numel() == 0:  # nothing to hide
        scores = torch.bmm(q_full, keys.transpose(1, 2)).mul_(cfg.softmax_scale)
    elif b.matvec:  # inductor's loop, as in bmm()
        scores = bmm(q_full, keys.transpose(1, 2), matvec=True) * cfg.softmax_scale + b.mask
    else:
        scores = torch.baddbmm(b.mask, q_full, keys.transpose(1, 2), alpha=cfg.softmax_scale)  # [B, S*H, T]
    p = F.softmax(scores, dim=-1, dtype=torch.float32)
    o_lat = bmm(p if p.dtype == x.dtype else p.to(x.dtype), keys[..., :c], b.matvec)  # [B, S*H, c]
    # W_UV after the weighted sum: [H, N, c] @ [H, c, v] -> [H, N, v]
    o = bmm(o_lat.view(bsz * seqlen, h, c).transpose(0, 1), lw.w_uv.transpose(1, 2), b.matvec)
    return linear(o.transpose(0, 1).reshape(bsz, seqlen, h * v), lw.wo, b.matvec)


def moe_ffn(x: torch.Tensor, lw: LayerWeights, cfg: ModelConfig, b: Batch) -> torch.Tensor:
    """Shared experts + the routed experts the N tokens x [N,D] selected (one matmul pair per busy expert only).

    The router and the sort-by-expert dispatch are nanoseek.moe's, as in the training model. Two paths only pay off
    in decoding: the gathered one (compiled graphs cannot have the dispatch's data-dependent shapes, and on an
    accelerator without grouped_mm it is the one without host syncs) and the per-pair one on the CPU (for a token or
    two, sorting costs more than it saves). On an accelerator the dispatch runs F.grouped_mm (bf16 on H100-class
    GPUs) with its offsets on the device; only a prefill without grouped_mm loops over the experts (a host sync)."""
    weights, indices = moe.select_experts(F.linear(x.float(), lw.gate_w).sigmoid(), lw.gate_bias, cfg)  # [N,K]
    y = torch.zeros_like(x) if lw.mlp_gate_up is None else swiglu(x, lw.mlp_gate_up, lw.mlp_down, b.matvec)
    n, k = indices.shape
    host = x.device.type == "cpu"  # on an accelerator no path below may read a value back to the host
    if b.static or (not host and not lw.grouped and n * k <= GATHER_PAIRS):
        # no data-dependent shapes or host syncs: for torch.compile, and the decode step on an accelerator where
        # grouped_mm has no kernel of its own. Inductor fuses the gather of each pair's expert weights into the
        # matrix-vector loops, so the weights are read in place, not copied; measured faster than a dense
        # all-expert formulation at batch 16 too (7 vs 13.5 ms a step): that multiplies by E instead of K.
        return moe.gathered_swiglu(x, weights, indices, lw.experts_gate_up_3d, lw.experts_down_3d, y)
    if host and n * k <= 4:  # a token or two (batch-1 decode, speculative verification): run each pair, no sorting
        outs = torch.cat([swiglu(x[i:i + 1], lw.experts_gate_up[e], lw.experts_down[e])
                          for i, row in enumerate(indices.tolist()) for e in row])  # [N*K, D]
        return y + (weights.to(x.dtype).view(n, k, 1) * outs.view(n, k, -1)).sum(1)
    if lw.grouped:  # one grouped matmul per projection: ~1.5x faster than the loop from 4 tokens up
        def experts(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return moe.grouped_swiglu(xs, counts, lw.experts_gate_up_3d, lw.experts_down_3d)
    else:
        def experts(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return moe.looped_swiglu(xs, counts, lw.experts_gate_up, lw.experts_down, linear)
    return moe.dispatch(x, weights, indices, cfg.n_routed_experts, experts, out=y)


def block(x: torch.Tensor, lw: LayerWeights, cache: torch.Tensor, b: Batch, cfg: ModelConfig) -> torch.Tensor:
    """x [B,S,D] -> [B,S,D]: attention over the layer's latent cache, then the FFN, each pre-normed and residual."""
    x = x + attention(rms_norm(x, lw.attn_norm, cfg.rms_norm_eps), lw, cache, b, cfg)
    hn = rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps)
    if lw.moe:
        return x + moe_ffn(hn.flatten(0, 1), lw, cfg, b).view_as(x)
    return x + swiglu(hn, lw.mlp_gate_up, lw.mlp_down, b.matvec)
