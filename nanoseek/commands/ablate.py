"""`nanoseek ablate {balance,mla,mtp,fp8}`: the DeepSeek-V2/V3 ablations at CPU scale (nanoseek.train.ablate)."""

from __future__ import annotations

import argparse

from nanoseek.commands._flags import add_model_and_data_arguments, add_training_arguments, config_from_args
from nanoseek.train.ablate import ABLATIONS, AblateConfig, ablate


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = AblateConfig(ablation=ABLATIONS[0])
    p.add_argument("ablation", choices=ABLATIONS, help="which ablation to run")
    add_model_and_data_arguments(p, d)
    a = p.add_argument_group("ablation variants")
    a.add_argument("--gammas", type=float, nargs="+", default=d.gammas,
                   help="balance: bias update speeds of the aux-loss-free variants (default 0.001 = V3, and 0.01)")
    a.add_argument("--alphas", type=float, nargs="+", default=d.alphas,
                   help="balance: sequence-wise balance-loss weights of the aux-loss-only variants (default 0.01 "
                        "0.001)")
    a.add_argument("--variants", nargs="+", default=None,
                   help="run only these variants (names as in the table; relative numbers are then against the "
                        "first one run), e.g. the baseline again with another --seed for a noise estimate")
    a.add_argument("--kv-heads", type=int, default=None,
                   help="mla: key/value heads of the GQA variant (default num_attention_heads / 2)")
    add_training_arguments(p, d, out="runs/ablate/<ablation>")
    # a rerun always skips finished variants and retrains unfinished ones: these pretrain flags do not apply
    for action in p._actions:
        if action.dest in ("resume", "save_every", "keep_last", "sample_every"):
            action.help = argparse.SUPPRESS


def run(args: argparse.Namespace) -> None:
    ablate(config_from_args(AblateConfig, args))
