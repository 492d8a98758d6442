"""A checkpoint as one GGUF file for llama.cpp / Ollama (architecture `deepseek2`); `nanoseek export --format gguf`.

llama.cpp runs DeepSeek-V2/V3 as `deepseek2` with absorbed MLA (V3 code's "absorb" mode): it caches the latent and
needs kv_b_proj split per head into W_UK (transposed, `attn_k_b`) and W_UV (`attn_v_b`). Everything else is a rename:

  nanoseek (HF) tensor                              GGUF tensor (torch shape as written)
  embed_tokens / norm / lm_head                     token_embd / output_norm / output
  layers.N.input_layernorm                          blk.N.attn_norm [D]
  self_attn.q_a_proj, q_a_layernorm, q_b_proj       attn_q_a, attn_q_a_norm, attn_q_b  (q_proj -> attn_q)
  self_attn.kv_a_proj_with_mqa, kv_a_layernorm      attn_kv_a_mqa, attn_kv_a_norm
  self_attn.kv_b_proj [H*(nope+v), c]               attn_k_b [H, c, nope] + attn_v_b [H, v, c]
  self_attn.o_proj                                  attn_output
  post_attention_layernorm                          ffn_norm
  mlp.{gate,up,down}_proj (first k dense layers)    ffn_{gate,up,down}
  mlp.gate.weight, e_score_correction_bias          ffn_gate_inp [E, D], exp_probs_b.bias [E]
  mlp.gate_up_proj [E, 2I, D]                       ffn_gate_exps [E, I, D] + ffn_up_exps [E, I, D]
  mlp.down_proj [E, D, I]                           ffn_down_exps [E, D, I]
  mlp.shared_experts.{gate,up,down}_proj            ffn_{gate,up,down}_shexp

GGUF lists dims innermost first, so a torch [out, in] weight is ggml {in, out}: arrays are written as they are.

RoPE: llama.cpp's deepseek2 graph rotates consecutive pairs (ggml "NORM" rope), which is exactly the layout of the
released weights (rope_interleave=true), so those rows are written unpermuted, as llama.cpp's own converter does.
A checkpoint with rope_interleave=false has its rope rows in half-split order; they are interleaved back here.

Not exported: the MTP modules (layers >= num_hidden_layers). llama.cpp's converter skips them for DeepSeek too, and a
GGUF with extra blocks does not load in older llama.cpp / Ollama builds; block_count = num_hidden_layers.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint import check_checkpoint_dir, load_model
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import MoE, Transformer, rope_frequencies
from nanoseek.osutil import check_writable, read_json, write_failed

FORMATS = ("gguf",)
DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deepseek2"


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise NanoseekError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


# --- tensors ---------------------------------------------------------------------------------------------------------
def _interleave_rope(w: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Rows [..., rope_dim, in] in half-split order (x_0..x_{d/2-1}, then their partners) -> consecutive pairs."""
    first, second = w[..., : rope_dim // 2, :], w[..., rope_dim // 2:, :]
    return torch.stack([first, second], dim=-2).flatten(-3, -2)


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in torch layout) for every tensor llama.cpp's deepseek2 loader reads, in file order."""
    cfg = model.config
    h, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c = cfg.kv_lora_rank

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().float().contiguous()

    yield "token_embd.weight", t(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        attn = layer.self_attn
        yield p + "attn_norm.weight", t(layer.input_layernorm.weight)
        q_w = attn.q_proj.weight if cfg.q_lora_rank is None else attn.q_b_proj.weight  # [H*(nope+rope), in]
        kv_a = attn.kv_a_proj_with_mqa.weight  # [c+rope, D]
        if not cfg.rope_interleave:
            q_w = q_w.view(h, nope + rope, -1)
            q_w = torch.cat([q_w[:, :nope], _interleave_rope(q_w[:, nope:], rope)], dim=1).flatten(0, 1)
            kv_a = torch.cat([kv_a[:c], _interleave_rope(kv_a[c:], rope)])
        if cfg.q_lora_rank is None:
            yield p + "attn_q.weight", t(q_w)
        else:
            yield p + "attn_q_a.weight", t(attn.q_a_proj.weight)
            yield p + "attn_q_a_norm.weight", t(attn.q_a_layernorm.weight)
            yield p + "attn_q_b.weight", t(q_w)
        yield p + "attn_kv_a_mqa.weight", t(kv_a)
        yield p + "attn_kv_a_norm.weight", t(attn.kv_a_layernorm.weight)
        kv_b = attn.kv_b_proj.weight.view(h, nope + v, c)  # per head: W_UK rows then W_UV rows
        yield p + "attn_k_b.weight", t(kv_b[:, :nope].transpose(1, 2))  # [H, c, nope]: absorbed into q_nope
        yield p + "attn_v_b.weight", t(kv_b[:, nope:])  # [H, v, c]
        yield p + "attn_output.weight", t(attn.o_proj.weight)
        yield p + "ffn_norm.weight", t(layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            yield p + "ffn_gate.weight", t(mlp.gate_proj.weight)
            yield p + "ffn_up.weight", t(mlp.up_proj.weight)
            yield p + "ffn_down.weight", t(mlp.down_proj.weight)
            continue
        inter = cfg.moe_intermediate_size
        yield p + "ffn_gate_inp.weight", t(mlp.gate.weight)
        yield p + "exp_probs_b.bias", t(mlp.gate.e_score_correction_bias)
        yield p + "ffn_gate_exps.weight", t(mlp.gate_up_proj[:, :inter])  # [E, I, D]
        yield p + "ffn_up_exps.weight", t(mlp.gate_up_proj[:, inter:])
        yield p + "ffn_down_exps.weight", t(mlp.down_proj)  # [E, D, I]
        if mlp.shared_experts is not None:
            yield p + "ffn_gate_shexp.weight", t(mlp.shared_experts.gate_proj.weight)
            yield p + "ffn_up_shexp.weight", t(mlp.shared_experts.up_proj.weight)
            yield p + "ffn_down_shexp.weight", t(mlp.shared_experts.down_proj.weight)
        else:  # the loader requires shared experts: one all-zero expert adds exactly 0
            d = cfg.hidden_size
            yield p + "ffn_gate_shexp.weight", torch.zeros(inter, d)
            yield p + "ffn_up_shexp.weight", torch.zeros(inter, d)
            yield p + "ffn_down_shexp.weight", torch.zeros(d, inter)
    yield "output_norm.weight", t(model.norm.weight)
    if not cfg.tie_word_embeddings:  # tied: llama.cpp falls back to token_embd
        yield "output.weight", t(model.lm_head.weight)


def _ggml_type(gguf: Any, name: str, x: np.ndarray, dtype: str) -> Any:
    """The storage type of one tensor: norms, biases and the router stay F32 (llama.cpp's converter does the same:
    1-D ops expect F32, and expert selection is sensitive to rounding); other weights take `dtype`."""
    q = gguf.GGMLQuantizationType
    if x.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or ".ffn_gate_inp." in name:
        return q.F32
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]


# --- tokenizer -------------------------------------------------------------------------------------------------------
def _pre_tokenizer_name(pre: dict[str, Any] | None, source: Path) -> str:
    """llama.cpp's name for the pre-tokenizer regexes equal to this tokenizer.json pre_tokenizer.

    GPT-2 byte-level regex alone -> "gpt-2"; individual digits (\\p{N}) then the GPT-2 regex -> "starcoder"
    (nanoseek's tokenizer: StarCoder's exact pre-tokenizer).
    """
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and last.get("use_regex", True) and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "starcoder"
    raise NanoseekError(f"{source}: pre_tokenizer {json.dumps(pre)} has no llama.cpp equivalent "
                        f"(supported: byte-level GPT-2 regex, optionally after individual digits)")


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_vocab(tok_dir: Path, n_vocab: int, config: ModelConfig) -> dict[str, Any]:
    """Everything GGUF needs from tokenizer.json + tokenizer_config.json, padded to the model's n_vocab rows."""
    try:
        return _read_vocab(tok_dir, n_vocab, config)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # JSON of the wrong shape: a list, ids as strings
        raise NanoseekError(f"{tok_dir}: tokenizer.json / tokenizer_config.json are not the tokenizer files GGUF "
                            f"needs ({type(e).__name__}: {e})") from None


def _read_vocab(tok_dir: Path, n_vocab: int, config: ModelConfig) -> dict[str, Any]:
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise NanoseekError(f"{tok_file} not found: GGUF needs the tokenizer (pass --tokenizer DIR)")
    tj = read_json(tok_file)
    bpe = tj.get("model") or {}
    if bpe.get("type") != "BPE" or tj.get("normalizer") is not None:
        raise NanoseekError(f"{tok_file}: only byte-level BPE without a normalizer exports to GGUF "
                            f"(model type {bpe.get('type')!r}, normalizer {tj.get('normalizer')!r})")
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"), tok_file)

    by_id: dict[int, str] = {i: s for s, i in bpe.get("vocab", {}).items()}
    special: set[int] = set()
    user_defined: set[int] = set()
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]  # added tokens are raw text, as llama.cpp expects for CONTROL tokens
        (special if added.get("special") else user_defined).add(added["id"])
    if by_id and max(by_id) >= n_vocab:
        raise NanoseekError(f"{tok_file}: token id {max(by_id)} does not fit the model's vocab_size {n_vocab}")
    q = _import_gguf().TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows with no token (vocab padded for matmul speed)
            tokens.append(f"[PAD{i}]")
            types.append(q.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(q.CONTROL if i in special else q.USER_DEFINED if i in user_defined else q.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]

    tc: dict[str, Any] = {}
    cfg_file = tok_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        tc = read_json(cfg_file)
    ids = {s: i for i, s in by_id.items()}

    def special_id(key: str, default: int | None) -> int | None:
        text = _token_content(tc.get(key))
        if text is None:
            return default
        if text not in ids:
            raise NanoseekError(f"{cfg_file}: {key} {text!r} is not in the vocabulary")
        return ids[text]

    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": special_id("bos_token", config.bos_token_id), "eos": special_id("eos_token", config.eos_token_id),
        "pad": special_id("pad_token", None),
        "add_bos": bool(tc.get("add_bos_token", False)), "add_eos": bool(tc.get("add_eos_token", False)),
        "chat_template": template,
    }


