"""Evaluation, `nanoseek eval`: pass@1 (greedy and sampled), pass@k and maj@k of a checkpoint on a task's test split.

R1 evaluates reasoning by sampling (temperature 0.6, top-p 0.95) and averaging correctness over k samples per problem
("pass@1"), because greedy decoding of long chains of thought repeats itself and varies from checkpoint to
checkpoint. We report both, plus

  pass@k   the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) with n samples, c correct
  maj@k    majority vote over the k samples' answers by verified value (Task.answer_key: equal countdown expressions
           vote together; R1's cons@64), ties to the first seen

Confidence intervals (95%) are over problems: Wilson score intervals for the two 0/1-per-problem metrics (greedy
pass@1, maj@k) and percentile bootstrap (2000 resamples of the problems) for the averaged ones (sampled pass@1,
pass@k), whose per-problem values are fractions rather than Bernoulli outcomes.

evaluate_checkpoint(EvalConfig) is the stage; evaluate() and greedy_accuracy() score an engine already built (the RL
monitor, the benchmarks). Prompts, sampling and scoring come from rollout.py. Under torchrun each rank decodes its
contiguous share of the problems with its own engine (request seeds from the whole job's indices), and every rank gets
the gathered per-problem results, so the metrics are one process's.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek import distributed
from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.osutil import check_writable, write_text_atomically
from nanoseek.tasks import Problem, Reward, Task, distinct_problems, load_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.rollout import load_engine, prompt_ids, sample_completions, score_all

EVAL_TEMPERATURE = 0.6  # R1's evaluation sampling settings
EVAL_TOP_P = 0.95


# ----- metrics ------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k)/C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(keys: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer is correct. keys are the samples' answer keys (Reward.key: the verified value,
    so "3 * 4 + 5" and "5 + 4 * 3" vote together) or parsed strings (compared without whitespace); None (unparsed)
    does not vote; a tie goes to the answer seen first. Samples with the same key are judged alike, so any one of
    them decides."""
    keys = ["".join(k.split()) if isinstance(k, str) else k for k in keys]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == best)
    return bool(correct[keys.index(winner)])


def vote_key(r: Reward) -> Hashable | None:
    """A sample's vote: its answer key, or its parsed string from a task whose own score() sets no key."""
    return r.key if r.key is not None else r.parsed


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sensible at 0% and 100%, unlike p ± z·se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-problem values (problems resampled with replacement)."""
    if not values:
        return 0.0, 1.0
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(len(v), (n_boot, len(v)), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def mcnemar_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Exact two-sided McNemar test of paired 0/1 outcomes of two models on the same problems: only the discordant
    problems count (b_only: b right and a wrong; a_only: the reverse); under "no difference" each is a fair coin, so
    p = 2 * P(Binomial(b_only + a_only, 1/2) <= min(b_only, a_only)), capped at 1."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths: {len(a)} and {len(b)}")
    b_only = sum(1 for x, y in zip(a, b, strict=True) if x < 0.5 <= y)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if y < 0.5 <= x)
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return {"b_only": b_only, "a_only": a_only, "p": min(1.0, 2 * tail / 2**n) if n else 1.0}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean of b - a over paired per-problem values (e.g. the fraction of k samples correct), its 95% percentile
    interval over problems resampled with replacement, and a two-sided p-value: how often the resampled mean, centred
    on the observed one, is at least as far from it as the observed mean is from 0 (at least 1 / n_boot)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two non-empty lists of one length, got {len(a)} and {len(b)}")
    d = torch.tensor([y - x for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (n_boot, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    obs = float(d.mean())
    p = float(((means - obs).abs() >= abs(obs)).double().mean()) if obs else 1.0
    return {"delta": obs, "ci95": [lo, hi], "p": max(p, 1 / n_boot)}


def paired_comparison(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Compare two `evaluate` results (model a, then model b) problem by problem on the problems both scored:
    greedy pass@1 by the exact McNemar test, sampled pass@1 and maj@k by the paired bootstrap / McNemar. Problems
    are matched by identity, so the evals must have drawn the same problems (same task, split, n and seed)."""
    oa, ob = a.get("outcomes"), b.get("outcomes")
    if not oa or not ob:
        raise NanoseekError("paired comparison needs per-problem outcomes in both results (evals written by "
                            "nanoseek eval since 2026-12-05)")
    index_b = {pid: i for i, pid in enumerate(ob["problem"])}
    pairs = [(i, index_b[pid]) for i, pid in enumerate(oa["problem"]) if pid in index_b]
    if not pairs:
        raise NanoseekError("the two evals share no problem: evaluate both on the same task, split, -n and --seed")
    out: dict[str, Any] = {"n": len(pairs)}
    for name in ("greedy", "sampled", "maj"):
        if oa.get(name) is not None and ob.get(name) is not None:
            xa, xb = [oa[name][i] for i, _ in pairs], [ob[name][j] for _, j in pairs]
            row = {"a": sum(xa) / len(xa), "b": sum(xb) / len(xb)}
            row["delta"] = row["b"] - row["a"]
            if name == "sampled":
                row.update(paired_bootstrap(xa, xb), test="paired bootstrap")
            else:
                row.update(mcnemar_test(xa, xb), test="McNemar exact")
            out[name] = row
    return out


