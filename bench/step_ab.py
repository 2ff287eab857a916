"""A/B the one-stream CPU step of two code versions on this machine: ``python bench/step_ab.py --against REV``.

``rtvc bench`` figures move by ~40% from run to run on a shared VM, more than most changes to a kernel, so a
change is measured against a git revision by alternating the two in fresh processes (``--rounds`` each), on the
same model and input: REV is checked out as a temporary worktree and put first on ``PYTHONPATH``. Prints each
round's median ms per 10 ms hop and the median over rounds; saves ``bench/results/step_ab.json``. ``--paced``:
one hop per hop duration, as live audio arrives (on a shared VM, cold caches make that ~2x the back-to-back cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One process' measurement: the default model, the speech-like bench signal, 1 thread, warm-up excluded. Inline
# rather than rtvc.bench.measure: it must run the same on any revision, including ones whose measure differs.
TIMING = """
import time, numpy as np, torch
torch.set_num_threads(1)
from rtvc.bench import _speech_like
from rtvc.voice import VoiceConverter, VoiceModel
vc = VoiceConverter(VoiceModel.load({model!r}))
hop = vc.hop
x = _speech_like(int({seconds} * vc.sample_rate) // hop * hop, vc.sample_rate)
for i in range(50):
    vc.convert(x[i * hop:(i + 1) * hop])
ts = []
start = time.perf_counter()
for i in range(x.shape[0] // hop):
    if {paced}:  # one hop per hop duration, as live audio arrives (rtvc.bench.measure's paced run)
        time.sleep(max(0.0, start + i * hop / vc.sample_rate - time.perf_counter()))
    t0 = time.perf_counter()
    vc.convert(x[i * hop:(i + 1) * hop])
    ts.append(time.perf_counter() - t0)
print(1e3 * np.median(ts))
"""


def measure(tree: Path, model: str, seconds: float, paced: bool) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = TIMING.format(model=model, seconds=seconds, paced=paced)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="HEAD", help="git revision to compare the working tree with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0, help="signal length per measurement")
    p.add_argument("--model", default=str(ROOT / "rtvc/models/default.pt"))
    p.add_argument("--paced", action="store_true", help="one hop per hop duration, as live (else back to back)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_ab.json"))
    a = p.parse_args()
    rows: dict[str, list[float]] = {a.against: [], "working tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "rev"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(other), a.against], check=True)
        try:
            for r in range(a.rounds):
                for name, tree in ((a.against, other), ("working tree", ROOT)):
                    rows[name].append(measure(tree, a.model, a.seconds, a.paced))
                    print(f"round {r + 1}: {name:<14} {rows[name][-1]:.3f} ms per hop")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=True)
    summary = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in summary.items():
        print(f"median over {a.rounds} rounds: {k:<14} {v:.3f} ms per hop")
    from rtvc.bench import cpu_name
    out = Path(a.out)
    out.write_text(json.dumps({"command": "python bench/step_ab.py " + " ".join(sys.argv[1:]), "machine": cpu_name(),
                               "paced": a.paced, "ms_per_hop": rows, "median": summary}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
