"""Expert parallelism on CPU gloo: step time and bytes moved per step, EP=2 vs DDP=2 vs 1 process; and the
all-to-all accounting at DeepSeek-V3's size.

    python benchmarks/bench_expert_parallel.py            # ~10 min on 2 cores: results/bench_expert_parallel.json
    python benchmarks/bench_expert_parallel.py --quick    # 3 steps, one round (a smoke run)
    python benchmarks/bench_expert_parallel.py --table    # only the V3 accounting table (no training)

Each variant is a real `nanoseek pretrain` (torchrun for the 2-process ones) with 1 thread per process, fp32, the
global batch 8 x 128 tokens; the tokenizer, token data and peak-FLOP cache are copied in beforehand, so only training
differs. Step time = run.json's train_seconds / steps (the optimizer steps only, no evaluation or checkpoint).
Variants run interleaved over rounds, so load from other users of the machine hits them alike.

Bytes per step, over all ranks:
  all-to-all   counted by expert_parallel (history's a2a_bytes: rows, pairs, sizes, forward and backward)
  all-reduce   DDP's gradient all-reduce, by the ring formula 2 (W - 1) x 4 bytes x the parameters it reduces (all
               of them for DDP; all but the routed experts under --ep, whose gradients the all-to-all brings home)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek import expert_parallel  # noqa: E402
from nanoseek.config import ModelConfig, get_preset  # noqa: E402
from nanoseek.osutil import cpu_model  # noqa: E402

CONFIGS = {
    "cpu": get_preset("cpu"),  # 16 routed experts, top-2, 4 groups top-2
    # 64 finer experts (V2-Lite's count), top-6 of 8 groups top-4: 4x the routed parameters, 1.5x the active
    "cpu-64e": get_preset("cpu", n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
                          moe_intermediate_size=64),
}
VARIANTS = {"1 process": (1, []), "DDP, 2 processes": (2, []), "EP=2, 2 processes": (2, ["--ep", "2"])}


def expert_params(config: ModelConfig) -> int:
    layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)) + config.num_nextn_predict_layers
    return layers * config.n_routed_experts * 3 * config.hidden_size * config.moe_intermediate_size


def run(variant: str, config_file: Path, cache: Path, out: Path, steps: int) -> dict:
    world, extra = VARIANTS[variant]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(cache, out)
    args = ["pretrain", "--config", str(config_file), "--steps", str(steps), "--batch-size", "8", "--seq-len", "128",
            "--eval-every", str(steps), "--eval-iters", "1", "--sample-every", "0", "--save-every", "0",
            "--dtype", "fp32", "--threads", "1", "--out", str(out), *extra]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "nanoseek", *args] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "-m", "nanoseek", *args])
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    record = json.loads((out / "run.json").read_text())
    state = json.loads((out / "final" / "trainer_state.json").read_text()) \
        if (out / "final" / "trainer_state.json").exists() else None
    if state is None:
        ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
        state = json.loads((ckpt / "trainer_state.json").read_text())
    a2a = [r["a2a_bytes"] for r in state["history"]["train"] if "a2a_bytes" in r]
    return {"step_seconds": record["train_seconds"] / record["steps"], "tokens": record["tokens"],
            "val_loss": record["final_val_loss"], "a2a_bytes": statistics.median(a2a) if a2a else 0}


def measure(quick: bool) -> dict:
    steps, rounds = (3, 1) if quick else (12, 3)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, config in CONFIGS.items():
            config_file = tmp / f"{name}.json"
            config.save(config_file)
            cache = tmp / f"{name}-cache"  # tokenizer, data, peak FLOP/s: made once, copied into every run
            subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--config", str(config_file), "--steps", "1",
                            "--batch-size", "8", "--seq-len", "128", "--eval-every", "1", "--eval-iters", "1",
                            "--sample-every", "0", "--dtype", "fp32", "--threads", "1", "--out", str(cache)],
                           check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            for leftover in ("checkpoints", "final", "run.json", "loss.png"):
                path = cache / leftover
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(rounds):
                for variant in VARIANTS:
                    runs[variant].append(run(variant, config_file, cache, tmp / "run", steps))
            p_all, p_experts = config.num_params()["total_with_mtp"], expert_params(config)
            results[name] = {}
            for variant, rs in runs.items():
                world, extra = VARIANTS[variant]
                reduced = 0 if world == 1 else (p_all - p_experts if extra else p_all)
                results[name][variant] = {
                    "step_seconds": [r["step_seconds"] for r in rs], "val_loss": rs[-1]["val_loss"],
                    "a2a_bytes_per_step": rs[-1]["a2a_bytes"],
                    "allreduce_bytes_per_step": 2 * (world - 1) * 4 * reduced,
                }
            results[name]["params"] = {"total": p_all, "routed_experts": p_experts}
    return results


# --- DeepSeek-V3's size, from the accounting ----------------------------------------------------------------------
def v3_table() -> tuple[list[dict], str]:
    """All-to-all bytes per token per MoE layer (forward + backward) at V3's shape: 256 routed experts, top-8,
    8 groups (= nodes) top-4, hidden 7168, EP over 64 GPUs = 8 nodes x 8 (V3 paper 3.2: 64-way EP over 8 nodes)."""
    v3 = get_preset("deepseek-v3")
    unlimited = get_preset("deepseek-v3", n_group=1, topk_group=1)
    d, k, ep, nodes = v3.hidden_size, v3.num_experts_per_tok, 64, 8
    bf16, fp8 = 2.0, 1 + 4 / 128  # fp8 dispatch: 1 byte a value + one fp32 scale per 128 (V3 dispatches in FP8)

    def per_token(remote_copies: float, dispatch: float) -> float:  # rows there and back, in forward and backward
        return 2 * remote_copies * d * (dispatch + bf16)

    rows = []
    for label, cfg in (("node-limited (4 of 8 groups)", v3), ("unlimited (any 8 of 256)", unlimited)):
        ranks = expert_parallel.expected_ranks_per_token(cfg, ep)
        node_count = expert_parallel.expected_ranks_per_token(cfg, nodes)
        bound = expert_parallel.max_ranks_per_token
        for unit, expected, most, n in (("(token, expert)", float(k), k, ep),
                                        ("(token, GPU) [nanoseek]", ranks, bound(cfg, ep), ep),
                                        ("(token, node) [V3 / DeepEP: IB once per node]", node_count,
                                         bound(cfg, nodes), nodes)):
            remote = expected * (n - 1) / n  # by symmetry a token's own GPU (node) is one of the n alike
            rows.append({"routing": label, "one copy per": unit, "copies_expected": expected, "copies_max": most,
                         "remote_copies": remote, "bytes_bf16": per_token(remote, bf16),
                         "bytes_fp8_dispatch": per_token(remote, fp8)})
    tokens_per_gpu = 15360 * 4096 // 2048  # V3's batch of 15360 x 4K tokens over 2048 GPUs, if all data parallel
    layers = v3.num_hidden_layers - v3.first_k_dense_replace + v3.num_nextn_predict_layers  # 58 MoE + 1 MTP
    weights = v3.n_routed_experts * 3 * d * v3.moe_intermediate_size
    fsdp = (2 * 2 * weights + 4 * weights) * (2047 / 2048)  # bf16 all-gather fwd + bwd, fp32 reduce-scatter
    link = 50e9  # bytes/s a GPU sends over InfiniBand (400 Gb/s per GPU, as V3's H800 cluster)

    def step(per_token: float) -> str:  # per GPU per step, and the seconds that takes on the link
        total = per_token * tokens_per_gpu * layers
        return f"{total / 1e9:.0f} GB, {total / link:.1f} s"

    lines = ["| routing | one copy per | copies a token sends (expected / max) | remote copies | "
             "bytes / token / MoE layer, bf16 | same, fp8 dispatch | per GPU per step, bf16 (at 50 GB/s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['routing']} | {r['one copy per']} | {r['copies_expected']:.2f} / {r['copies_max']} | "
                     f"{r['remote_copies']:.2f} | {r['bytes_bf16'] / 1e3:.0f} KB | "
                     f"{r['bytes_fp8_dispatch'] / 1e3:.0f} KB | {step(r['bytes_bf16'])} |")
    lines.append(f"| FSDP instead of EP: every GPU gathers all 256 experts of a layer (bf16, twice) and "
                 f"reduce-scatters their fp32 gradient | - | - | - | {fsdp / tokens_per_gpu / 1e3:.0f} KB | - | "
                 f"{step(fsdp / tokens_per_gpu)} |")
    return rows + [{"fsdp_bytes_per_layer_per_gpu": fsdp, "tokens_per_gpu": tokens_per_gpu, "moe_layers": layers,
                    "link_bytes_per_second": link}], "\n".join(lines)


def markdown(results: dict, cpu: str, quick: bool) -> str:
    lines = [f"CPU: {cpu}; gloo over loopback; 1 thread per process; fp32; global batch 8 x 128 tokens; "
             f"{'3 steps, 1 round (quick)' if quick else '12 steps, 3 interleaved rounds'}; "
             f"{datetime.date.today().isoformat()}.", "",
             "| config | variant | step time, s (rounds) | all-to-all MB / step | all-reduce MB / step (formula) | "
             "final val loss |", "|---|---|---|---|---|---|"]
    for name, variants in results.items():
        for variant, r in variants.items():
            if variant == "params":
                continue
            times = ", ".join(f"{t:.2f}" for t in r["step_seconds"])
            lines.append(f"| {name} | {variant} | {times} | {r['a2a_bytes_per_step'] / 1e6:.2f} | "
                         f"{r['allreduce_bytes_per_step'] / 1e6:.1f} | {r['val_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table", action="store_true", help="only the V3 accounting table")
    args = ap.parse_args()
    rows, table = v3_table()
    print(table)
    if args.table:
        return
    results = measure(args.quick)
    cpu = cpu_model()
    text = markdown(results, cpu, args.quick)
    print(text)
    out = ROOT / "benchmarks" / "results" / f"bench_expert_parallel{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"cpu": cpu, "date": datetime.date.today().isoformat(), "quick": args.quick,
                               "results": results, "v3": rows, "markdown": text, "v3_markdown": table},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
