"""A repeatable fault pass over checkpoints and training: damage them in many ways, run the real CLI on each, and check
that nanoseek answers with exit code 2 and one line (or loads, where loading is legitimately fine), never a traceback
or a segfault, and that kill -9 and a full disk lose nothing.

    python scripts/fault_pass_checkpoints.py            # every case (a few minutes on 2 cores)
    python scripts/fault_pass_checkpoints.py -k index   # only the cases whose name contains "index"

Cases (each runs `python -m nanoseek ...` in a subprocess, one torch thread):
  weights     truncated / garbled / empty safetensors, wrong shapes and dtypes, missing and extra tensors, partial MTP
  config      bad JSON, wrong types (string rope_theta, bool for int, NaN), absurd sizes (hidden_size 10**7, ...)
  index       model.safetensors.index.json: absolute paths, "..", links out of the directory, a FIFO, bad weight_map
  resume      damaged optimizer.pt / trainer_state.json / checkpoints/latest on `pretrain --resume`
  write       read-only and full (tmpfs) --out, export -o, sample --out, eval --json (as root, where mount works)
  kill        kill -9 during training and during a checkpoint write, then --resume: bit-identical to an uninterrupted
              run, and the previous checkpoint loads at every point

Checks per case: the exit code is the expected one; no "Traceback" and no segfault (rc 139 / -11); with exit code 2,
stderr holds exactly one line (progress bars aside) and it names the damaged file or directory; the child's peak RSS
(VmHWM) for the absurd-size configs stays small; for write/kill cases, the previous checkpoint still loads.
Prints a table, writes benchmarks/results/fault_pass_checkpoints.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from nanoseek.osutil import cpu_model  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ["--preset", "test", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
         "--warmup-steps", "2", "--eval-every", "4", "--eval-iters", "1", "--sample-every", "0"]


@dataclass
class Case:
    name: str
    group: str
    argv: list[str]  # after `python -m nanoseek`
    expect: tuple[int, ...] = (2,)
    names: str | None = None  # a path the error line must contain
    max_rss_mb: float | None = None
    after: Callable[[], str | None] | None = None  # extra check: None = fine, else what is wrong
    result: dict = field(default_factory=dict)


def _hwm_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process from /proc, in MiB; 0 where /proc is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def run(argv: list[str], timeout: float = 120, cwd: Path | None = None) -> dict:
    """`python -m nanoseek argv` -> rc, stdout, stderr, peak RSS of the child (MiB), seconds.

    The peak is VmHWM polled every 10 ms while the child lives (wait4's ru_maxrss would include the parent's memory
    that the child inherited at fork, before exec)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek", *argv], stdout=out, stderr=err, env=ENV, cwd=cwd)
        rc, rss = None, 0.0
        while rc is None:
            rss = max(rss, _hwm_mb(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
            elif time.time() - t0 > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                rc = "timeout"
            else:
                time.sleep(0.01)
        proc.returncode = rc if isinstance(rc, int) else -9  # already reaped: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace"),
                "rss_mb": round(rss, 1), "seconds": round(time.time() - t0, 2)}


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm progress bars (carriage-return redraws) and without the MTP warning line."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return [ln for ln in lines if "%|" not in ln and "it/s]" not in ln and "step/s" not in ln]


def judge(case: Case, r: dict) -> list[str]:
    problems = []
    if r["rc"] in (139, -11, 134, -6):
        problems.append(f"crashed (rc {r['rc']})")
    if "Traceback" in r["stderr"]:
        problems.append("traceback")
    if r["rc"] not in case.expect:
        problems.append(f"rc {r['rc']}, expected {'/'.join(map(str, case.expect))}")
    lines = error_lines(r["stderr"])
    if r["rc"] == 2:
        errors = [ln for ln in lines if "error:" in ln]
        if len(lines) != 1 or len(errors) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if case.names and not any(case.names in ln for ln in errors):
            problems.append(f"error does not name {case.names}")
    if case.max_rss_mb is not None and r["rss_mb"] > case.max_rss_mb:
        problems.append(f"peak RSS {r['rss_mb']:.0f} MiB > {case.max_rss_mb:.0f}")
    if case.after is not None:
        extra = case.after()
        if extra:
            problems.append(extra)
    return problems


