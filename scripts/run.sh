#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv (once), then runs the benchmark or the tests.
#   bash scripts/run.sh bench [fastcodec bench options...]
#   bash scripts/run.sh test  [pytest options...]
# A torch already present in .venv is kept (that is how a CUDA user brings their own build);
# otherwise torch==$FASTCODEC_TORCH (default 2.13.0, a CPU wheel on these machines) is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"; shift || true
case "$cmd" in bench|test|setup) ;; *) echo "usage: bash scripts/run.sh bench|test|setup [args...]" >&2; exit 2;; esac

PY="${FASTCODEC_PYTHON:-python3}"
VENV="${FASTCODEC_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
stamp="$VENV/.fastcodec-setup-$(sha1sum pyproject.toml scripts/run.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    pip_q "torch==${FASTCODEC_TORCH:-2.13.0}"
  fi
  pip_q -e ".[test]"
  # The oracles, without their heavy requirements: the tests import only their vq/seanet/conv/lstm submodules.
  pip_q --no-deps "audiocraft==1.3.0" "encodec==0.1.1"
  touch "$stamp"
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
case "$cmd" in
  setup) echo "environment ready: $VENV" ;;
  bench)
    # onnxruntime only for the benchmark's comparison column: without it (no wheel for this platform)
    # that column reads n/a with the reason, the rest runs
    if ! "$VPY" -c "import onnxruntime, onnx" 2>/dev/null; then
      pip_q -e ".[bench]" || echo "warning: onnxruntime/onnx could not be installed; their column shows n/a" >&2
    fi
    exec "$VENV/bin/fastcodec" bench "$@" ;;
  test)
    # Unit/equivalence tests, then a smoke run of the pytest-benchmark suites so they cannot rot.
    "$VPY" -m pytest tests "$@"
    exec "$VPY" -m pytest bench -q -m smoke --benchmark-disable -p no:cacheprovider
    ;;
esac
