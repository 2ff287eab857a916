"""rtvc profile: the measured delay of the local engine equals its nominal latency (passthrough), the server path
reports round trips and capacity, and JSON + PNG are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtvc.config import load_config
from rtvc.profile import chirp_train, measured_delay, run_profile


def test_measured_delay_finds_a_known_shift():
    x = chirp_train(2.0, 24000)
    y = x.copy()
    y[:] = 0
    y[600:] = x[:-600]
    assert abs(measured_delay(x, y, 24000)[0] - 25.0) < 0.1


def test_profile_local_and_in_process_server(tmp_path):
    res = run_profile(load_config(), tmp_path, local=True, server_url=None, serve=True, seconds=2.0, rate=48000,
                      block_ms=10.0, max_clients=2)
    loc, srv = res["local"], res["server"]
    assert loc["underruns"] == 0 and loc["dropped"] == 0
    assert abs(loc["measured_delay_ms"] - loc["nominal_latency_ms"]) < 0.1  # passthrough: measured == nominal
    assert loc["algorithmic_latency_ms"] < 12
    assert srv["round_trip_ms"]["p50"] > 0 and srv["measured_delay_ms"] >= srv["algorithmic_latency_ms"] - 1
    assert [c["clients"] for c in srv["capacity"]][:1] == [1] and srv["max_realtime_clients"] >= 1
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["server"]["round_trip_ms"].keys() == {"p50", "p95", "p99"}
    assert (tmp_path / "profile.png").stat().st_size > 10000


@pytest.mark.slow
def test_step_ab_script_times_a_revision_and_the_tree(tmp_path):
    """bench/step_ab.py: HEAD and the working tree, one short round each, both timed and saved; the temporary
    worktree is gone afterwards."""
    root = Path(__file__).resolve().parent.parent
    worktrees = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, "bench/step_ab.py", "--against", "HEAD", "--rounds", "1", "--seconds", "1",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"HEAD", "working tree"} and all(v > 0 for v in res["median"].values())
    assert subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout == worktrees