# --- metadata --------------------------------------------------------------------------------------------------------
def _check_rope_scaling(cfg: ModelConfig, origin: str) -> None:
    """llama.cpp's deepseek2 YaRN scales the softmax by mscale(mscale_all_dim)^2 and leaves cos/sin unscaled: nanoseek
    (and HF) compute the same only when a rope scale factor of 1 is implied (mscale == mscale_all_dim, as in V2/V3)."""
    rs = cfg.rope_scaling
    if not rs:
        return
    _, attention_factor = rope_frequencies(cfg)
    if not rs.get("mscale_all_dim") or abs(attention_factor - 1.0) > 1e-6:
        raise NanoseekError(f"{origin}: rope_scaling {rs} cannot be expressed in llama.cpp's deepseek2 YaRN "
                            f"(it needs mscale == mscale_all_dim, as DeepSeek-V2/V3 use)")


def _write_metadata(w: Any, gguf: Any, cfg: ModelConfig, name: str, dtype: str) -> None:
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # MLA as llama.cpp sees it: MQA over the latent (one kv head of width c + rope, values = the latent itself);
    # the *_mla lengths are the per-head sizes after decompression.
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0 = plain attn_q (the loader reads this key for non-"lite" depths)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        # stored as 0.1 * mscale_all_dim: llama.cpp divides by 0.1 when loading deepseek2 (its converter's convention)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
    # DeepSeekMoE
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(max(cfg.n_shared_experts, 1))  # 0 shared -> one all-zero expert (see gguf_tensors)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    if 1 < cfg.n_group and cfg.topk_group < cfg.n_group:  # llama.cpp asserts group_used < group_count
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)


