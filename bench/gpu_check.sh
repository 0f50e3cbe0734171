#!/usr/bin/env bash
# The one prepared GPU check (../shared/DESIGN.md, "Testing without a GPU"): a random Whisper of large-v3's shape,
# 20 bf16 steps of the real `deepspeed train_ds.py` under ZeRO-2 and then ZeRO-3 with a periodic evaluation,
# samples/s, MFU, peak memory, and bench/train_throughput.py's project-vs-event baseline, written part by part to
# bench/results/gpu_check.json. bench/gpu_check.py does the work (its docstring lists the parts); expect about
# 6 to 7 minutes on one H100/H200, 8 at most (--budget 450 s for the driver, after the wheels' install).
#
# On the lent device machine (the session's `run` tool), from the repository root:
#   1. here, once (/.whl/ is git-ignored):   cp -r ../shared/device-wheels .whl
#   2. run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#      The machine's start (1 to 3 minutes) counts against the session's 15 minutes of device time, so there is
#      room for one run, not two: call give_back right after it. gpu_check.json and gpu_check.log come back
#      through $OUT (the reply's files_at); copy gpu_check.json to bench/results/ here and commit it.
#      A run stopped at its limit still returns the JSON of the parts that ended.
# On the CPU, the same flow at tiny size, fp32, 2 ranks (a minute or two; tests/test_gpu_check.py runs it):
#   bash bench/gpu_check.sh --cpu [--out FILE]
# Other options go through to bench/gpu_check.py (--help). PYTHON picks the interpreter (default: .venv/bin/python
# where it exists, else python3); carried wheels are installed into /tmp/site only where DeepSpeed is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
fi
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)'; then
    if ! compgen -G '.whl/*.whl' >/dev/null; then
        echo "error: DeepSpeed is not installed and there are no wheels in .whl/ (cp -r ../shared/device-wheels .whl)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for arg in "$@"; do
    if [[ $arg == --cpu ]]; then
        export DS_ACCELERATOR=cpu
    fi
done
mirror=()
if [[ -n ${OUT:-} ]]; then  # the device machine's folder whose files come back
    mirror=(--mirror "$OUT")
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py ${mirror[@]+"${mirror[@]}"} "$@"
