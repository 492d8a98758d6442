"""`nanoseek eval`: pass@1 (greedy, sampled), pass@k and maj@k of a checkpoint on a task's test split
(nanoseek.train.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.commands._flags import config_from_args
from nanoseek.errors import NanoseekError
from nanoseek.osutil import read_json
from nanoseek.train.evaluate import (
    EVAL_TEMPERATURE,
    EVAL_TOP_P,
    EvalConfig,
    evaluate_checkpoint,
    format_comparison,
    paired_comparison,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="checkpoint directory (with tokenizer files)")
    p.add_argument("--task", help="task spec, e.g. arithmetic or arithmetic:max_digits=2,ops=+-")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("A.json", "B.json"),
                   help="instead of evaluating: compare two --json results problem by problem (exact McNemar for "
                        "greedy pass@1 and maj@k, paired bootstrap for sampled pass@1)")
    p.add_argument("-n", "--n", type=int, default=200, help="problems (default 200)")
    p.add_argument("--split", choices=("val", "test"), default="test",
                   help="test (default), or val: held out of train, for choosing settings without the test split")
    p.add_argument("--zero", action="store_true",
                   help="prompt with the R1-Zero template, as `nanoseek rl --zero` trained the model")
    p.add_argument("--k", type=int, default=4, help="samples per problem for sampled pass@1/pass@k/maj@k "
                   "(default 4; 0 = greedy only)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=EVAL_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=EVAL_TOP_P)
    p.add_argument("--batch-size", type=int, default=64,
                   help="engine batch size (sequences decoded together; per process under torchrun)")
    p.add_argument("--seed", type=int, default=0, help="problem draw and sampling seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu); under torchrun "
                   "each process takes its share of the problems")


def run(args: argparse.Namespace) -> None:
    if args.compare:
        a, b = args.compare
        print(format_comparison(paired_comparison(read_json(a), read_json(b)), str(a), str(b)))
        return
    if args.model is None or args.task is None:
        raise NanoseekError("eval needs --model and --task (or --compare A.json B.json)")
    evaluate_checkpoint(config_from_args(EvalConfig, args))
