"""Rollouts: the chat prompt of a problem, completions sampled through the Engine, and their rule-based rewards.

What every reasoning stage shares: evaluation (evaluate.py), GRPO (grpo.py) and rejection sampling (sample.py).
Under torchrun each rank samples its share of the problems with its own engine; a request's seed comes from its
index in the whole job (first_index), so the samples do not depend on the number of processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek import distributed
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tasks import Problem, Reward, Task
from nanoseek.tokenizer import Tokenizer


@dataclass
class Completion:
    ids: list[int]  # generated tokens, cut after the first end-of-sentence token (which is kept)
    text: str  # decoded with special tokens kept: </think> is a special token and the scorer needs it
    truncated: bool  # stopped by max_new_tokens before an end-of-sentence token


# DeepSeek-R1-Zero's template (R1 paper, Table 1), with the answer asked for in \boxed{} (the tasks' rule) instead of
# <answer> tags. The base model gets plain text, no chat tokens: R1-Zero is RL straight from the pre-trained model.
ZERO_TEMPLATE = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
                 "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
                 "the answer. The reasoning process is enclosed within <think> </think>, and the final answer follows "
                 "it within \\boxed{{}}, i.e., <think> reasoning process here </think> answer here. "
                 "User: {prompt}\nAssistant: <think>\n")


def prompt_ids(tokenizer: Tokenizer, problem: Problem, zero: bool = False) -> list[int]:
    """The R1 chat prompt for a problem: <bos><｜User｜>{prompt}<｜Assistant｜><think>\\n (no system prompt, as R1
    advises; the generation prompt forces the model to open its reasoning). zero=True: the R1-Zero plain-text
    template (ZERO_TEMPLATE) for RL from a base model; it also ends in <think>\\n, so completions are scored alike."""
    if zero:
        return tokenizer.encode(ZERO_TEMPLATE.format(prompt=problem.prompt), add_bos=True)
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], add_generation_prompt=True)


def sample_completions(engine: Engine, tokenizer: Tokenizer, prompts: list[list[int]], n: int,
                       max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                       seed: int = 0, first_index: int = 0) -> list[list[Completion]]:
    """n completions for each prompt, all decoded together by the engine; result[i][j] = sample j of prompt i.

    Each request gets its own seed (seed * 1_000_003 + first_index + its index), so the n samples of a prompt differ
    and the whole call is reproducible; a rank that samples prompts p0.. of a larger batch passes first_index = p0 * n
    and draws what one process would. temperature 0 is greedy decoding (then n should be 1).
    """
    if not prompts or n <= 0:
        return [[] for _ in prompts]
    stop = [tokenizer.eos_id]
    reqs = [engine.submit(p, SamplingParams(max_new_tokens, temperature, top_p, top_k, stop,
                                            seed * 1_000_003 + first_index + i))
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


def load_engine(model_dir: Path, max_batch_size: int, max_seq_len: int | None = None,
                device: torch.device | None = None) -> Engine:
    """An engine over a checkpoint directory on `device` (default the CPU) for `eval` and `sample`: bf16 weights and
    cache on CUDA, fp32 on the CPU (distributed.inference_dtype), with the default decode path (the native kernels on
    a CPU that runs them), which it names on stderr."""
    device = torch.device("cpu") if device is None else device
    engine = Engine.from_pretrained(model_dir, dtype=distributed.inference_dtype(device),
                                    max_batch_size=max_batch_size, max_seq_len=max_seq_len, device=str(device))
    print(f"engine: {engine.stats()['decode_path']}", file=sys.stderr)
    return engine


def make_engine(model: Transformer, rows: int, max_seq_len: int) -> Engine:
    """A fresh engine over a model's current weights (the engine keeps fused copies of some weights, so one built
    before an optimizer step would sample from the old policy)."""
    return Engine(model, max_batch_size=rows, max_seq_len=min(max_seq_len, model.config.max_position_embeddings))


class RolloutWeights:
    """The plain model a rank's engine samples from while `policy` trains: the policy itself in one process on the
    CPU; otherwise a copy refreshed from it before each use (current()): the whole weights under FSDP (gathered
    from the shards, a collective), in bf16 on CUDA (distributed.inference_dtype; the routing biases stay fp32)."""

    def __init__(self, policy: Transformer):
        self.policy = policy
        p = next(policy.parameters())
        device = p.device
        dtype = distributed.inference_dtype(device)
        self.copy: Transformer | None = None
        if distributed.is_sharded(policy) or dtype != p.dtype:
            with torch.random.fork_rng(devices=[]), torch.device(device):  # the init draws no numbers of the run's
                self.copy = Transformer(policy.config).to(dtype).eval().requires_grad_(False)
            for gate in self.copy.gates():
                gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()

    def current(self) -> Transformer:
        """The policy's current weights as a plain model (every rank must call this under FSDP)."""
        if self.copy is None:
            return self.policy
        distributed.copy_full_weights(self.policy, self.copy)
        return self.copy
