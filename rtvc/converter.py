"""The streaming converter interface the engine drives, and the delay-line converter (passthrough).

A converter runs at the model rate on exact hops.  The models issue implements ``VoiceConverter``; until a
voice model exists the engine runs :class:`DelayConverter` as a *labelled* passthrough.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Converter(Protocol):
    """Streaming converter: one hop in, one hop out, state carried between calls.

    Attributes:
        name: shown to the user (e.g. the voice name, or "passthrough (no voice model)").
        sample_rate: model rate, Hz.
        hop: samples per :meth:`convert` call at ``sample_rate``.
        latency: samples (model rate) by which the output signal lags the input signal *beyond* the engine's
            hop buffering: lookahead plus any internal delay. The engine adds it to its reported latency.
    """

    name: str
    sample_rate: int
    hop: int
    latency: int

    def convert(self, x: np.ndarray) -> np.ndarray:
        """``x`` [hop] float32 -> [hop] float32. May return an internal buffer valid until the next call."""
        ...

    def reset(self) -> None:
        """Forget all streaming state (start of a new stream)."""
        ...


class DelayConverter:
    """Output = input delayed by exactly ``latency`` samples. Passthrough, latency matching and tests.

    The delay line is a preallocated buffer of ``latency + hop`` samples; no allocation per call.
    """

    def __init__(self, sample_rate: int, hop: int, latency: int = 0, name: str = "passthrough (no voice model)"):
        if hop < 1 or latency < 0:
            raise ValueError(f"DelayConverter needs hop >= 1 and latency >= 0, got hop={hop}, latency={latency}")
        self.name, self.sample_rate, self.hop, self.latency = name, int(sample_rate), int(hop), int(latency)
        self._line = np.zeros(self.latency + self.hop, dtype=np.float32)
        self._out = np.zeros(self.hop, dtype=np.float32)

    def convert(self, x: np.ndarray) -> np.ndarray:
        if x.shape != (self.hop,):
            raise ValueError(f"{self.name}: expected one hop of shape ({self.hop},), got {x.shape}")
        line, d = self._line, self.latency
        line[d:] = x                     # newest hop after the `latency` samples still owed
        self._out[:] = line[: self.hop]  # oldest hop out
        line[: d] = line[self.hop: self.hop + d]  # shift left by one hop (numpy buffers overlapping ranges)
        return self._out

    def reset(self) -> None:
        self._line[:] = 0.0
