"""How many real-time clients the server keeps when its batched step costs a fixed time whatever the batch (as a
CUDA-graph step does), and what the number of torch calls per step (each one lets go of the GIL and must win it
back from the event loop) does to that. No model, no GPU: the runner sleeps.

    python bench/server_step_cost.py                      # -> bench/results/server_step_cost.json
    python bench/server_step_cost.py --cost-ms 5 --releases 1 12 --max-clients 64

Each configuration runs `rtvc serve` with a passthrough runner whose step sleeps ``releases`` x 0.1 ms and then
``cost-ms`` (sleeping releases the GIL, as a CUDA synchronisation or a torch call does), in its own process, and
`rtvc profile`'s capacity search (1, 2, 4, ... clients, in this process) against it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtvc.config import load_config  # noqa: E402
from rtvc.profile import profile_server  # noqa: E402

SERVER = """
import sys, time
import rtvc.server as S
from rtvc.config import load_config
cost, releases, port = float(sys.argv[1]) / 1000, int(sys.argv[2]), int(sys.argv[3])
class FixedCost(S.PassthroughBatch):
    def step(self, slots, hops):
        for _ in range(releases):
            time.sleep(0.0001)
        time.sleep(cost)
        return hops.copy()
cfg = load_config().replace(**{"server.max_sessions": 256, "server.port": port, "paths.model": ""})
S.make_runner = lambda cfg: FixedCost(cfg, cfg.server.max_sessions)
S.serve_forever(cfg)
"""


def run(cost_ms: float, releases: int, max_clients: int, seconds: float, port: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(cost_ms), str(releases), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        cfg = load_config()
        res = profile_server(f"ws://127.0.0.1:{port}/v1/stream", seconds, 48000, 10.0, None, max_clients,
                             cfg.engine.max_backlog_ms)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"cost_ms": cost_ms, "releases": releases, "max_realtime_clients": res["max_realtime_clients"],
            "capacity": res["capacity"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cost-ms", type=float, default=5.0)
    p.add_argument("--releases", type=int, nargs="+", default=[1, 12])
    p.add_argument("--max-clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--port", type=int, default=8799)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_step_cost.json"))
    a = p.parse_args()
    from rtvc.bench import cpu_name
    rows = []
    for r in a.releases:
        row = run(a.cost_ms, r, a.max_clients, a.seconds, a.port)
        rows.append(row)
        print(f"step {a.cost_ms} ms, {r:3d} GIL releases: {row['max_realtime_clients']} real-time clients "
              + " ".join(f"[{c['clients']}: p99 {c['round_trip_p99_ms']:.1f} ms, drop {c['dropped_samples']}]"
                         for c in row["capacity"]), flush=True)
    out = {"command": "python bench/server_step_cost.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
