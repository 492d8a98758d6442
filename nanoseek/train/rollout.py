"""Rollouts: the chat prompt of a problem, completions sampled through the Engine, and their rule-based rewards.

What every reasoning stage shares: evaluation (evaluate.py), GRPO (grpo.py) and rejection sampling (sample.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tasks import Problem, Reward, Task
from nanoseek.tokenizer import Tokenizer


@dataclass
class Completion:
    ids: list[int]  # generated tokens, cut after the first end-of-sentence token (which is kept)
    text: str  # decoded with special tokens kept: </think> is a special token and the scorer needs it
    truncated: bool  # stopped by max_new_tokens before an end-of-sentence token


def prompt_ids(tokenizer: Tokenizer, problem: Problem) -> list[int]:
    """The R1 chat prompt for a problem: <bos><｜User｜>{prompt}<｜Assistant｜><think>\\n (no system prompt, as R1
    advises; the generation prompt forces the model to open its reasoning)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], add_generation_prompt=True)


def sample_completions(engine: Engine, tokenizer: Tokenizer, prompts: list[list[int]], n: int,
                       max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                       seed: int = 0) -> list[list[Completion]]:
    """n completions for each prompt, all decoded together by the engine; result[i][j] = sample j of prompt i.

    Each request gets its own seed (seed * 1_000_003 + its index), so the n samples of a prompt differ and the whole
    call is reproducible. temperature 0 is greedy decoding (then n should be 1: every sample would be the same).
    """
    if not prompts or n <= 0:
        return [[] for _ in prompts]
    stop = [tokenizer.eos_id]
    reqs = [engine.submit(p, SamplingParams(max_new_tokens, temperature, top_p, top_k, stop, seed * 1_000_003 + i))
            for i, p in enumerate(p for p in prompts for _ in range(n))]  # prompt-major: row i*n + j
    while not all(r.finished for r in reqs):
        engine.step()
    completions = []
    for r in reqs:
        # the engine does not emit the stop token; put it back so the text and the RL training targets end with it
        ids = list(r.output_ids) + ([tokenizer.eos_id] if r.finish_reason == "stop" else [])
        completions.append(Completion(ids, tokenizer.decode(ids), r.finish_reason == "length"))
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]


def score_all(task: Task, problems: list[Problem], completions: list[list[Completion]]) -> list[list[Reward]]:
    return [[task.score(p, c.text) for c in cs] for p, cs in zip(problems, completions, strict=True)]


def load_engine(model_dir: Path, max_batch_size: int, max_seq_len: int | None = None) -> Engine:
    """An engine over a checkpoint directory (`eval`, `sample`), with the default decode path (the native kernels
    on a CPU that runs them), which it names on stderr."""
    engine = Engine.from_pretrained(model_dir, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    print(f"engine: {engine.stats()['decode_path']}", file=sys.stderr)
    return engine


def make_engine(model: Transformer, rows: int, max_seq_len: int) -> Engine:
    """A fresh engine over a model's current weights (the engine keeps fused copies of some weights, so one built
    before an optimizer step would sample from the old policy)."""
    return Engine(model, max_batch_size=rows, max_seq_len=min(max_seq_len, model.config.max_position_embeddings))
