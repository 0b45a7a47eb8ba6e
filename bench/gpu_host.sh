#!/usr/bin/env bash
# Issue 12's checks and figures on a CUDA host, stage by stage; each stage's whole log goes to $OUT
# (or gpu-results/), its tail to the terminal:
#
#   bench/gpu_host.sh env tests masked sweep            # correctness, then moshiko's step time and capacity
#   bench/gpu_host.sh persona profile load               # PersonaPlex, where a step's time goes, the whole system
#   bench/gpu_host.sh echo64 workers                     # media worker processes: 64 echo calls, moshiko calls
#   bench/gpu_host.sh env kvtests kv; ... agreement kvload profile   # issue 24: the KV cache options, their
#                                                        # correctness, accuracy, step time by age, whole system
#
# A GPU host without a package registry takes moshi, aiortc, av and their small dependencies as wheels
# from .whl/ (ignored by git), all --no-deps. For the lent H100/H200 image (Python 3.12, torch 2.11) these
# were enough (61 MB): moshi==0.2.13 sphn==0.2.1 aiortc==1.16.0 av==18.1.0 aioice==0.13.0 pylibsrtp==1.0.0
# pyee==13.0.1 google-crc32c==1.9.0 pyOpenSSL==26.4.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
# dnspython==2.9.2 ifaddr==0.2.0 aiohttp==3.11.18 prometheus_client, fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 ...` (sphn needs manylinux_2_24). With `./run`'s
# virtual environment instead, run the same commands with PYTHON=.venv/bin/python.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-gpu-results}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import moshi, aiortc, av" 2>/dev/null; then
  [ -d /tmp/site/moshi ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
LOAD_CALLS="${LOAD_CALLS:-1,4,8,16,24,32}"
LOAD_SECONDS="${LOAD_SECONDS:-15}"
SWEEP="${SWEEP:-1,2,4,8,16,24,32,40,48,64}"
PROFILE_BATCH="${PROFILE_BATCH:-16}"
KV_VARIANTS="${KV_VARIANTS:-ring,window,fused,fused-int8}"
KV_BATCHES="${KV_BATCHES:-16,32,48,64}"
KV_LOAD="${KV_LOAD:---kv-attention fused --kv-cache int8}"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  local status=$?
  grep -v -e Warning -e "warnings.warn" "$RESULTS/$name.log" | tail -n 30
  echo "== $name exit $status ($(date -u +%H:%M:%S))"
}

for name in "$@"; do
  case "$name" in
    env) stage env 60 bash -c "nvidia-smi; $PYTHON -c 'import torch, moshi, aiortc, av, triton; print(torch.__version__, torch.version.cuda, moshi.__version__, aiortc.__version__, av.__version__, triton.__name__, triton.__version__)'" ;;
    tests) stage tests 300 "$PYTHON" -m pytest tests/test_cuda.py -v -p no:cacheprovider -p no:asyncio ;;
    masked) CUDA_LAUNCH_BLOCKING=1 stage masked 150 "$PYTHON" -m pytest tests/test_cuda.py -k masked -v -p no:cacheprovider -p no:asyncio ;;
    sweep) stage sweep 240 "$PYTHON" bench/engine_step.py --real-size --batches "$SWEEP" ;;
    persona) stage persona 240 "$PYTHON" bench/engine_step.py --real-size --persona --batches "$SWEEP" --prompt-batches 1,8 ;;
    gil) stage gil 300 bash -c "$PYTHON bench/engine_step.py --real-size --batches 16 --steps 20 --warmup 3 \
      --busy-thread; $PYTHON bench/engine_step.py --real-size --batches 16 --steps 20 --warmup 3 --busy-thread \
      --switch-interval-ms 0.5" ;;
    prompt) stage prompt 240 "$PYTHON" bench/engine_step.py --real-size --persona --batches 1,16 \
      --prompt-batches 1,16,32 ;;
    profile) stage profile 150 "$PYTHON" bench/engine_step.py --real-size --profile "$PROFILE_BATCH" --steps 30 ;;
    load) stage load 420 "$PYTHON" bench/load.py --model random-moshiko --calls "$LOAD_CALLS" --seconds "$LOAD_SECONDS" ;;
    workers)  # issue 15: the whole system with media in worker processes, against media in the engine's process
      for w in ${WORKERS:-0 4}; do
        stage "workers-$w" 330 "$PYTHON" bench/load.py --model random-moshiko --calls "${WORKER_CALLS:-24}" \
          --seconds "$LOAD_SECONDS" --server-args "--media-workers $w"
      done ;;
    echo64)  # issue 15: 64 echo calls with their callers on the same 16-core host
      for w in ${ECHO_WORKERS:-0 8}; do
        stage "echo64-$w" 200 "$PYTHON" bench/load.py --model echo --calls "${ECHO_CALLS:-64}" --seconds "$LOAD_SECONDS" \
          --callers-per-process 8 --server-args "--media-workers $w"
      done ;;
    kvtests)  # every batched property with the fused kernel, and the window across its lengths
      stage kvtests 420 "$PYTHON" -m pytest tests/test_cuda.py -v -p no:cacheprovider -p no:asyncio \
        -k "${KV_TESTS:-fused-int8 or window_equals}" ;;
    agreement) stage agreement 240 "$PYTHON" bench/kv_agreement.py --real-size --steps "${AGREEMENT_STEPS:-500}" \
      --variants "${AGREEMENT_VARIANTS:-int8,fused,fused-int8}" ;;
    kv)  # the KV options side by side per batch, fresh calls and calls whose rings are full (age 3000)
      stage kv 360 "$PYTHON" bench/engine_step.py --real-size --kv "$KV_VARIANTS" --ages 0,3000 \
        --batches "$KV_BATCHES" --steps 50 --warmup 5 ;;
    kvpersona) stage kvpersona 300 "$PYTHON" bench/engine_step.py --real-size --persona --kv ring,fused-int8 \
      --ages 0,3000 --batches "${KV_PERSONA_BATCHES:-16,32}" --steps 50 --warmup 5 --prompt-batches 1 ;;
    kvload)  # the whole system: 64 calls, every ring full, media in 8 workers
      stage kvload 300 "$PYTHON" bench/load.py --model random-moshiko --calls "${KV_LOAD_CALLS:-64}" \
        --seconds "$LOAD_SECONDS" --callers-per-process 8 \
        --server-args "--media-workers 8 $KV_LOAD --bench-kv-age 3000" ;;
    *) echo "unknown stage $name" >&2; exit 2 ;;
  esac
done
