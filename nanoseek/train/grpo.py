"""GRPO with rule-based rewards (DeepSeekMath 2402.03300; R1 paper eq. 1-3), token-level: `nanoseek rl`.

One step:
  1. sample: B train problems, G completions each from the current policy through the Engine (temperature 1, no
     top-k/top-p, so the samples follow pi_theta exactly)
  2. reward: task.score -> accuracy (1/0) + format (0.1/0), summed
  3. advantages per group of G: A_i = (acc_i - mean(acc)) / (std(acc) + 1e-4) + (fmt_i - mean(fmt)), correctness
     normalised and format an unscaled tie-breaker that never outweighs it (Dr. GRPO: r_i - mean(r)); groups whose
     rewards are all equal carry no signal and are dropped from the batch (logged as frac_zero_std). With
     --dynamic-sampling (DAPO's dynamic sampling) more fresh problems are sampled, up to --max-sampling-rounds
     batches of B, until B groups with mixed rewards fill the batch; the surplus is dropped
  4. mu updates on the batch, each minimising, per completion token t of sample i (A_i on every token),
         l_it = -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i) + beta * k3_it
         rho_it = pi_theta(o_it) / pi_old(o_it),   k3_it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1  (>= 0)
     averaged over all completion tokens of the batch (token-level, as DAPO and trl's default), with --loss-agg seq
     averaged per sequence and then over sequences (the original GRPO), or with --dr-grpo summed and divided by
     (sequences x max_new_tokens), a constant, which removes GRPO's length bias.
With mu = 1, pi_old = pi_theta, so rho = 1, clipping never triggers, and the gradient is REINFORCE's:
-sum(mask * A * grad log pi) / sum(mask). The ratio and clip only matter for mu > 1, but the code is the general one.

rl(RLConfig) is the stage: GRPOStep runs these steps on the shared training loop (trainer.py), so an RL run has the
Trainer's optimizer, lr schedule, checkpoints, --resume, Ctrl-C save and run record, and a resumed run (after
Ctrl-C or a kill) continues exactly as an uninterrupted one: problems and sampling seeds are functions of the step.

Shapes: B prompts per step, G group size, N = B*G sequences, T padded sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek import distributed
from nanoseek.checkpoint import load_model
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.osutil import check_writable, write_file_atomically, write_text_atomically
from nanoseek.tasks import MixedTask, Problem, Task, distinct_problems, load_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.evaluate import greedy_accuracy
from nanoseek.train.rollout import Completion, RolloutWeights, make_engine, prompt_ids, sample_completions, score_all
from nanoseek.train.trainer import (
    TrainConfig,
    Trainer,
    TrainStep,
    epoch_batch,
    resolve_device,
    resolve_dtype,
    resume_point,
    set_threads,
    train,
)

IGNORE = -1


@dataclass(kw_only=True)
class GRPOConfig:
    """The GRPO algorithm's settings (grpo_step)."""

    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 16  # B
    max_new_tokens: int = 128
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    mu: int = 1  # policy updates per batch of rollouts
    epsilon: float = 0.2  # clip low: rho >= 1 - epsilon
    epsilon_high: float | None = None  # clip high: rho <= 1 + epsilon_high (DAPO's clip-higher: 0.28); None = epsilon
    beta: float = 0.0  # k3 KL weight to the frozen reference (the initial policy); 0 = no reference model
    dr_grpo: bool = False  # advantages without /std, loss / (N * max_new_tokens) instead of / tokens
    zero: bool = False  # R1-Zero: the plain-text R1-Zero template (rollout.ZERO_TEMPLATE) for a base model, no chat
    loss_agg: str = "token"  # "token": mean over the batch's tokens; "seq": per-sequence mean, then mean (GRPO)
    mask_truncated: bool = False  # exclude completions cut by max_new_tokens from the loss (DAPO overlong filter)
    micro_batch: int = 32  # sequences per forward/backward (gradients accumulate; the result does not depend on it)
    dynamic_sampling: bool = False  # DAPO: sample more problems until B groups have mixed rewards
    max_sampling_rounds: int = 4  # dynamic sampling: at most this many batches of B problems a step


