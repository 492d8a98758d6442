"""Model configuration: one dataclass with the Hugging Face DeepseekV3 field names.

The same object is read from and written to a checkpoint's `config.json`, so a config trained here loads in
transformers / vLLM / SGLang, and the published DeepSeek-V3 config.json loads here. Field names follow the HF config
(the official `inference/model.py` names are given in the comments) so the code can be held against both papers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError
from nanoseek.osutil import read_json


@dataclass
class ModelConfig:
    # --- vocabulary and width -----------------------------------------------------------------------------------
    vocab_size: int = 4096  # V3: 129280
    hidden_size: int = 256  # d_model ("dim"); V3: 7168
    intermediate_size: int = 768  # width of the dense SwiGLU FFN in the first layers ("inter_dim"); V3: 18432
    moe_intermediate_size: int = 128  # width of one expert ("moe_inter_dim"); V3: 2048
    num_hidden_layers: int = 6  # main-model blocks ("n_layers"); V3: 61
    num_attention_heads: int = 4  # ("n_heads"); V3: 128. MLA has no GQA: num_key_value_heads == this
    # --- DeepSeekMoE ---------------------------------------------------------------------------------------------
    n_shared_experts: int = 1  # always-on experts, fused into one SwiGLU of width n_shared * moe_intermediate_size
    n_routed_experts: int = 16  # fine-grained routed experts; V3: 256
    num_experts_per_tok: int = 2  # routed experts per token K_r ("n_activated_experts"); V3: 8
    n_group: int = 4  # expert groups for group-limited routing ("n_expert_groups"); V3: 8 (= nodes)
    topk_group: int = 2  # groups a token may route to ("n_limited_groups"); V3: 4
    first_k_dense_replace: int = 1  # the first k blocks use the dense FFN ("n_dense_layers"); V3: 3
    routed_scaling_factor: float = 1.0  # multiplies the normalised routing weights ("route_scale"); V3: 2.5
    norm_topk_prob: bool = True  # renormalise the K selected sigmoid scores to sum to 1
    scoring_func: str = "sigmoid"  # V3 gate; V2's "softmax" is not supported
    topk_method: str = "noaux_tc"  # auxiliary-loss-free selection with e_score_correction_bias
    # --- Multi-head Latent Attention -------------------------------------------------------------------------------
    q_lora_rank: int | None = 128  # query compression d_c'; None = a plain q_proj (V2-Lite); V3: 1536
    kv_lora_rank: int = 64  # KV compression d_c, the cached latent; V3: 512
    qk_nope_head_dim: int = 32  # per-head query/key dims without position; V3: 128
    qk_rope_head_dim: int = 16  # decoupled RoPE dims, one key head shared by all heads; V3: 64
    v_head_dim: int = 32  # V3: 128
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings",
    #                                              "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    rope_interleave: bool = True  # rotary dims stored as interleaved pairs (x0,x1),(x2,x3)... as in the release
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    # --- multi-token prediction ----------------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1  # MTP depth D; V3: 1
    # --- misc ----------------------------------------------------------------------------------------------------
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the normal init; V3 used 0.006 at width 7168
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 when YaRN extends the context (V3: 192^-0.5 * 1.36889^2 = 0.135234)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2, layers: int | None = None) -> int:
        """MLA's cache per token: the latent c_kv (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim), per
        layer (default: the main model's num_hidden_layers; the MTP module caches its own when it decodes).
        V3 in bf16: (512 + 64) * 61 * 2 = 70,272 bytes (V2 paper, Table 1, counts the elements)."""
        n = self.num_hidden_layers if layers is None else layers
        return (self.kv_lora_rank + self.qk_rope_head_dim) * n * bytes_per_element

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Blocks at index >= first_k_dense_replace (MTP blocks included) use DeepSeekMoE."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def validate(self) -> None:
        """Raise NanoseekError with one clear line for the first invalid value."""
        self._validate_types()
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise NanoseekError(f"config: {name} must be a positive integer, got {v!r}")
        non_negative = ["n_shared_experts", "n_routed_experts", "first_k_dense_replace", "num_nextn_predict_layers"]
        for name in non_negative:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise NanoseekError(f"config: {name} must be a non-negative integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise NanoseekError(f"config: q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise NanoseekError(f"config: qk_rope_head_dim must be even (RoPE rotates pairs), "
                                f"got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise NanoseekError(f"config: first_k_dense_replace ({self.first_k_dense_replace}) > num_hidden_layers "
                                f"({self.num_hidden_layers})")
        if self.scoring_func != "sigmoid":
            raise NanoseekError(f"config: scoring_func {self.scoring_func!r} is not supported (only the V3 'sigmoid')")
        if self.topk_method not in ("noaux_tc", "greedy"):
            raise NanoseekError(f"config: topk_method {self.topk_method!r} is not supported (use 'noaux_tc')")
        if not self.rms_norm_eps > 0:
            raise NanoseekError(f"config: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers:
            self._validate_moe()
        self._validate_rope_scaling()

    def _validate_types(self) -> None:
        """Every field has its declared type (a config.json may say "rope_theta": "1e4", true for an int, NaN ...);
        floats are finite numbers (ints allowed), ints are not bools."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type.split(" | ")[0]
            if v is None and f.type.endswith("| None"):
                continue
            if kind == "int":
                ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                want = "a finite number"
            elif kind == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif kind == "str":
                ok, want = isinstance(v, str), "a string"
            else:
                continue  # rope_scaling: _validate_rope_scaling
            if not ok:
                raise NanoseekError(f"config: {f.name} must be {want}, got {v!r}")
        for name in ("rope_theta",):
            if not getattr(self, name) > 0:
                raise NanoseekError(f"config: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("initializer_range", "bos_token_id", "eos_token_id"):
            if getattr(self, name) < 0:
                raise NanoseekError(f"config: {name} must be >= 0, got {getattr(self, name)!r}")

    def _validate_moe(self) -> None:
        e, g, k, kg = self.n_routed_experts, self.n_group, self.num_experts_per_tok, self.topk_group
        if e <= 0:
            raise NanoseekError("config: n_routed_experts must be > 0 when any layer is a MoE layer "
                                "(set first_k_dense_replace = num_hidden_layers for a dense model)")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            raise NanoseekError(f"config: moe_intermediate_size must be a positive integer, got "
                                f"{self.moe_intermediate_size!r}")
        if not isinstance(g, int) or g <= 0 or e % g:
            raise NanoseekError(f"config: n_group ({g}) must be a positive divisor of n_routed_experts ({e})")
        if not isinstance(kg, int) or not 0 < kg <= g:
            raise NanoseekError(f"config: topk_group ({kg}) must be between 1 and n_group ({g})")
        if g > 1 and e // g < 2:
            raise NanoseekError(f"config: each expert group needs >= 2 experts (groups are scored by their top-2), "
                                f"got {e // g}")
        if not isinstance(k, int) or not 0 < k <= kg * (e // g):
            raise NanoseekError(f"config: num_experts_per_tok ({k}) must be between 1 and the experts in the "
                                f"selected groups (topk_group * n_routed_experts / n_group = {kg * (e // g)})")
        if not self.routed_scaling_factor > 0:
            raise NanoseekError(f"config: routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise NanoseekError(f"config: rope_scaling must be an object or null, got {rs!r}")
        kind = rs.get("type", rs.get("rope_type"))
        if kind in ("default", None) and "factor" not in rs:
            self.rope_scaling = None
            return
        if kind != "yarn":
            raise NanoseekError(f"config: rope_scaling type {kind!r} is not supported (only 'yarn')")
        factor = rs.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise NanoseekError(f"config: rope_scaling.factor must be a number >= 1, got {rs.get('factor')!r}")
        orig = rs.get("original_max_position_embeddings")
        if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
            raise NanoseekError(f"config: rope_scaling.original_max_position_embeddings must be a positive integer, "
                                f"got {orig!r}")
        for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise NanoseekError(f"config: rope_scaling.{key} must be a finite number, got {v!r}")

    # --- parameter and FLOP accounting (analytic: works for the 671B shape without allocating it) --------------
    def num_params(self) -> dict[str, int]:
        """Total and activated parameter counts, split as DeepSeek reports them (MTP counted separately)."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            attn = d * h * self.qk_head_dim
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d
        norms = 2 * d
        dense_ffn = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + self.n_routed_experts * d
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + self.n_routed_experts * d
        n_dense = self.first_k_dense_replace
        n_moe = self.num_hidden_layers - n_dense
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        body_total = n_dense * (attn + norms + dense_ffn) + n_moe * (attn + norms + moe_total)
        body_active = n_dense * (attn + norms + dense_ffn) + n_moe * (attn + norms + moe_active)
        mtp_extra = 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, shared_head.norm
        mtp_total = self.num_nextn_predict_layers * (attn + norms + moe_total + mtp_extra)
        mtp_active = self.num_nextn_predict_layers * (attn + norms + moe_active + mtp_extra)
        total = embed + head + body_total + d
        return {
            "total": total,
            "active": embed + head + body_active + d,
            "embedding": embed,
            "mtp_total": mtp_total,
            "mtp_active": mtp_active,
            "total_with_mtp": total + mtp_total,
        }

    def flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), MoE counted at its activated size.

        Matmul FLOPs = 2 * activated non-embedding weights (the embedding lookup is free, the head is a matmul),
        plus causal attention: q.k and p.v over on average (seq_len + 1) / 2 keys per query.
        """
        p = self.num_params()
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        weights = p["active"] - p["embedding"] + (p["mtp_active"] if include_mtp else 0)
        if self.tie_word_embeddings:
            weights += p["embedding"]  # the tied head is still a matmul
        attn = 2 * layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * (seq_len + 1) / 2
        return 3 * (2 * weights + attn)

    # --- Hugging Face config.json ------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,  # HF defaults this to 128: always write it
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            qk_head_dim=self.qk_head_dim,
            head_dim=self.qk_rope_head_dim,
            dtype="float32",
            use_cache=True,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        if d.get("model_type") not in (None, "deepseek_v3"):
            raise NanoseekError(f"{source}: model_type {d.get('model_type')!r} is not 'deepseek_v3'")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 writes rope_parameters = {rope_theta, rope_type, factor, ...} instead of rope_scaling
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            kw.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default" and "rope_scaling" not in d:
                kw["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
                kw["rope_scaling"]["type"] = rp.get("rope_type", rp.get("type"))
        rs = kw.get("rope_scaling")
        if isinstance(rs, dict) and "type" not in rs and "rope_type" in rs:
            kw["rope_scaling"] = {**kw["rope_scaling"], "type": kw["rope_scaling"]["rope_type"]}
        nkv = d.get("num_key_value_heads")
        if nkv is not None and nkv != d.get("num_attention_heads", nkv):
            raise NanoseekError(f"{source}: num_key_value_heads ({nkv}) != num_attention_heads: MLA has no GQA")
        if isinstance(kw.get("eos_token_id"), list):  # several stop tokens: the first is the model's eos
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        for k in ("bos_token_id", "eos_token_id"):
            if kw.get(k) is None:
                kw.pop(k, None)
        try:
            return cls(**kw)
        except TypeError as e:
            raise NanoseekError(f"{source}: {e}") from None
        except NanoseekError as e:  # validate()'s "config: ..." names the file it came from
            if source == "config":
                raise
            raise NanoseekError(f"{source}: {str(e).removeprefix('config: ')}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise NanoseekError(f"config file not found: {path}")
        d = read_json(path)
        if not isinstance(d, dict):
            raise NanoseekError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (V3 paper eq. for s = factor)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# --- presets ---------------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: every feature on (group routing, q_lora, YaRN off, MTP on), runs in milliseconds.
    "test": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                 first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, max_position_embeddings=256, routed_scaling_factor=2.5),
    # The speedrun's model (nanoseek speedrun): every V3 feature at 1.5M parameters (1.1M active), ~6k training
    # tokens/s on one core, so pre-training, SFT and GRPO all fit in half an hour on 2 cores.
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, max_position_embeddings=512),
    # The CPU default: trains to recognisable text in minutes on 2 cores (see docs/pretrain.md for the numbers).
    "cpu": dict(),
    # The real DeepSeek-V3 (671B) shape, for parameter and FLOP accounting only: never allocate it.
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
                        routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                        num_nextn_predict_layers=1, initializer_range=0.006),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise NanoseekError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