def _metric(values: Sequence[float], method: str) -> dict[str, Any]:
    est = sum(values) / len(values) if values else 0.0
    lo, hi = wilson_interval(sum(values), len(values)) if method == "wilson" else bootstrap_interval(values)
    return {"value": est, "ci95": [lo, hi], "ci_method": method}


def compute_metrics(greedy: list[Reward] | None, sampled: list[list[Reward]] | None, k: int) -> dict[str, Any]:
    """Metrics over problems from greedy rewards [n_problems] and sampled rewards [n_problems][k]."""
    out: dict[str, Any] = {}
    if greedy:
        out["pass@1_greedy"] = _metric([r.accuracy for r in greedy], "wilson")
        out["format_greedy"] = sum(r.format > 0 for r in greedy) / len(greedy)
    if sampled and k > 0:
        acc = [[r.accuracy > 0 for r in rs] for rs in sampled]
        out[f"pass@1_sampled_mean@{k}"] = _metric([sum(a) / k for a in acc], "bootstrap")
        if k > 1:
            out[f"pass@{k}"] = _metric([pass_at_k(k, sum(a), k) for a in acc], "bootstrap")
            votes = [majority_vote([vote_key(r) for r in rs], a) for rs, a in zip(sampled, acc, strict=True)]
            out[f"maj@{k}"] = _metric([float(v) for v in votes], "wilson")
        out["format_sampled"] = sum(r.format > 0 for rs in sampled for r in rs) / (len(sampled) * k)
    return out


