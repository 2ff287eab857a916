"""Stateful streaming resampling between the device/client rate and the model rate.

libsamplerate's sinc converters (through the ``samplerate`` package) stream sample-accurately with a short
filter: measured here, "sinc_fastest" holds back ~19 output samples at 48->24 kHz (0.8 ms) and emits every
other sample immediately. soxr was measured too: its sinc qualities (LQ..VHQ) release output in bursts every
30-40 ms (HQ 48->24 kHz holds back 560 samples, 23 ms), which alone would blow the 10 ms latency budget, and
its "QQ" mode is cubic interpolation (aliasing). Equal rates bypass resampling entirely (bit-exact).
"""

from __future__ import annotations

import math

import numpy as np
import samplerate


class StreamResampler:
    """Chunk-in, chunk-out resampler whose output is the one-shot resampling of the concatenated input.

    ``delay`` is how many output samples it holds back (availability delay, not a signal delay: the output
    signal is time-aligned with the input, the last ``delay`` samples just are not out yet).
    """

    def __init__(self, in_rate: int, out_rate: int, converter: str = "sinc_fastest") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate, self.out_rate, self.converter = int(in_rate), int(out_rate), converter
        self.ratio = self.out_rate / self.in_rate
        self.identity = self.in_rate == self.out_rate
        self._rs = None if self.identity else samplerate.Resampler(converter, channels=1)
        self.delay = 0 if self.identity else self._measure_delay()

    def _measure_delay(self) -> int:
        """Output samples held back, measured on a scratch instance (libsamplerate does not report it)."""
        probe = samplerate.Resampler(self.converter, channels=1)
        n = 4 * self.in_rate // 100  # 40 ms: well past the filter length of every converter
        got = len(probe.process(np.zeros(n, np.float32), self.ratio, end_of_input=False))
        return max(0, math.floor(n * self.ratio) - got)

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x`` [n] float32 -> [m] float32, m ~= n * ratio (varies by the rounding of the running phase)."""
        if self.identity:
            return x
        if x.shape[0] == 0:
            return x[:0]
        return self._rs.process(x, self.ratio, end_of_input=False).astype(np.float32, copy=False)

    def reset(self) -> None:
        if self._rs is not None:
            self._rs.reset()
