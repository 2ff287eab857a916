"""StreamEngine: arbitrary client blocks in -> exact model hops -> converter -> arbitrary client blocks out.

Data path (only the rings and the hop FIFO accumulate samples)::

    push(block) -> in_ring -> [backlog bound] -> resample to model rate -> hop FIFO -> converter (crossfade
    on switch) -> resample to client rate -> [timeline alignment] -> out_ring -> pull(out)

Threads: ``push`` is the producer side (audio callback / websocket handler), ``pull`` the consumer side (audio
callback / sender), ``step`` the worker.  ``process`` does all three in one call for offline use and tests.

Latency (client samples).  After N input samples the pipeline has emitted at least
``N - (hop + d_in)/r - d_out - 1`` samples (r = model/client rate ratio, d_in/d_out the resamplers'
held-back samples), whatever the block sizes; so ``pad = ceil((hop + d_in)/r) + d_out + 1`` zeros ahead
of the output stream make ``pull`` never run dry in synchronous use.  The converter's own ``latency`` is a
signal delay on top.  ``extra`` (live/server) adds the callback block and a compute safety margin.

Bounded delay.  Every converted sample has an *ideal slot* in the output timeline: its input index plus
the nominal latency.  When the worker falls behind, samples arrive after their slot has been played (as
counted silence): the stream is *late* by ``lateness`` samples.  Late audio within ``max_backlog`` is played
(delay nominal + lateness) and the lateness is removed during the next quiet hop; beyond ``max_backlog`` it is
dropped at once, so the delay returns to nominal instead of growing.  Input queued beyond ``max_backlog`` is
dropped (oldest first) before being converted, as its output could only be late.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import EngineConfig
from .converter import Converter
from .resample import StreamResampler
from .ringbuffer import RingBuffer


def settle_heap() -> None:
    """Call once after start-up, before real-time audio flows (``rtvc live``, ``serve``, ``profile``): collect the
    start-up garbage now and move every object alive (torch, the model: ~300k) out of the collector's reach
    (``gc.freeze``). Why: a full collection of that heap took 248 ms on the 2-core VM, holding the GIL the audio
    callback (or the event loop and the worker) needs, ~25 hops. Streaming itself allocates little that survives
    (a 6 s live run collected nothing above generation 0), so this guards long sessions: a full collection, should
    one come mid-stream, has none of the start-up heap to scan."""
    gc.collect()
    gc.freeze()


def warm_up(converter: Converter, hops: int = 3) -> None:
    """Convert a few hops of silence, then reset: first-call costs (JIT cache loads, allocations) paid before the
    clock starts. Call it **on the thread that will convert**: a thread's first BLAS call sets up that thread's
    buffers, ~4 ms (session 22: numba's ``np.dot`` 0.045 ms on the main thread, 3.95 ms on a new thread's first
    call). Warmed on the main thread instead, the worker's first hop took ~15 ms, past the safety margin: the one
    underrun (161 samples at 48 kHz) every ``rtvc profile`` run showed. Run :func:`settle_heap` before, not
    after: the first conversion after a full collection took ~10 ms again (in the vocoder; cause not found)."""
    for _ in range(hops):
        converter.convert(np.zeros(converter.hop, np.float32))
    converter.reset()


class WarmedThread(threading.Thread):
    """The converting worker of ``rtvc live``, ``serve`` and ``profile``: a daemon thread that first runs ``warm``
    on itself (a converter must be warmed on the thread that converts: :func:`warm_up`), then ``loop``.
    :meth:`start_warmed` returns once ``warm`` is done and re-raises its error (``loop`` then never runs)."""

    def __init__(self, warm: Callable[[], None], loop: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._warm_fn, self._loop_fn = warm, loop
        self._warmed = threading.Event()
        self._failed: BaseException | None = None

    def run(self) -> None:
        try:
            self._warm_fn()
        except BaseException as e:
            self._failed = e
        finally:
            self._warmed.set()
        if self._failed is None:
            self._loop_fn()

    def start_warmed(self) -> None:
        self.start()
        self._warmed.wait()
        if self._failed is not None:
            raise self._failed


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started, all in client-rate samples unless named otherwise."""

    samples_in: int        # accepted by push
    samples_out: int       # handed out by pull (real + silence)
    overrun_in: int        # push found the input ring full (worker stalled far beyond the bound)
    dropped_in: int        # queued input dropped by the backlog bound, never converted
    dropped_late: int      # converted audio dropped because it was later than allowed / skipped to catch up
    gap_filled: int        # silence inserted where dropped input would have played
    underruns: int         # silence handed out by pull because nothing was ready
    hops: int              # converter steps run
    lateness: int          # current extra delay beyond nominal
    compute_ms_p50: float  # converter time per hop
    compute_ms_p99: float
    converter: str         # name of the active converter

    @property
    def dropped(self) -> int:
        """Every input sample that will never be heard."""
        return self.overrun_in + self.dropped_in + self.dropped_late


