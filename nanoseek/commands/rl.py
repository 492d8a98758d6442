"""`nanoseek rl`: GRPO reinforcement learning with a task's rule-based rewards (nanoseek.train.grpo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.commands._flags import add_distributed_arguments, config_from_args
from nanoseek.train.grpo import RLConfig, rl


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RLConfig(model=Path(), task="")
    p.add_argument("--model", type=Path, required=True, help="checkpoint to start from (with tokenizer files), "
                   "usually an SFT model's final/; also the frozen reference for --beta")
    p.add_argument("--task", required=True, help="task spec, e.g. arithmetic:min_digits=2,max_digits=2,ops=+-")
    g = p.add_argument_group("GRPO")
    g.add_argument("--zero", action="store_true",
                   help="R1-Zero: prompt with the R1-Zero plain-text template (think, then a \\boxed{} answer) "
                        "instead of the chat template; give --model the pre-trained base model, no SFT")
    g.add_argument("--steps", type=int, default=d.steps, help=f"GRPO steps (default {d.steps})")
    g.add_argument("--group-size", "-G", type=int, default=d.group_size,
                   help=f"samples per prompt (default {d.group_size})")
    g.add_argument("--prompts-per-step", "-B", type=int, default=d.prompts_per_step,
                   help=f"prompts per step (default {d.prompts_per_step})")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"completion length cap (default {d.max_new_tokens})")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (default 1.0)")
    g.add_argument("--mu", type=int, default=d.mu, help="policy updates per batch of rollouts (default 1)")
    g.add_argument("--epsilon", type=float, default=d.epsilon, help="clip: rho >= 1 - epsilon (default 0.2)")
    g.add_argument("--epsilon-high", type=float, help="clip: rho <= 1 + epsilon_high (default: epsilon; DAPO 0.28)")
    g.add_argument("--beta", type=float, default=d.beta, help="k3 KL weight to the initial model (default 0)")
    g.add_argument("--dr-grpo", action="store_true", help="Dr. GRPO: advantage r - mean, loss / (N * max tokens)")
    g.add_argument("--loss-agg", choices=("token", "seq"), default=d.loss_agg,
                   help="token: mean over all completion tokens of the batch (default; DAPO); seq: each completion's "
                        "mean, then the mean over completions (the original GRPO)")
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut by --max-new-tokens")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO dynamic sampling: sample more fresh problems (up to --max-sampling-rounds batches of "
                        "-B) until -B groups have mixed rewards; the sampling cost grows, every trained group "
                        "carries signal")
    g.add_argument("--max-sampling-rounds", type=int, default=d.max_sampling_rounds,
                   help=f"dynamic sampling: batches of -B problems sampled at most per step (default "
                        f"{d.max_sampling_rounds})")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help=f"sequences per forward/backward (default {d.micro_batch}; does not change the result)")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="held-out greedy accuracy every N steps, and before the first and after the last (0 = off)")
    g.add_argument("--eval-n", type=int, default=d.eval_n,
                   help=f"held-out (validation split) problems for it (default {d.eval_n})")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, constant after warmup (default 3e-5)")
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps (default 5)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on matrices (default 0)")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (default 1.0)")
    t.add_argument("--bias-update-speed", type=float, default=d.bias_update_speed,
                   help="expert-bias gamma during RL (default 0: routing stays as SFT left it)")
    t.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (default 10)")
    t.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints to keep (default 2)")
    t.add_argument("--seed", type=int, default=d.seed, help="problem order and sampling seed (default 0)")
    t.add_argument("--out", type=Path, default=d.out, help="run directory (default runs/rl)")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    t.add_argument("--price-per-hour", type=float, default=d.price_per_hour, help="USD per machine-hour for run.json")
    m = p.add_argument_group("machine")
    m.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=d.dtype,
                   help="the update's compute dtype (bf16 = torch.autocast, master weights fp32); auto = fp32 on the "
                        "CPU, bf16 on CUDA, where the rollouts sample from a bf16 copy of the policy")
    add_distributed_arguments(p, d)


def run(args: argparse.Namespace) -> None:
    rl(config_from_args(RLConfig, args))
