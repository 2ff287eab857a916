"""``rtvc live``: microphone -> StreamEngine -> speakers, with sounddevice.

The PortAudio callback only copies: input block -> engine input ring, engine output ring -> output block
(silence, counted, on underrun).  No allocation of audio buffers, logging, locks or inference inside it.
A worker thread runs ``engine.step()``; the main thread prints a status line and handles key toggles.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from .config import Config
from .converter import Converter, DelayConverter
from .devices import AudioUnavailable, import_sounddevice, resolve_device
from .engine import EngineStats, StreamEngine, WarmedThread, settle_heap, warm_up


@dataclass(frozen=True)
class LiveReport:
    """What a live run did: devices, latency budget, engine counters, PortAudio status flags."""

    input_device: str
    output_device: str
    sample_rate: int
    block_frames: int
    latency_ms: float             # engine nominal (algorithmic + buffer)
    algorithmic_latency_ms: float
    device_input_latency_ms: float
    device_output_latency_ms: float
    callbacks: int
    input_overflows: int          # PortAudio input_overflow flags
    output_underflows: int        # PortAudio output_underflow flags
    engine: EngineStats


class LiveSession:
    """A duplex PortAudio stream around a :class:`StreamEngine` and its worker thread."""

    def __init__(self, cfg: Config, converter: Converter) -> None:
        self.cfg = cfg
        self.sd = import_sounddevice()
        a = cfg.audio
        self.in_dev = resolve_device(a.input_device, "input", a.host_api)
        self.out_dev = resolve_device(a.output_device, "output", a.host_api)
        info_in = self.sd.query_devices(self.in_dev)
        if a.input_channel >= info_in["max_input_channels"]:
            raise AudioUnavailable(f"audio.input_channel={a.input_channel} but '{info_in['name']}' has only "
                                   f"{info_in['max_input_channels']} input channel(s)")
        self.rate = a.sample_rate or int(info_in["default_samplerate"])
        self.block = round(self.rate * a.block_ms / 1000)
        # A duplex callback must hand out a block the moment it receives one, and the worker can only convert
        # that block afterwards: one block of output buffering, plus a safety margin for compute jitter.
        extra = (self.block or round(self.rate * 0.02)) + round(self.rate * cfg.engine.safety_ms / 1000)
        self.voice = converter
        # Passthrough is delay-matched to the voice, so toggling crossfades without a jump in timing.
        self.dry = DelayConverter(converter.sample_rate, converter.hop, converter.latency, name="passthrough")
        start = self.dry if a.passthrough else converter
        self.engine = StreamEngine(start, self.rate, cfg.engine, extra_latency=extra)
        self.monitor = a.monitor
        self._ch = a.input_channel
        self._mono = np.zeros(max(self.block, 1) * 8 + self.rate, dtype=np.float32)  # >= any callback size
        self._flags = np.zeros(3, dtype=np.int64)  # callbacks, input overflows, output underflows
        self._stop = threading.Event()
        self._worker = WarmedThread(self._warm_up, self._work, name="rtvc-worker")
        self._stream = None

    # --------------------------------------------------------------------------------------- real-time
    def _callback(self, indata: np.ndarray, outdata: np.ndarray, frames: int, time_info, status) -> None:
        flags = self._flags
        flags[0] += 1
        if status.input_overflow:
            flags[1] += 1
        if status.output_underflow:
            flags[2] += 1
        self.engine.push(indata[:, self._ch])
        mono = self._mono[:frames]
        self.engine.pull(mono)
        if self.monitor:
            outdata[:] = mono[:, None]
        else:
            outdata.fill(0.0)

    def _warm_up(self) -> None:
        for conv in {id(c): c for c in (self.voice, self.engine.converter)}.values():
            warm_up(conv)

    def _work(self) -> None:
        # Poll rather than be signalled: signalling from the callback would take a lock in it.
        nap = self.engine.hop / self.engine.model_rate / 4
        while not self._stop.is_set():
            if self.engine.step() == 0:
                time.sleep(nap)

    # --------------------------------------------------------------------------------------- control
    def toggle_passthrough(self) -> bool:
        """Crossfade between the voice and passthrough. Returns True when now in passthrough."""
        to_dry = self.engine.converter is not self.dry
        self.engine.switch_converter(self.dry if to_dry else self.voice)
        return to_dry

    def switch_voice(self, name: str) -> str:
        """Crossfade to another voice of the same model; the new converter continues the current state."""
        new = self.voice.with_voice(name)
        self.voice = new
        if self.engine.converter is not self.dry:
            self.engine.switch_converter(new)
        return name

    def start(self) -> None:
        settle_heap()  # before the warm-up: the first conversion after a full collection took ~10 ms (session 22)
        self._worker.start_warmed()  # it warms the converters (first-call costs) before the clock starts
        latency = self.cfg.audio.device_latency
        self._stream = self.sd.Stream(
            device=(self.in_dev, self.out_dev), samplerate=self.rate, blocksize=self.block, dtype="float32",
            channels=(self._ch + 1, self.cfg.audio.output_channels),
            latency=latency if latency in ("low", "high") else float(latency),
            callback=self._callback)
        self._stream.start()

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
        if self._worker.is_alive():
            self._worker.join(timeout=2)

    def report(self) -> LiveReport:
        s = self._stream
        lat_in, lat_out = (s.latency if s is not None else (0.0, 0.0))
        return LiveReport(
            input_device=self.sd.query_devices(self.in_dev)["name"],
            output_device=self.sd.query_devices(self.out_dev)["name"],
            sample_rate=self.rate, block_frames=self.block, latency_ms=self.engine.latency_ms,
            algorithmic_latency_ms=self.engine.algorithmic_latency_ms,
            device_input_latency_ms=1000 * lat_in, device_output_latency_ms=1000 * lat_out,
            callbacks=int(self._flags[0]), input_overflows=int(self._flags[1]),
            output_underflows=int(self._flags[2]), engine=self.engine.stats())

    def status_line(self) -> str:
        r = self.report()
        e = r.engine
        hop_ms = 1000 * self.engine.hop / self.engine.model_rate
        total = r.latency_ms + r.device_input_latency_ms + r.device_output_latency_ms
        return (f"delay {total:5.1f} ms (algorithmic {r.algorithmic_latency_ms:.1f} + buffer "
                f"{r.latency_ms - r.algorithmic_latency_ms:.1f} + device {r.device_input_latency_ms:.1f}/"
                f"{r.device_output_latency_ms:.1f}) | compute p50 {e.compute_ms_p50:.2f} p99 {e.compute_ms_p99:.2f} ms "
                f"(RTF {e.compute_ms_p50 / hop_ms:.3f}) | underruns {e.underruns} dropped {e.dropped} | "
                f"{'MONITOR' if self.monitor else 'muted'} | {e.converter}"
                + (f" | centring {self.voice.centring}" if hasattr(self.voice, "centring") else ""))


def run_live(cfg: Config, converter: Converter, duration: float = 0.0, stats_json: str = "",
             interactive: bool | None = None) -> LiveReport:
    """Run until ``duration`` seconds pass (0 = until Ctrl-C / 'q'). Prints a status line every second."""
    live = LiveSession(cfg, converter)
    interactive = sys.stdin.isatty() if interactive is None else interactive
    print(f"rtvc live: {live.sd.query_devices(live.in_dev)['name']} -> {live.sd.query_devices(live.out_dev)['name']}"
          f" at {live.rate} Hz, block {live.block} frames; voice: {converter.name}", file=sys.stderr)
    if interactive:
        print("keys (then Enter): p passthrough on/off, m monitor on/off, v NAME switch voice, t N transpose "
              "N semitones, q quit", file=sys.stderr)
        threading.Thread(target=_keys, args=(live,), daemon=True).start()
    live.start()
    t0 = time.monotonic()
    try:
        while not live._stop.is_set() and (duration <= 0 or time.monotonic() - t0 < duration):
            time.sleep(min(1.0, max(0.01, duration - (time.monotonic() - t0))) if duration > 0 else 1.0)
            end = "\r" if sys.stderr.isatty() else "\n"
            print(live.status_line(), end=end, file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        live.stop()
    report = live.report()
    print(file=sys.stderr)
    if stats_json:
        with open(stats_json, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)
    return report


def _keys(live: LiveSession) -> None:
    for line in sys.stdin:
        key, _, arg = line.strip().partition(" ")
        key = key.lower()[:1]
        if key == "v" and hasattr(live.voice, "with_voice"):
            try:
                print(f"voice: {live.switch_voice(arg.strip())}", file=sys.stderr)
            except KeyError as e:
                print(e.args[0], file=sys.stderr)
        elif key == "t" and hasattr(live.voice, "transpose"):
            try:
                live.voice.transpose = float(arg)
            except ValueError:
                print("usage: t SEMITONES", file=sys.stderr)
        elif key == "p":
            print(f"passthrough {'on' if live.toggle_passthrough() else 'off'}", file=sys.stderr)
        elif key == "m":
            live.monitor = not live.monitor
        elif key == "q":
            live._stop.set()
            return
