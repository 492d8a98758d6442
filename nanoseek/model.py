"""The DeepSeek-V3 transformer: MLA attention, DeepSeekMoE with auxiliary-loss-free balancing, and MTP.

One module per paper concept, in reading order:
  RMSNorm -> rotary embedding with YaRN -> MLA (V2 paper 2.1, V3 paper 2.1.1) -> dense SwiGLU MLP
  -> Gate + MoE (V3 paper 2.1.2) -> Block -> MTP module (V3 paper 2.2) -> Transformer.

Shapes: B batch, T sequence, D hidden_size, H heads, E routed experts, K experts per token, N = B*T tokens.
Module and parameter names follow the Hugging Face DeepseekV3 checkpoint (checkpoint.py maps the few differences:
the `model.` prefix, experts stored as 3-D tensors here, and MTP blocks stored as extra layers there).

This file is the training / full-sequence path (expanded keys and values, causal SDPA). The inference engine
(engine.py) reuses these weights with the absorbed-MLA latent cache. Block projections are `Linear`s: with the
routed experts, enable_fp8 (below) switches them to DeepSeek-V3 FP8 GEMMs (off by default).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import moe
from nanoseek.config import ModelConfig, yarn_mscale
from nanoseek.errors import NanoseekError
from nanoseek.fp8 import fp8_grouped_linear, fp8_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel (weight included) instead of ~5 ops forward and ~10 backward: 1.6x faster, same result
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32 (bf16 sums of squares lose precision), as the reference implementations do
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose three GEMMs switch to DeepSeek-V3 FP8 numerics when `fp8` is set (enable_fp8).

    Every projection of the blocks is one; the output head (nn.Linear), the MoE gate and the embedding are not,
    so they stay high precision (V3 paper 3.3). With fp8 off (the default) this is exactly nn.Linear.
    """

    fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return fp8_linear(x, self.weight)  # bias-free, as every projection here (enable_fp8 checks)
        return F.linear(x, self.weight, self.bias)


