"""One streaming idea for every layer (after moshi's StreamingModule).

A :class:`StreamingModule` computes ``forward(x)`` offline (no state: zero left-context, the whole sequence
at once) or, inside ``with model.streaming(batch):``, chunk by chunk with a typed per-layer state that is
preallocated at entry and updated in place (so CUDA graphs and custom kernels can own it), resettable per
batch slot.  The offline path is the *same* forward with no state, so streaming == offline by construction;
tests check it to 1e-5.

Every streaming module reports ``hop`` (input samples/frames per output step), ``receptive_field`` (past
context it reads, in its own input units) and ``lookahead`` (future context; 0 everywhere in rtvc: causal).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class StreamingModule(nn.Module):
    """Base: subclasses that keep state override :meth:`init_state`; the rest just contain such modules."""

    lookahead: int = 0

    def __init__(self) -> None:
        super().__init__()
        self._state: object | None = None
        self._streaming = False

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> object | None:
        return None

    @property
    def is_streaming(self) -> bool:
        return self._streaming

    def _streaming_children(self) -> Iterator["StreamingModule"]:
        return (m for m in self.modules() if isinstance(m, StreamingModule))

    @contextlib.contextmanager
    def streaming(self, batch: int = 1) -> Iterator[None]:
        """Within the block, ``forward`` consumes consecutive chunks of ``batch`` streams."""
        self.start_streaming(batch)
        try:
            yield
        finally:
            self.stop_streaming()

    def start_streaming(self, batch: int = 1) -> None:
        """Allocate every layer's state for ``batch`` streams (what ``streaming`` does on entry)."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None else torch.float32
        for m in self._streaming_children():
            m._state = m.init_state(batch, device, dtype)
            m._streaming = True

    def stop_streaming(self) -> None:
        for m in self._streaming_children():
            m._state = None
            m._streaming = False

    @contextlib.contextmanager
    def slots(self, idx: torch.Tensor) -> Iterator[None]:
        """Within the block, ``forward`` runs on the streams in batch slots ``idx`` only: every layer's state is
        gathered to a compact batch on entry and scattered back on exit (idle slots are not advanced)."""
        saved = []
        for m in self._streaming_children():
            if m._state is None:
                continue
            for name, t in vars(m._state).items():
                if isinstance(t, torch.Tensor):
                    saved.append((m._state, name, t))
                    setattr(m._state, name, t[idx])
        try:
            yield
        finally:
            for st, name, full in saved:
                full[idx] = getattr(st, name)
                setattr(st, name, full)

    def reset_streaming(self, slots: torch.Tensor | list[int] | int | None = None) -> None:
        """Zero the state of the given batch slots (all when None): a new stream starts in those slots. One ``int``
        slot costs no host->device copy (a list becomes an index tensor first: one small copy per state tensor)."""
        for m in self._streaming_children():
            st = m._state
            if st is None:
                continue
            for t in vars(st).values():
                if isinstance(t, torch.Tensor):
                    if slots is None:
                        t.zero_()
                    elif isinstance(slots, int):
                        t[slots].zero_()
                    else:
                        t[slots] = 0


@dataclass
class ConvState:
    """The last ``(kernel_size - 1) * dilation`` input frames of a causal conv: ``past`` [B, C_in, P]."""

    past: torch.Tensor


class CausalConv1d(StreamingModule):
    """Conv1d that sees only the past: ``y[t]`` depends on ``x[t - (K-1)d .. t]``.

    Offline: left zero-padding + ``F.conv1d`` (fast for long training sequences).  Streaming: the cached
    past and the new chunk form the input of *one GEMM* (``addmm`` over the K dilated taps stacked as rows),
    ~2.5x cheaper than a Conv1d call for a 10 ms chunk on CPU.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.c_in, self.c_out, self.k, self.d = c_in, c_out, kernel_size, dilation
        self.pad = (kernel_size - 1) * dilation
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(c_in * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def receptive_field(self) -> int:
        return self.pad + 1

    def init_state(self, batch, device, dtype):
        # weights are frozen while streaming: lay them out for the GEMM once, not per chunk
        self._w = self.gemm_weight().detach().contiguous()
        self._b = None if self.bias is None else self.bias.detach()[:, None].contiguous()
        return ConvState(torch.zeros(batch, self.c_in, self.pad, device=device, dtype=dtype))

    def gemm_weight(self) -> torch.Tensor:
        """[C_out, K*C_in], tap-major: columns k*C_in..(k+1)*C_in-1 hold tap k."""
        return self.weight.permute(0, 2, 1).reshape(self.c_out, self.k * self.c_in)

    def taps(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming: [B, C_in, T] new frames -> [B, K*C_in (+ E), T] stacked dilated taps (and ``extra``
        [B, E, T] rows appended, so a caller can fold another 1x1 input into the same GEMM); updates the state."""
        st: ConvState = self._state  # type: ignore[assignment]
        T = x.shape[2]
        full = torch.cat([st.past, x], dim=2) if self.pad else x
        if self.pad:
            st.past.copy_(full[:, :, full.shape[2] - self.pad:])
        parts = [full[:, :, k * self.d: k * self.d + T] for k in range(self.k)]
        if extra is not None:
            parts.append(extra)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, T] -> [B, C_out, T]."""
        if not self._streaming:
            return F.conv1d(F.pad(x, (self.pad, 0)), self.weight, self.bias, dilation=self.d)
        return gemm(self._w, self._b, self.taps(x))


def gemm(w: torch.Tensor, b: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """w [O, I] @ cols [B, I, T] (+ b [O, 1]) -> [B, O, T]; batch 1 (the live case) is one plain ``addmm``."""
    if cols.shape[0] == 1:
        return (torch.addmm(b, w, cols[0]) if b is not None else w @ cols[0])[None]
    y = torch.matmul(w, cols)
    return y + b if b is not None else y


def receptive_field(convs: list[CausalConv1d]) -> int:
    """Receptive field of a chain of causal convs, in input frames."""
    return 1 + sum(c.pad for c in convs)
