"""`nanoseek distill`: SFT of a small dense student on a teacher's verified reasoning traces (R1 paper 2.4).

R1's distilled models (Qwen/Llama 1.5B-70B) are plain SFT on the ~800k samples from rejection sampling, with no RL.
Here the student is a fresh model from a preset or config.json made dense: every block uses the dense SwiGLU FFN
(first_k_dense_replace = num_hidden_layers, n_routed_experts = 0) and it has no MTP module, like the dense students
R1 distils into. It uses the teacher's tokenizer (so the traces tokenize the same) and the SFT loop of sft.py.

    nanoseek sample --model rl_ckpt --task T -n 2000 -k 4 --keep-correct --out traces.jsonl
    nanoseek distill --teacher-data traces.jsonl --teacher rl_ckpt --student-preset test --out runs/student
    -> runs/student/final (HF checkpoint + the teacher's tokenizer), run.json, loss.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.sft import add_data_arguments, encode_for_training, fit, init_model, read_chat_jsonl, setup_threads
from nanoseek.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-data", type=Path, nargs="+", required=True,
                   help="chat JSONL traces from `nanoseek sample --keep-correct`")
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint directory (its tokenizer is used)")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-preset", choices=list(PRESETS), help="student shape (made dense, no MTP)")
    student.add_argument("--student-config", type=Path, help="student config.json (made dense, no MTP)")
    add_data_arguments(p, lr=1e-3, out="runs/distill")  # a fresh student: a from-scratch learning rate


def run(args: argparse.Namespace) -> None:
    setup_threads(args)
    tokenizer = Tokenizer.from_dir(args.teacher)
    vocab_size = tokenizer.vocab_size
    if (args.teacher / "config.json").is_file():  # keep the teacher's (possibly padded) embedding size
        vocab_size = max(vocab_size, ModelConfig.load(args.teacher).vocab_size)
    convs = [c for path in args.teacher_data for c in read_chat_jsonl(path)]
    if not convs:  # e.g. a teacher that got no sample right: say so, not sft's generic "no training data"
        raise NanoseekError(f"distill: no traces in {', '.join(map(str, args.teacher_data))}; did `nanoseek sample "
                            f"--keep-correct` keep none (0 verified-correct samples)?")
    student = init_model(args.student_preset, args.student_config, vocab_size, dense=True, seed=args.seed)
    if student.config.n_routed_experts or student.config.num_nextn_predict_layers:
        raise NanoseekError("distill: the student must be dense without MTP")  # dense_student_config guarantees it
    examples = encode_for_training(tokenizer, convs, args, student.config.max_position_embeddings)
    fit(student, examples, args, tokenizer.pad_id, args.teacher, stage="distill")
