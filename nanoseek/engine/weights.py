"""One block's weights in the layout the engine's forward wants, prepared once from a `Transformer` block.

Fused where two matmuls read the same input (x -> [q_a ; c_kv ; k_pe] in one matmul, the shared experts' gate and up
in one), kv_b_proj split per head into W_UK [H, nope, c] and W_UV [H, v, c] for the absorbed attention, the routed
experts both as per-expert views (the eager loop, quantised weights) and as the 3-D stacks (F.grouped_mm, the
compiled graphs' gather). The attribute names are an interface: layers.py, quant.py's weight_bytes and the native
kernels read them.

Shapes: D hidden, H heads, c kv_lora_rank, r qk_rope_head_dim, nope qk_nope_head_dim, v v_head_dim, E routed
experts, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nanoseek import moe
from nanoseek.config import ModelConfig
from nanoseek.model import MoE
from nanoseek.quant import QuantizedWeight


class LayerWeights:
    """One block's weights in the layout the engine uses (fused where two matmuls read the same input)."""

    def __init__(self, block: torch.nn.Module, config: ModelConfig):
        attn, h = block.self_attn, config.num_attention_heads
        self.attn_norm = block.input_layernorm.weight
        # x -> [q_a (or q) ; c_kv ; k_pe] in one matmul: [q_lora_rank (or H*qk) + c + r, D]
        q_first = attn.q_proj.weight if config.q_lora_rank is None else attn.q_a_proj.weight
        self.wq_a_kv_a = torch.cat([q_first, attn.kv_a_proj_with_mqa.weight])
        self.q_norm = attn.q_a_layernorm.weight if config.q_lora_rank is not None else None
        self.wq_b = attn.q_b_proj.weight if config.q_lora_rank is not None else None
        self.kv_norm = attn.kv_a_layernorm.weight
        self.wkv_b = attn.kv_b_proj.weight  # [H*(nope+v), c], used expanded by the naive prefill
        wkv_b = self.wkv_b.view(h, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
        self.w_uk = wkv_b[:, :config.qk_nope_head_dim].contiguous()  # [H, nope, c]
        self.w_uv = wkv_b[:, -config.v_head_dim:].contiguous()  # [H, v, c]
        self.wo = attn.o_proj.weight
        self.ffn_norm = block.post_attention_layernorm.weight
        mlp = block.mlp
        self.moe = isinstance(mlp, MoE)
        if self.moe:
            self.gate_w = mlp.gate.weight.float()  # the router runs in fp32 (model.Gate)
            self.gate_bias = mlp.gate.e_score_correction_bias.float()
            self.experts_gate_up = list(mlp.gate_up_proj.unbind(0))  # E x [2I, D] (views, no copy)
            self.experts_down = list(mlp.down_proj.unbind(0))  # E x [D, I]
            # the 3-D expert tensors themselves, for the compiled decode step (which gathers the selected experts)
            self.experts_gate_up_3d, self.experts_down_3d = mlp.gate_up_proj, mlp.down_proj  # [E, 2I, D], [E, D, I]
            # one F.grouped_mm per projection where its kernel takes these stacks; a quantised mode sets `grouped`
            # False and swaps the per-expert lists above
            self.grouped = moe.grouped_mm_ok(mlp.gate_up_proj, mlp.down_proj)
            shared = mlp.shared_experts
        else:
            shared = mlp
        self.mlp_gate_up = None if shared is None else torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        self.mlp_down = None if shared is None else shared.down_proj.weight
        if hasattr(block, "eh_proj"):  # MTP module extras
            self.enorm, self.hnorm = block.enorm.weight, block.hnorm.weight
            self.eh_proj, self.head_norm = block.eh_proj.weight, block.shared_head.norm.weight

    def quantize(self, q: Callable[[torch.Tensor], QuantizedWeight]) -> None:
        """Swap every projection for its quantised form, except kv_b_proj: W_UK / W_UV run in torch.bmm (and the
        naive prefill's wkv_b stays with them, so prefill and decode see the same keys and values)."""
        for name in ("wq_a_kv_a", "wq_b", "wo", "mlp_gate_up", "mlp_down", "eh_proj"):
            if getattr(self, name, None) is not None:
                setattr(self, name, q(getattr(self, name)))
        if self.moe:
            self.experts_gate_up = [q(w) for w in self.experts_gate_up]
            self.experts_down = [q(w) for w in self.experts_down]
            # F.grouped_mm reads full-precision 3-D weights: the quantised experts take the loop through linear()
            self.grouped = False
            self.experts_gate_up_3d = self.experts_down_3d = None