# ----- the evaluation -----------------------------------------------------------------------------------------------
def evaluate(engine: Engine, tokenizer: Tokenizer, task: Task, problems: list[Problem], k: int = 4,
             max_new_tokens: int = 256, temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P,
             seed: int = 0, greedy: bool = True, zero: bool = False) -> dict[str, Any]:
    """Greedy and k-sample metrics of `engine` on `problems` (see compute_metrics) and each problem's outcomes
    ("outcomes"); returns a JSON-able dict. Under torchrun every rank passes all the problems and decodes its share;
    every rank returns the whole result."""
    share = distributed.shard_range(len(problems))
    mine = problems[share.start:share.stop]
    prompts = [prompt_ids(tokenizer, p, zero) for p in mine]
    t0 = time.perf_counter()
    g_rewards: list[Reward] = []
    g_stats: list[tuple[bool, int]] = []  # (truncated, tokens) of each greedy completion
    if greedy and mine:
        g = sample_completions(engine, tokenizer, prompts, 1, max_new_tokens, temperature=0.0, seed=seed,
                               first_index=share.start)
        g_rewards = [rs[0] for rs in score_all(task, mine, g)]
        g_stats = [(c[0].truncated, len(c[0].ids)) for c in g]
    s_rewards: list[list[Reward]] = []
    s_stats: list[tuple[bool, int]] = []
    if k > 0 and mine:
        s = sample_completions(engine, tokenizer, prompts, k, max_new_tokens, temperature, top_p, seed=seed,
                               first_index=share.start * k)
        s_rewards = score_all(task, mine, s)
        s_stats = [(c.truncated, len(c.ids)) for cs in s for c in cs]
    parts = distributed.all_gather_object((g_rewards, g_stats, s_rewards, s_stats))  # in rank order = problem order
    g_rewards, g_stats, s_rewards, s_stats = (sum((part[i] for part in parts), []) for i in range(4))
    result: dict[str, Any] = {"n": len(problems), "k": k, "max_new_tokens": max_new_tokens, "zero": zero,
                              "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed}}
    if greedy:
        result["greedy_truncated"] = sum(t for t, _ in g_stats) / max(len(g_stats), 1)
        result["greedy_mean_tokens"] = sum(n for _, n in g_stats) / max(len(g_stats), 1)
    if k > 0:
        result["sampled_truncated"] = sum(t for t, _ in s_stats) / max(len(s_stats), 1)
        result["sampled_mean_tokens"] = sum(n for _, n in s_stats) / max(len(s_stats), 1)
    result["metrics"] = compute_metrics(g_rewards if greedy else None, s_rewards if k > 0 else None, k)
    # per-problem outcomes, for paired comparisons of two models on the same problems (paired_comparison)
    outcomes: dict[str, Any] = {"problem": [p.identity for p in problems]}
    if greedy:
        outcomes["greedy"] = [r.accuracy for r in g_rewards]
    if k > 0:
        outcomes["sampled"] = [sum(r.accuracy > 0 for r in rs) / k for rs in s_rewards]
        if k > 1:
            outcomes["maj"] = [float(majority_vote([vote_key(r) for r in rs], [r.accuracy > 0 for r in rs]))
                               for rs in s_rewards]
    result["outcomes"] = outcomes
    result["seconds"] = time.perf_counter() - t0
    return result


def greedy_accuracy(engine: Engine, tokenizer: Tokenizer, task: Task, problems: list[Problem],
                    max_new_tokens: int, zero: bool = False) -> float:
    """Fraction of problems solved by greedy decoding (the cheap held-out check run during training)."""
    if not problems:
        return 0.0
    prompts = [prompt_ids(tokenizer, p, zero) for p in problems]
    g = sample_completions(engine, tokenizer, prompts, 1, max_new_tokens, temperature=0.0)
    return sum(task.score(p, c[0].text).accuracy for p, c in zip(problems, g, strict=True)) / len(problems)


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{result.get('task', '?')}: {result['n']} {result.get('split', 'test')} problems, k={result['k']}"]
    for name, m in result["metrics"].items():
        if isinstance(m, dict):
            lo, hi = m["ci95"]
            lines.append(f"  {name:<24} {m['value']:.3f}  [{lo:.3f}, {hi:.3f}] 95% CI ({m['ci_method']})")
        else:
            lines.append(f"  {name:<24} {m:.3f}")
    return "\n".join(lines)


def format_comparison(c: dict[str, Any], a: str = "A", b: str = "B") -> str:
    """paired_comparison's result as lines: each metric's values, difference and paired p-value."""
    lines = [f"paired on {c['n']} problems: A = {a}, B = {b}"]
    for name in ("greedy", "sampled", "maj"):
        if name in c:
            r = c[name]
            extra = (f"b only {r['b_only']}, a only {r['a_only']}" if "b_only" in r
                     else f"95% CI [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]")
            lines.append(f"  {name:<8} {r['a']:.3f} -> {r['b']:.3f}  {r['delta']:+.3f}  p = {r['p']:.3g} "
                         f"({r['test']}; {extra})")
    return "\n".join(lines)


# ----- the stage ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EvalConfig:
    """An evaluation of a checkpoint on n distinct problems of a task's test split (or its validation split, for
    choosing settings without looking at the test split)."""

    model: Path  # checkpoint directory (with tokenizer files)
    task: str  # task spec, e.g. arithmetic or arithmetic:max_digits=2,ops=+-
    n: int = 200  # test problems
    split: str = "test"  # "val" while choosing settings, "test" once at the end
    zero: bool = False  # prompt with the R1-Zero template (a model trained by `rl --zero`), not the chat template
    k: int = 4  # samples per problem for sampled pass@1 / pass@k / maj@k (0 = greedy only)
    max_new_tokens: int = 256
    temperature: float = EVAL_TEMPERATURE
    top_p: float = EVAL_TOP_P
    batch_size: int = 64  # engine batch size (sequences decoded together; per process under torchrun)
    seed: int = 0  # problem draw and sampling seed
    threads: int = 2
    json: Path | None = None  # write the result here as JSON
    device: str | None = None  # torch device (None: cuda if available, else cpu)


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise NanoseekError(f"--{name.replace('_', '-')} must be positive, got {v}")


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate cfg.model, print the report and write cfg.json; returns the result. One process, or one rank of
    `torchrun --nproc_per_node=N -m nanoseek eval ...` (each rank decodes its share, rank 0 writes)."""
    return distributed.run(distributed.resolve_device(cfg.device), lambda device: _evaluate_checkpoint(cfg, device))


def _evaluate_checkpoint(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    check_positive(n=cfg.n, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, threads=cfg.threads)
    if cfg.json is not None:
        if cfg.json.is_dir():
            raise NanoseekError(f"--json {cfg.json} is a directory; give the file to write")
        check_writable(cfg.json.parent, "--json's directory")  # before the evaluation, not after it
    if cfg.k < 0:
        raise NanoseekError(f"--k must be >= 0, got {cfg.k}")
    torch.set_num_threads(cfg.threads)
    task = load_task(cfg.task)
    engine = load_engine(cfg.model, cfg.batch_size, device=device)
    tokenizer = Tokenizer.from_dir(cfg.model)
    problems = distinct_problems(task, cfg.split, cfg.n, seed=cfg.seed)
    if len(problems) < cfg.n and distributed.is_main():
        print(f"note: the {cfg.split} split of {cfg.task} has only {len(problems)} different problems; evaluating "
              f"those instead of {cfg.n}", file=sys.stderr)
    result = {"task": cfg.task, "model": str(cfg.model), "split": cfg.split, "n_requested": cfg.n}
    result.update(evaluate(engine, tokenizer, task, problems, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, zero=cfg.zero))
    print(format_report(result))
    if cfg.json and distributed.is_main():
        write_text_atomically(cfg.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.json}")
    return result
