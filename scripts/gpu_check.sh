#!/usr/bin/env bash
# The GPU path on a real GPU (issue 16), in one run: the CUDA tests, then scripts/bench_gpu.py
# (build --device cuda byte-identical to --device cpu, matching throughput, the loader into the GPU,
# nvjpeg against the CPU decode), then scripts/bench_torchvision.py on the device (issue 14). Made for
# the device machine (Python 3.12 with torch and torchvision preinstalled: nothing here installs torch),
# and dry-runnable on a CPU machine. The step timeouts add up to 9 minutes, under one device call's 10:
#
#   bash scripts/gpu_check.sh prepare    # here, once: wheels into .whl/, tiny_coco into .gpu_data/ (both ignored)
#   bash scripts/gpu_check.sh            # on the GPU machine; results under $OUT (default /tmp/gpu_check)
#                                        # (device tool: carry [".whl", ".gpu_data"], timeout_s 600)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_ROWS=200 bash scripts/gpu_check.sh   # a dry run here
#
# Inputs it finds on its own: tiny_coco at ../shared/data/tiny_coco, else at .gpu_data/tiny_coco (a
# git-ignored copy carried to the device machine; it is linked into ../shared/data); wheels of our
# pure dependencies that the machine lacks in .whl/ (installed into /tmp/site, no index).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
ROWS="${GPU_CHECK_ROWS:-1000}"
PY="${PYTHON:-python3}"
if [ "${1:-}" = "prepare" ]; then
  # The device machine lacks these (it has numpy, pillow, pyarrow, click, tqdm, fsspec, torch, torchvision).
  rm -rf .whl && mkdir -p .whl .gpu_data
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl simplejpeg==1.9.0 braceexpand==0.1.7 pycocotools==2.0.11 || exit 3
  rm -rf .gpu_data/tiny_coco && cp -r ../shared/data/tiny_coco .gpu_data/tiny_coco || exit 3
  du -sh .whl .gpu_data
  exit 0
fi
mkdir -p "$OUT"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Our package only, no dependencies (torch is the machine's); the source tree on the path either way.
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/log.txt" 2>&1 || log "editable install failed; using PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f ../shared/data/tiny_coco/annotations/instances_train2017.json ] && [ -d .gpu_data/tiny_coco ]; then
  mkdir -p ../shared/data && ln -sfn "$PWD/.gpu_data/tiny_coco" ../shared/data/tiny_coco
fi

{ nvidia-smi || true; "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -1

log "1. CUDA tests (-m gpu)"
CI=true timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_matching.py tests/test_torchvision.py tests/test_keep_ratio.py >"$OUT/pytest_gpu.txt" 2>&1
rc_tests=$?
tail -3 "$OUT/pytest_gpu.txt"

log "2-4. bench_gpu.py --device $DEVICE --rows $ROWS"
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md"
timeout 240 "$PY" scripts/bench_gpu.py --device "$DEVICE" --rows "$ROWS" --out-md "$OUT/BENCHMARKS.md" \
  ${GPU_CHECK_BENCH_ARGS:-} >"$OUT/bench_gpu.md" 2>"$OUT/bench_gpu.log"
rc_bench=$?
tail -5 "$OUT/bench_gpu.log"
log "5. bench_torchvision.py --device $DEVICE (a training step: stored targets against the stock assignment)"
if [ "$DEVICE" = "cuda" ]; then TV_ARGS="--batch-size 8 --steps 30"; else TV_ARGS="--batch-size 1 --steps 2 --warmup-steps 1 --assign-repeats 1"; fi
timeout 180 "$PY" scripts/bench_torchvision.py --device "$DEVICE" $TV_ARGS --out-md "$OUT/BENCHMARKS.md" \
  >"$OUT/bench_torchvision.md" 2>"$OUT/bench_torchvision.log"
rc_tv=$?
tail -3 "$OUT/bench_torchvision.log"
log "done: tests rc=$rc_tests, bench_gpu rc=$rc_bench, bench_torchvision rc=$rc_tv; results in $OUT"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_tv" -eq 0 ]