# --- building damaged checkpoints -----------------------------------------------------------------------------------
def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn: Callable[[dict], None]) -> None:
    t = tensors(d / "model.safetensors")
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def loads(path: Path) -> str | None:
    from nanoseek import load_model

    try:
        load_model(path)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{path} does not load: {e}"
    return None


# --- the cases ------------------------------------------------------------------------------------------------------
def load_cases(work: Path, final: Path, sharded: Path) -> list[Case]:
    """Damaged copies of a good checkpoint, each read by one of the commands that load checkpoints."""
    cases: list[Case] = []
    commands = {
        "generate": lambda d: ["generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "2",
                               "--threads", "1"],
        "export": lambda d: ["export", str(d), "-o", str(work / "out" / f"{d.name}.gguf")],
        "sft": lambda d: ["sft", "--model", str(d), "--task", "arithmetic", "--n", "8", "--steps", "1",
                          "--batch-size", "2", "--threads", "1", "--out", str(work / "out" / f"sft-{d.name}")],
        "info": lambda d: ["info", "--config", str(d)],
        "eval": lambda d: ["eval", "--model", str(d), "--task", "arithmetic", "-n", "2", "--max-new-tokens", "4",
                           "--threads", "1"],
    }
    order = ["generate", "export", "sft", "generate", "eval", "export", "info"]

    def add(name: str, group: str, make: Callable[[Path], None], expect=(2,), command: str | None = None,
            base: Path = final, names_dir: bool = True, **kw) -> None:
        d = copy(base, work / "cases" / name)
        make(d)
        cmd = command or order[len(cases) % len(order)]
        cases.append(Case(f"{group}: {name}", group, commands[cmd](d), expect, str(d) if names_dir else None, **kw))

    st = final / "model.safetensors"
    size = st.stat().st_size
    # weights
    add("truncated-half", "weights", lambda d: (d / st.name).write_bytes(st.read_bytes()[: size // 2]))
    add("truncated-10-bytes", "weights", lambda d: (d / st.name).write_bytes(st.read_bytes()[:-10]))
    add("empty-file", "weights", lambda d: (d / st.name).write_bytes(b""))
    add("garbled-header-length", "weights", lambda d: (d / st.name).write_bytes(b"\xff" * 8 + st.read_bytes()[8:]))
    add("garbled-header-json", "weights",
        lambda d: (d / st.name).write_bytes(st.read_bytes()[:8] + b"{" * 40 + st.read_bytes()[48:]))
    add("random-bytes", "weights", lambda d: (d / st.name).write_bytes(os.urandom(size)))

    def garble_data(d: Path) -> None:  # a valid header over different data: loads (the values are not checked)
        raw = bytearray(st.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        rng = random.Random(0)
        for i in range(8 + n, len(raw), 97):
            raw[i] = rng.randrange(256)
        (d / st.name).write_bytes(bytes(raw))

    add("garbled-data-valid-header", "weights", garble_data, expect=(0,), command="generate")
    add("missing-tensor", "weights", lambda d: edit_tensors(
        d, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight")))
    add("wrong-shape", "weights", lambda d: edit_tensors(
        d, lambda t: t.update({"model.norm.weight": torch.zeros(7)})))
    add("transposed", "weights", lambda d: edit_tensors(
        d, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                               t["model.layers.0.self_attn.o_proj.weight"].t().contiguous()})))
    add("integer-dtype", "weights", lambda d: edit_tensors(
        d, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].long()})))
    add("extra-tensor", "weights", lambda d: edit_tensors(
        d, lambda t: t.update({"model.layers.0.extra": torch.zeros(3)})))
    add("bf16-weights", "weights", lambda d: edit_tensors(
        d, lambda t: t.update({k: v.bfloat16() for k, v in t.items() if not k.endswith("correction_bias")})),
        expect=(0,))
    add("partial-mtp-layer", "weights", lambda d: edit_tensors(d, lambda t: t.pop("model.layers.2.eh_proj.weight")),
        command="generate")
    add("mtp-declared-no-weights", "weights", lambda d: edit_tensors(
        d, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")]), expect=(0,), command="generate")
    add("mtp-declared-no-weights-speculate", "weights", lambda d: edit_tensors(
        d, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")]), command="generate")
    cases[-1].argv.append("--speculate")
    add("weights-a-directory", "weights", lambda d: ((d / st.name).unlink(), (d / st.name).mkdir()))
    add("no-weights", "weights", lambda d: (d / st.name).unlink())
    add("pickle-only", "weights", lambda d: ((d / st.name).unlink(), (d / "pytorch_model.bin").write_bytes(b"\x80")))
    add("weights-link-to-dev-zero", "weights",
        lambda d: ((d / st.name).unlink(), (d / st.name).symlink_to("/dev/zero")))
    # config.json
    add("config-missing", "config", lambda d: (d / "config.json").unlink())
    add("config-bad-json", "config", lambda d: (d / "config.json").write_text("{\"hidden_size\": 64,"))
    add("config-not-object", "config", lambda d: (d / "config.json").write_text("[1, 2]"))
    add("config-binary", "config", lambda d: (d / "config.json").write_bytes(os.urandom(64)))
    absurd = dict(max_rss_mb=1500)
    add("absurd-hidden_size", "config", lambda d: edit_config(d, hidden_size=10**7), command="generate", **absurd)
    add("absurd-num_hidden_layers", "config", lambda d: edit_config(d, num_hidden_layers=10**6), command="export",
        **absurd)
    add("absurd-vocab_size", "config", lambda d: edit_config(d, vocab_size=10**9), command="sft", **absurd)
    add("absurd-n_routed_experts", "config", lambda d: edit_config(d, n_routed_experts=2**20, n_group=1, topk_group=1),
        command="generate", **absurd)
    add("absurd-max_position_embeddings", "config", lambda d: edit_config(d, max_position_embeddings=2**40),
        expect=(0,), command="generate", **absurd)  # legitimate: no tensor depends on it, the engine caps its cache
    add("string-rope_theta", "config", lambda d: edit_config(d, rope_theta="10000"))
    add("string-initializer_range", "config", lambda d: edit_config(d, initializer_range="0.02"))
    add("bool-num_hidden_layers", "config", lambda d: edit_config(d, num_hidden_layers=True))
    add("float-n_group", "config", lambda d: edit_config(d, n_group=4.0))
    add("nan-rope_theta", "config", lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": NaN')))
    add("inf-rms_norm_eps", "config", lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": Infinity')))
    add("negative-hidden_size", "config", lambda d: edit_config(d, hidden_size=-64))
    add("null-vocab_size", "config", lambda d: edit_config(d, vocab_size=None))
    add("model_type-llama", "config", lambda d: edit_config(d, model_type="llama"))
    add("kv-heads-mismatch", "config", lambda d: edit_config(d, num_key_value_heads=1))
    add("rope_scaling-garbage", "config", lambda d: edit_config(d, rope_scaling={"type": "yarn", "factor": "x"}))
    add("rope_scaling-list", "config", lambda d: edit_config(d, rope_scaling=[1, 2]))
    add("n_group-not-divisor", "config", lambda d: edit_config(d, n_group=3))
    add("fields-missing", "config", lambda d: (d / "config.json").write_text('{"model_type": "deepseek_v3"}'))
    add("q_lora_rank-null", "config", lambda d: edit_config(d, q_lora_rank=None))
    add("eos-empty-list", "config", lambda d: edit_config(d, eos_token_id=[]), expect=(0,), command="generate")
    add("num_nextn-2-one-held", "config", lambda d: edit_config(d, num_nextn_predict_layers=2))
    add("unknown-fields", "config", lambda d: edit_config(d, foo={"bar": 1}, torch_dtype="float64"), expect=(0,),
        command="generate")
    # index.json
    shard = sorted(p.name for p in sharded.glob("*.safetensors"))[0]

    def index_edit(fn: Callable[[Path, dict], dict | str]) -> Callable[[Path], None]:
        def make(d: Path) -> None:
            idx = json.loads((d / "model.safetensors.index.json").read_text())
            new = fn(d, idx)
            (d / "model.safetensors.index.json").write_text(new if isinstance(new, str) else json.dumps(new))
        return make

    def remap(idx: dict, name: str) -> dict:
        idx["weight_map"] = {k: (name if v == shard else v) for k, v in idx["weight_map"].items()}
        return idx

    def outside(d: Path, idx: dict, how: str) -> dict:
        elsewhere = d.parent / f"{d.name}-elsewhere.safetensors"
        (d / shard).rename(elsewhere)
        if how == "absolute":
            return remap(idx, str(elsewhere))
        if how == "dotdot":
            return remap(idx, f"../{elsewhere.name}")
        (d / shard).symlink_to(elsewhere)
        return idx

    def fifo(d: Path, idx: dict) -> dict:
        (d / shard).unlink()
        os.mkfifo(d / shard)
        return idx

    sh = dict(base=sharded)
    add("index-absolute-path", "index", index_edit(lambda d, i: outside(d, i, "absolute")), **sh)
    add("index-dotdot", "index", index_edit(lambda d, i: outside(d, i, "dotdot")), **sh)
    add("index-symlink-escape", "index", index_edit(lambda d, i: outside(d, i, "symlink")), **sh)
    add("index-etc-passwd", "index", index_edit(lambda d, i: remap(i, "/etc/passwd")), **sh)
    add("index-fifo", "index", index_edit(fifo), **sh)
    add("index-bad-json", "index", index_edit(lambda d, i: "{\"weight_map\": "), **sh)
    add("index-weight_map-list", "index", index_edit(lambda d, i: {"weight_map": list(i["weight_map"])}), **sh)
    add("index-weight_map-missing", "index", index_edit(lambda d, i: {"metadata": {}}), **sh)
    add("index-value-int", "index", index_edit(lambda d, i: {"weight_map": {k: 1 for k in i["weight_map"]}}), **sh)
    add("index-value-null", "index", index_edit(lambda d, i: {"weight_map": {k: None for k in i["weight_map"]}}),
        **sh)
    add("index-shard-missing", "index", lambda d: (d / shard).unlink(), **sh)
    add("index-wrong-shard", "index", index_edit(
        lambda d, i: {"weight_map": {k: sorted(set(i["weight_map"].values()))[-1] for k in i["weight_map"]}}), **sh)
    add("index-tensor-not-listed", "index", index_edit(
        lambda d, i: {"weight_map": dict(list(i["weight_map"].items())[1:])}), **sh)
    add("index-good", "index", lambda d: None, expect=(0,), command="generate", **sh)
    return cases


def resume_cases(work: Path, run_dir: Path) -> list[Case]:
    """Damaged files in a copy of a finished run's newest checkpoint, then `pretrain --resume` with more steps."""
    data = run_dir.parent / "corpus.txt"
    cases: list[Case] = []

    def add(name: str, make: Callable[[Path], str], expect=(2,)) -> None:
        d = copy(run_dir, work / "cases" / f"resume-{name}")
        ckpt = d / "checkpoints" / "step_000004"
        target = make(ckpt)
        argv = ["pretrain", *TRAIN, "--data", str(data), "--steps", "6", "--out", str(d), "--resume"]
        before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}

        def unchanged() -> str | None:
            if expect != (2,):
                return None
            now = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
            return None if now == before else "the checkpoint was modified by a refused resume"

        cases.append(Case(f"resume: {name}", "resume", argv, expect, target, after=unchanged))

    def opt_edit(fn: Callable[[dict], object]) -> Callable[[Path], str]:
        def make(ckpt: Path) -> str:
            sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
            new = fn(sd)
            torch.save(new if isinstance(new, (dict, list)) else sd, ckpt / "optimizer.pt")
            return str(ckpt / "optimizer.pt")
        return make

    def state_edit(fn: Callable[[dict], object] | str) -> Callable[[Path], str]:
        def make(ckpt: Path) -> str:
            path = ckpt / "trainer_state.json"
            if isinstance(fn, str):
                path.write_text(fn)
            else:
                st = json.loads(path.read_text())
                new = fn(st)
                path.write_text(json.dumps(new if isinstance(new, dict) else st))
            return str(path)
        return make

    def raw(name: str, data_fn: Callable[[bytes], bytes]) -> Callable[[Path], str]:
        def make(ckpt: Path) -> str:
            (ckpt / name).write_bytes(data_fn((ckpt / name).read_bytes()))
            return str(ckpt / name)
        return make

    def set_state(sd: dict, i: int, k: str, v: torch.Tensor) -> None:
        sd["state"][i][k] = v

    add("optimizer-truncated", raw("optimizer.pt", lambda b: b[: len(b) // 2]))
    add("optimizer-truncated-tail", raw("optimizer.pt", lambda b: b[:-100]))
    add("optimizer-garbage", raw("optimizer.pt", lambda b: os.urandom(len(b))))
    add("optimizer-empty", raw("optimizer.pt", lambda b: b""))
    add("optimizer-wrong-shape", opt_edit(lambda sd: set_state(sd, 0, "exp_avg", torch.zeros(3))))
    add("optimizer-wrong-shape-bigger", opt_edit(lambda sd: set_state(sd, 3, "exp_avg_sq", torch.zeros(4096, 4096))))
    add("optimizer-wrong-dtype", opt_edit(lambda sd: set_state(sd, 0, "exp_avg", sd["state"][0]["exp_avg"].half())))
    add("optimizer-nan", opt_edit(lambda sd: sd["state"][2]["exp_avg_sq"].fill_(float("nan"))))
    add("optimizer-fewer-params", opt_edit(lambda sd: sd["param_groups"][0].update(
        params=sd["param_groups"][0]["params"][:-2])))
    add("optimizer-step-string", opt_edit(lambda sd: set_state(sd, 0, "step", "x")))
    add("optimizer-bad-lr", opt_edit(lambda sd: sd["param_groups"][0].update(lr="fast")))
    add("optimizer-not-dict", opt_edit(lambda sd: [1, 2, 3]))
    add("optimizer-missing", lambda ckpt: ((ckpt / "optimizer.pt").unlink(), str(ckpt))[1])
    add("state-bad-json", state_edit("{\"step\": 4,"))
    add("state-empty-object", state_edit("{}"))
    add("state-step-string", state_edit(lambda st: st.update(step="4")))
    add("state-step-negative", state_edit(lambda st: st.update(step=-1)))
    add("state-history-missing", state_edit(lambda st: st.pop("history")))
    add("state-history-garbage", state_edit(lambda st: st.update(history={"train": "x", "val": []})))
    add("state-history-no-loss", state_edit(lambda st: st["history"]["train"][0].pop("loss")))
    add("state-nan-seconds", state_edit(lambda st: st.update(wall_seconds=float("nan"))))
    add("state-wrong-stage", state_edit(lambda st: st.update(stage="rl")))
    add("state-binary", raw("trainer_state.json", lambda b: os.urandom(200)))

    def latest(text: bytes) -> Callable[[Path], str]:
        def make(ckpt: Path) -> str:
            (ckpt.parent / "latest").write_bytes(text)
            return str(ckpt.parent / "latest")
        return make

    add("latest-path-escape", latest(b"../../../etc\n"))
    add("latest-missing-step", latest(b"step_000099\n"))
    add("latest-binary", latest(b"\xff\xfe\x00"))
    add("weights-truncated", raw("model.safetensors", lambda b: b[: len(b) // 3]))
    add("config-changed", lambda ckpt: (edit_config(ckpt, rope_theta=5000.0), str(ckpt))[1])
    add("good", lambda ckpt: str(ckpt), expect=(0,))
    return cases


def write_cases(work: Path, run_dir: Path, final: Path) -> tuple[list[Case], Callable[[], None]]:
    """Read-only and full file systems (tmpfs mounts; needs root). Returns the cases and an unmount function."""
    mounts: list[Path] = []

    def mount(path: Path, opts: str) -> bool:
        path.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode
        if ok == 0:
            mounts.append(path)
        return ok == 0

    def unmount() -> None:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], capture_output=True)

    cases: list[Case] = []
    data = run_dir.parent / "corpus.txt"
    ro, full = work / "mnt-ro", work / "mnt-full"
    if not (os.geteuid() == 0 and mount(ro, "ro,size=1m")):
        print("write cases skipped: mounting a tmpfs needs root", file=sys.stderr)
        return cases, unmount
    cases.append(Case("write: pretrain --out read-only", "write",
                      ["pretrain", *TRAIN, "--data", str(data), "--steps", "2", "--out", str(ro / "run")],
                      names=str(ro / "run")))
    cases.append(Case("write: export -o read-only", "write", ["export", str(final), "-o", str(ro / "m.gguf")],
                      names=str(ro)))
    cases.append(Case("write: export -o a directory", "write", ["export", str(final), "-o", str(work)],
                      names=str(work)))
    cases.append(Case("write: sample --out read-only", "write",
                      ["sample", "--model", str(final), "--task", "arithmetic", "-n", "2", "--out",
                       str(ro / "t.jsonl"), "--threads", "1"], names=str(ro)))
    cases.append(Case("write: eval --json read-only", "write",
                      ["eval", "--model", str(final), "--task", "arithmetic", "-n", "2", "--json",
                       str(ro / "e.json"), "--threads", "1"], names=str(ro)))
    cases.append(Case("write: distill --out read-only", "write",
                      ["distill", "--teacher-data", str(run_dir.parent / "traces.jsonl"), "--teacher", str(final),
                       "--student-preset", "test", "--steps", "1", "--threads", "1", "--out", str(ro / "st")],
                      names=str(ro / "st")))

    # a full disk during a checkpoint write: the run's step-4 checkpoint on a tmpfs with room for little more
    ckpt_bytes = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step_000004").iterdir())
    run_bytes = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    if mount(full, f"size={run_bytes + ckpt_bytes // 2}"):
        target = full / "run"
        shutil.copytree(run_dir, target)
        good = target / "checkpoints" / "step_000004"

        def kept() -> str | None:
            latest = (target / "checkpoints" / "latest").read_text().strip()
            strays = [p.name for p in target.rglob(".*") if ".tmp" in p.name or ".old" in p.name]
            return (f"latest is {latest}" if latest != "step_000004" else None) or \
                (f"temporaries left: {strays}" if strays else None) or loads(good)

        cases.append(Case("write: disk full at a checkpoint (tmpfs)", "write",
                          ["pretrain", *TRAIN, "--data", str(data), "--steps", "8", "--save-every", "2",
                           "--out", str(target), "--resume"], names=str(target), after=kept))
    if mount(full2 := work / "mnt-full2", "size=600k"):
        def no_partial() -> str | None:
            left = list(full2.iterdir())
            return f"left behind: {[p.name for p in left]}" if left else None

        cases.append(Case("write: disk full during export (tmpfs)", "write",
                          ["export", str(final), "-o", str(full2 / "m.gguf")], names=str(full2 / "m.gguf"),
                          after=no_partial))
    return cases, unmount


# --- kill -9 --------------------------------------------------------------------------------------------------------
def kill_cases(work: Path, data: Path, reference: Path) -> list[dict]:
    """Start a run, kill -9 it (at a random moment, or as soon as a checkpoint write is under way), check the last
    complete checkpoint loads, resume, and compare the finished run with an uninterrupted one."""
    from safetensors.torch import load_file

    results = []
    argv_for = lambda out: ["pretrain", *TRAIN, "--data", str(data), "--steps", "40", "--save-every", "1",  # noqa: E731
                            "--keep-last", "2", "--out", str(out)]
    for i, mode in enumerate(["random", "random", "random", "during-write", "during-write", "during-write"]):
        out = work / "kill" / f"{mode}-{i}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "nanoseek", *argv_for(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=ENV)
        ckpts = out / "checkpoints"
        t0 = time.time()
        killed_at = None
        rng = random.Random(i)
        after_step = rng.randint(1, 30)  # during-write: kill inside the first checkpoint write after this step
        while proc.poll() is None and time.time() - t0 < 120:
            if (ckpts / "latest").is_file():
                if mode == "random":
                    time.sleep(rng.uniform(0.0, 1.0))
                    killed_at = "training"
                    break
                tmp = list(ckpts.glob(".step_*.tmp-*"))
                if tmp and int(tmp[0].name[6:12]) > after_step:
                    killed_at = f"writing {tmp[0].name}"
                    break
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        row = {"case": f"kill -9 ({mode})", "killed": killed_at or f"not killed (finished, rc {proc.returncode})"}
        problems = []
        latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None
        row["latest_after_kill"] = latest
        if latest:
            err = loads(ckpts / latest)
            if err:
                problems.append(err)
        r = run(argv_for(out) + (["--resume"] if latest else []))
        row["resume_rc"] = r["rc"]
        if r["rc"] != 0 or "Traceback" in r["stderr"]:
            problems.append(f"resume rc {r['rc']}: {error_lines(r['stderr'])[-1:]}")
        else:
            got = json.loads((ckpts / "step_000040" / "trainer_state.json").read_text())["history"]
            want = json.loads((reference / "checkpoints" / "step_000040" / "trainer_state.json").read_text())["history"]
            a, b = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
            if got != want or a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                problems.append("resumed run differs from the uninterrupted one")
            strays = [p.name for p in ckpts.glob(".*")]
            if strays:
                problems.append(f"temporaries left: {strays}")
        row["problems"] = problems
        row["ok"] = not problems
        results.append(row)
    return results


# --- main -----------------------------------------------------------------------------------------------------------
def setup(work: Path) -> tuple[Path, Path, Path, Path]:
    """A finished 4-step pretrain run (checkpoints at 2 and 4), its final checkpoint sharded, a 40-step reference run
    for the kill cases and a small traces file for distill."""
    from nanoseek.checkpoint import load_model, save_pretrained
    from nanoseek.data import corpus_dir

    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:14000]
    (work / "corpus.txt").write_text(text, encoding="utf-8")
    run_dir = work / "run"
    for out, steps in ((run_dir, "4"), (work / "reference", "40")):
        save_every = "2" if out == run_dir else "1"
        r = run(["pretrain", *TRAIN, "--data", str(work / "corpus.txt"), "--steps", steps, "--save-every",
                 save_every, "--keep-last", "2", "--out", str(out)])
        if r["rc"] != 0:
            sys.exit(f"setup run failed: {r['stderr'][-2000:]}")
    final = run_dir / "final"
    sharded = work / "sharded"
    save_pretrained(load_model(final), sharded, tokenizer_dir=final, max_shard_bytes=200_000)
    (work / "traces.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2", "reasoning_content": "1+1=2"}]})
        + "\n")
    return run_dir, final, sharded, work / "reference"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fault_pass_checkpoints.json")
    args = ap.parse_args()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="nanoseek-faults-"))
    unmount = lambda: None  # noqa: E731
    try:
        run_dir, final, sharded, reference = setup(work)
        cases = load_cases(work, final, sharded) + resume_cases(work, run_dir)
        more, unmount = write_cases(work, run_dir, final)
        cases += more
        cases = [c for c in cases if args.k in c.name]
        def one(c: Case) -> dict:
            r = run(c.argv)
            problems = judge(c, r)
            lines = error_lines(r["stderr"])
            mark = "ok  " if not problems else "FAIL"
            print(f"{mark} {c.name:<48} {c.argv[0]:<9} rc {r['rc']!s:>3}  {r['rss_mb']:6.0f} MiB  "
                  f"{(lines[-1] if lines else '')[:110]}" + (f"  <- {'; '.join(problems)}" if problems else ""),
                  flush=True)
            return {"case": c.name, "group": c.group, "command": c.argv[0], "expected": list(c.expect),
                    "rc": r["rc"], "stderr_lines": len(lines), "rss_mb": r["rss_mb"], "seconds": r["seconds"],
                    "message": lines[-1][:300] if lines else "", "ok": not problems, "problems": problems}

        with ThreadPoolExecutor(args.jobs) as pool:  # each case is its own process: independent of the others
            rows = list(pool.map(one, cases))
        kills = kill_cases(work, work / "corpus.txt", reference) if "kill" in args.k or not args.k else []
        for k in kills:
            print(f"{'ok  ' if k['ok'] else 'FAIL'} {k['case']:<48} killed while {k['killed']}; latest "
                  f"{k['latest_after_kill']}; resume rc {k['resume_rc']}" + (f"  <- {k['problems']}" if k["problems"]
                                                                              else ""), flush=True)
    finally:
        unmount()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    groups: dict[str, list[int]] = {}
    for row in rows:
        g = groups.setdefault(row["group"], [0, 0])
        g[0] += 1
        g[1] += row["ok"]
    if kills:
        groups["kill"] = [len(kills), sum(k["ok"] for k in kills)]
    total = sum(g[0] for g in groups.values())
    passed = sum(g[1] for g in groups.values())
    print("\n| group | cases | pass |\n|---|---:|---:|")
    for g, (n, ok) in groups.items():
        print(f"| {g} | {n} | {ok} |")
    print(f"| **all** | **{total}** | **{passed}** |")
    summary = {"cases": total, "passed": passed, "tracebacks": sum("traceback" in r["problems"] for r in rows),
               "segfaults": sum(r["rc"] in (139, -11) for r in rows), "groups": groups,
               "seconds": round(time.time() - t_start, 1)}
    print(f"\n{passed}/{total} cases pass; {summary['tracebacks']} tracebacks, {summary['segfaults']} segfaults; "
          f"{summary['seconds']:.0f} s")
    if not args.k:
        cpu = cpu_model()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": "python scripts/fault_pass_checkpoints.py",
            "machine": {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "summary": summary, "rows": rows, "kill": kills}, indent=1) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0 if passed == total else 1)


if __name__ == "__main__":
    main()
