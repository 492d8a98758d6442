"""`nanoseek pretrain`: tokenizer -> token data -> V3 pre-training objective -> HF checkpoint (nanoseek.train.pretrain).

Also the command each rank of `torchrun --nproc_per_node=N -m nanoseek pretrain ... [--parallel fsdp]` runs.
"""

from __future__ import annotations

import argparse

from nanoseek.commands._flags import (
    add_distributed_arguments,
    add_model_and_data_arguments,
    add_training_arguments,
    config_from_args,
)
from nanoseek.train.pretrain import PretrainConfig, pretrain


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PretrainConfig()
    add_model_and_data_arguments(p, d)
    p.add_argument("--sample-prompt", default=d.sample_prompt,
                   help=f"prompt of the periodic text samples (default {d.sample_prompt!r})")
    p.add_argument("--fp8", action="store_true",
                   help="DeepSeek-V3 FP8 GEMMs for every projection and expert (1x128 / 128x128 e4m3 tiles, emulated "
                        "exactly; slower on CPU); embedding, head, gate, norms, attention stay in --dtype")
    p.add_argument("--ep", type=int, default=d.ep, metavar="N",
                   help="under torchrun: expert parallelism, each MoE layer's routed experts spread over N processes "
                        "and the tokens sent to them with all-to-all; N divides the process count (default 1; "
                        "docs/expert_parallel.md)")
    add_training_arguments(p, d)
    add_distributed_arguments(p, d)


def run(args: argparse.Namespace) -> None:
    pretrain(config_from_args(PretrainConfig, args))
