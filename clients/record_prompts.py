#!/usr/bin/env python3
"""Read the enrolment prompts aloud and record each next to its text (for `rtvc enrol train`).

    rtvc enrol prompts my_voice                  # writes my_voice/prompt_000.txt ...
    python clients/record_prompts.py my_voice [--input-device USB] [--rate 48000]
    rtvc enrol train my_voice --out mine.pt      # then: rtvc live --model mine.pt ...

For every prompt without a recording yet: Enter starts, Enter stops (s + Enter skips it, q + Enter quits).
Speak as you will into the voice changer: same microphone, same distance. Each take is checked for clipping and
for level. The audio callback only copies into a preallocated ring (the ring holds 30 s; a longer take is cut).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from rtvc.devices import AudioUnavailable, import_sounddevice, resolve_device
from rtvc.ringbuffer import RingBuffer

MAX_SECONDS = 30


def take(sd, dev: int, rate: int, ring: RingBuffer) -> np.ndarray:
    """One recording between two Enters -> mono float32 [n]."""
    ring.discard(ring.available())
    with sd.InputStream(device=dev, samplerate=rate, channels=1, dtype="float32", latency="low",
                        callback=lambda indata, frames, t, status: ring.write(indata[:, 0])):
        input("  recording... Enter to stop ")
    out = np.zeros(ring.available(), np.float32)
    ring.read_into(out, False)
    return out


def check(x: np.ndarray, rate: int) -> str | None:
    """What is wrong with a take, or None."""
    if x.shape[0] < 0.5 * rate:
        return "shorter than 0.5 s"
    peak, rms = float(np.abs(x).max()), float(np.sqrt(np.mean(x * x)))
    if peak >= 0.99:
        return f"clipped (peak {peak:.2f}): move back or lower the input gain"
    if rms < 10 ** (-45 / 20):
        return f"very quiet ({20 * np.log10(max(rms, 1e-9)):.0f} dBFS): is this the right microphone?"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder written by `rtvc enrol prompts`")
    p.add_argument("--input-device", default="", help="name fragment or index (default: the system's)")
    p.add_argument("--rate", type=int, help="sample rate (default: the device's)")
    a = p.parse_args()
    prompts = sorted(Path(a.dir).glob("*.txt"))
    if not prompts:
        print(f"{a.dir}: no prompts; run `rtvc enrol prompts {a.dir}` first", file=sys.stderr)
        return 1
    try:
        sd = import_sounddevice()
        dev = resolve_device(a.input_device, "input")
    except AudioUnavailable as e:
        print(f"record_prompts: {e}", file=sys.stderr)
        return 1
    rate = a.rate or int(sd.query_devices(dev)["default_samplerate"])
    ring = RingBuffer(MAX_SECONDS * rate)
    todo = [t for t in prompts if not t.with_suffix(".wav").exists()]
    print(f"{len(prompts) - len(todo)} of {len(prompts)} recorded; {len(todo)} to go ({rate} Hz)")
    for i, txt in enumerate(todo):
        print(f"\n[{i + 1}/{len(todo)}] {txt.read_text(encoding='utf-8').strip()}")
        while True:
            cmd = input("  Enter to start (s skip, q quit) ").strip().lower()
            if cmd in ("s", "q"):
                break
            x = take(sd, dev, rate, ring)
            problem = check(x, rate)
            if problem is None:
                sf.write(str(txt.with_suffix(".wav")), x, rate, subtype="PCM_16")
                print(f"  saved {txt.with_suffix('.wav').name} ({x.shape[0] / rate:.1f} s)")
                break
            print(f"  not saved: {problem}; again")
        if cmd == "q":
            break
    done = sum(t.with_suffix(".wav").exists() for t in prompts)
    print(f"\n{done} of {len(prompts)} recorded; then: rtvc enrol train {a.dir} --out mine.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
