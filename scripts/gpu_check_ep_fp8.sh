#!/usr/bin/env bash
# The GPU checks of issue 22 (expert parallelism, FP8 tensor cores), as a section scripts/gpu_check.sh can call, or
# alone:   bash scripts/gpu_check_ep_fp8.sh [OUT_DIR]
#
#   fp8-kernel   torch._scaled_mm with V3's 1x128 / 128x128 scales (nanoseek.fp8._ScaledLinear / _ScaledGroupedLinear)
#                against the fp32 emulation on the same GPU: output, input and weight gradients (the kernel
#                rounds its outputs to bf16: relative error < 1e-2); SKIP where fp8.scaled_mm_available() is False (not Hopper / cuBLAS < 12.9)
#   fp8-train    `pretrain --fp8` vs bf16 on the cpu preset, 60 steps, same seed: step time and loss of each
#                (PASS when both finish and the fp8 final train loss is within 2% of bf16's: V3 reports < 0.25% at
#                scale, a 60-step run is noisier); the numbers go to docs/gpu.md
#   ep-nccl      `torchrun --nproc_per_node=2 pretrain --ep 2` on nccl against one GPU, same global batch (val
#                losses within 1e-2: bf16 sums in another order); SKIP with fewer than 2 GPUs
# Needs a CUDA torch already installed; nanoseek is installed without dependencies if it is not importable.
# Prints a table; exit status 1 if any check FAILs. Finishes in ~2-3 minutes on one H100.
# Environment: DEVICE=cpu is the dry run (scripts/gpu_check.sh --device cpu sets it): fp8-kernel is skipped, fp8-train
# and the EP run (ep-gloo: 2 processes on gloo) run at toy size; DATA=file.txt trains on that text (default: the
# bundled corpus; its tokenizer takes a while to train); PYTHON=the interpreter (default python).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
DATA_ARGS=()
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data "$DATA" --vocab-size 512); fi
$PY -c "import nanoseek" 2>/dev/null || $PY -m pip install -q --no-deps -e . >/dev/null || exit 2
declare -a ROWS
FAILED=0
# row NAME "STATUS details": anything but PASS or SKIP (a traceback's last line too) counts as FAIL
row() {
  local status="${2%% *}" details="${2#* }"
  case "$status" in PASS|SKIP) ;; FAIL) FAILED=1 ;; *) status=FAIL; details="$2"; FAILED=1 ;; esac
  ROWS+=("$(printf '| %-10s | %-4s | %s |' "$1" "$status" "$details")")
}

# --- fp8-kernel ------------------------------------------------------------------------------------------------------
if [ "$DEVICE" = cpu ]; then
  res="SKIP the dry run on the CPU (no tensor cores)"