def _write_vocab(w: Any, vocab: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        w.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:
        w.add_eos_token_id(vocab["eos"])
    if vocab["pad"] is not None:
        w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])


# --- export ----------------------------------------------------------------------------------------------------------
def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "f32",
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write the checkpoint at `model_dir` (HF DeepseekV3 layout + tokenizer.json) as a llama.cpp `deepseek2` GGUF.

    dtype applies to the 2-D/3-D weights ("q8_0" falls back to f16 for rows not a multiple of 32); norms, the router
    and its bias stay f32. The file is written under a temporary name and renamed into place.
    """
    gguf = _import_gguf()
    if dtype not in DTYPES:
        raise NanoseekError(f"export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    check_checkpoint_dir(model_dir)
    if out_path.is_dir():
        raise NanoseekError(f"-o {out_path} is a directory; give the .gguf file to write")
    check_writable(out_path.parent, "the output directory")  # before the conversion, not after it
    model = load_model(model_dir)
    cfg = model.config
    _check_rope_scaling(cfg, str(model_dir / "config.json"))
    vocab = read_vocab(Path(tokenizer_dir) if tokenizer_dir else model_dir, cfg.vocab_size, cfg)

    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    w = None
    try:
        w = gguf.GGUFWriter(tmp, ARCH)
        _write_metadata(w, gguf, cfg, model_dir.resolve().name, dtype)
        _write_vocab(w, vocab)
        for name, tensor in gguf_tensors(model):
            x = tensor.numpy()
            qtype = _ggml_type(gguf, name, x, dtype)
            try:
                data = gguf.quants.quantize(x, qtype)
            except gguf.QuantError:  # Q8_0 needs rows of 32: keep such small tensors in f16
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except OSError as e:  # a full disk, a read-only directory: no partial .gguf is left behind
        raise write_failed(out_path, e) from None
    finally:
        if w is not None and w.fout is not None:
            with contextlib.suppress(OSError):
                w.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out_path


# --- CLI -------------------------------------------------------------------------------------------------------------
