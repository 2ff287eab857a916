#!/usr/bin/env python3
"""Microphone -> rtvc server -> speakers (numpy, sounddevice, websockets; no torch).

    python clients/mic.py --url ws://127.0.0.1:8765/v1/stream --voice slt
    python clients/mic.py --input-device USB --output-device 3 --jitter-ms 30

While running (type, then Enter): m toggles monitor (hearing the result), v NAME switches voice, t N transposes,
q quits. A status line shows the measured round trip, the server's algorithmic latency and the local buffers.
The audio callback only copies between preallocated rings (silence, counted, when nothing has arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

import numpy as np

from rtvc.client import StreamClient
from rtvc.devices import AudioUnavailable, import_sounddevice, resolve_device
from rtvc.ringbuffer import RingBuffer


class MicBridge:
    """Duplex sound-card stream <-> two rings; the asyncio side moves blocks to and from the server."""

    def __init__(self, sd, in_dev: int, out_dev: int, rate: int, block: int, jitter: int) -> None:
        self.rate, self.block, self.jitter = rate, block, jitter
        self.mic, self.play = RingBuffer(rate * 2), RingBuffer(rate * 2)
        self.play.write_zeros(jitter)  # the jitter buffer: network and server timing vary
        self.monitor = True
        self._mono = np.zeros(rate, np.float32)
        self.stream = sd.Stream(device=(in_dev, out_dev), samplerate=rate, blocksize=block, dtype="float32",
                                channels=(1, 1), latency="low", callback=self._callback)

    def _callback(self, indata, outdata, frames, time_info, status) -> None:
        self.mic.write(indata[:, 0])
        mono = self._mono[:frames]
        self.play.read_into(mono)
        if self.monitor:
            outdata[:, 0] = mono
        else:
            outdata.fill(0.0)

    def queued_ms(self) -> float:
        return 1000.0 * self.play.available() / self.rate


async def run(a: argparse.Namespace) -> int:
    sd = import_sounddevice()
    in_dev, out_dev = resolve_device(a.input_device or "", "input"), resolve_device(a.output_device or "", "output")
    rate = a.rate or int(sd.query_devices(in_dev)["default_samplerate"])
    block = round(rate * a.block_ms / 1000)
    bridge = MicBridge(sd, in_dev, out_dev, rate, block, round(rate * a.jitter_ms / 1000))
    max_queue = round(rate * (a.jitter_ms + 60) / 1000)  # bounded delay on the playback side too
    rtts: list[float] = []
    stop = asyncio.Event()
    async with StreamClient(a.url, rate, voice=a.voice, transpose=a.transpose, token=a.token) as c:
        print(f"connected: voice {c.ready['voice']} (voices: {', '.join(c.ready['voices'])}), "
              f"algorithmic latency {c.latency_ms:.1f} ms", file=sys.stderr)

        async def sender() -> None:
            buf = np.zeros(block, np.float32)
            while not stop.is_set():
                if bridge.mic.available() >= block:
                    bridge.mic.read_into(buf, False)
                    await c.send(buf)
                else:
                    await asyncio.sleep(block / rate / 4)

        async def receiver() -> None:
            async for r in c.receive():
                rtts.append(1000 * (r.arrival - r.t))
                if bridge.play.available() > max_queue:  # we fell behind: skip to stay near nominal delay
                    bridge.play.discard(bridge.play.available() - bridge.jitter)
                bridge.play.write(r.samples)
            stop.set()

        def keys() -> None:
            for line in sys.stdin:
                cmd, _, arg = line.strip().partition(" ")
                if cmd == "m":
                    bridge.monitor = not bridge.monitor
                elif cmd == "v" and arg:
                    asyncio.run_coroutine_threadsafe(c.control({"type": "set", "voice": arg.strip()}), loop)
                elif cmd == "t" and arg:
                    asyncio.run_coroutine_threadsafe(c.control({"type": "set", "transpose": float(arg)}), loop)
                elif cmd == "q":
                    loop.call_soon_threadsafe(stop.set)
                    return

        loop = asyncio.get_running_loop()
        if sys.stdin.isatty():
            threading.Thread(target=keys, daemon=True).start()
        bridge.stream.start()
        tasks = [asyncio.create_task(sender()), asyncio.create_task(receiver())]
        t0 = time.monotonic()
        try:
            while not stop.is_set() and (a.duration <= 0 or time.monotonic() - t0 < a.duration):
                await asyncio.sleep(1.0)
                recent = rtts[-100:]
                rtt = float(np.median(recent)) if recent else float("nan")
                dev = 1000 * sum(bridge.stream.latency)
                print(f"delay ~{rtt + bridge.queued_ms() + dev:6.1f} ms (round trip {rtt:.1f} incl. algorithmic "
                      f"{c.latency_ms:.1f}; playback queue {bridge.queued_ms():.1f}; device {dev:.1f}) | underruns "
                      f"{bridge.play.underruns} | {'monitor' if bridge.monitor else 'muted'}",
                      file=sys.stderr, end="\r" if sys.stderr.isatty() else "\n")
        finally:
            stop.set()
            bridge.stream.stop()
            await c.stop()
            for t in tasks:
                t.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream")
    p.add_argument("--voice")
    p.add_argument("--transpose", type=float, default=0.0)
    p.add_argument("--token")
    p.add_argument("--input-device", help="name substring or index")
    p.add_argument("--output-device", help="name substring or index")
    p.add_argument("--rate", type=int, default=0, help="sound card rate (default: the device's)")
    p.add_argument("--block-ms", type=float, default=10.0)
    p.add_argument("--jitter-ms", type=float, default=20.0, help="playback cushion against network jitter")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (0 = until q / Ctrl-C)")
    a = p.parse_args(argv)
    try:
        return asyncio.run(run(a))
    except AudioUnavailable as e:
        print(f"mic: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        print(f"mic: cannot stream: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
