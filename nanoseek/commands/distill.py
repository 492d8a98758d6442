"""`nanoseek distill`: SFT of a small dense student on a teacher's verified reasoning traces (nanoseek.train.sft).

    nanoseek sample --model rl_ckpt --task T -n 2000 -k 4 --keep-correct --out traces.jsonl
    nanoseek distill --teacher-data traces.jsonl --teacher rl_ckpt --student-preset test --out runs/student
    nanoseek distill --teacher-data traces.jsonl --teacher rl_ckpt --student-model runs/student_base/final ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.commands._flags import add_distributed_arguments, add_finetune_arguments, config_from_args
from nanoseek.config import PRESETS
from nanoseek.train.sft import DistillConfig, distill


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-data", type=Path, nargs="+", required=True,
                   help="chat JSONL traces from `nanoseek sample --keep-correct`")
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint directory (its tokenizer is used)")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-preset", choices=list(PRESETS), help="student shape (made dense, no MTP)")
    student.add_argument("--student-config", type=Path, help="student config.json (made dense, no MTP)")
    student.add_argument("--student-model", type=Path,
                         help="a pre-trained dense checkpoint on the teacher's tokenizer (as R1 distils into "
                              "pre-trained models)")
    d = DistillConfig(teacher_data=[], teacher=Path())
    add_finetune_arguments(p, d)
    add_distributed_arguments(p, d)


def run(args: argparse.Namespace) -> None:
    distill(config_from_args(DistillConfig, args))
