"""`nanoseek export --format gguf`: a checkpoint as one GGUF file for llama.cpp / Ollama (nanoseek.export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.export import ARCH, DTYPES, FORMATS, export_gguf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--format", choices=FORMATS, default="gguf", help="output format (default: gguf)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="weight type (default f32; norms and the router always stay f32)")
    p.add_argument("-o", "--output", type=Path, help="output file (default: <checkpoint>/<name>-<dtype>.gguf)")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json, if not in the checkpoint")


def run(args: argparse.Namespace) -> None:
    out = args.output or args.checkpoint / f"{args.checkpoint.resolve().name}-{args.dtype}.gguf"
    path = export_gguf(args.checkpoint, out, args.dtype, tokenizer_dir=args.tokenizer)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {ARCH}, {args.dtype})")
