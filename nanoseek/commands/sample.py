"""`nanoseek sample`: rejection sampling, k samples per train problem, keep the verified-correct traces
(nanoseek.train.sample)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.commands._flags import config_from_args
from nanoseek.train.evaluate import EVAL_TEMPERATURE, EVAL_TOP_P
from nanoseek.train.sample import SampleConfig, sample_traces


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (with tokenizer files)")
    p.add_argument("--task", required=True, help="task spec, e.g. arithmetic:max_digits=2,ops=+-")
    p.add_argument("-n", "--n", type=int, required=True, help="problems of the train split")
    p.add_argument("-k", "--k", type=int, default=4, help="samples per problem (default 4)")
    p.add_argument("--keep-correct", action="store_true", help="write only verified-correct samples")
    p.add_argument("--out", type=Path, required=True, help="output chat JSONL")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=EVAL_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=EVAL_TOP_P)
    p.add_argument("--batch-size", type=int, default=64, help="engine batch size (per process under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu); under torchrun "
                   "each process takes its share of the problems")


def run(args: argparse.Namespace) -> None:
    sample_traces(config_from_args(SampleConfig, args))