else
res=$($PY - <<'EOF' 2>&1 | tail -1
import torch
from nanoseek import fp8
dev = torch.device("cuda")
if not fp8.scaled_mm_available(dev):
    print(f"SKIP compute capability {torch.cuda.get_device_capability(dev)}, CUDA {torch.version.cuda}")
    raise SystemExit
torch.manual_seed(0)
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
def run(fn, x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    (y.float() * g).sum().backward()
    return y, x.grad, w.grad
worst = 0.0
x, w = torch.randn(300, 1024, device=dev), torch.randn(576, 1024, device=dev) * 0.05  # V3's kv_a rows: 576
g = torch.randn(300, 576, device=dev).bfloat16().float()  # bf16 values: the kernel's output gradient is bf16
kernel = run(lambda x, w: fp8._ScaledLinear.apply(x, w, torch.bfloat16), x, w, g)
emulated = run(lambda x, w: fp8._FP8Linear.apply(x, w), x, w, g)
worst = max(rel(a, b) for a, b in zip(kernel, emulated))
offs = torch.tensor([130, 130, 300], dtype=torch.int32, device=dev)
w = torch.randn(3, 512, 1024, device=dev) * 0.05  # gate_up of 3 experts, 256 rows each
g = torch.randn(300, 512, device=dev).bfloat16().float()
kernel = run(lambda x, w: fp8._ScaledGroupedLinear.apply(x, w, offs, 2, torch.bfloat16), x, w, g)
emulated = run(lambda x, w: fp8._FP8GroupedLinear.apply(x, w, offs, 2), x, w, g)
worst = max(worst, *(rel(a, b) for a, b in zip(kernel, emulated)))
print(f"{'PASS' if worst < 1e-2 else 'FAIL'} max relative error vs emulation {worst:.2e} "
      f"({torch.cuda.get_device_name(dev)})")
EOF
)
fi
row fp8-kernel "$res"

# --- fp8-train -------------------------------------------------------------------------------------------------------
ARGS=(--preset cpu --device cuda --steps 60 --batch-size 16 --seq-len 256 --eval-every 60 --eval-iters 2
      --sample-every 0 --save-every 0 --seed 0 "${DATA_ARGS[@]}")
if [ "$DEVICE" = cpu ]; then
  ARGS=(--preset test --device cpu --dtype bf16 --steps 6 --batch-size 4 --seq-len 64 --eval-every 6 --eval-iters 1
        --sample-every 0 --save-every 0 --seed 0 --threads 1 "${DATA_ARGS[@]}")
fi
if $PY -m nanoseek pretrain "${ARGS[@]}" --out "$OUT/bf16" >"$OUT/bf16.log" 2>&1 &&
   $PY -m nanoseek pretrain "${ARGS[@]}" --fp8 --out "$OUT/fp8" >"$OUT/fp8.log" 2>&1; then
  res=$($PY - "$OUT" <<'EOF'
import json, sys
r = {k: json.load(open(f"{sys.argv[1]}/{k}/run.json")) for k in ("bf16", "fp8")}
ms = {k: 1e3 * v["train_seconds"] / v["steps"] for k, v in r.items()}
loss = {k: v["final_train_loss"] for k, v in r.items()}
ok = abs(loss["fp8"] - loss["bf16"]) / loss["bf16"] < 0.02
print(f"{'PASS' if ok else 'FAIL'} step {ms['bf16']:.1f} ms bf16 / {ms['fp8']:.1f} ms fp8; final train loss "
      f"{loss['bf16']:.4f} bf16 / {loss['fp8']:.4f} fp8; val {r['bf16']['final_val_loss']:.4f} / "
      f"{r['fp8']['final_val_loss']:.4f}")
EOF
)
  row fp8-train "$res"
else
  row fp8-train "FAIL pretrain failed: see $OUT/bf16.log, $OUT/fp8.log"
fi

# --- ep-nccl ---------------------------------------------------------------------------------------------------------
EP=ep-nccl
EARGS=(--preset cpu --steps 20 --batch-size 8 --seq-len 128 --eval-every 20 --eval-iters 2 --sample-every 0
       --save-every 0 --seed 0 "${DATA_ARGS[@]}")
if [ "$DEVICE" = cpu ]; then
  EP=ep-gloo GPUS=2
  EARGS=(--preset test --device cpu --steps 6 --batch-size 4 --seq-len 64 --eval-every 6 --eval-iters 1
         --sample-every 0 --save-every 0 --seed 0 --threads 1 "${DATA_ARGS[@]}")
else
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
fi
if [ "$GPUS" -lt 2 ]; then
  row $EP "SKIP $GPUS GPU: expert parallelism needs 2 (nccl allows one rank per GPU)"
else
  if CUDA_VISIBLE_DEVICES=0 $PY -m nanoseek pretrain "${EARGS[@]}" --out "$OUT/one" >"$OUT/one.log" 2>&1 &&
     $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m nanoseek pretrain "${EARGS[@]}" --ep 2 --out "$OUT/ep2" \
       >"$OUT/ep2.log" 2>&1; then
    res=$($PY - "$OUT" <<'EOF'
import json, sys
one, ep = (json.load(open(f"{sys.argv[1]}/{k}/run.json")) for k in ("one", "ep2"))
d = abs(one["final_val_loss"] - ep["final_val_loss"])
print(f"{'PASS' if d < 1e-2 else 'FAIL'} val loss {one['final_val_loss']:.4f} one process / {ep['final_val_loss']:.4f} "
      f"ep 2; step {1e3 * one['train_seconds'] / one['steps']:.1f} / {1e3 * ep['train_seconds'] / ep['steps']:.1f} ms")
EOF
)
    row $EP "$res"
  else
    row $EP "FAIL pretrain failed: see $OUT/one.log, $OUT/ep2.log"
  fi
fi

echo "| check      | result | details |"
echo "|------------|--------|---------|"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
