#!/usr/bin/env bash
# One device call for issue 13 (speed): every GPU figure and the CUDA tests, in priority order, each
# stage skipped when too little of the call's time is left for it. Logs and JSON go to $OUT:
#   log.txt          everything printed (environment, installs, tests, progress)
#   bench3.json      512², batch 8: reference (seed-style), peer_best, ours + ratios
#   scaling.json     ours at 256/512/1024² x batch 1/4/8/16 (micro-batch auto)
#   data_bench.json  patch loader throughput at the same patch size
#   attn.json        the mid-block attention (head dim 512) under each SDPA backend
#   ab.jsonl         ours at 512², batch 8 with one change each (A/B against bench3's ours)
#   profile.txt      torch.profiler kernel table of ours at 512², batch 8
#   wan.json         Qwen-Image (Wan 2.1) VAE at 256², batch 1 and 8: our 2D path vs diffusers' 3D forward
#                    (last, so it never takes time from the stages above; STAGES=wan runs it alone)
#
# On the device (Python 3.12 with torch/torchvision/triton/pytest; wheels carried in $WHEELS):
#   OUT=/some/dir WHEELS=.whl/wheels bash bench/gpu_run.sh
# Rehearsal on a CPU machine (tiny sizes, same stages, same commands):
#   REHEARSE=1 PY=/work/main/.venv/bin/python OUT=/tmp/out bash bench/gpu_run.sh
# A rerun of some stages only: STAGES=tests,bench3,scaling (comma-separated names below), and
# SIDES3=ours / SC_SIZES=1024 / SC_BATCH=... to narrow the headline or the scaling table.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for logs}"
mkdir -p "$OUT"
PY=${PY:-python3}
DEADLINE=${DEADLINE:-440}   # seconds this script may take in all (the run's timeout leaves a margin)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if [ -n "${REHEARSE:-}" ]; then
  DEV=cpu; TINY="--tiny --peak-tflops 1 --peak-tflops-fp32 1"; S3=32; B3=2; SC_SIZES=32,64; SC_BATCH=1,2
  ST="--steps 1 --warmup 1"; DATA="--batches 2 --batch-size 2 --patch-size 64 --image-size 256"
  ATTN="--device cpu --size 64 --batch 1 --dim 64 --reps 2"
else
  DEV=cuda; TINY=""; S3=512; B3=8; SC_SIZES=${SC_SIZES:-256,512,1024}; SC_BATCH=${SC_BATCH:-1,4,8,16}
  ST="--steps 5 --warmup 2"; DATA="--batches 8 --batch-size 8 --patch-size 512"
  ATTN="--size 512 --batch 8 --reps 20"
fi

stage() {  # stage NAME SECONDS_NEEDED command...: run it within what is left of DEADLINE
  local name=$1 need=$2 left rc
  shift 2
  if [ -n "${STAGES:-}" ] && [[ ",$STAGES," != *",$name,"* ]]; then
    return 0
  fi
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "=== SKIP $name: ${left}s left, it needs ~${need}s"
    return 0
  fi
  echo "=== $name (up to ${left}s) at $(date -u +%FT%TZ), ${SECONDS}s in"
  timeout -k 5 "$left" "$@"
  rc=$?
  echo "=== $name: rc=$rc, ${SECONDS}s in"
}

echo "=== environment"
date -u +%FT%TZ
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ -z "${REHEARSE:-}" ] && [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' || exit 4
import platform, torch, diffusers, lpips, kornia
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"missing ({e})"
cuda = torch.cuda.is_available()
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "triton", tv, "diffusers", diffusers.__version__,
      "kornia", kornia.__version__, "gpu", torch.cuda.get_device_name() if cuda else None,
      "mem_GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None)
EOF

# 1. The headline: all three sides at 512², batch 8, one process, same data.
stage bench3 60 $PY bench/train_bench.py --device $DEV $TINY --sizes $S3 --batch $B3 --steps 10 --warmup 3 \
  --sides "${SIDES3:-all}" --json-out "$OUT/bench3.json"

# 2. CUDA tests: fused kernels (bf16 vs float64, the trainer with/without them), augmentation without
#    host syncs (sync debug mode), the trainer's non-logging steps free of syncs.
stage tests 40 $PY -m pytest -q -p no:cacheprovider tests/test_fused_norm.py tests/test_augment.py -k cuda

# 3. Scaling table of ours (micro-batch auto).
stage scaling 60 $PY bench/train_bench.py --device $DEV $TINY --sides ours --sizes $SC_SIZES --batch $SC_BATCH $ST \
  --json-out "$OUT/scaling.json"

# 4. Loader throughput at the headline's patch size, beside the trainer's consumption.
stage data_bench 30 bash -c "$PY bench/data_bench.py $DATA > '$OUT/data_bench.json'"

# 5. A/Bs, each measured before anything is switched on: the mid-block attention's backends alone,
#    then ours with the attention restricted to the math and cuDNN backends, then a profile.
stage attn 15 bash -c "$PY bench/attn_bench.py $ATTN > '$OUT/attn.json'"
for backend in math cudnn_attention; do
  stage "ab_sdpa_$backend" 25 bash -c "$PY bench/train_bench.py --device $DEV $TINY --sides ours --sizes $S3 \
    --batch $B3 --steps 10 --warmup 3 --sdpa-backend $backend >> '$OUT/ab.jsonl'"
done
stage profile 30 bash -c "$PY bench/train_bench.py --device $DEV $TINY --sides ours --sizes $S3 --batch $B3 \
  --steps 5 --warmup 3 --profile 3 --profile-out '$OUT/profile.txt' >> '$OUT/ab.jsonl'"

# 6. The Wan 2.1 / Qwen-Image VAE: the trainer's 2D path vs diffusers' unmodified 3D forward, same losses.
if [ -n "${REHEARSE:-}" ]; then WAN="--sizes 32 --batch 2 --steps 1 --warmup 1"; else
  WAN="--sizes ${WAN_SIZES:-256} --batch ${WAN_BATCH:-1,8} --steps 10 --warmup 3"; fi
stage wan 90 $PY bench/train_bench.py --family wan2.1 --device $DEV $TINY $WAN --json-out "$OUT/wan.json"

echo "=== done in ${SECONDS}s"
ls -la "$OUT"
