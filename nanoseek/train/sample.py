"""Rejection sampling (R1 paper 2.3.3), `nanoseek sample`: k samples per train problem, keep the verified ones.

R1 built its ~600k reasoning SFT samples this way from the RL checkpoint, then fine-tuned the base model (and the
distilled students) on them. With --keep-correct a sample is written only if the task's rule-based verifier accepts
it: accuracy 1 (one </think>, one correct \\boxed{} after it), format reward > 0 (non-empty reasoning, no stray
<think>), and not cut off by --max-new-tokens. Identical completions of the same problem are written once.

Output: SFT chat JSONL (`nanoseek sft --data` / `nanoseek distill --teacher-data` read it), one sample a line:
  {"messages": [{"role": "user", "content": prompt},
                {"role": "assistant", "reasoning_content": text before </think>, "content": text after it}],
   "task": spec, "problem": index, "sample": j, "accuracy": 1.0, "format": 0.1}
sample_traces(SampleConfig) is the stage. Under torchrun each rank samples its contiguous share of the problems (seeds
from the whole job's indices, so the file is one process's) and rank 0 writes all the records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek import distributed
from nanoseek.errors import NanoseekError
from nanoseek.osutil import check_writable, write_text_atomically
from nanoseek.tasks import EOS_TEXT, Problem, Reward, Task, load_task, split_completion
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.evaluate import EVAL_TEMPERATURE, EVAL_TOP_P, check_positive
from nanoseek.train.rollout import Completion, load_engine, prompt_ids, sample_completions, score_all


def is_verified(reward: Reward, completion: Completion) -> bool:
    """Correct, well-formed (non-empty reasoning and answer) and finished with an end-of-sentence token."""
    return reward.accuracy == 1.0 and reward.format > 0 and not completion.truncated


def trace_records(problems: list[Problem], completions: list[list[Completion]], rewards: list[list[Reward]],
                  keep_correct: bool = True, task_spec: str = "", first_problem: int = 0) -> list[dict[str, Any]]:
    """Chat records for the samples (only verified ones with keep_correct), one per distinct completion text;
    "problem" is the index in the whole list (first_problem + position here)."""
    records = []
    for i, (problem, cs, rs) in enumerate(zip(problems, completions, rewards, strict=True), first_problem):
        seen: set[str] = set()
        for j, (c, r) in enumerate(zip(cs, rs, strict=True)):
            if keep_correct and not is_verified(r, c):
                continue
            text = c.text.split(EOS_TEXT, 1)[0]
            if text in seen:
                continue
            seen.add(text)
            reasoning, answer = split_completion(text)
            if reasoning is None:  # unverified and malformed (only without --keep-correct): keep the raw text
                assistant = {"role": "assistant", "content": text.strip()}
            else:
                assistant = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
            records.append({"messages": [{"role": "user", "content": problem.prompt}, assistant], "task": task_spec,
                            "problem": i, "sample": j, "accuracy": r.accuracy, "format": r.format})
    return records


def rejection_sample(engine: Any, tokenizer: Tokenizer, task: Task, problems: list[Problem], k: int,
                     max_new_tokens: int, temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P,
                     seed: int = 0, keep_correct: bool = True, task_spec: str = "",
                     ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample k completions per problem and return (records, summary counts). Under torchrun every rank passes all
    the problems, samples its share and returns every rank's records, in problem order."""
    share = distributed.shard_range(len(problems))
    mine = problems[share.start:share.stop]
    prompts = [prompt_ids(tokenizer, p) for p in mine]
    completions = sample_completions(engine, tokenizer, prompts, k, max_new_tokens, temperature, top_p, seed=seed,
                                     first_index=share.start * k)
    rewards = score_all(task, mine, completions)
    records = trace_records(mine, completions, rewards, keep_correct, task_spec, first_problem=share.start)
    verified = [[is_verified(r, c) for r, c in zip(rs, cs, strict=True)] for rs, cs in zip(rewards, completions,
                                                                                            strict=True)]
    parts = distributed.all_gather_object((records, verified))
    records, verified = sum((p[0] for p in parts), []), sum((p[1] for p in parts), [])
    summary = {"problems": len(problems), "samples": len(problems) * k, "written": len(records),
               "verified": sum(map(sum, verified)),
               "problems_with_verified": sum(any(v) for v in verified)}
    return records, summary


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    write_text_atomically(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


# ----- the stage ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SampleConfig:
    """k samples of each of n train problems from a checkpoint, written as SFT chat JSONL to `out`."""

    model: Path  # checkpoint directory (with tokenizer files)
    task: str  # task spec, e.g. arithmetic:max_digits=2,ops=+-
    n: int  # problems of the train split
    out: Path  # output chat JSONL
    k: int = 4  # samples per problem
    keep_correct: bool = False  # write only verified-correct samples
    max_new_tokens: int = 256
    temperature: float = EVAL_TEMPERATURE
    top_p: float = EVAL_TOP_P
    batch_size: int = 64  # engine batch size (per process under torchrun)
    seed: int = 0
    threads: int = 2
    device: str | None = None  # torch device (None: cuda if available, else cpu)


def sample_traces(cfg: SampleConfig) -> dict[str, float]:
    """Rejection-sample cfg.model into cfg.out; prints and returns the summary counts. One process, or one rank of
    `torchrun --nproc_per_node=N -m nanoseek sample ...`."""
    return distributed.run(distributed.resolve_device(cfg.device), lambda device: _sample_traces(cfg, device))


def _sample_traces(cfg: SampleConfig, device: torch.device) -> dict[str, float]:
    check_positive(n=cfg.n, k=cfg.k, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                   threads=cfg.threads)
    if cfg.out.is_dir():
        raise NanoseekError(f"--out {cfg.out} is a directory; give the JSONL file to write")
    check_writable(cfg.out.parent, "--out's directory")  # before the sampling, not after it
    if cfg.temperature <= 0 and cfg.k > 1:
        raise NanoseekError("--temperature 0 is greedy: all k samples would be identical; use k=1 or sample")
    torch.set_num_threads(cfg.threads)
    task = load_task(cfg.task)
    engine = load_engine(cfg.model, cfg.batch_size, device=device)
    tokenizer = Tokenizer.from_dir(cfg.model)
    problems = task.problems("train", cfg.n, seed=cfg.seed)
    records, summary = rejection_sample(engine, tokenizer, task, problems, cfg.k, cfg.max_new_tokens,
                                        cfg.temperature, cfg.top_p, cfg.seed, cfg.keep_correct, cfg.task)
    if distributed.is_main():
        write_jsonl(records, cfg.out)
    print(f"{summary['verified']}/{summary['samples']} samples verified correct; "
          f"{summary['problems_with_verified']}/{summary['problems']} problems have at least one; "
          f"wrote {summary['written']} records to {cfg.out}")
    return summary
