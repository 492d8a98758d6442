"""`nanoseek <command>`: one entry point over the stage modules.

Each command lives in its own module of nanoseek/commands/, which defines `add_arguments(parser)` and `run(args)`;
this file only dispatches, turns NanoseekError into one line on stderr with exit code 2, and Ctrl-C into exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanoseek.errors import NanoseekError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nanoseek.commands.info",
             "print a config's or checkpoint's parameter counts and FLOPs per token"),
    "pretrain": ("nanoseek.commands.pretrain",
                 "pre-train a model: tokenizer, data, V3 objective, HF checkpoint"),
    "generate": ("nanoseek.commands.generate",
                 "stream a completion for one prompt from a checkpoint (tokens and tok/s)"),
    "serve": ("nanoseek.commands.serve",
              "serve a checkpoint: OpenAI/DeepSeek-compatible HTTP API and web chat"),
    "chat": ("nanoseek.commands.chat",
             "chat with a checkpoint in the terminal (streams the reasoning, dimmed)"),
    "export": ("nanoseek.commands.export",
               "write a checkpoint as a GGUF file for llama.cpp / Ollama (deepseek2)"),
    "sft": ("nanoseek.commands.sft",
            "supervised fine-tuning on chat JSONL and/or a task's reasoning traces"),
    "eval": ("nanoseek.commands.eval",
             "pass@1 (greedy, sampled), pass@k and maj@k on a task's test split, with CIs"),
    "rl": ("nanoseek.commands.rl",
           "GRPO reinforcement learning with a task's rule-based rewards"),
    "sample": ("nanoseek.commands.sample",
               "rejection sampling: k samples per problem, keep verified-correct traces"),
    "distill": ("nanoseek.commands.distill",
                "SFT of a small dense student on a teacher's verified traces"),
    "report": ("nanoseek.commands.report",
               "the cost report card: stages, FLOPs, $, MFU, evals, $/M tokens, V3-scale table"),
    "ablate": ("nanoseek.commands.ablate",
               "the V2/V3 ablations at CPU scale: balance, mla, mtp, fp8 (tables and plots)"),
    "speedrun": ("nanoseek.commands.speedrun",
                 "tokenizer -> pretrain -> SFT -> GRPO -> distill -> eval -> report card, one command (--quick: toy "
                 "size)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen command's module is imported (the server's, say, pulls in FastAPI)."""
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def _os_error(e: OSError) -> str:
    """'<file>: <reason>' ('runs/x/loss.png: No space left on device')."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


# the commands that run as ranks of a torchrun job (nanoseek/distributed.py); the others refuse one of several processes
DISTRIBUTED = ("pretrain", "sft", "distill", "rl", "eval", "sample")


def _torchrun_processes() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        sys.exit(2)
    world = _torchrun_processes()
    if world > 1 and args.command not in DISTRIBUTED:
        sys.stderr.write(f"nanoseek {args.command}: error: `nanoseek {args.command}` runs as one process, but torchrun "
                         f"started {world}: each would do the whole job. Run it without torchrun (under torchrun: "
                         f"{', '.join(DISTRIBUTED)})\n")
        sys.exit(2)
    try:
        importlib.import_module(args._module).run(args)
    except (NanoseekError, OSError) as e:
        # OSError: a file system that refuses a read or write nanoseek has no more specific message for (a full
        # disk, a read-only or missing directory) is the user's to fix, named in one line like any bad input
        message = str(e) if isinstance(e, NanoseekError) else _os_error(e)
        # one write, not print's two (text, then newline): under torchrun every rank shares stderr, and two ranks'
        # halves would interleave into one garbled line
        sys.stderr.write(f"nanoseek {args.command}: error: {' '.join(message.splitlines())}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nnanoseek {args.command}: interrupted\n")
        sys.exit(130)
