"""`nanoseek sft`: supervised fine-tuning on chat JSONL and/or a task's reasoning traces (nanoseek.train.sft)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.commands._flags import add_distributed_arguments, add_finetune_arguments, config_from_args
from nanoseek.config import PRESETS
from nanoseek.train.sft import SFTConfig, sft


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint directory to fine-tune (with tokenizer files)")
    src.add_argument("--preset", choices=list(PRESETS), help="start from scratch with this preset (needs --tokenizer)")
    src.add_argument("--config", type=Path, help="start from scratch with this config.json (needs --tokenizer)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the --model directory)")
    p.add_argument("--data", type=Path, nargs="+", help="chat JSONL file(s): {\"messages\": [...]} per line")
    p.add_argument("--task", help="add synthetic reasoning traces of this task, e.g. arithmetic:max_digits=2")
    p.add_argument("--n", type=int, help="number of task traces (train split)")
    add_finetune_arguments(p, SFTConfig())
    add_distributed_arguments(p, SFTConfig())


def run(args: argparse.Namespace) -> None:
    sft(config_from_args(SFTConfig, args))