class StreamEngine:
    """Streams a :class:`Converter` over client audio with fixed latency and bounded delay.

    Args:
        converter: the streaming converter (model rate, exact hops).
        client_rate: sample rate of the blocks given to ``push`` / taken by ``pull``.
        cfg: engine settings (resampler, backlog bound, crossfade, ring sizes).
        extra_latency: additional output buffering in client samples (live: block size + safety margin).
    """

    def __init__(self, converter: Converter, client_rate: int, cfg: EngineConfig, extra_latency: int = 0) -> None:
        if client_rate <= 0:
            raise ValueError(f"client sample rate must be positive, got {client_rate}")
        if extra_latency < 0:
            raise ValueError(f"extra_latency must be >= 0, got {extra_latency}")
        self.cfg, self.client_rate = cfg, int(client_rate)
        self.model_rate, self.hop = int(converter.sample_rate), int(converter.hop)
        self.converter: Converter = converter
        r = self.model_rate / self.client_rate
        self._rs_in = StreamResampler(self.client_rate, self.model_rate, cfg.resampler)
        self._rs_out = StreamResampler(self.model_rate, self.client_rate, cfg.resampler)
        if self._rs_in.identity:
            self.pad = self.hop - 1  # exact: a hop completes the moment its last sample arrives
        else:  # see module docstring; the +1s cover the resamplers' rounding of their running phase
            self.pad = math.ceil((self.hop + self._rs_in.delay) / r) + self._rs_out.delay + 1
        self.extra = int(extra_latency)
        self._conv_lag = round(converter.latency / r)  # converter latency in client samples

        ring = max(int(cfg.ring_ms * self.client_rate / 1000), 4 * (self.pad + self.extra + self._conv_lag))
        self._in = RingBuffer(ring)
        self._out = RingBuffer(ring)
        self._fifo = RingBuffer(max(int(cfg.ring_ms * self.model_rate / 1000), 4 * self.hop))  # model-rate hops
        self._scratch = np.zeros(ring, dtype=np.float32)
        self._hop_buf = np.zeros(self.hop, dtype=np.float32)
        self._mix = np.zeros(self.hop, dtype=np.float32)
        self.max_backlog = int(cfg.max_backlog_ms * self.client_rate / 1000)
        self._silence_rms = 10.0 ** (cfg.catchup_silence_db / 20.0)
        # crossfade ramp in model samples, whole hops, raised-cosine (sums to 1 with its mirror: no level dip)
        nf = max(1, math.ceil(cfg.crossfade_ms * self.model_rate / 1000 / self.hop)) * self.hop
        self._ramp = (np.sin(0.5 * np.pi * (np.arange(nf, dtype=np.float64) + 0.5) / nf) ** 2).astype(np.float32)
        self._fade_from: Converter | None = None
        self._fade_pos = 0
        self._pending: Converter | None = None
        self._times = np.zeros(4096, dtype=np.float64)  # per-hop compute seconds (ring of recent values)
        self._reset_counters()
        self._out.write_zeros(self.pad + self.extra)

    def _reset_counters(self) -> None:
        self._fed = 0            # client samples taken from in_ring into the pipeline
        self._emitted = 0        # client samples out of the pipeline (before alignment)
        self._dropped_total = 0  # input dropped so far (shifts the ideal slots of later samples)
        self._marks: deque[tuple[int, int]] = deque()  # (fed position after a drop, dropped_total)
        self._slot_shift = 0     # dropped_total in force for the samples now being emitted
        self._slot_base = self._out.written + self._out.underruns  # output slot where this stream starts
        self._last_block = 0     # size of the newest pushed block (producer writes, worker reads)
        self._dropped_in = self._dropped_late = self._gap = self._hops = 0
        self._lateness = 0

    # -------------------------------------------------------------------------------------------- latency
    @property
    def latency_samples(self) -> int:
        """Nominal input-to-output delay in client samples (what a listener experiences, before devices)."""
        return self.pad + self.extra + self._conv_lag

    @property
    def algorithmic_latency_samples(self) -> int:
        """Delay the algorithm itself needs (hop accumulation, resampler filters, converter lookahead)."""
        return self.pad + self._conv_lag

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.latency_samples / self.client_rate

    @property
    def algorithmic_latency_ms(self) -> float:
        return 1000.0 * self.algorithmic_latency_samples / self.client_rate

    # -------------------------------------------------------------------------------------- producer side
    def push(self, block: np.ndarray) -> None:
        """Queue a block [n] float32 of client audio. Never blocks; a full ring counts as ``overrun_in``."""
        self._last_block = block.shape[0]
        self._in.write(block)

    # -------------------------------------------------------------------------------------- consumer side
    def pull(self, out: np.ndarray) -> int:
        """Fill ``out`` [n] float32 with output; silence (counted) where nothing is ready. Returns real count."""
        return self._out.read_into(out, True)

    def available(self) -> int:
        """Output samples ready to pull."""
        return self._out.available()

    def queued(self) -> int:
        """Input samples pushed but not yet taken by the worker (for producers that apply backpressure)."""
        return self._in.available()

    # ----------------------------------------------------------------------------------------- worker side
    def switch_converter(self, converter: Converter) -> None:
        """Switch to ``converter`` (e.g. another voice) with a crossfade at the next hop. Thread-safe."""
        for attr in ("sample_rate", "hop", "latency"):
            if getattr(converter, attr) != getattr(self.converter, attr):
                raise ValueError(f"cannot switch to {converter.name}: its {attr} is {getattr(converter, attr)}, "
                                 f"the running converter's is {getattr(self.converter, attr)}")
        self._pending = converter  # picked up by the worker; a single reference store is atomic

    def step(self) -> int:
        """Convert every complete hop that is queued. Returns the number of hops run."""
        n = 0
        while (x := self.next_hop()) is not None:
            t0 = time.perf_counter()
            y = self._convert(x)
            self.put_hop(y, time.perf_counter() - t0)
            n += 1
        return n

    def next_hop(self) -> np.ndarray | None:
        """Worker side, for batched converters: the next complete model-rate hop [hop] (an internal buffer,
        valid until the next call), or None. Every hop taken must be answered with :meth:`put_hop`."""
        if self._fifo.available() < self.hop:
            self._ingest()
            if self._fifo.available() < self.hop:
                return None
        self._fifo.read_into(self._hop_buf, False)
        return self._hop_buf

    def put_hop(self, y: np.ndarray, compute_s: float = 0.0) -> None:
        """Worker side: the converted hop [hop] for the last :meth:`next_hop`, placed on the output timeline."""
        self._times[self._hops % self._times.shape[0]] = compute_s
        self._hops += 1
        self._emit(self._rs_out.process(y))

    def process(self, block: np.ndarray) -> np.ndarray:
        """Synchronous push -> step -> pull: returns exactly ``len(block)`` samples, delayed by the latency."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        out = np.empty(block.shape[0], dtype=np.float32)
        pos = 0
        # chunk so a huge block never overflows the rings (offline files can be arbitrarily long)
        chunk = max(1, self._in.capacity // 4)
        while pos < block.shape[0]:
            part = block[pos: pos + chunk]
            self.push(part)
            self.step()
            self.pull(out[pos: pos + part.shape[0]])
            pos += part.shape[0]
        return out

    def _ingest(self) -> None:
        avail = self._in.available()
        if avail == 0:
            return
        newest = self._last_block
        if avail > self.max_backlog + newest:
            # Fell behind by more than the bound (beyond the block that just arrived, which a client sending
            # large frames cannot avoid): converting the old part could only produce late audio. Restart from
            # the newest block plus one hop.
            keep = min(avail, newest + math.ceil(self.hop * self.client_rate / self.model_rate))
            k = self._in.discard(avail - keep)
            self._dropped_in += k
            self._dropped_total += k
            self._marks.append((self._fed, self._dropped_total))
            avail = keep
        x = self._scratch[:avail]
        self._in.read_into(x, False)
        self._fed += avail
        y = self._rs_in.process(x)
        got = self._fifo.write(y)
        if got < y.shape[0]:  # cannot happen with the backlog bound < ring size; counted if it ever does
            self._dropped_in += y.shape[0] - got

    def _convert(self, x: np.ndarray) -> np.ndarray:
        if self._pending is not None:
            self._fade_from, self.converter, self._pending = self.converter, self._pending, None
            self._fade_pos = 0
        y = self.converter.convert(x)
        if self._fade_from is not None:
            old = self._fade_from.convert(x)
            w = self._ramp[self._fade_pos: self._fade_pos + self.hop]
            np.subtract(y, old, out=self._mix)
            self._mix *= w
            self._mix += old
            y = self._mix
            self._fade_pos += self.hop
            if self._fade_pos >= self._ramp.shape[0]:
                self._fade_from = None
        return y

    def _emit(self, y: np.ndarray) -> None:
        """Place pipeline output [m] (client rate) on the output timeline."""
        while y.shape[0]:
            # Samples emitted before the next drop mark keep the current slot shift; split at the mark.
            seg = y
            if self._marks:
                pos, total = self._marks[0]
                boundary = pos + self._conv_lag  # pipeline output index whose source input follows the drop
                if self._emitted >= boundary:
                    self._slot_shift = total
                    self._marks.popleft()
                    continue
                seg = y[: boundary - self._emitted]
            self._place(seg)
            self._emitted += seg.shape[0]
            y = y[seg.shape[0]:]

    def _place(self, y: np.ndarray) -> None:
        ideal = self._slot_base + self._emitted + self.pad + self.extra + self._slot_shift  # slot of y[0]
        end = self._out.written + self._out.underruns  # slot the next written sample will play in
        late = end - ideal
        if late < 0:  # input was dropped but its slots have not played yet: keep the timeline with silence
            self._gap += self._out.write_zeros(-late)
            late = 0
        elif late > 0 and (late > self.max_backlog or self._quiet(y)):
            k = min(late, y.shape[0])
            self._dropped_late += k
            y = y[k:]
            late -= k
        self._lateness = late
        self._out.write(y)

    def _quiet(self, y: np.ndarray) -> bool:
        return y.shape[0] > 0 and float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) < self._silence_rms

    # ------------------------------------------------------------------------------------------- control
    def reset(self) -> None:
        """Start a new stream (call with producer/consumer/worker stopped)."""
        for ring in (self._in, self._out, self._fifo):
            ring.discard(ring.available())
        self._rs_in.reset()
        self._rs_out.reset()
        self.converter.reset()
        self._fade_from = self._pending = None
        self._reset_counters()
        self._out.write_zeros(self.pad + self.extra)

    def stats(self) -> EngineStats:
        n = min(self._hops, self._times.shape[0])
        t = self._times[:n] * 1000.0
        p50, p99 = (float(np.percentile(t, 50)), float(np.percentile(t, 99))) if n else (0.0, 0.0)
        return EngineStats(
            samples_in=self._in.written, samples_out=self._out.read + self._out.underruns,
            overrun_in=self._in.overruns, dropped_in=self._dropped_in, dropped_late=self._dropped_late,
            gap_filled=self._gap, underruns=self._out.underruns, hops=self._hops, lateness=self._lateness,
            compute_ms_p50=p50, compute_ms_p99=p99, converter=self.converter.name)
