#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py says what it measures; launch/README.md gives the `run`
# call). On the GPU machine: installs the carried wheels (.gpu_wheels, made by
# launch/gpu_prepare.sh) into /tmp, then runs the check; figures go to $OUT/summary.json and
# the log to $OUT/log.txt. `bash launch/gpu_check.sh --tiny` rehearses it on this CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ " $* " != *" --tiny "* ]]; then
    # Only the wheels the machine lacks, without their dependencies (all present there).
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .gpu_wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$PYTHON" launch/gpu_check.py --out="$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