# ----- the objective ------------------------------------------------------------------------------------------------
def group_advantages(accuracy: torch.Tensor, fmt: torch.Tensor | None = None, scale_std: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness rewards [B,G] (and format rewards [B,G]) -> advantages [B,G] and keep [B] (False for groups whose
    total rewards are all equal, whose advantages are set to exactly 0).

    A_i = (acc_i - mean(acc)) / (std(acc) + eps) + (fmt_i - mean(fmt)): only correctness is divided by the group's
    std (the unbiased sample std, as trl computes it); format is a tie-breaker added unscaled. Scaling the summed
    reward instead lets the 0.1 format reward stand in for correctness: a group of all-wrong answers with one
    malformed sample would get advantages +0.35 / -2.47, exactly those of one right answer among wrong ones. Here
    such a group gets +0.0125 / -0.0875, and within a group every correct sample's advantage exceeds every wrong
    one's (for 0/1 accuracy the scaled gap is >= 1/0.71 = 1.41, the format difference <= format_weight = 0.1).
    With scale_std=False (Dr. GRPO) this is r_i - mean(r) of the total reward."""
    if accuracy.dim() != 2 or accuracy.shape[1] < 2:
        raise NanoseekError(f"GRPO needs a group of >= 2 samples per prompt, got rewards of shape "
                            f"{list(accuracy.shape)}")
    accuracy = accuracy.double()
    fmt = torch.zeros_like(accuracy) if fmt is None else fmt.double()
    adv = accuracy - accuracy.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (accuracy.std(1, keepdim=True) + eps)
    adv = adv + fmt - fmt.mean(1, keepdim=True)
    total = accuracy + fmt
    keep = total.amax(1) > total.amin(1)
    return torch.where(keep[:, None], adv, torch.zeros_like(adv)).float(), keep


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = ref_logp - logp; >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def loss_weights(mask: torch.Tensor, dr_grpo: bool, max_len: int, agg: str = "token", total: float | None = None,
                 ) -> torch.Tensor:
    """Per-token weights [N,T] so that loss = sum(weights * l):
      token   mask / sum(mask): every completion token of the batch counts the same (DAPO, trl's default)
      seq     mask / (len_i * n): each sequence's mean, then the mean over the n sequences with a token (the original
              GRPO of DeepSeekMath; a long completion's tokens weigh less)
      Dr. GRPO (dr_grpo, whatever agg) mask / (N * max_len), a constant, without GRPO's length bias.
    Computed once for the whole batch so micro-batches add up to exactly the full-batch loss. `total`: the whole
    batch's normaliser when mask holds one rank's share of it (sum(mask), n, or N for Dr. GRPO)."""
    if dr_grpo:
        return mask / ((mask.shape[0] if total is None else total) * max_len)
    if agg == "seq":
        lengths = mask.sum(1, keepdim=True)
        n = (lengths > 0).sum().clamp(min=1) if total is None else max(total, 1.0)
        return mask / (lengths.clamp(min=1) * n)
    if agg != "token":
        raise ValueError(f"unknown loss aggregation {agg!r}: expected 'token' or 'seq'")
    return mask / (mask.sum().clamp(min=1) if total is None else max(total, 1.0))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss sum(weights * l) for token log-probs logp / old_logp / ref_logp [N,T] and per-sequence
    advantages [N]. Returns (loss, sums): token counts and sums for clip fractions, KL and the ratio."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None]  # one advantage for every token of a sequence
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + eps_high) * adv)
    per_token = -surrogate
    mask = weights > 0
    kl = None
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = (weights * per_token).sum()
    with torch.no_grad():
        # a token is clipped when the clamp is the active side of the min: its gradient is zero
        clip_low = mask & (adv < 0) & (ratio < 1 - epsilon)
        clip_high = mask & (adv > 0) & (ratio > 1 + eps_high)
        sums = {"tokens": float(mask.sum()), "clip_low": float(clip_low.sum()), "clip_high": float(clip_high.sum()),
                "ratio": float(ratio[mask].sum()),
                "kl": float(kl[mask].sum()) if kl is not None else 0.0}
    return loss, sums


def token_logprobs(model: Transformer, input_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(targets | prefix) [N,T] (0 where targets is IGNORE) and the exact entropy of each next-token
    distribution [N,T] (0 where targets is IGNORE; no gradient): logsumexp(z) - sum softmax(z) z, in fp32.

    The final norm, the head and the [*, V] softmax run only at the M completion positions: a prompt or padding
    position's logits are never used, and the head with its fp32 log-softmax is the largest part of the update
    at a small model's vocabulary (roughly 40% of the positions of a short-answer batch are prompt)."""
    sel = targets != IGNORE  # [N,T]
    logits = model(input_ids, select=sel).float()  # [M,V], through forward: DDP / FSDP2 wrap that method
    if temperature != 1.0:
        logits = logits / temperature  # the distribution the completion was sampled from
    logp_all = F.log_softmax(logits, dim=-1)  # [M,V]
    logp = torch.zeros(targets.shape, dtype=logp_all.dtype, device=logp_all.device)
    logp[sel] = logp_all.gather(-1, targets[sel][:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = torch.zeros_like(logp)
        entropy[sel] = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def rollout_tensors(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[prompt ‖ completion] rows right-padded -> input_ids [N,T], targets [N,T] (IGNORE on prompt and padding: only
    completion tokens are scored), mask [N,T] float (1 on completion tokens)."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    t = max(len(s) for s in seqs) - 1
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        input_ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        # position j predicts s[j+1]; the first completion token is predicted at len(p) - 1
        targets[i, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p):])
    return input_ids, targets, (targets != IGNORE).float()


# ----- one step -----------------------------------------------------------------------------------------------------
def sample_groups(policy: Transformer, tokenizer: Tokenizer, task: Task, problems: list[Problem], cfg: GRPOConfig,
                  seed: int, first_index: int = 0, timings: dict[str, float] | None = None,
                  ) -> tuple[list[list[int]], list[list[Completion]], list[list[Any]]]:
    """G completions of each problem from the current policy and their rewards: (prompts, completions, rewards).
    first_index: the problems' position in the whole batch times G (the requests' seeds, sample_completions).
    Adds the seconds spent building the engine, generating and scoring to timings["engine" / "generate" / "score"]."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    prompts = [prompt_ids(tokenizer, p, cfg.zero) for p in problems]
    if not prompts:  # a rank with no problem of this batch (more processes than problems)
        return [], [], []
    engine = make_engine(policy, len(prompts) * cfg.group_size, max(len(p) for p in prompts) + cfg.max_new_tokens)
    t1 = time.perf_counter()
    completions = sample_completions(engine, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens,
                                     cfg.temperature, seed=seed, first_index=first_index)
    t2 = time.perf_counter()
    rewards = score_all(task, problems, completions)
    t3 = time.perf_counter()
    for key, dt in (("engine", t1 - t0), ("generate", t2 - t1), ("score", t3 - t2)):
        timings[key] = timings.get(key, 0.0) + dt
    return prompts, completions, rewards


def _mixed(totals: list[list[float]]) -> int:
    """Groups whose rewards are not all equal."""
    return sum(len(set(t)) > 1 for t in totals)


def grpo_step(policy: Transformer, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer, task: Task,
              problems: list[Problem], cfg: GRPOConfig, seed: int, ref_model: Transformer | None = None,
              bias_update_speed: float = 0.0, max_grad_norm: float = 1.0,
              more_problems: Callable[[int], list[Problem]] | None = None, sampler: Transformer | None = None,
              autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, Any]:
    """Sample, score, and update `policy` on one batch of problems (gradients clipped to max_grad_norm, then the
    expert-bias update at bias_update_speed); returns the step's metrics. With cfg.dynamic_sampling,
    more_problems(round) supplies the fresh problems of sampling rounds 1, 2, ... `sampler`: the plain model the
    engine samples from (default the policy; RolloutWeights.current()). The update's forwards run in `autocast`.

    Under torchrun every rank gets the same `problems` and samples, scores and trains on its contiguous share of the
    groups (distributed.shard_range: a group stays whole on one rank, so its advantages are local); the rewards of
    all groups are gathered for the statistics and dynamic sampling's choice, and the loss is normalised by the whole
    batch's tokens, so the averaged gradient is one process's."""
    g, b = cfg.group_size, len(problems)
    world = distributed.world_size()
    mine = distributed.shard_range(b)  # this rank's groups of every sampling round
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    mine_problems: list[Problem] = []  # this rank's problems of every round, in the order of `rewards`

    def sample_round(batch: list[Problem], round_seed: int) -> tuple[list, list, list]:
        mine_problems.extend(batch[mine.start:mine.stop])
        return sample_groups(policy if sampler is None else sampler, tokenizer, task, batch[mine.start:mine.stop],
                             cfg, round_seed, first_index=mine.start * g, timings=timings)

    prompts, completions, rewards = sample_round(problems, seed)
    # [round][this rank's group][sample] of the total, correctness and format rewards
    totals = [[[r.total for r in rs] for rs in rewards]]
    accs, fmts = [[[r.accuracy for r in rs] for rs in rewards]], [[[r.format for r in rs] for rs in rewards]]
    rounds = 1
    if cfg.dynamic_sampling and more_problems is None:
        raise ValueError("dynamic sampling needs more_problems")
    while (cfg.dynamic_sampling and rounds < cfg.max_sampling_rounds
           and sum(distributed.all_gather_object(sum(map(_mixed, totals)))) < b):  # groups with mixed rewards
        p2, c2, r2 = sample_round(more_problems(rounds), seed + 7919 * rounds)
        prompts, completions, rewards = prompts + p2, completions + c2, rewards + r2
        totals.append([[r.total for r in rs] for rs in r2])
        accs.append([[r.accuracy for r in rs] for rs in r2])
        fmts.append([[r.format for r in rs] for rs in r2])
        rounds += 1
    t_sample = time.perf_counter() - t0

    flat_c = [c for cs in completions for c in cs]
    flat_r = [r for rs in rewards for r in rs]
    # every group's rewards in one process's order (round by round, ranks in order within a round)
    everyone = distributed.all_gather_object({
        "totals": totals, "accs": accs, "fmts": fmts, "accuracy": [r.accuracy for r in flat_r],
        "format": [r.format for r in flat_r], "lengths": [len(c.ids) for c in flat_c],
        "truncated": [c.truncated for c in flat_c], "by_task": _accuracy_by_task(task, mine_problems, rewards)})

    def whole(key: str) -> torch.Tensor:  # [B,G] (B x rounds with dynamic sampling), one process's group order
        return torch.tensor([t for j in range(rounds) for e in everyone for t in e[key][j]],
                            dtype=torch.float64).view(-1, g)

    total = whole("totals")
    adv, keep = group_advantages(whole("accs"), whole("fmts"), scale_std=not cfg.dr_grpo)
    zero_std = 1.0 - keep.float().mean().item()
    if cfg.dynamic_sampling:  # train on the first B mixed groups: the batch size stays B
        keep = keep & (keep.long().cumsum(0) <= b)
    accuracy, fmt = (sum((e[k] for e in everyone), []) for k in ("accuracy", "format"))
    lengths, truncated = (sum((e[k] for e in everyone), []) for k in ("lengths", "truncated"))
    stats: dict[str, Any] = {
        "reward": total.mean().item(),
        "reward_accuracy": sum(accuracy) / len(accuracy),
        "reward_format": sum(fmt) / len(fmt),
        "reward_std": total.std(1).mean().item(),
        "frac_zero_std": zero_std,
        "rollouts": len(lengths),
        "sampling_rounds": rounds,
        "trained_groups": int(keep.sum()),
        "response_len_mean": sum(lengths) / len(lengths),
        "response_len_max": max(lengths),
        "truncated_frac": sum(truncated) / len(truncated),
    }
    stats["accuracy"] = stats["reward_accuracy"]
    by_task: dict[str, list[float]] = {}  # one accuracy per task of a mix: [correct, samples] summed over ranks
    for part in everyone:
        for name, (right, n) in part["by_task"].items():
            acc = by_task.setdefault(name, [0.0, 0])
            acc[0], acc[1] = acc[0] + right, acc[1] + n
    stats.update({f"accuracy_{name}": right / n for name, (right, n) in sorted(by_task.items())})

    t1 = time.perf_counter()
    groups = [j * b + i for j in range(rounds) for i in mine]  # this rank's groups in the whole batch's order
    rows = [k * g + j for k, gi in enumerate(groups) if keep[gi] for j in range(g)]
    if keep.any():
        micro = _update(policy, optimizer, tokenizer, cfg, prompts, flat_c, rows, adv[groups].flatten(),
                        int(keep.sum()) * g, ref_model, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        policy.eval()
        if distributed.initialized():  # the bias follows the whole batch's load, as in Trainer.train_step
            for gate in policy.gates():
                torch.distributed.all_reduce(gate.expert_load)
        stats["maxvio"] = policy.update_expert_bias(bias_update_speed)
        sums = distributed.all_reduce_mean(micro)  # the loss: each rank's share times W; the rest: counts
        sums = {k: v if k == "loss" else v * world for k, v in sums.items()}
        n_tok = max(sums["tokens"], 1.0)
        stats.update(loss=sums["loss"] / cfg.mu, kl=sums["kl"] / n_tok, clip_frac_low=sums["clip_low"] / n_tok,
                     clip_frac_high=sums["clip_high"] / n_tok, ratio=sums["ratio"] / n_tok,
                     entropy=sums["entropy"] / max(sums["mask"], 1.0), grad_norm=float(grad_norm),
                     trained_seqs=int(keep.sum()) * g, tokens=int(sums["numel"]) * cfg.mu)
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    else:  # every group was all-right or all-wrong: nothing to learn from this batch
        stats.update(loss=0.0, kl=0.0, clip_frac=0.0, clip_frac_low=0.0, clip_frac_high=0.0, ratio=1.0,
                     entropy=None, grad_norm=0.0, trained_seqs=0, tokens=0, maxvio=0.0)
    stats["t_sample"] = t_sample  # = t_engine + t_generate + t_score (+ prompt encoding)
    stats.update({f"t_{k}": v for k, v in timings.items()})
    stats["t_train"] = time.perf_counter() - t1
    return stats


def _accuracy_by_task(task: Task, problems: list[Problem], rewards: list[list[Any]]) -> dict[str, tuple[float, int]]:
    """A mix's (correct, samples) per task over these problems' groups ({} for a single task)."""
    out: dict[str, tuple[float, int]] = {}
    if isinstance(task, MixedTask):
        for problem, rs in zip(problems, rewards, strict=True):
            right, n = out.get(task.task_of(problem)[0], (0.0, 0))
            out[task.task_of(problem)[0]] = (right + sum(r.accuracy for r in rs), n + len(rs))
    return out


def _update(policy: Transformer, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer, cfg: GRPOConfig,
            prompts: list[list[int]], completions: list[Completion], rows: list[int], advantages: torch.Tensor,
            total_rows: int, ref_model: Transformer | None,
            autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """cfg.mu gradient passes of the GRPO loss over this rank's trained rows (indices into `completions`, G per
    prompt; advantages [rows of completions]), in micro-batches; leaves the gradients for the optimizer step.
    Returns this rank's sums (loss, token counts and sums for the clip fractions, ratio, KL and entropy).

    Under torchrun the loss weights use the whole batch's token count (or rows, Dr. GRPO) times the world size:
    DDP/FSDP average the ranks' gradients into one process's. Every rank runs as many micro-batches as the busiest
    one (a backward is a collective): a rank with fewer runs zero-weight ones on a single padding token."""
    g, device = cfg.group_size, next(policy.parameters()).device
    world = distributed.world_size()
    input_ids, targets, mask = rollout_tensors([prompts[i // g] for i in rows], [completions[i].ids for i in rows],
                                               tokenizer.pad_id) if rows else (torch.full((1, 1), tokenizer.pad_id),
                                                                               torch.full((1, 1), IGNORE),
                                                                               torch.zeros(1, 1))
    if cfg.mask_truncated and rows:
        mask = mask * torch.tensor([0.0 if completions[i].truncated else 1.0 for i in rows])[:, None]
    tokens = distributed.all_reduce_sum(mask.sum()).item()
    if cfg.dr_grpo:
        norm = total_rows
    elif cfg.loss_agg == "seq":  # the whole batch's sequences with a token
        norm = distributed.all_reduce_sum((mask.sum(1) > 0).sum().double()).item()
    else:
        norm = tokens
    weights = loss_weights(mask, cfg.dr_grpo, cfg.max_new_tokens, cfg.loss_agg, total=norm) * world
    adv = advantages[rows] if rows else torch.zeros(1)
    chunks = [slice(s, s + cfg.micro_batch) for s in range(0, len(rows), cfg.micro_batch)]
    n_chunks = max(distributed.all_gather_object(len(chunks)))
    chunks += [slice(0, 0)] * (n_chunks - len(chunks))  # zero-weight passes (see above)
    input_ids, targets, mask, weights, adv = (t.to(device) for t in (input_ids, targets, mask, weights, adv))
    ref_logp: list[torch.Tensor | None] = [None] * n_chunks
    if cfg.beta and ref_model is not None:
        with torch.no_grad(), autocast():
            ref_logp = [token_logprobs(ref_model, *_rows(c, input_ids, targets), cfg.temperature)[0] for c in chunks]
    old_logp: list[torch.Tensor] = []
    sums = {"loss": 0.0, "tokens": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio": 0.0, "kl": 0.0,
            "entropy": 0.0, "mask": float(mask.sum()) if rows else 0.0, "numel": float(input_ids.numel()) if rows
            else 0.0}
    policy.train()
    for it in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        for k, c in enumerate(chunks):
            pad = c.stop == c.start
            if pad:
                policy.eval()  # the padding token must not count towards the experts' loads
            with distributed.gradient_sync(policy, k == n_chunks - 1), autocast():
                x, y = _rows(c, input_ids, targets)
                logp, entropy = token_logprobs(policy, x, y, cfg.temperature)
                if it == 0:  # the policy has not moved yet: pi_old = pi_theta (no extra forward needed)
                    old_logp.append(logp.detach())
                    sums["entropy"] += 0.0 if pad else float((entropy * mask[c]).sum())
                w = torch.zeros_like(logp) if pad else weights[c]
                a = torch.zeros(x.shape[0], device=device) if pad else adv[c]
                loss, s = grpo_loss(logp, old_logp[k], a, w, cfg.epsilon, cfg.epsilon_high, cfg.beta, ref_logp[k])
                loss.backward()
            if pad:
                policy.train()
            for key, v in s.items():
                sums[key] += v
            sums["loss"] += loss.item()
    return sums


def _rows(c: slice, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows c of the batch, or for an empty slice (a zero-weight pass) the first row's first token."""
    if c.stop == c.start:
        return input_ids[:1, :1], targets[:1, :1]
    return input_ids[c], targets[c]


# ----- logging and plots --------------------------------------------------------------------------------------------
def plot_curves(rows: list[dict[str, Any]], heldout: list[dict[str, Any]], path: Path) -> Path:
    """rl_curves.png: reward (total and per component), accuracy (train samples; held-out greedy) and response length
    over steps. Drawn on the Agg canvas directly, as report.plot_losses: no pyplot state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(15, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax_reward, ax_acc, ax_len = fig.subplots(1, 3)
    for key, label in [("reward", "total"), ("reward_accuracy", "accuracy"), ("reward_format", "format")]:
        ax_reward.plot(steps, [r[key] for r in rows], label=label)
    ax_reward.set_title("reward (mean over samples)")
    ax_acc.plot(steps, [r["accuracy"] for r in rows], label="train samples")
    ax_acc.plot([r["step"] for r in heldout], [r["accuracy"] for r in heldout], "o-", label="held-out greedy")
    ax_acc.set_title("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_len.plot(steps, [r["response_len_mean"] for r in rows], label="mean")
    ax_len.plot(steps, [r["response_len_max"] for r in rows], label="max")
    ax_len.set_title("response length (tokens)")
    for ax in (ax_reward, ax_acc, ax_len):
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def write_log(out: Path, rows: list[dict[str, Any]]) -> None:
    """rl_log.jsonl (one line per step) in the run directory, replaced atomically; each step then appends its line."""
    write_text_atomically(out / "rl_log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def write_curves(out: Path, rows: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> None:
    """rl_curves.png and rl_heldout.json (the held-out greedy accuracy by step, for `nanoseek report`) in the run
    directory, each replaced atomically."""
    write_text_atomically(out / "rl_heldout.json", json.dumps(heldout) + "\n")
    write_file_atomically(out / "rl_curves.png", lambda tmp: plot_curves(rows, heldout, tmp))


def format_step(r: dict[str, Any]) -> str:
    entropy = "-" if r["entropy"] is None else f"{r['entropy']:.3f}"  # None: every group was skipped
    rounds = f" rounds {r['sampling_rounds']}" if r.get("sampling_rounds", 1) > 1 else ""  # dynamic sampling
    return (f"step {r['step']:4d} | reward {r['reward']:.3f} acc {r['accuracy']:.3f} fmt {r['reward_format']:.3f} "
            f"| len {r['response_len_mean']:.0f}/{r['response_len_max']} trunc {r['truncated_frac']:.2f} "
            f"| zero-std {r['frac_zero_std']:.2f}{rounds} kl {r['kl']:.4f} clip {r['clip_frac']:.3f} ent {entropy} "
            f"| sample {r['t_sample']:.1f}s train {r['t_train']:.1f}s")


# ----- the run ------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RLConfig(GRPOConfig, TrainConfig):
    """A GRPO run: the checkpoint to start from, the task, the GRPO settings and the shared training settings.

    Of TrainConfig's settings rl uses steps, the lr schedule (constant after warmup by default, as DAPO), weight_decay,
    grad_clip, bias_update_speed, eval_every (the held-out greedy accuracy; 0 = off), save_every, keep_last, seed,
    out, resume, threads, price_per_hour, device, dtype, parallel and async_save. batch_size (B x G rollouts) and
    seq_len (the longest prompt + max_new_tokens) are derived. dtype "auto" is fp32 on the CPU and bf16 autocast on
    CUDA (where the rollouts sample from a bf16 copy of the policy: RolloutWeights).
    """

    model: Path  # checkpoint to start from (with tokenizer files); also the frozen reference for beta > 0
    task: str  # task spec, e.g. arithmetic:min_digits=2,max_digits=2,ops=+-
    eval_n: int = 100  # held-out (validation split) problems for the greedy accuracy
    steps: int = 50
    lr: float = 3e-5
    warmup_steps: int = 5
    decay_frac: float = 0.0
    min_lr_frac: float = 1.0
    weight_decay: float = 0.0
    dtype: str = "auto"
    bias_update_speed: float = 0.0  # routing stays as SFT left it
    balance_alpha: float = 0.0  # the GRPO loss is the only objective
    mtp_lambda: float = 0.0
    eval_every: int = 10
    save_every: int = 10
    sample_every: int = 0
    out: Path = Path("runs/rl")

    def check(self, config: ModelConfig | None = None) -> None:
        for name in ("steps", "group_size", "prompts_per_step", "max_new_tokens", "mu", "micro_batch", "keep_last",
                     "max_sampling_rounds"):
            if getattr(self, name) <= 0:
                raise NanoseekError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "eval_n", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise NanoseekError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.group_size < 2:
            raise NanoseekError("--group-size must be >= 2: GRPO's baseline is the mean reward of the group")
        if self.loss_agg not in ("token", "seq"):
            raise NanoseekError(f"--loss-agg must be 'token' or 'seq', got {self.loss_agg!r}")
        if self.dr_grpo and self.loss_agg != "token":
            raise NanoseekError("--dr-grpo sets its own loss normaliser (sum / (N x max tokens)): leave --loss-agg "
                                "at token")
        if not self.temperature > 0:
            raise NanoseekError("--temperature must be > 0: GRPO needs samples, not greedy decoding")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise NanoseekError("--epsilon must be in (0, 1) and --epsilon-high > 0")
        if self.beta < 0 or not self.lr > 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise NanoseekError("--beta and --weight-decay must be >= 0, --lr and --grad-clip > 0")
        if self.dtype not in ("auto", "fp32", "bf16") or self.grad_accum != 1:
            raise NanoseekError("rl trains with one micro-batch list per step (grad_accum 1) in dtype auto, fp32 or "
                                "bf16")
        for name in ("min_lr_frac", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise NanoseekError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class ProblemPool:
    problems: list[Problem]
    finite: bool  # the task's whole train split, smaller than steps x B: drawn in epochs


# GRPO's prompts are drawn from their own stream of the train split: `sft --task T --n N` and `sample` draw
# task.problems("train", N, seed) with the same seed, and a pool drawn alike would begin with the cold start's very
# problems (a speedrun's 60 x 16 GRPO prompts were all among its 2,000 SFT traces). R1 runs RL on fresh prompts.
RL_DRAW_OFFSET = 10**10


def train_pool(task: Task, steps: int, b: int, seed: int) -> ProblemPool:
    """The train problems a run's steps draw from. A synthetic task gives steps x B fresh problems, drawn with a seed
    no SFT trace set uses (RL_DRAW_OFFSET); one more is asked for to tell it from a finite data set, which returns its
    whole split, GSM8K in file order, when asked for more than it has."""
    drawn = task.problems("train", steps * b + 1, seed=RL_DRAW_OFFSET + seed)
    if not drawn:
        raise NanoseekError(f"task {task.name}: its train split has no problems to train on")
    finite = len(drawn) <= steps * b
    return ProblemPool(drawn if finite else drawn[:steps * b], finite)


def step_problems(pool: ProblemPool, b: int, step: int, seed: int) -> list[Problem]:
    """Step `step`'s B problems: slice `step` of the fresh draw, or, for a finite data set, batch `step` of seeded
    epoch shuffles (a new order per seed and epoch, never file order, never running dry). A pure function of the
    arguments, so a resumed run continues exactly, and a longer run begins with the shorter run's problems."""
    if pool.finite:
        return epoch_batch(pool.problems, b, step, seed, "rl")
    return pool.problems[step * b:(step + 1) * b]


def extra_problems(task: Task, n: int, seed: int, step: int, round_: int) -> list[Problem]:
    """Dynamic sampling's round `round_` (>= 1) of step `step`: n train problems, a pure function of the arguments
    (so a resumed run samples the same ones), drawn with seeds the main schedule does not use (a synthetic task
    makes fresh ones; a finite data set such as GSM8K may repeat problems)."""
    return task.problems("train", n, seed=1_000_000 + seed * 100_003 + step * 17 + round_)


def heldout_accuracy(policy: Transformer, tokenizer: Tokenizer, task: Task, problems: list[Problem],
                     max_new_tokens: int, zero: bool = False) -> float:
    """Greedy accuracy on `problems`; under torchrun each rank decodes its share and the counts are summed."""
    share = distributed.shard_range(len(problems))
    mine = problems[share.start:share.stop]
    correct = 0.0
    if mine:
        longest = max(len(prompt_ids(tokenizer, p, zero)) for p in mine)
        engine = make_engine(policy, min(len(mine), 128), longest + max_new_tokens)
        correct = greedy_accuracy(engine, tokenizer, task, mine, max_new_tokens, zero=zero) * len(mine)
    return sum(distributed.all_gather_object(correct)) / len(problems)


class GRPOStep(TrainStep):
    """One GRPO step on the shared loop: the B problems of step s (step_problems(), plus dynamic sampling's rounds),
    G rollouts each with seed * 1_000_003 + s, one update. Every step appends its row to
    rl_log.jsonl (so a run killed between checkpoints keeps the steps it did); the held-out greedy accuracy goes to
    history["heldout"]; rl_curves.png is redrawn after each checkpoint. Under torchrun rank 0 writes the files."""

    def __init__(self, cfg: RLConfig, tokenizer: Tokenizer, task: Task, train_problems: ProblemPool,
                 eval_problems: list[Problem], weights: RolloutWeights, ref_model: Transformer | None = None):
        self.cfg, self.tokenizer, self.task = cfg, tokenizer, task
        self.train_problems, self.eval_problems, self.ref_model = train_problems, eval_problems, ref_model
        self.weights = weights

    def step(self, trainer: Trainer) -> dict[str, Any]:
        cfg, step, b = self.cfg, trainer.step, self.cfg.prompts_per_step
        lr = trainer.set_lr()
        stats = grpo_step(trainer.model, trainer.optimizer, self.tokenizer, self.task,
                          step_problems(self.train_problems, b, step, cfg.seed), cfg, seed=cfg.seed * 1_000_003 + step,
                          ref_model=self.ref_model, bias_update_speed=cfg.bias_update_speed,
                          max_grad_norm=cfg.grad_clip,
                          more_problems=lambda r: extra_problems(self.task, b, cfg.seed, step, r),
                          sampler=self.weights.current(), autocast=trainer.autocast)
        row = trainer.end_step({"lr": lr, **stats}, stats["tokens"], stats["t_train"])
        if distributed.is_main():
            with open(trainer.out_dir / "rl_log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
        tqdm.write(format_step(row))
        return row

    def progress(self, row: dict[str, Any]) -> str:
        return f"reward {row['reward']:.3f} | acc {row['accuracy']:.3f} | len {row['response_len_mean']:.0f}"

    def evaluate(self, trainer: Trainer) -> None:
        if not self.eval_problems:
            return
        acc = heldout_accuracy(self.weights.current(), self.tokenizer, self.task, self.eval_problems,
                               self.cfg.max_new_tokens, self.cfg.zero)
        trainer.history["heldout"].append({"step": trainer.step, "accuracy": acc})
        tqdm.write(f"step {trainer.step:4d} | held-out greedy accuracy {acc:.3f}")

    def saved(self, trainer: Trainer) -> None:
        if distributed.is_main():
            write_curves(trainer.out_dir, trainer.history["train"], trainer.history["heldout"])


def rl(cfg: RLConfig) -> Path:
    """GRPO from cfg.model into cfg.out; returns the final checkpoint (HF layout + tokenizer). One process, or one
    rank of `torchrun --nproc_per_node=N -m nanoseek rl ... [--parallel fsdp]`: each rank samples and trains on its
    share of every step's groups."""
    cfg.check()
    return distributed.run(resolve_device(cfg.device), lambda device: _rl(cfg, device))


def _rl(cfg: RLConfig, device: torch.device) -> Path:
    set_threads(cfg.threads)
    task = load_task(cfg.task)
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    check_writable(out)  # a read-only or full out fails now, not after the first GRPO steps
    policy = load_model(cfg.model, device=device)
    tokenizer = Tokenizer.from_dir(cfg.model)
    ref_model = None
    if cfg.beta:
        ref_model = load_model(cfg.model, device=device).requires_grad_(False)  # the frozen initial policy
    b = cfg.prompts_per_step
    train_problems = train_pool(task, cfg.steps, b, cfg.seed)
    # the held-out monitor reads the validation split (held out of train), never the test split
    eval_problems = distinct_problems(task, "val", cfg.eval_n, seed=cfg.seed) if cfg.eval_every and cfg.eval_n \
        else []
    seq_len = max(len(prompt_ids(tokenizer, p, cfg.zero)) for p in train_problems.problems[:64]) + cfg.max_new_tokens
    dtype = cfg.dtype if cfg.dtype != "auto" else "bf16" if device.type == "cuda" else "fp32"
    cfg = dataclasses.replace(cfg, batch_size=b * cfg.group_size, seq_len=seq_len, dtype=dtype)
    # the update calls the policy's forward: DDP reduces the gradients of that method (before the optimizer exists)
    policy = distributed.wrap_model(policy, cfg.parallel, resolve_dtype(dtype, device, policy.config.hidden_size),
                                    method="forward")
    trainer = Trainer(policy, cfg, tokenizer_dir=cfg.model, stage="rl")
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    weights = RolloutWeights(policy)
    heldout: list[dict[str, Any]] = trainer.history.setdefault("heldout", [])
    n = policy.config.num_params()
    world = distributed.world_size()
    print(f"rl: {n['total'] / 1e6:.2f}M params | {cfg.task} | {cfg.steps} steps x {b} prompts x "
          f"{cfg.group_size} samples | {'Dr. GRPO' if cfg.dr_grpo else 'GRPO'}"
          f"{' (R1-Zero template)' if cfg.zero else ''} mu={cfg.mu} eps={cfg.epsilon}"
          f"{f'/{cfg.epsilon_high}' if cfg.epsilon_high is not None else ''} beta={cfg.beta} lr={cfg.lr:g} | "
          f"{dtype} on {device}" + (f" | {world} processes ({cfg.parallel})" if world > 1 else ""))
    if not heldout and eval_problems:
        acc = heldout_accuracy(weights.current(), tokenizer, task, eval_problems, cfg.max_new_tokens, cfg.zero)
        heldout.append({"step": trainer.step, "accuracy": acc})
        print(f"step {trainer.step:4d} | held-out greedy accuracy {acc:.3f} ({len(eval_problems)} validation problems)")
    if distributed.is_main():  # the log starts from the rows of the checkpoint resumed from (a killed run's later
        write_log(out, trainer.history["train"])  # lines dropped)
    train(trainer, GRPOStep(cfg, tokenizer, task, train_problems, eval_problems, weights, ref_model))
    final = trainer.save_final()
    record = trainer.write_report()
    if distributed.is_main():
        write_curves(out, trainer.history["train"], heldout)
    first, last = (heldout[0]["accuracy"], heldout[-1]["accuracy"]) if heldout else (None, None)
    summary = f"; held-out greedy accuracy {first:.3f} -> {last:.3f}" if heldout else ""
    print(f"done: {record.steps} steps in {record.wall_seconds / 60:.1f} min{summary}")
    print(f"checkpoint (HF layout + tokenizer): {final}; log {out / 'rl_log.jsonl'}; curves {out / 'rl_curves.png'}")
    return final