# --- rotary position embedding with YaRN -------------------------------------------------------------------------
def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim/2] and the cos/sin scale ("attention factor").

    With YaRN, low-frequency dims (long wavelengths) are interpolated by `factor`, high-frequency dims are kept,
    and a linear ramp blends the correction range [low, high] found from beta_fast/beta_slow (V3: low=10, high=23).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = config.rope_scaling
    if not rs:
        return inv_freq.float(), 1.0
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength completes `rotations` turns in `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the original frequency), 0 = interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    # cos/sin scale as in transformers: mscale(mscale) / mscale(mscale_all_dim), 1.0 for V3; with neither given,
    # the plain YaRN temperature. The softmax gets mscale(mscale_all_dim)^2 (config.softmax_scale).
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] -> cos, sin [..., T, rope_dim/2] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x [..., T, rope_dim] by the angles in cos/sin [..., T, rope_dim/2].

    The released weights pair dims interleaved, (x0,x1),(x2,x3)...; `rope_interleave=False` means the weights
    were permuted so pairs are (x_i, x_{i+d/2}) (NeoX rotate_half). Either way the output is written
    half-split [rotated firsts ; rotated seconds]: q and k get the same permutation, so q.k is unchanged.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# --- Multi-head Latent Attention ---------------------------------------------------------------------------------
class MLA(nn.Module):
    """Queries and keys/values pass through low-rank latents; only c_kv and the shared k_pe need caching.

    q    = W_UQ . norm(W_DQ h)                  [B,T,H,nope+rope]  (or a plain q_proj when q_lora_rank is None)
    c_kv, k_pe = W_DKV h                        [B,T,kv_lora_rank], [B,T,rope]  (k_pe: one head shared by all)
    k_nope, v = W_UK/W_UV . norm(c_kv)          [B,T,H,nope], [B,T,H,v]
    attention over [q_nope ; rope(q_pe)] . [k_nope ; rope(k_pe)] with softmax_scale (YaRN mscale^2 included)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, h = config.hidden_size, config.num_attention_heads
        self.n_heads = h
        if config.q_lora_rank is None:
            self.q_proj = Linear(d, h * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, h * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = Linear(h * config.v_head_dim, d, bias=False)
        self.softmax_scale = config.softmax_scale

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,D] -> q [B,T,H,qk_head_dim] (before RoPE)."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, self.config.qk_head_dim)

    def project_kv_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> normalised latent c_kv [B,T,kv_lora_rank] and k_pe [B,T,rope] (before RoPE)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.config.kv_lora_rank, self.config.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D]; cos/sin [T, rope/2] (or [B,T,rope/2]); attn_mask None = causal, else bool [B,1,T,T]."""
        cfg = self.config
        bsz, seqlen, _ = x.shape
        q = self.project_q(x)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.project_kv_latent(x)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)
        else:
            q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], cfg.rope_interleave)
        k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave)  # [B,T,rope]
        kv = self.kv_b_proj(c_kv).view(bsz, seqlen, self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B,T,H,qk]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        # SDPA's CPU flash kernel needs one head dim for q, k and v; with qk 48 != v 32 it falls back to the math
        # path, which materialises the [T,T] scores and ignores causality (~1.3x slower forward+backward here).
        # Zero-padding v (or q and k) to the common dim is exact: zero v columns give zero output columns, dropped
        # below, and zero q/k columns add nothing to q.k (the scale is passed explicitly).
        dim = max(cfg.qk_head_dim, cfg.v_head_dim)
        if cfg.qk_head_dim < dim:
            q, k = F.pad(q, (0, dim - cfg.qk_head_dim)), F.pad(k, (0, dim - cfg.qk_head_dim))
        if cfg.v_head_dim < dim:
            v = F.pad(v, (0, dim - cfg.v_head_dim))
        # under CPU autocast, attend in fp32: the CPU flash kernel's backward is ~1.3x slower in bf16 than in fp32
        # at head dim 48 (the q/k/v projections stay bf16; o_proj casts back)
        upcast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=attn_mask, is_causal=attn_mask is None,
                                               scale=self.softmax_scale)
        return self.o_proj(o[..., :cfg.v_head_dim].transpose(1, 2).reshape(bsz, seqlen, -1))  # [B,H,T,v] -> [B,T,D]


# --- feed-forward ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense FFN of the first layers, and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The V3 router: sigmoid affinities; a per-expert bias steers *selection* only (auxiliary-loss-free balancing).

    s = sigmoid(x W^T)                      [N,E]   in fp32 (gating stays high precision, V3 paper 3.3)
    s_sel = s + e_score_correction_bias     only for choosing experts, never as a weight
    group score = sum of top-2 s_sel in each of n_group groups; keep topk_group groups; top-K experts among them
    weights = s[top-K] / sum(s[top-K]) * routed_scaling_factor
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # fp32 buffer, saved in checkpoints; updated outside autograd by Transformer.update_expert_bias
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        # tokens routed to each expert since the last bias update (training only; not saved)
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,D] -> weights [N,K] (fp32), indices [N,K], scores [N,E] (fp32)."""
        cfg = self.config
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        weights, indices = moe.select_experts(scores, self.e_score_correction_bias, cfg)
        return weights, indices, scores


class MoE(nn.Module):
    """Shared experts + fine-grained routed experts. Experts are 3-D tensors so dispatch is a sort + per-expert matmul.

    gate_up_proj [E, 2*I, D] (gate rows then up rows), down_proj [E, D, I]; I = moe_intermediate_size.
    `fp8` (set by enable_fp8) runs the routed experts' GEMMs with V3 FP8 numerics; the gate never does.
    `ep` (set by expert_parallel.parallelize): the expert stacks are DTensors holding this rank's experts, and the
    tokens travel to the ranks that hold theirs (ep.dispatch) instead of moe.dispatch.
    """

    fp8 = False
    ep = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e, d, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate = Gate(config)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.shared_experts = MLP(d, i * config.n_shared_experts) if config.n_shared_experts else None
        self.aux_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last forward (if requested)

    def forward(self, x: torch.Tensor, balance_alpha: float = 0.0) -> torch.Tensor:
        bsz, seqlen, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat)
        if self.training:
            self.gate.expert_load += moe.expert_counts(indices.flatten(), self.config.n_routed_experts)  # no sync
        self.aux_loss = self.balance_loss(indices, scores, bsz, seqlen) * balance_alpha if balance_alpha else None
        y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(bsz, seqlen, d)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Routed experts for x [N,D]: moe.dispatch sorts the N*K (token, expert) pairs by expert, then one grouped
        matmul per projection (F.grouped_mm: every expert's rows in one call), or V3's FP8 GEMMs."""
        # grouped_mm is not autocast-aware: the rows go in the dtype autocast gives F.linear (bf16 under autocast)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        experts = self._fp8_experts if self.fp8 else lambda xs, counts: moe.grouped_swiglu(
            xs, counts, _local(self.gate_up_proj).to(dt), _local(self.down_proj).to(dt))
        if self.ep is not None:
            return self.ep.dispatch(x, weights, indices, experts, dtype=dt)
        return moe.dispatch(x, weights, indices, self.config.n_routed_experts, experts, dtype=dt)

    def _fp8_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """V3 FP8 numerics of per-expert GEMMs (quantised from the fp32 master weights, gate and up blocked
        separately), computed for all experts at once: exact, because every 1x128 / 128x128 tile lies within one
        expert's operands (see fp8._FP8GroupedLinear); ~1.9x faster forward+backward than a loop of fp8_linear per
        expert (cpu preset MoE, 1024 tokens: 72 vs 136 ms)."""
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = fp8_grouped_linear(xs, _local(self.gate_up_proj), offs, n_split=2).chunk(2, dim=-1)
        return fp8_grouped_linear(F.silu(gate) * up, _local(self.down_proj), offs)  # [N*K, D]

    def balance_loss(self, indices: torch.Tensor, scores: torch.Tensor, bsz: int, seqlen: int) -> torch.Tensor:
        """Sequence-wise balance loss sum_i f_i P_i (V3 eq. 17-20), averaged over sequences; multiply by alpha.

        f_i = E/(K T) * #tokens of the sequence routed to i;  P_i = mean_t s_i,t / sum_j s_j,t.
        """
        e, k = self.config.n_routed_experts, self.config.num_experts_per_tok
        counts = torch.zeros(bsz, e, device=scores.device).scatter_add_(
            1, indices.view(bsz, -1), torch.ones(bsz, seqlen * k, device=scores.device))
        f = counts * e / (k * seqlen)
        p = (scores / scores.sum(-1, keepdim=True)).view(bsz, seqlen, e).mean(1)
        return (f * p).sum(-1).mean()


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's experts of an expert stack: the local shard of a DTensor (expert parallelism; differentiable,
    no communication), else the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


# --- blocks ------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                balance_alpha: float = 0.0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, balance_alpha) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's own output norm; the linear head itself is the main model's lm_head (shared)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """Multi-token prediction depth k (V3 paper 2.2): h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)].

    Then a full block TRM_k, then the shared head. Embedding first, as vLLM loads the released weights.
    h^{k-1} is the previous depth's hidden state *before* the final norm (the head applies its own norm).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,  # type: ignore[override]
                attn_mask: torch.Tensor | None = None, balance_alpha: float = 0.0) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, cos, sin, attn_mask, balance_alpha)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h weight^T [N,V] against targets [N], in chunks of rows.

    The loss is a scalar whose gradient w.r.t. the logits is (softmax - onehot) / n, so the forward computes the
    h and weight gradients chunk by chunk while that chunk's logits are still in cache, and backward only scales
    them: the [N,V] fp32 logits, log-softmax and gradient never go through memory. Same numerics as
    F.cross_entropy(F.linear(h, weight).float(), targets): matmuls in the autocast dtype, softmax in fp32.
    cpu preset (N = V = 4096): lm_head + loss forward+backward ~1.5x faster under bf16 autocast, ~1.2x in fp32.
    """

    CHUNK = 256  # rows per chunk: [256, V] fp32 logits = 4 MiB at V = 4096

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                need_grad: bool, denominator: torch.Tensor | None = None) -> torch.Tensor:
        # h [N,D], weight [V,D], targets [N]; the summed loss is divided by denominator (default: the valid targets)
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        need_h, need_w = need_grad and ctx.needs_input_grad[0], need_grad and ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            hd, wd = h.to(dt), weight.to(dt)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)  # any in-range index for the ignored rows (masked below)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hd) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            for s in range(0, hd.shape[0], LinearCrossEntropy.CHUNK):
                rows = slice(s, s + LinearCrossEntropy.CHUNK)
                hc, tc, vc = hd[rows], safe[rows, None], valid[rows, None]
                logits = (hc @ wd.t()).float()  # [C,V]
                lse = logits.logsumexp(-1, keepdim=True)
                loss += torch.where(vc, lse - logits.gather(1, tc), 0.0).sum()
                if need_h or need_w:
                    g = logits.sub_(lse).exp_()  # softmax, in place of the logits
                    g.scatter_add_(1, tc, torch.full_like(lse, -1.0))  # - onehot(target)
                    g = g.mul_(vc).to(dt)  # ignored rows: no gradient
                    if need_h:
                        grad_h[rows] = g @ wd
                    if need_w:
                        grad_w += (g.t() @ hc).float()
            n = valid.sum() if denominator is None else denominator.to(h.device)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.dtypes = h.dtype, weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n
        grad_h = None if grad_h is None else grad_h.to(ctx.dtypes[0]) * scale
        grad_w = None if grad_w is None else grad_w.to(ctx.dtypes[1]) * scale
        return grad_h, grad_w, None, None, None, None


@dataclass(frozen=True)
class LossNorm:
    """What compute_loss divides each summed loss term by instead of this batch's own counts (0-d fp32 tensors).

    A data-parallel rank holds a shard of the batch and its gradient is averaged with the other ranks' as equals;
    with the whole batch's counts / the number of ranks here (distributed.loss_norm), that average is exactly the
    whole batch's loss and gradient, however unevenly the targets (SFT's masked prompts) or the rows are spread.
    """

    tokens: torch.Tensor  # main next-token targets
    mtp_tokens: tuple[torch.Tensor, ...]  # targets of MTP depth k = 1..D
    sequences: torch.Tensor  # rows (the balance loss is a mean over sequences)

    @staticmethod
    def count(targets: torch.Tensor, ignore_index: int, mtp_depth: int) -> LossNorm:
        """This batch's own counts for targets [B,T] and MTP depths 1..mtp_depth (on the targets' device)."""
        valid = (targets != ignore_index).float()
        return LossNorm(valid.sum(), tuple(valid[:, k:].sum() for k in range(1, mtp_depth + 1)),
                        torch.tensor(float(targets.shape[0]), device=targets.device))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList([MTPModule(config, n + k) for k in range(config.num_nextn_predict_layers)])
        self.rotary = RotaryEmbedding(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range); output projections scaled by 1/sqrt(2 * layers) (GPT-2) so the residual
        stream does not grow with depth; norms 1, routing bias 0."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * (self.config.num_hidden_layers + self.config.num_nextn_predict_layers))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()
                m.expert_load.zero_()

    # --- forward -------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, balance_alpha: float = 0.0) -> torch.Tensor:
        """input_ids [B,T] -> last block's output [B,T,D], before the final norm."""
        cos, sin = self.rotary(torch.arange(input_ids.shape[1], device=input_ids.device))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, balance_alpha=balance_alpha)
        return x

    def forward(self, input_ids: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,V] (main next-token head; MTP is used by compute_loss and the engine).
        select [B,T] bool: only those M positions' logits [M,V] (the final norm and the head skip the others)."""
        h = self.hidden_states(input_ids)
        return self.lm_head(self.norm(h if select is None else h[select]))

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_lambda: float = 0.0,
                     balance_alpha: float = 0.0, ignore_index: int = -1, norm: LossNorm | None = None,
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """The V3 training objective: L_main + lambda/D * sum_k L_MTP_k + alpha * sum_layers L_Bal.

        targets [B,T] are input_ids shifted by one (ignore_index where no loss is wanted). MTP depth k at position i
        combines h^{k-1}_i with Emb(t_{i+k}) and predicts targets_{i+k} (the token k+1 steps ahead). Each term is a
        mean over this batch's targets (or sequences), or over the counts of `norm` (a data-parallel shard).
        """
        h = self.hidden_states(input_ids, balance_alpha)
        loss_main = self._lm_loss(self.norm(h), targets, ignore_index, None if norm is None else norm.tokens)
        loss = loss_main
        stats = {"loss_main": loss_main.item()}
        if mtp_lambda and len(self.mtp):
            mtp_losses = []
            seqlen = input_ids.shape[1]
            for k, module in enumerate(self.mtp, start=1):
                if seqlen - k < 1:
                    break
                cos, sin = self.rotary(torch.arange(seqlen - k, device=input_ids.device))
                h = module(h[:, :-1], self.embed_tokens(input_ids[:, k:]), cos, sin, balance_alpha=balance_alpha)
                mtp_losses.append(self._lm_loss(module.shared_head.norm(h), targets[:, k:], ignore_index,
                                                None if norm is None else norm.mtp_tokens[k - 1]))
            if mtp_losses:
                loss_mtp = torch.stack(mtp_losses).mean()
                loss = loss + mtp_lambda * loss_mtp
                stats["loss_mtp"] = loss_mtp.item()
        if balance_alpha:
            aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
            if aux:
                loss_bal = torch.stack(aux).sum()
                if norm is not None:  # each layer's loss is a mean over this batch's sequences
                    loss_bal = loss_bal * (input_ids.shape[0] / norm.sequences)
                loss = loss + loss_bal
                stats["loss_balance"] = loss_bal.item()
        stats["loss"] = loss.item()
        return loss, stats

    def _lm_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 denominator: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of lm_head(h) for h [B,T,D] (normed) against targets [B,T]: fp32 softmax, as
        F.cross_entropy(self.lm_head(h).float(), ...), without holding the [B*T,V] logits (LinearCrossEntropy).
        The summed loss is divided by `denominator` when given."""
        weight = self.lm_head.weight
        need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        return LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), ignore_index, need_grad,
                                        denominator)


    # --- auxiliary-loss-free load balancing -------------------------------------------------------------------------
    def gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update_expert_bias(self, gamma: float) -> float:
        """After an optimizer step: b_i += gamma * sign(mean load - load_i) for each MoE layer (V3 paper 2.1.2).

        Loads are the tokens routed since the last call (callers all-reduce `expert_load` across ranks first).
        Returns MaxVio = max_i load_i / mean load - 1, averaged over layers (0 = perfectly balanced).
        """
        vios = []
        for gate in self.gates():
            load = gate.expert_load
            if load.sum() == 0:
                continue
            mean = load.mean()
            vios.append((load.max() / mean - 1).item())
            if gamma:
                gate.e_score_correction_bias += gamma * torch.sign(mean - load)
            load.zero_()
        return sum(vios) / len(vios) if vios else 0.0

    # --- bookkeeping -------------------------------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Counted from the allocated tensors (config.num_params() gives the same numbers analytically)."""
        total = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in self.named_parameters() if n.startswith("mtp."))
        return {"total": total, "mtp_total": mtp, "total_with_mtp": total + mtp,
                "active": self.config.num_params()["active"]}



def enable_fp8(model: Transformer, enabled: bool = True) -> int:
    """Switch `model` to V3 FP8 GEMMs (or back, enabled=False). Returns the number of weight tensors switched.

    Switched: every `model.Linear` (MLA q_proj / q_a / q_b / kv_a / kv_b / o_proj, dense MLPs, shared experts, the
    MTP modules' eh_proj and blocks) and every MoE's routed-expert stacks (gate_up_proj and down_proj: 2 per MoE).
    Untouched (high precision, V3 paper 3.3): embedding, lm_head, MoE gate, norms, attention core. Only the
    computation changes: parameters, gradients and optimizer state stay fp32, checkpoints are unaffected.
    """
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            if m.bias is not None:
                raise NanoseekError(f"enable_fp8: {name} has a bias, which fp8_linear does not support")
            m.fp8 = enabled
            n += 1
        elif isinstance(m, MoE):
            m.fp8 = enabled
            n += 2
    return n
