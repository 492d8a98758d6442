"""`nanoseek report RUN_DIR...`: the cost report card of run directories (nanoseek.train.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.train.report import write_report_card


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories (searched recursively for run.json and `nanoseek eval --json` results)")
    p.add_argument("--out", type=Path, help="markdown file to write (default: RUN_DIR/report.md for one directory)")
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="USD per machine-hour for every run (default: the price each run recorded)")
    p.add_argument("--serve-json", type=Path, help="a serving benchmark result (benchmarks/results/bench_serve.json) "
                   "for the $/M output tokens (also picked up when it lies under a RUN_DIR)")
    p.add_argument("--title", default="nanoseek report card")


def run(args: argparse.Namespace) -> None:
    out = args.out
    if out is None:
        if len(args.dirs) > 1:
            raise NanoseekError("several directories: say where the card goes with --out FILE.md")
        out = args.dirs[0] / "report.md"
    out = write_report_card(args.dirs, out, args.price_per_hour, args.serve_json, args.title)
    print(f"wrote {out} (+ {out.stem}_cost.png, {out.stem}_losses.png, {out.stem}.json)")
