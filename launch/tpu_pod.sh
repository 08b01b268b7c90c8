#!/usr/bin/env bash
# Train on a TPU pod slice: create (or reuse) a TPU VM, install this checkout on every worker, run
# `python -m vsd_jax.train` on all workers at once (jax.distributed finds its peers from the TPU metadata),
# stream the logs, and optionally delete the VM afterwards.
#
#   launch/tpu_pod.sh --name vsd-v5p --zone us-east5-a --type v5p-64 -- --config configs/llama3.py:70b
#   launch/tpu_pod.sh --dry-run --name vsd --zone us-central2-b --type v4-32 -- --config configs/vicuna.py
#
# Options (or the environment variable in brackets):
#   --name NAME        TPU VM name                                   [TPU_NAME]      required
#   --zone ZONE        GCP zone with capacity for the slice         [TPU_ZONE]      required
#   --type TYPE        accelerator type, e.g. v4-32, v5p-64          [TPU_TYPE]      required
#   --version VERSION  TPU VM runtime (default: by generation)       [TPU_VERSION]
#   --project PROJECT  GCP project (default: gcloud's)               [GCP_PROJECT]
#   --spot             create a spot VM (preemptible: training resumes from its checkpoints)
#   --delete           delete the VM when training ends
#   --dry-run          print the commands instead of running them
# Everything after `--` goes to `python -m vsd_jax.train` on every worker.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

NAME="${TPU_NAME:-}" ZONE="${TPU_ZONE:-}" TYPE="${TPU_TYPE:-}" VERSION="${TPU_VERSION:-}"
PROJECT="${GCP_PROJECT:-}" SPOT=0 DELETE=0 DRY_RUN=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (train arguments go after '--'; see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "no TPU VM name: pass --name NAME or set TPU_NAME (any new or existing VM name)"
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE or set TPU_ZONE (one with capacity for $TYPE, e.g. us-east5-a for v5p)"
[[ -n "$TYPE" ]] || die "no accelerator type: pass --type TYPE or set TPU_TYPE (the slice of the config's mesh.slice, e.g. v5p-64)"
[[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "no training arguments: add '-- --config configs/llama3.py' (what each worker runs)"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime for --type $TYPE: pass --version (see 'gcloud compute tpus versions list')" ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=vsd_jax
TARBALL="${TMPDIR:-/tmp}/vsd_jax-$NAME.tar.gz"

run() {  # print the command; run it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY_RUN -eq 1 ]] || "$@"
}

echo "# TPU VM $NAME ($TYPE, runtime $VERSION) in $ZONE${PROJECT:+, project $PROJECT}"
if [[ $DRY_RUN -eq 1 ]] || ! "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  echo "# 1. create the VM (skipped when it already exists)"
  CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
else
  echo "# 1. reusing the existing VM $NAME"
fi

echo "# 2. copy this checkout (no runs/ or caches) to every worker and install it"
run tar -czf "$TARBALL" -C "$REPO" --exclude=./runs --exclude=./.git --exclude='*/__pycache__' .
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:vsd_jax.tar.gz" "${WHERE[@]}" --worker=all
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command "mkdir -p $REMOTE_DIR && tar -xzf vsd_jax.tar.gz -C $REMOTE_DIR && bash $REMOTE_DIR/launch/tpu_setup.sh $REMOTE_DIR"

echo "# 3. train on all workers; worker logs stream here and stay in ~/$REMOTE_DIR/train.log on each"
printf -v ARGS ' %q' "${TRAIN_ARGS[@]}"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command "cd $REMOTE_DIR && source .venv/bin/activate && python -m vsd_jax.train$ARGS 2>&1 | tee -a train.log"

if [[ $DELETE -eq 1 ]]; then
  echo "# 4. delete the VM"
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
else
  echo "# 4. the VM is kept: delete it with: ${GCLOUD[*]} delete $NAME ${WHERE[*]} --quiet"
fi
