"""Does numba help the ring buffer? Times one write + one read of audio-sized blocks: numba vs numpy slicing.

    python bench/ringbuffer.py            # prints a table, saves bench/results/ringbuffer.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from rtvc.bench import cpu_name
from rtvc.ringbuffer import RingBuffer


class NumpyRing:
    """The same SPSC ring with numpy slicing instead of numba (reference for the comparison only)."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, np.float32)
        self.w = self.r = 0

    def write(self, x: np.ndarray) -> int:
        cap = self.buf.shape[0]
        n = min(x.shape[0], cap - (self.w - self.r))
        s = self.w % cap
        first = min(n, cap - s)
        self.buf[s: s + first] = x[:first]
        self.buf[: n - first] = x[first:n]
        self.w += n
        return n

    def read_into(self, out: np.ndarray) -> int:
        cap = self.buf.shape[0]
        n = min(out.shape[0], self.w - self.r)
        s = self.r % cap
        first = min(n, cap - s)
        out[:first] = self.buf[s: s + first]
        out[first:n] = self.buf[: n - first]
        out[n:] = 0.0
        self.r += n
        return n


def time_ring(ring, block: int, reps: int = 20000) -> float:
    x = np.random.default_rng(0).standard_normal(block).astype(np.float32)
    out = np.zeros(block, np.float32)
    for _ in range(200):
        ring.write(x)
        ring.read_into(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        ring.write(x)
        ring.read_into(out)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    rows = []
    print(f"{'block':>6} {'numba us':>9} {'numpy us':>9} {'speed-up':>8}")
    for block in (64, 240, 480, 1024, 4096):
        a = min(time_ring(RingBuffer(48000), block) for _ in range(3))
        b = min(time_ring(NumpyRing(48000), block) for _ in range(3))
        rows.append({"block": block, "numba_us": a, "numpy_us": b, "speedup": b / a})
        print(f"{block:>6} {a:>9.2f} {b:>9.2f} {b / a:>7.1f}x")
    out = Path(__file__).parent / "results" / "ringbuffer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/ringbuffer.py", "machine": cpu_name(),
                               "python": platform.python_version(), "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
