"""`nanoseek info`: parameter counts, KV-cache size and training FLOPs per token of a preset, config or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig, get_preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), default="cpu", help="a named preset (default: cpu)")
    src.add_argument("--config", type=Path, help="a config.json file or a checkpoint directory")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the attention FLOPs (default 4096)")


def describe(cfg: ModelConfig, seq_len: int) -> str:
    n = cfg.num_params()
    layers = cfg.num_hidden_layers
    mla_cache = cfg.kv_cache_bytes_per_token(bytes_per_element=1)  # elements
    mha_cache = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * layers
    rows = [
        ("parameters (total, main model)", f"{n['total']:,}"),
        ("parameters (activated per token)", f"{n['active']:,}"),
        ("MTP modules (total / activated)", f"{n['mtp_total']:,} / {n['mtp_active']:,}"),
        ("KV cache per token, MLA latent", f"{mla_cache:,} elements ({mla_cache * 2:,} B in bf16)"),
        ("KV cache per token, expanded MHA", f"{mha_cache:,} elements ({mha_cache * 2:,} B in bf16)"),
        (f"training FLOPs per token (seq {seq_len})", f"{cfg.flops_per_token(seq_len):.4g}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> None:
    if args.config is not None and args.config.is_dir() and any(args.config.glob("*.safetensors")):
        from nanoseek.checkpoint import checkpoint_config  # a checkpoint: counted as it loads (MTP only if held)

        cfg = checkpoint_config(args.config)
    else:
        cfg = ModelConfig.load(args.config) if args.config else get_preset(args.preset)
    print(describe(cfg, args.seq_len))
