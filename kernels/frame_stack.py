"""Fused CPU step of the frame-rate stacks: encoder -> nearest code (+ phone recogniser) -> decoder, one numba call
per chunk.

At one mel frame per 10 ms hop, every encoder/decoder conv is a matrix-vector product, and in eager torch each
layer costs ~6 ops of ~4 us dispatch overhead for ~10 us of arithmetic (measured: encoder+VQ+decoder ~0.8 ms
per hop). This kernel runs the same arithmetic in one compiled call: matvecs through BLAS (``np.dot``), the
causal conv history read from and written to *the torch modules' own streaming state* (numpy views of
``ConvState.past``), so the torch streaming path and this one are interchangeable mid-stream.

Stack layout (every stack): layer 0 = input conv (+ per-layer bias row 0), layers 1..L-2 = residual blocks
``h += conv(leaky(h)) + bias[i]``, layer L-1 = output conv ``conv(leaky(h))``. Weights are tap-major
``[C_out, K*C_in]`` (``CausalConv1d.gemm_weight``), histories ``[C_in, (K-1)*d]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _conv(x, past, w, b, k, d, cols):  # pragma: no cover - numba
    """y = W @ [x(t-(K-1)d), .., x(t-d), x(t)] + b for one frame; shifts x into ``past``."""
    c = x.shape[0]
    p = past.shape[1]
    for tap in range(k):
        j = tap * d  # index into (past ++ x)
        if j < p:
            cols[tap * c:(tap + 1) * c] = past[:, j]
        else:
            cols[tap * c:(tap + 1) * c] = x
    y = np.dot(w, cols[: k * c]) + b
    for i in range(c if p > 0 else 0):  # shift row by row: each row of the history is contiguous
        for j in range(p - 1):
            past[i, j] = past[i, j + 1]
        past[i, p - 1] = x[i]
    return y


@njit(cache=True, nogil=True)
def _leaky(x):  # pragma: no cover - numba
    return np.where(x > 0, x, np.float32(0.2) * x).astype(np.float32)


@njit(cache=True, nogil=True)
def _stack(x, ws, bs, pasts, ks, ds, bias, cols):  # pragma: no cover - numba
    n = len(ws)
    h = _conv(x, pasts[0], ws[0], bs[0], ks[0], ds[0], cols) + bias[0]
    for i in range(1, n - 1):
        h = h + _conv(_leaky(h), pasts[i], ws[i], bs[i], ks[i], ds[i], cols) + bias[i]
    return _conv(_leaky(h), pasts[n - 1], ws[n - 1], bs[n - 1], ks[n - 1], ds[n - 1], cols)


@njit(cache=True, nogil=True)
def frame_convert(mel, pitch, enc, codebook, cb_norm, dec, out, zout, phn, shift, inv_t):  # pragma: no cover - numba
    """mel [n_mels, T], pitch [2, T] -> decoder mel ``out`` [n_mels, T], frame by frame (streaming); the encoder's
    output (before the quantizer, unshifted) goes to ``zout`` [code_dim, T]. ``phn``: the phone recogniser's stack
    (None: the model has none), which reads z + ``shift`` [code_dim]; its softmax(logits * ``inv_t``) goes to the
    decoder below the code. (numba prunes the ``phn is None`` branches at compile time: one kernel per kind.)"""
    ews, ebs, eps, eks, eds, ebias, ecols = enc
    dws, dbs, dps, dks, dds, dbias, dcols = dec
    code_dim = codebook.shape[1]
    n_in = dws[0].shape[1] // dks[0]  # the decoder's input channels: code (+ posteriors) + pitch
    zin = np.empty(n_in, np.float32)
    for t in range(mel.shape[1]):
        z = _stack(np.ascontiguousarray(mel[:, t]), ews, ebs, eps, eks, eds, ebias, ecols)
        zout[:, t] = z
        best = np.argmin(cb_norm - 2.0 * np.dot(codebook, z))  # squared distance without the constant ||z||^2
        zin[:code_dim] = codebook[best]
        if phn is not None:
            pws, pbs, pps, pks, pds, pbias, pcols = phn
            logits = _stack((z + shift).astype(np.float32), pws, pbs, pps, pks, pds, pbias, pcols) * inv_t
            e = np.exp(logits - logits.max())
            zin[code_dim:n_in - 2] = e / e.sum()
        zin[n_in - 2:] = pitch[:, t]
        out[:, t] = _stack(zin, dws, dbs, dps, dks, dds, dbias, dcols)


def stack_args(convs, bias: np.ndarray, slot: int = 0) -> tuple:
    """Numba arguments for a stack of streaming ``CausalConv1d`` (inside ``streaming()``): weights and biases
    as numpy views of the GEMM layouts, histories as numpy views of batch slot ``slot`` of the modules' state."""
    ws = tuple(c._w.numpy() for c in convs)
    bs = tuple(np.ascontiguousarray(c._b.numpy()[:, 0]) for c in convs)
    pasts = tuple(c._state.past[slot].numpy() for c in convs)
    ks = np.array([c.k for c in convs], np.int64)
    ds = np.array([c.d for c in convs], np.int64)
    cols = np.empty(max(c.k * c.c_in for c in convs), np.float32)
    return ws, bs, pasts, ks, ds, np.ascontiguousarray(bias, dtype=np.float32), cols
