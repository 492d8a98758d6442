"""Peak memory per rank while a 2-process FSDP2 job (gloo, CPU) saves a checkpoint, before and after issue 20.

    python benchmarks/bench_checkpoint.py --before /path/to/old/checkout   # -> benchmarks/results/bench_checkpoint.json

For each model (the `cpu` preset, 11.8M parameters, and a larger MoE of ~100M) and each code version (`--before`: a
checkout of nanoseek from before issue 20, put first on PYTHONPATH; `after`: this one), torchrun starts 2 ranks that
build the model, shard it with FSDP2, train one step (so AdamW has its moments), and then measure on each rank:

  step checkpoint   Trainer.save_checkpoint(): before, every rank gathered the whole weights and the whole AdamW state
                    and rank 0 wrote them; after, every rank writes its own shards with torch.distributed.checkpoint
  final export      Trainer.save_final(): the HF checkpoint, gathered on rank 0 (after: into CPU memory, one tensor at
                    a time)

Memory is the process's resident set (RSS): its high-water mark (VmHWM) is reset through /proc/self/clear_refs just
before the save and read just after, so "peak" is the most the process held during the save and "extra" that minus
what it held before (all CPU memory here: gloo on CPU). Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BIG = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
           num_attention_heads=8, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
           q_lora_rank=192, kv_lora_rank=128, vocab_size=8192, max_position_embeddings=256)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured(fn) -> dict:
    """Run fn() and return the RSS before it, the peak RSS during it and the difference (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: the RSS before is what is in use
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    peak = _status("VmHWM")
    return {"rss_before": before, "peak": peak, "extra": peak - before}


def worker(preset: str, out: Path) -> None:
    """One rank: FSDP2 model, one training step, then the two saves, measured."""
    import torch

    import nanoseek
    from nanoseek import distributed
    from nanoseek.config import get_preset
    from nanoseek.model import Transformer
    from nanoseek.train.pretrain import pretrain_loss
    from nanoseek.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    device = distributed.setup(torch.device("cpu"))
    try:
        config = get_preset("cpu") if preset == "cpu" else get_preset("cpu", **BIG)
        torch.manual_seed(0)
        model = distributed.wrap_model(Transformer(config), "fsdp")
        cfg = TrainConfig(steps=2, batch_size=2, seq_len=64, out=out, dtype="fp32", save_every=0, eval_every=1)
        trainer = Trainer(model, cfg, stage="pretrain")
        x = torch.randint(0, config.vocab_size, (2, 64), device=device)
        trainer.train_step([distributed.shard((x, x))], pretrain_loss(0.3, 0.0))
        result = {"rank": distributed.rank(), "code": nanoseek.__file__,
                  "params": config.num_params()["total_with_mtp"], "step_checkpoint": measured(trainer.save_checkpoint),
                  "final_export": measured(trainer.save_final)}
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        distributed.cleanup()


def run(code: Path, preset: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "NANOSEEK_KERNELS": "off"}
    for _ in range(3):  # the old code's gloo teardown sometimes aborts a rank at exit ("terminate called ..."): retry
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2", __file__, "--worker", preset, "--work", tmp], env=env,
                                  capture_output=True, text=True, timeout=1800)
        rows = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode == 0 or len(rows) == 2:  # both ranks measured: a crash at exit loses nothing
            return sorted(rows, key=lambda r: r["rank"])
    raise RuntimeError(done.stderr[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="a nanoseek checkout from before issue 20 (e.g. git archive 84e2274)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--models", default="cpu,big", help="cpu and/or big (default both)")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.work)
    from nanoseek.osutil import cpu_model

    versions = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    results = []
    for preset in args.models.split(","):
        for name, code in versions.items():
            ranks = run(code, preset)
            results.append({"model": preset, "code": name, "ranks": ranks})
            for r in ranks:
                step, final = r["step_checkpoint"], r["final_export"]
                print(f"{preset:>4} {name:>6} rank {r['rank']}: {r['params'] / 1e6:.1f}M params | step checkpoint "
                      f"peak {step['peak'] / 2**20:.0f} MiB (+{step['extra'] / 2**20:.0f}) | final export peak "
                      f"{final['peak'] / 2**20:.0f} MiB (+{final['extra'] / 2**20:.0f})", flush=True)
    out = ROOT / "benchmarks" / "results" / "bench_checkpoint.json"
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "cpu": cpu_model(),
                               "machine": platform.machine(), "load_average": os.getloadavg(),
                               "command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
