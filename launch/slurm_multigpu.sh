#!/usr/bin/env bash
# Multi-GPU / multi-node training under SLURM: one task per node, each driving all GPUs of its node; the
# coordinator is the first node of the allocation, and jax.distributed takes the process count and ids
# from SLURM (SLURM_NTASKS, SLURM_PROCID).
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_multigpu.sh -- --config configs/llama3.py
#   launch/slurm_multigpu.sh --dry-run -- --config configs/llama3.py      (inside salloc, or with SLURM_* set)
#
# Options: --port PORT (coordinator port, default 8476 or $JAX_COORDINATOR_PORT), --dry-run (print, run nothing).
# Everything after `--` goes to `python -m vsd_jax.train` on every node. Set PYTHON to choose the interpreter.
#SBATCH --job-name=vsd_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

die() { echo "slurm_multigpu.sh: error: $*" >&2; exit 2; }

PORT="${JAX_COORDINATOR_PORT:-8476}" DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (train arguments go after '--')" ;;
  esac
done

for var in SLURM_JOB_NODELIST SLURM_NNODES SLURM_NTASKS; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run this inside a SLURM allocation, e.g. sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 $0 -- --config configs/llama3.py"
done
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: add '-- --config configs/llama3.py' (what each node runs)"
[[ "$SLURM_NTASKS" == "$SLURM_NNODES" ]] || die "SLURM_NTASKS=$SLURM_NTASKS but SLURM_NNODES=$SLURM_NNODES: use --ntasks-per-node=1 (one JAX process per node drives all its GPUs)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port $PORT is not a port number"

first_host() {  # the first hostname of a SLURM node list ("gpu[01-04],cpu7" -> gpu01)
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
  else  # no scontrol (a dry run off the cluster): expand the first range by hand
    local first="${1%%,*}"
    if [[ "$first" =~ ^([^[]+)\[([0-9]+) ]]; then first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"; fi
    echo "${first%%[*}"
  fi
}

export JAX_COORDINATOR_ADDRESS
JAX_COORDINATOR_ADDRESS="$(first_host "$SLURM_JOB_NODELIST"):$PORT"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CMD=(srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NTASKS" --ntasks-per-node=1 --kill-on-bad-exit=1
     --chdir="$REPO" "$PYTHON" -m vsd_jax.train "${TRAIN_ARGS[@]}" --config.mesh.distributed=on)

echo "# $SLURM_NNODES node(s) of job ${SLURM_JOB_ID:-?}: coordinator JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS; process ids from SLURM_PROCID"
printf '+'; printf ' %q' "${CMD[@]}"; printf '\n'
[[ $DRY_RUN -eq 1 ]] || exec "${CMD[@]}"
