#!/usr/bin/env bash
# One prepared run of every GPU check, for a CUDA machine reached with nothing but the repository (e.g. the
# project's device machine, which has torch/numba/triton but no package registry):
#
#   bash bench/gpu_session.sh OUT_DIR 2>&1 | tee OUT_DIR/log.txt   # + OUT_DIR/gpu.json, OUT_DIR/profile.tar
#
# 1. the CUDA tests: real kernels against their references, the CUDA-graph step against the CPU reference, and
#    the server's SIGTERM test with server.device = "auto" (a real `rtvc serve` process on its GPU runner);
# 2. bench/gpu.py: ops vs eager, step time per batch with/without the graph, real-time capacity, vocoders;
# 3. end to end: `rtvc serve` on the GPU and `rtvc profile` loading 1, 2, 4 ... 128 real-time websocket clients
#    (all clients in one process: at the top the client side may be what saturates).
# Each part has its own time limit, so one failing part does not stop the others. Missing Python
# packages can be put as wheels in .whl/ (installed into /tmp/site first). QUICK=1: a smoke run of the same
# script on any machine (small sizes, 2 clients).
set -u
OUT=${1:?usage: bash bench/gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=python3
quick=${QUICK:-0}
nvidia-smi 2>&1 | head -20
$py -c "import torch, numba; import numpy; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name())" 2>&1

echo "== 1. CUDA tests"
timeout 150 $py -m pytest -p no:cacheprovider -q -rs tests/test_kernels.py tests/test_gpu_step.py \
    "tests/test_server.py::test_sigterm_flushes_and_closes_1001" -k "gpu or cuda or sigterm" 2>&1

echo "== 2. bench/gpu.py"
timeout 180 $py bench/gpu.py --reps 50 --out "$OUT/gpu.json" $([ "$quick" = 1 ] && echo "--quick") 2>&1

echo "== 3. server on the GPU + websocket clients"
$py -m rtvc --set server.max_sessions=128 serve >/tmp/serve.txt 2>&1 &
srv=$!
$py - <<'EOF'  # wait for /healthz (the model loads and warms up first)
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:8765/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
EOF
timeout 150 $py -m rtvc profile --no-local --server ws://127.0.0.1:8765/v1/stream --max-clients $([ "$quick" = 1 ] && echo 2 || echo 128) --seconds 5 \
    --out /tmp/profile 2>&1
kill -TERM $srv; wait $srv
tail -20 /tmp/serve.txt
tar -cf "$OUT/profile.tar" -C /tmp profile
