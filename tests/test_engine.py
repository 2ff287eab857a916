"""StreamEngine: exact delay through the resampling round trip, any block sizes, bounded delay under
overload with exact drop accounting, click-free converter switching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rtvc.config import load_config
from rtvc.converter import DelayConverter
from rtvc.engine import StreamEngine

CFG = load_config()


def _multisine(n: int, rate: int, seed: int, fmax: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    x = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in
            zip(rng.uniform(0.02, 0.1, 12), rng.uniform(50, fmax, 12), rng.uniform(0, 2 * np.pi, 12)))
    return x.astype(np.float32)


def _stream(engine: StreamEngine, x: np.ndarray, rng: np.random.Generator, max_block: int) -> np.ndarray:
    outs, pos = [], 0
    while pos < x.shape[0]:
        n = int(rng.integers(1, max_block)) if rng.random() > 0.05 else 1
        y = engine.process(x[pos: pos + n])
        assert y.shape[0] == min(n, x.shape[0] - pos)  # every call: as many samples out as in
        outs.append(y)
        pos += n
    return np.concatenate(outs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("conv_latency", [0, 50])
def test_exact_delay_48k_client_24k_model(seed, conv_latency):
    """Output == input delayed by the reported latency, after the 48k -> 24k -> 48k round trip.

    Tolerance 5e-5 absolute on a ~0.5-peak signal band-limited to 8 kHz: libsamplerate's sinc_fastest passes
    80% of the 12 kHz model Nyquist; measured max error 4.6e-6 up to 8 kHz (3.7e-3 at 9 kHz: its band edge).
    """
    rng = np.random.default_rng(seed)
    engine = StreamEngine(DelayConverter(24000, 240, conv_latency), 48000, CFG.engine)
    x = _multisine(48000 * 3, 48000, seed, 8000.0)
    y = _stream(engine, x, rng, 3000)
    d = engine.latency_samples
    assert d == engine.pad + 2 * conv_latency
    assert y.shape == x.shape
    assert np.all(y[:d - 60] == 0)  # nothing comes out before the latency (the filters ring ~40 samples early)
    skip = 4800  # the resamplers' start-up transient (first 0.1 s)
    err = np.abs(y[d + skip:] - x[skip: x.shape[0] - d])
    assert err.max() < 5e-5, f"max error {err.max():.2e} at delay {d}"
    st = engine.stats()
    assert st.underruns == 0 and st.dropped == 0 and st.gap_filled == 0
    assert st.samples_in == st.samples_out == x.shape[0]


@pytest.mark.parametrize("client_rate", [24000, 44100, 16000, 96000, 8000])
def test_never_underruns_and_identity_is_bit_exact(client_rate):
    rng = np.random.default_rng(client_rate)
    engine = StreamEngine(DelayConverter(24000, 240, 7), client_rate, CFG.engine)
    x = _multisine(client_rate * 2, client_rate, 3, 0.35 * min(client_rate, 24000))
    y = _stream(engine, x, rng, 2 * client_rate // 100)
    assert engine.stats().underruns == 0
    if client_rate == 24000:  # no resampling: exact, and the latency is one hop minus one sample + the converter's
        assert engine.latency_samples == 239 + 7
        np.testing.assert_array_equal(y[246:], x[:-246])


def test_algorithmic_latency_at_default_rates():
    e48 = StreamEngine(DelayConverter(24000, 240), 48000, CFG.engine)
    e24 = StreamEngine(DelayConverter(24000, 240), 24000, CFG.engine)
    assert e24.algorithmic_latency_ms < 10.0  # hop accumulation only
    assert e48.algorithmic_latency_ms < 12.0  # + ~1.6 ms of resampling filters
    e = StreamEngine(DelayConverter(24000, 240), 48000, CFG.engine, extra_latency=720)
    assert e.latency_samples == e48.latency_samples + 720


# ------------------------------------------------------------------------------------------ overload

# Sample i of the test signal carries its own index: loud regions i * 2**-6, quiet regions i * 2**-30
# (both exact in float32 and told apart by magnitude), so every output sample names the input it came from.
LOUD, QUIET = 2.0 ** -6, 2.0 ** -30


def _indexed_signal(n: int, rate: int) -> np.ndarray:
    idx = np.arange(1, n + 1, dtype=np.float64)
    loud = (np.arange(n) % (rate // 2)) < int(0.3 * rate)  # 300 ms speech, 200 ms pause
    return np.where(loud, idx * LOUD, idx * QUIET).astype(np.float32)


def _decode(y: np.ndarray) -> np.ndarray:
    v = y.astype(np.float64)
    idx = np.where(v > 2.0 ** -10, v / LOUD, v / QUIET)
    return np.rint(idx).astype(np.int64) - 1  # -1 where the sample is silence


class SlowConverter(DelayConverter):
    """Exact delay line that stalls on chosen hops and runs slower than real time on a range of hops."""

    def __init__(self, stalls: dict[int, float], slow: range, slow_s: float):
        super().__init__(24000, 240, 48, name="slow")
        self.stalls, self.slow, self.slow_s, self.calls = stalls, slow, slow_s, 0

    def convert(self, x):
        self.calls += 1
        if self.calls in self.stalls:
            time.sleep(self.stalls[self.calls])
        elif self.calls in self.slow:
            time.sleep(self.slow_s)
        return super().convert(x)


def test_overload_keeps_delay_bounded_and_accounts_for_every_drop():
    rate, block, seconds = 24000, 240, 5.0
    # hop 60: 150 ms stall; hops 150..210: 13 ms per 10 ms hop (1.3x slower than real time); hop 330: 400 ms
    conv = SlowConverter({60: 0.15, 330: 0.4}, range(150, 210), 0.013)
    cfg = CFG.replace(**{"engine.max_backlog_ms": 60.0, "engine.safety_ms": 5.0})
    extra = block + round(rate * cfg.engine.safety_ms / 1000)
    engine = StreamEngine(conv, rate, cfg.engine, extra_latency=extra)
    n = int(rate * seconds)
    x = _indexed_signal(n + rate, rate)
    out = np.zeros(n, np.float32)
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            if engine.step() == 0:
                time.sleep(0.002)

    w = threading.Thread(target=worker)
    w.start()
    t0 = time.perf_counter()
    for k in range(n // block):  # the "audio callback": push a block, pull a block, on a real-time clock
        deadline = t0 + (k + 1) * block / rate
        time.sleep(max(0.0, deadline - time.perf_counter()))
        engine.push(x[k * block: (k + 1) * block])
        engine.pull(out[k * block: (k + 1) * block])
    stop.set()
    w.join()
    # flush what is still in flight (synchronously, so nothing more is late): the tail of the signal
    tail = engine.process(x[n: n + rate])
    y = np.concatenate([out, tail])
    st = engine.stats()

    idx = _decode(y)
    pos = np.nonzero(idx >= 0)[0]
    src = idx[pos]
    assert np.all(np.diff(src) > 0), "output is out of order or duplicated"
    delay = pos - src
    nominal, bound = engine.latency_samples, engine.max_backlog
    assert delay.min() >= nominal, "a sample played earlier than the nominal latency"
    # bound: nominal + max_backlog, plus at most one callback block for the race between the worker reading
    # the underrun counter and writing (it corrects itself on the next write)
    assert delay.max() <= nominal + bound + block, f"delay {delay.max()} > {nominal} + {bound} + {block}"
    # exact accounting: every input sample up to the last one heard was heard once or counted as dropped
    last = src[-1]
    missing = (last + 1) - src.shape[0]
    assert st.dropped > 0, "the overload did not cause any drop: the test is not testing anything"
    assert missing == st.dropped, f"{missing} samples missing, counters say {st.dropped} ({st})"
    # latency comes back to nominal once the overload is over (the last second plays at nominal delay)
    assert np.all(delay[pos >= n - rate] == nominal), np.unique(delay[pos >= n - rate])
    assert st.underruns > 0 and st.lateness == 0


def test_switch_converter_crossfades_without_click():
    rate = 24000
    x = (0.5 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    a = DelayConverter(rate, 240, 10, name="a")

    class Inverted(DelayConverter):
        def convert(self, v):
            return -super().convert(v)

    engine = StreamEngine(a, rate, CFG.engine)
    y1 = engine.process(x[: rate // 2])
    engine.switch_converter(Inverted(rate, 240, 10, name="b"))
    y2 = engine.process(x[rate // 2:])
    y = np.concatenate([y1, y2])
    assert engine.stats().converter == "b"
    steady = np.abs(np.diff(y[2000: rate // 2])).max()  # sine slope: the largest step without a switch
    assert np.abs(np.diff(y)).max() <= steady * 1.05, "a step (click) at the converter switch"
    # after the fade the output is the inverted converter's
    np.testing.assert_allclose(y[-2000:], -x[-2000 - 249: -249], atol=1e-6)
    with pytest.raises(ValueError, match="latency is 0"):
        engine.switch_converter(DelayConverter(rate, 240, 0))


def test_reset_starts_a_clean_stream():
    engine = StreamEngine(DelayConverter(24000, 240, 5), 48000, CFG.engine)
    x = _multisine(48000, 48000, 0, 5000)
    first = engine.process(x)
    engine.reset()
    again = engine.process(x)
    np.testing.assert_array_equal(first, again)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample rate must be positive"):
        StreamEngine(DelayConverter(24000, 240), 0, CFG.engine)
    with pytest.raises(ValueError, match="extra_latency"):
        StreamEngine(DelayConverter(24000, 240), 48000, CFG.engine, extra_latency=-1)
    with pytest.raises(ValueError, match="expected one hop"):
        DelayConverter(24000, 240).convert(np.zeros(10, np.float32))
