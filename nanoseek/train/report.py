"""The report card, `nanoseek report RUN_DIR...`: what each stage cost and what it bought.

write_report_card gathers every run.json (record.RunRecord), `nanoseek eval --json` result and serving benchmark
under the given directories into one markdown card: cost by stage with totals, evals and the accuracy gained between
stages, $ per million output tokens, and the same FLOPs scaled to DeepSeek-V3's 14.8T-token pre-training beside the
paper's 2.788M H800 GPU-hours (docs/report.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import NanoseekError
from nanoseek.osutil import write_file_atomically, write_text_atomically
from nanoseek.train.evaluate import paired_comparison
from nanoseek.train.record import RunRecord

STAGE_ORDER = ("pretrain", "sft", "rl", "sample", "distill", "eval")  # then any other stage name

# DeepSeek-V3 technical report (arXiv 2412.19437): Table 1 and section 4.2.
V3_TOKENS = 14.8e12  # pre-training tokens
V3_SEQ_LEN = 4096  # pre-training sequence length
V3_PRETRAIN_GPU_HOURS = 2.664e6  # the 14.8T-token pre-training alone
V3_GPU_HOURS = 2.788e6  # + context extension (119K) + post-training (5K)
V3_USD_PER_GPU_HOUR = 2.0
V3_COST_USD = 5.576e6
# ASSUMED H800 SXM dense (no 2:4 sparsity) tensor-core peaks: NVIDIA's H100 SXM datasheet numbers. The H800 is the
# export variant with a cut-down NVLink and, as far as public sources say, the same tensor cores. Not in the paper.
H800_PEAK_FLOPS = {"BF16": 989.5e12, "FP8": 1979e12}


@dataclass
class StageRun:
    """One run directory: its run.json and, when the checkpoints are still there, its loss history."""

    dir: Path
    record: RunRecord
    history: dict[str, list[dict[str, Any]]] | None

    @property
    def label(self) -> str:
        return self.record.stage if self.dir.name == self.record.stage else f"{self.record.stage} ({self.dir.name})"


@dataclass
class EvalResult:
    """One `nanoseek eval --json` file and the run whose model it evaluated (None when no run directory matches)."""

    path: Path
    result: dict[str, Any]
    run: StageRun | None

    @property
    def stage(self) -> str:
        return self.run.record.stage if self.run else ""

    @property
    def label(self) -> str:
        return self.run.label if self.run else str(self.result.get("model", self.path.stem))


def stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def is_eval_result(d: Any) -> bool:
    """The keys `nanoseek eval --json` writes (the file name says nothing)."""
    return isinstance(d, dict) and isinstance(d.get("metrics"), dict) and all(k in d for k in ("task", "n", "k"))


def is_serve_result(d: Any) -> bool:
    """The keys benchmarks/bench_serve.py writes."""
    return isinstance(d, dict) and isinstance(d.get("levels"), list) and "price_per_hour_usd" in d


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def load_run(path: Path) -> StageRun:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise NanoseekError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
    return StageRun(path.parent, RunRecord.from_dict(d, str(path)), load_history(path.parent))


def load_history(run_dir: Path) -> dict[str, list[dict[str, Any]]] | None:
    """The loss history from the newest checkpoint's trainer_state.json, else rl_log.jsonl; None if neither is left."""
    ckpts = run_dir / "checkpoints"
    candidates = sorted(ckpts.glob("step_*"), reverse=True)
    try:
        candidates.insert(0, ckpts / (ckpts / "latest").read_text().strip())
    except OSError:
        pass  # no `latest` pointer: the newest step directory first
    for c in candidates:
        state = _read_json(c / "trainer_state.json")
        if isinstance(state, dict) and isinstance(state.get("history"), dict):
            return state["history"]
    try:
        rows = [json.loads(line) for line in (run_dir / "rl_log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    return {"train": rows, "val": []} if rows else None


def _match_run(path: Path, result: dict[str, Any], runs: list[StageRun]) -> StageRun | None:
    """The run whose model an eval scored: its --model path inside a run directory (as given, or relative to the eval
    file), else the run directory's name in that path (written from another working directory), else the eval file's
    name (eval/sft.json, eval_sft.json)."""
    model = Path(str(result.get("model", "")))
    if str(model) not in ("", "."):
        for candidate in (model, path.parent / model):
            m = candidate.resolve()
            inside = [r for r in runs if m == r.dir.resolve() or r.dir.resolve() in m.parents]
            if inside:
                return max(inside, key=lambda r: len(r.dir.resolve().parts))  # the innermost run directory
        parts = list(model.parts)
        while parts and (parts[-1] in ("final", "checkpoints") or parts[-1].startswith("step_")):
            parts.pop()
        if parts:
            named = [r for r in runs if r.dir.name == parts[-1]]
            if len(named) == 1:
                return named[0]
    stem = path.stem.removeprefix("eval_").removeprefix("eval-")
    named = [r for r in runs if r.dir.name == stem] or [r for r in runs if r.record.stage == stem]
    return named[0] if len(named) == 1 else None


def find_results(dirs: list[Path], serve_json: Path | None = None
                 ) -> tuple[list[StageRun], list[EvalResult], list[tuple[Path, dict[str, Any]]]]:
    """Every run.json, eval result and serving-benchmark JSON under `dirs` (recursively; checkpoint directories are
    skipped), sorted: runs by stage order then directory, evals likewise by the stage of the model they scored."""
    runs: list[StageRun] = []
    evals: list[tuple[Path, dict[str, Any]]] = []
    serves: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()  # resolved paths already read (directories may overlap)
    recognised: set[Path] = set()
    if serve_json is not None:
        if not Path(serve_json).is_file():
            raise NanoseekError(f"--serve-json: file not found: {serve_json}")
        d = _read_json(Path(serve_json))
        if not is_serve_result(d):
            raise NanoseekError(f"--serve-json {serve_json}: not a bench_serve.py result (no 'levels' and "
                                f"'price_per_hour_usd')")
        serves.append((Path(serve_json), d))
        seen.add(Path(serve_json).resolve())
    for top in map(Path, dirs):
        if not top.exists():
            raise NanoseekError(f"directory not found: {top}")
        if not top.is_dir():
            raise NanoseekError(f"not a directory: {top} (give run directories)")
        found = 0
        for root, subdirs, files in os.walk(top):
            subdirs[:] = sorted(s for s in subdirs if s != "checkpoints" and not s.startswith("."))
            for name in sorted(f for f in files if f.endswith(".json") and not f.startswith(".")):
                path = Path(root) / name
                key = path.resolve()
                if key in seen:
                    found += key in recognised
                    continue
                seen.add(key)
                if not path.is_file() or path.stat().st_size > 50_000_000:
                    continue
                if name == "run.json":
                    runs.append(load_run(path))
                else:
                    d = _read_json(path)
                    if is_eval_result(d):
                        evals.append((path, d))
                    elif is_serve_result(d):
                        serves.append((path, d))
                    else:
                        continue
                recognised.add(key)
                found += 1
        if not found:
            raise NanoseekError(f"no run records (run.json) or eval results under {top}")
    if not runs:
        raise NanoseekError(f"no run records (run.json) under {', '.join(map(str, dirs))}: nothing to cost")
    runs.sort(key=lambda r: (stage_rank(r.record.stage), str(r.dir)))
    matched = [EvalResult(p, d, _match_run(p, d, runs)) for p, d in evals]
    matched.sort(key=lambda e: (stage_rank(e.stage or "other"), e.label, str(e.path)))
    return runs, matched, serves


# ----- numbers ------------------------------------------------------------------------------------------------------
def gpus(record: RunRecord) -> int:
    """GPUs of a CUDA run: its torchrun world size (records from before world_size was recorded: 1)."""
    n = record.machine.get("world_size", 1)
    return n if isinstance(n, int) and n > 0 else 1


def device_hours(record: RunRecord) -> tuple[str, float]:
    """("GPU-h", wall hours x GPUs) on CUDA, ("CPU-h", wall hours x threads) on CPU."""
    if record.device.startswith("cuda"):
        return "GPU-h", record.wall_seconds / 3600 * gpus(record)
    return "CPU-h", record.cpu_hours


def achieved_flops(record: RunRecord) -> float:
    """Training FLOP/s over the optimizer steps (the MFU numerator)."""
    return record.flops / record.train_seconds if record.train_seconds else 0.0


def v3_flops_per_token(seq_len: int = V3_SEQ_LEN) -> float:
    from nanoseek.config import get_preset  # config imports nothing from here; imported late to keep report light

    return get_preset("deepseek-v3").flops_per_token(seq_len)


def v3_paper_table(h800_peaks: dict[str, float] | None = None) -> dict[str, Any]:
    """V3's pre-training FLOPs from nanoseek's accounting, and what the paper's GPU-hours imply about its MFU."""
    fpt = v3_flops_per_token()
    total = fpt * V3_TOKENS
    peaks = []
    for name, peak in (h800_peaks or H800_PEAK_FLOPS).items():
        peaks.append({"dtype": name, "peak_flops": peak, "h800_hours_at_peak": total / peak / 3600,
                      "mfu_pretrain_hours": total / (V3_PRETRAIN_GPU_HOURS * 3600) / peak,
                      "mfu_all_hours": total / (V3_GPU_HOURS * 3600) / peak})
    return {"flops_per_token": fpt, "seq_len": V3_SEQ_LEN, "tokens": V3_TOKENS, "flops": total,
            "gpu_hours_pretrain": V3_PRETRAIN_GPU_HOURS, "gpu_hours": V3_GPU_HOURS,
            "usd_per_gpu_hour": V3_USD_PER_GPU_HOUR, "cost_usd": V3_COST_USD, "peaks": peaks}


def _is_metric(m: Any) -> bool:
    """{"value": v, "ci95": [lo, hi], ...} as evaluate.compute_metrics writes it."""
    return (isinstance(m, dict) and isinstance(m.get("value"), (int, float)) and isinstance(m.get("ci95"), list)
            and len(m["ci95"]) == 2)


def _ci_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]


def _sampled_key(metrics: dict[str, Any]) -> str | None:
    return next((k for k in metrics if k.startswith("pass@1_sampled")), None)


def _parent_eval(model: str, group: list[EvalResult]) -> EvalResult | None:
    """The eval in `group` of the run whose checkpoint `model` names (a run's --model / --teacher path)."""
    runs = [e.run for e in group if e.run is not None]
    run = _match_run(Path("."), {"model": model}, runs) if runs else None
    return next((e for e in group if run is not None and e.run is run), None)


def eval_gains(evals: list[EvalResult]) -> list[dict[str, Any]]:
    """Accuracy differences between evals that scored the same problems the same way (same task, n, k, split,
    max_new_tokens, sampling settings and prompt template; the seed draws the problems): each model against the model
    its run started from and, for a distilled student, its teacher, as the run records name them (started_from,
    teacher); a model whose record names neither (records before 2026-12-06) against the eval before it in stage
    order."""
    groups: dict[str, list[EvalResult]] = {}
    for e in evals:
        r = e.result
        key = json.dumps([r.get("task"), r.get("n"), r.get("k"), r.get("split"), r.get("max_new_tokens"),
                          r.get("sampling"), bool(r.get("zero"))], sort_keys=True)
        groups.setdefault(key, []).append(e)
    gains = []
    for group in groups.values():
        for i, b in enumerate(group):
            record = b.run.record if b.run is not None else None
            pairs: list[tuple[EvalResult, str]] = []
            if record is not None and (record.started_from or record.teacher):
                for origin, note in ((record.teacher, "a distilled student vs its teacher"),
                                     (record.started_from, "")):
                    parent = _parent_eval(origin, group) if origin else None
                    if parent is not None and parent is not b:
                        pairs.append((parent, note))
            elif i > 0:
                pairs.append((group[i - 1], "a distilled student vs its teacher" if b.stage == "distill" else ""))
            gains += [gain_row(a, b, note) for a, note in pairs]
    return gains


def gain_row(a: EvalResult, b: EvalResult, note: str) -> dict[str, Any]:
    """The accuracy difference from eval a to eval b, with a paired test where both stored per-problem outcomes."""
    row: dict[str, Any] = {"from": a.label, "to": b.label, "task": a.result["task"], "n": a.result["n"], "note": note}
    for name, ka, kb in (("greedy", "pass@1_greedy", "pass@1_greedy"),
                         ("sampled", _sampled_key(a.result["metrics"]), _sampled_key(b.result["metrics"]))):
        ma, mb = a.result["metrics"].get(ka or ""), b.result["metrics"].get(kb or "")
        if _is_metric(ma) and _is_metric(mb):
            row[name] = {"delta": mb["value"] - ma["value"], "ci_overlap": _ci_overlap(ma, mb)}
    if a.result.get("outcomes") and b.result.get("outcomes"):  # per-problem outcomes: a paired test
        paired = paired_comparison(a.result, b.result)
        for name in ("greedy", "sampled"):
            if name in row and name in paired:
                row[name].update(p=paired[name]["p"], test=paired[name]["test"])
    return row


def serving_costs(path: Path, res: dict[str, Any], price_per_hour: float | None) -> dict[str, Any]:
    """$ per million output tokens at each concurrency level: price per hour / output tokens per hour."""
    price = res["price_per_hour_usd"] if price_per_hour is None else price_per_hour
    levels = []
    for i, lv in enumerate(res["levels"]):
        if not isinstance(lv, dict) or not isinstance(lv.get("tokens_per_s"), (int, float)) or lv["tokens_per_s"] <= 0:
            raise NanoseekError(f"{path}: levels[{i}].tokens_per_s is missing or not a positive number")
        levels.append({"clients": lv.get("clients"), "tokens_per_s": lv["tokens_per_s"],
                       "usd_per_million": price / (lv["tokens_per_s"] * 3600) * 1e6})
    best = min(levels, key=lambda lv: lv["usd_per_million"]) if levels else None
    return {"path": str(path), "price_per_hour": price, "price_source": "benchmark" if price_per_hour is None
            else "--price-per-hour", "levels": levels, "best": best,
            **{k: res.get(k) for k in ("date", "machine", "cpus", "torch_threads", "model", "params_m",
                                       "max_batch_size", "load_average", "deepseek_prices_per_million")}}


def card_data(runs: list[StageRun], evals: list[EvalResult], serves: list[tuple[Path, dict[str, Any]]],
              price_per_hour: float | None = None) -> dict[str, Any]:
    """Every number on the card (also written next to it as JSON). price_per_hour None: each run's own price."""
    v3 = v3_paper_table()
    stages, totals = [], {"tokens": 0, "flops": 0.0, "wall_seconds": 0.0, "train_seconds": 0.0, "cost_usd": 0.0,
                          "device_hours": {}, "peak_flop_seconds": 0.0}
    for r in runs:
        rec = r.record
        price = rec.price_per_hour if price_per_hour is None else price_per_hour
        unit, hours = device_hours(rec)
        cost = rec.wall_seconds / 3600 * price
        flops_s = achieved_flops(rec)
        v3_hours = v3["flops"] / flops_s / 3600 if flops_s else None
        stages.append({"label": r.label, "dir": str(r.dir), **rec.to_dict(), "price_per_hour": price,
                       "cost_usd": cost, "device_hours": hours, "device_hours_unit": unit, "gpus": gpus(rec)
                       if unit == "GPU-h" else 0,
                       "achieved_flops": flops_s, "has_history": r.history is not None,
                       "v3": {"flops_per_token_ratio": v3["flops_per_token"] / rec.flops_per_token
                              if rec.flops_per_token else None,
                              "hours": v3_hours, "years": v3_hours / (24 * 365.25) if v3_hours else None,
                              "x_paper_gpu_hours": v3_hours / V3_GPU_HOURS if v3_hours else None,
                              "cost_usd": v3_hours * price if v3_hours else None,
                              "x_paper_cost": v3_hours * price / V3_COST_USD if v3_hours else None}})
        totals["tokens"] += rec.tokens
        totals["flops"] += rec.flops
        totals["wall_seconds"] += rec.wall_seconds
        totals["train_seconds"] += rec.train_seconds
        totals["cost_usd"] += cost
        totals["device_hours"][unit] = totals["device_hours"].get(unit, 0.0) + hours
        totals["peak_flop_seconds"] += rec.train_seconds * rec.peak_flops
    # all stages' training FLOPs over the FLOPs their measured peaks could have done in the same optimizer-step time
    totals["mfu"] = totals["flops"] / totals["peak_flop_seconds"] if totals["peak_flop_seconds"] else 0.0
    eval_rows = [{"label": e.label, "stage": e.stage, "path": str(e.path),
                  **{k: e.result.get(k) for k in ("task", "model", "split", "n", "k", "max_new_tokens", "sampling",
                                                  "seconds", "metrics")}} for e in evals]
    return {"price_per_hour": price_per_hour, "stages": stages, "totals": totals, "evals": eval_rows,
            "gains": eval_gains(evals), "serving": [serving_costs(p, d, price_per_hour) for p, d in serves],
            "v3": v3, "machines": sorted({_machine_line(r.record) for r in runs})}


def _machine_line(rec: RunRecord) -> str:
    m = rec.machine
    if rec.device.startswith("cuda"):
        return f"{m.get('cuda') or 'CUDA GPU'} (torch {m.get('torch', '?')})"
    return (f"{m.get('cpu_model', 'unknown CPU')}, {m.get('cpu_count', '?')} CPUs, "
            f"native bf16 {'yes' if m.get('cpu_native_bf16') else 'no'} (torch {m.get('torch', '?')})")


# ----- formatting ---------------------------------------------------------------------------------------------------
def fmt_count(n: float) -> str:
    """162720 -> 163K, 671026404352 -> 671B, 14.8e12 -> 14.8T."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def fmt_sci(x: float) -> str:
    """4431790080 -> 4.43e9 (FLOPs)."""
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    m = x / 10**e
    if round(m, 2) >= 10:  # 9.996e9 rounds to 10.00: carry into the exponent
        m, e = m / 10, e + 1
    return f"{m:.2f}e{e}"


def fmt_usd(x: float) -> str:
    """$5.576M, $1,234, $2.19, $0.10, $0.000304 (three significant digits below ten cents)."""
    if x >= 1e9:
        return f"${x / 1e9:,.2f}B"
    if x >= 1e6:
        return f"${x / 1e6:.3f}M"
    if x >= 100:
        return f"${x:,.0f}"
    if x >= 0.1:
        return f"${x:.2f}"
    return f"${x:.3g}"


def fmt_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def fmt_hours(h: float) -> str:
    return f"{h:.4f}" if h < 1 else f"{h:,.2f}" if h < 1000 else f"{h:,.0f}"


def fmt_metric(m: Any) -> str:
    if not _is_metric(m):
        return "–"
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _loss(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _rel(path: str | Path, start: Path) -> str:
    """`path` relative to the card's directory when it lies below it, else absolute."""
    rel = os.path.relpath(path, start)
    return str(Path(path).resolve()) if rel.startswith("..") else rel


def render_card(data: dict[str, Any], out: Path, title: str, dirs: list[Path], cost_png: str, loss_png: str,
                rl_png: str | None = None) -> str:
    """The card's markdown (links relative to `out`'s directory)."""
    here = out.parent
    price = data["price_per_hour"]
    price_note = (f"every run priced at **{fmt_usd(price)}/machine-hour** (--price-per-hour)" if price is not None
                  else "each run priced at the $/hour it recorded (its --price-per-hour)")
    lines = [f"# {title}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `nanoseek report` from "
             f"{', '.join(f'`{d}`' for d in dirs)}: {len(data['stages'])} run record(s), {len(data['evals'])} eval "
             f"result(s), {len(data['serving'])} serving benchmark(s); {price_note}.", "",
             "Machine(s): " + "; ".join(data["machines"]) + ".", "",
             "## Training cost by stage", "",
             "| stage | run dir | params total / activated | steps | tokens | FLOPs | wall time | train time | "
             "device-hours | $/h | cost | MFU | final train / val loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in data["stages"]:
        thr = f" ({s['threads']} thr)" if s["device_hours_unit"] == "CPU-h" else f" ({s['gpus']} GPU)"
        loss_link = Path(s["dir"]) / "loss.png"
        dir_cell = f"[`{_rel(s['dir'], here)}`]({_rel(loss_link, here)})" if loss_link.is_file() else \
            f"`{_rel(s['dir'], here)}`"
        lines.append(f"| {s['label']} | {dir_cell} | {fmt_count(s['params_total'])} / {fmt_count(s['params_active'])}"
                     f" | {s['steps']:,} | {fmt_count(s['tokens'])} | {fmt_sci(s['flops'])} | "
                     f"{fmt_duration(s['wall_seconds'])} | {fmt_duration(s['train_seconds'])} | "
                     f"{fmt_hours(s['device_hours'])} {s['device_hours_unit']}{thr} | {fmt_usd(s['price_per_hour'])} | "
                     f"{fmt_usd(s['cost_usd'])} | {s['mfu']:.1%} | {_loss(s['final_train_loss'])} / "
                     f"{_loss(s['final_val_loss'])} |")
    t = data["totals"]
    hours = " + ".join(f"{fmt_hours(h)} {u}" for u, h in sorted(t["device_hours"].items()))
    lines += [f"| **total** | | | | {fmt_count(t['tokens'])} | {fmt_sci(t['flops'])} | "
              f"{fmt_duration(t['wall_seconds'])} | {fmt_duration(t['train_seconds'])} | {hours} | | "
              f"**{fmt_usd(t['cost_usd'])}** | {t['mfu']:.1%} | |", "",
              "Wall time is the whole stage (tokenizer, data, evaluations, checkpoints, all sessions of a resumed "
              "run); cost = wall hours x $/h. CPU-h = wall hours x threads; GPU-h = wall hours x GPUs. "
              "Train time is the optimizer steps only (for RL: the policy update, not the sampling): the base of "
              "tokens/s and MFU. MFU = training FLOP/s over this machine's *measured* matmul peak at the run's dtype "
              "and threads, not a datasheet peak; the total's MFU is all training FLOPs over all stages' peak x train "
              "time. Parameters: main model, MTP modules not included (DeepSeek's convention).", "",
              f"![cost by stage]({cost_png})", "", f"![loss curves]({loss_png})", ""]
    missing = [s["label"] for s in data["stages"] if not s["has_history"]]
    if missing:
        lines += [f"No loss history left for {', '.join(missing)} (its checkpoints were removed): see its loss.png.",
                  ""]
    if rl_png:
        lines += ["GRPO over its steps: the mean reward of the step's samples and their mean length (both smoothed "
                  "over 5 steps), and the greedy pass@1 on held-out validation problems where the run measured it "
                  "(`nanoseek rl --eval-every`).", "", f"![GRPO over steps]({rl_png})", ""]

    lines += ["## Evaluations", ""]
    if data["evals"]:
        lines += ["pass@1 greedy: one greedy answer per problem (Wilson 95% CI). pass@1 sampled: the mean "
                  "correctness of k samples per problem at the eval's temperature / top-p, as R1 reports pass@1 "
                  "(bootstrap 95% CI over problems). pass@k and maj@k use the same k samples.", "",
                  "| model (stage) | task | n | k | pass@1 greedy | pass@1 sampled | pass@k | maj@k | eval time "
                  "| file |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in data["evals"]:
            m, k = e["metrics"] or {}, e["k"]
            sk = _sampled_key(m)
            secs = fmt_duration(e["seconds"]) if isinstance(e.get("seconds"), (int, float)) else "–"
            lines.append(f"| {e['label']} | `{e['task']}` | {e['n']} | {k} | {fmt_metric(m.get('pass@1_greedy'))} | "
                         f"{fmt_metric(m.get(sk or ''))} | {fmt_metric(m.get(f'pass@{k}'))} | "
                         f"{fmt_metric(m.get(f'maj@{k}'))} | {secs} | `{_rel(e['path'], here)}` |")
        lines += ["", "### Accuracy gained between stages", ""]
        if data["gains"]:
            lines += ["Between each model and the one its run started from (a distilled student: its teacher), "
                      "evaluated on the same problems with the same settings (task, n, k, split, max tokens, "
                      "sampling, template; for runs recorded before 2026-12-06, consecutive stages). \"CIs "
                      "overlap\" means the two intervals overlap: the difference is not established at this n. "
                      "Where both evals stored per-problem outcomes, p is a paired test on the same problems "
                      "(greedy: exact McNemar; sampled: paired bootstrap), which is more sensitive than comparing "
                      "intervals.", "",
                      "| from → to | task | n | Δ pass@1 greedy | Δ pass@1 sampled | note |",
                      "|---|---|---:|---:|---:|---|"]
            for g in data["gains"]:
                cells = []
                for name in ("greedy", "sampled"):
                    d = g.get(name)
                    p = f"; p = {d['p']:.2g}, {d['test']}" if d is not None and "p" in d else ""
                    cells.append("–" if d is None else f"{d['delta']:+.3f} ("
                                 f"{'CIs overlap' if d['ci_overlap'] else 'CIs disjoint'}{p})")
                lines.append(f"| {g['from']} → {g['to']} | `{g['task']}` | {g['n']} | {cells[0]} | {cells[1]} | "
                             f"{g['note']} |")
        else:
            lines.append("No two evals are comparable (same task, n, k, split, max tokens and sampling settings).")
    else:
        lines.append("No `nanoseek eval --json` results found under the given directories.")
    lines.append("")

    lines += ["## Inference cost", ""]
    if not data["serving"]:
        lines += ["No serving benchmark given (`--serve-json benchmarks/results/bench_serve.json`, written by "
                  "`python benchmarks/bench_serve.py`).", ""]
    for sv in data["serving"]:
        best = sv["best"]
        src = "the benchmark's own price" if sv["price_source"] == "benchmark" else "--price-per-hour"
        lines += [f"From `{_rel(sv['path'], here)}` ({sv.get('date') or 'undated'}): {sv.get('model') or 'model ?'} "
                  f"({sv.get('params_m') or 0:.1f}M params), `nanoseek serve` on {sv.get('machine') or '?'} with "
                  f"{sv.get('cpus') or '?'} CPUs, {sv.get('torch_threads') or '?'} torch thread(s), max batch "
                  f"{sv.get('max_batch_size') or '?'}, load average {sv.get('load_average') or 0:.1f}; machine priced "
                  f"at **{fmt_usd(sv['price_per_hour'])}/hour** ({src}). $/M output tokens = $/hour / (output tokens "
                  "per hour at the measured rate).", "",
                  "| concurrent clients | output tok/s | $ / 1M output tokens |", "|---:|---:|---:|"]
        for lv in sv["levels"]:
            lines.append(f"| {lv['clients']} | {lv['tokens_per_s']:.0f} | {fmt_usd(lv['usd_per_million'])} |")
        if best:
            lines += ["", f"Best: **{fmt_usd(best['usd_per_million'])} per million output tokens** at "
                      f"{best['clients']} clients."]
        prices = sv.get("deepseek_prices_per_million") or []
        if prices:
            lines.append("For scale, DeepSeek's API output prices (671B, 37B active, on H800s): " + "; ".join(
                f"{p['model']} {fmt_usd(p['output'])}/M" for p in prices) + ". Not like for like: a model with "
                f"{671e3 / (sv.get('params_m') or 1):,.0f}x the parameters on different hardware; the unit is what "
                "compares.")
        lines.append("")

    v3 = data["v3"]
    lines += ["## At DeepSeek-V3 scale", "",
              f"DeepSeek-V3 (671B parameters, 37B activated) was pre-trained on {fmt_count(v3['tokens'])} tokens at "
              f"sequence length {v3['seq_len']}. nanoseek's FLOP accounting (`deepseek-v3` preset, the same "
              "`flops_per_token` every run records: forward + backward = 3x forward, MoE at its activated size, "
              f"causal attention, MTP depth 1) gives **{fmt_sci(v3['flops_per_token'])} FLOPs per token**, so "
              f"**{fmt_sci(v3['flops'])} FLOPs** for the pre-training.", "",
              "What this machine would need at each run's achieved training FLOP/s (its optimizer-step rate on its "
              "own small model: see the caveats below):", "",
              "| run | its FLOPs/token | achieved FLOP/s | MFU | V3 FLOPs/token ÷ its | machine-hours for V3 "
              "| = years | × V3's 2.788M GPU-hours | cost at its $/h | × V3's $5.576M |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in data["stages"]:
        sv3 = s["v3"]
        if not sv3["hours"]:
            lines.append(f"| {s['label']} | {fmt_sci(s['flops_per_token'])} | – | – | – | – | – | – | – | – |")
            continue
        lines.append(f"| {s['label']} | {fmt_sci(s['flops_per_token'])} | {fmt_sci(s['achieved_flops'])} | "
                     f"{s['mfu']:.1%} | {sv3['flops_per_token_ratio']:,.0f} | {fmt_sci(sv3['hours'])} | "
                     f"{fmt_sci(sv3['years'])} | {sv3['x_paper_gpu_hours']:,.0f} | {fmt_usd(sv3['cost_usd'])} | "
                     f"{sv3['x_paper_cost']:,.0f} |")
    lines += ["", "The paper's side (Table 1, H800 at $2/GPU-hour): pre-training "
              f"{v3['gpu_hours_pretrain'] / 1e6:.3f}M GPU-hours, **{v3['gpu_hours'] / 1e6:.3f}M GPU-hours = "
              f"{fmt_usd(v3['cost_usd'])}** with context extension and post-training. The H800-hours the FLOPs above "
              "imply at an ASSUMED H800 dense peak (H100 SXM datasheet numbers; the paper states no peak), and the "
              "MFU the paper's hours then imply:", "",
              "| assumed H800 peak (dense) | H800-hours at 100% of peak | implied MFU over the 2.664M pre-training "
              "hours | over all 2.788M hours |", "|---|---:|---:|---:|"]
    for p in v3["peaks"]:
        lines.append(f"| {p['dtype']} {p['peak_flops'] / 1e12:,.1f} TFLOP/s | {fmt_count(p['h800_hours_at_peak'])} | "
                     f"{p['mfu_pretrain_hours']:.1%} | {p['mfu_all_hours']:.1%} |")
    lines += ["", "What it means: the FLOPs gap between this run and V3, in machine-hours and dollars at the rate this "
              "machine actually sustained. What it does not mean: that this machine could train V3 at that rate "
              "(671B parameters with fp32 AdamW state need ~11 TB of memory; a large model's efficiency differs from "
              "a tiny one's), or that V3's cost is only FLOPs (the paper's hours include communication, pipeline "
              "bubbles and recomputation). V3 ran its large matmuls in FP8 and attention, embedding, head and gating "
              "in BF16/FP32, so its true MFU lies between the FP8 row (lower) and the BF16 row (upper). The paper's "
              "figures exclude research and ablation runs.", ""]
    return "\n".join(lines)


# ----- plots --------------------------------------------------------------------------------------------------------
def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, tight_layout=True)
    FigureCanvasAgg(fig)
    return fig


def plot_costs(data: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of each stage's cost in USD, the value written on each bar."""
    stages = data["stages"]
    fig = _figure((max(5.0, 1.3 * len(stages) + 2), 4))
    ax = fig.subplots()
    bars = ax.bar([s["label"] for s in stages], [s["cost_usd"] for s in stages], color="tab:blue")
    for bar, s in zip(bars, stages, strict=True):
        ax.annotate(fmt_usd(s["cost_usd"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("USD")
    ax.set_title(f"cost by stage (total {fmt_usd(data['totals']['cost_usd'])})")
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


def plot_all_losses(runs: list[StageRun], path: str | Path) -> Path:
    """Every stage's loss curve in one figure, one panel per run: train (line) and val (dots) loss; RL panels show
    the GRPO surrogate loss and the mean reward (its curve that matters) on a second axis."""
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig = _figure((5 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(axes, runs, strict=False):
        ax.set_title(r.label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        h = r.history or {}
        train = [x for x in h.get("train", []) if isinstance(x, dict) and isinstance(x.get("loss"), (int, float))]
        val = [x for x in h.get("val", []) if isinstance(x, dict) and isinstance(x.get("loss"), (int, float))]
        if not train and not val:
            ax.text(0.5, 0.5, "no loss history\n(checkpoints removed)", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        if train:
            ax.plot([x["step"] for x in train], [x["loss"] for x in train], lw=0.8, label="train")
        if val:
            ax.plot([x["step"] for x in val], [x["loss"] for x in val], "o-", ms=3, label="val")
        ax.set_ylabel("GRPO loss" if r.record.stage == "rl" else "loss")
        handles = ax.get_lines()
        reward = [x for x in train if isinstance(x.get("reward"), (int, float))]
        if reward:
            ax2 = ax.twinx()
            handles += ax2.plot([x["step"] for x in reward], [x["reward"] for x in reward], color="tab:green",
                                lw=0.8, label="reward")
            ax2.set_ylabel("mean reward", color="tab:green")
        ax.legend(handles=handles, loc="best", fontsize=8)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


def read_rl_curves(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An RL run's per-step rows (rl_log.jsonl) and its held-out greedy accuracy by step (rl_heldout.json; none
    when the run had no monitor). Lines that are not JSON objects with a step are skipped."""
    rows, heldout = [], []
    log = run_dir / "rl_log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    if (run_dir / "rl_heldout.json").is_file():
        data = _read_json(run_dir / "rl_heldout.json")
        heldout = [x for x in data if isinstance(x, dict) and isinstance(x.get("accuracy"), (int, float))] \
            if isinstance(data, list) else []
    return rows, heldout


def plot_rl_runs(runs: list[StageRun], path: str | Path) -> Path | None:
    """Reward, held-out greedy pass@1 and mean response length over GRPO steps, one line per RL run (None when no
    run logged GRPO steps). Rewards and lengths are smoothed over 5 steps (a step has 16 x 8 samples)."""
    curves = [(r.label, *read_rl_curves(r.dir)) for r in runs if r.record.stage == "rl"]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig = _figure((15, 4))
    ax_reward, ax_acc, ax_len = fig.subplots(1, 3)

    def smooth(values: list[float], w: int = 5) -> list[float]:
        return [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1])
                for i in range(len(values))]

    for label, rows, heldout in curves:
        steps = [r["step"] for r in rows]
        line, = ax_reward.plot(steps, smooth([float(r.get("reward", 0.0)) for r in rows]), label=label)
        if heldout:
            ax_acc.plot([h["step"] for h in heldout], [h["accuracy"] for h in heldout], "o-", ms=3,
                        color=line.get_color(), label=label)
        ax_len.plot(steps, smooth([float(r.get("response_len_mean", 0.0)) for r in rows]), color=line.get_color(),
                    label=label)
    for ax, title in ((ax_reward, "mean reward (accuracy + format)"),
                      (ax_acc, "held-out greedy pass@1 (validation split)"),
                      (ax_len, "mean response length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_acc.set_ylim(0, 1)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))


# ----- the card -----------------------------------------------------------------------------------------------------
def write_report_card(dirs: list[Path], out: Path, price_per_hour: float | None = None,
                      serve_json: Path | None = None, title: str = "nanoseek report card") -> Path:
    """Find every run.json, eval result and serving benchmark under `dirs`; write `out` (markdown), and next to it
    <stem>_cost.png, <stem>_losses.png and <stem>.json (every number on the card). Returns `out`.

    price_per_hour: USD per machine-hour for every run; None prices each run at what it recorded.
    """
    if price_per_hour is not None and price_per_hour < 0:
        raise NanoseekError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    dirs = [Path(d) for d in dirs]
    runs, evals, serves = find_results(dirs, serve_json)
    out = Path(out)
    if out.suffix != ".md":
        raise NanoseekError(f"--out {out}: the report card is markdown: give a .md file")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = card_data(runs, evals, serves, price_per_hour)
    cost_png = plot_costs(data, out.with_name(f"{out.stem}_cost.png"))
    loss_png = plot_all_losses(runs, out.with_name(f"{out.stem}_losses.png"))
    rl_png = plot_rl_runs(runs, out.with_name(f"{out.stem}_rl.png"))
    text = render_card(data, out, title, dirs, cost_png.name, loss_png.name, rl_png.name if rl_png else None)
    for path, content in ((out.with_suffix(".json"), json.dumps(data, indent=2) + "\n"), (out, text)):
        write_text_atomically(path, content)
    return out
