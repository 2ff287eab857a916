#!/usr/bin/env python3
"""Stream a sound file through an rtvc server and write the converted audio (numpy, soundfile, websockets).

    python clients/stream_file.py in.wav out.wav --voice slt            # as fast as the server goes
    python clients/stream_file.py in.wav out.wav --realtime --block-ms 20   # pace of a live source + RTT stats
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np
import soundfile as sf

from rtvc.client import round_trips_ms, stream_array


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream")
    p.add_argument("--voice")
    p.add_argument("--transpose", type=float, default=0.0)
    p.add_argument("--token", help="bearer token if the server requires one")
    p.add_argument("--format", choices=["f32", "s16"], default="f32")
    p.add_argument("--block-ms", type=float, default=20.0, help="samples per frame, in ms (default 20)")
    p.add_argument("--realtime", action="store_true", help="send at real-time pace (else as fast as possible)")
    a = p.parse_args(argv)
    try:
        data, rate = sf.read(a.input, dtype="float32", always_2d=True)
    except Exception as e:
        print(f"stream_file: cannot read {a.input}: {e}", file=sys.stderr)
        return 1
    x = data.mean(axis=1).astype(np.float32)
    block = max(1, round(rate * a.block_ms / 1000))
    try:
        y, frames, c = asyncio.run(stream_array(a.url, x, rate, block, realtime=a.realtime, voice=a.voice,
                                                transpose=a.transpose, token=a.token, format=a.format))
    except (OSError, RuntimeError) as e:
        print(f"stream_file: {e}", file=sys.stderr)
        return 1
    sf.write(a.output, y, rate, subtype="PCM_16")
    end = c.end or {}
    rtt = round_trips_ms(frames)
    print(f"wrote {a.output}: {y.shape[0]} samples at {rate} Hz (sent {x.shape[0]}), voice {c.ready['voice']}, "
          f"algorithmic latency {c.latency_ms:.2f} ms, dropped {end.get('dropped_samples', '?')} samples, "
          f"source centring {end.get('centring', '?')}"
          + (f", round trip p50 {np.percentile(rtt, 50):.1f} ms p99 {np.percentile(rtt, 99):.1f} ms"
             if a.realtime and rtt.size else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
