"""``rtvc::student_layer``: one gated residual layer of the streaming student vocoder, state included, fused.

    x_new = torch.ops.rtvc.student_layer(x, c, past, w, b, wr, br, ws, skips, dilation)

x [B, C, T] layer input, c [B, A, T] conditioning, past [B, C, P] the last P = (K-1)*dilation inputs (read, then
overwritten with the new history), w [2C, K*C + A] the dilated conv taps (tap-major) and the conditioning 1x1
stacked, b [2C], wr/br residual 1x1, ws skip 1x1 (no bias), skips [B, C, T] accumulated in place. Computes
``g = GLU(w @ [taps(past ++ x); c] + b)``, ``skips += ws @ g`` and returns ``x + wr @ g + br``.

CPU: numba (BLAS GEMMs), also what :func:`kernels.student_step.student_step` runs per layer. CUDA: one numba.cuda
launch per layer, one block per stream: the block computes g for a tile of time steps into shared memory, then the
residual and skip outputs, then rewrites the history, on PyTorch's current stream. Reference: :func:`reference`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, njit

THREADS = 256
SHARED = 4096  # floats of shared memory for g (C x time tile) and the history rewrite


def reference(x, c, past, w, b, wr, br, ws, skips, dilation):
    """Plain torch; returns (x_new, new_past, new_skips) without mutating its inputs."""
    B, C, T = x.shape
    K = (w.shape[1] - c.shape[1]) // C
    full = torch.cat([past, x], dim=2)
    taps = torch.cat([full[:, :, k * dilation: k * dilation + T] for k in range(K)] + [c], dim=1)
    h = torch.matmul(w, taps) + b[:, None]
    g = h[:, :C] * torch.sigmoid(h[:, C:])
    return x + torch.matmul(wr, g) + br[:, None], full[:, :, full.shape[2] - past.shape[2]:], skips + torch.matmul(ws, g)


@njit(cache=True, nogil=True)
def causal_conv_cpu(x, past, w, b, k, d, extra):  # pragma: no cover - numba
    """Causal conv over T frames of one stream: x [C, T] -> W @ [dilated taps of (past ++ x); extra] + b,
    [C_out, T]; shifts x into ``past`` [C, (K-1)*d]. ``extra`` [E, T] rows may be empty."""
    c, t_len = x.shape
    p = past.shape[1]
    e = extra.shape[0]
    cols = np.empty((k * c + e, t_len), np.float32)
    for tap in range(k):  # row-wise (contiguous) copies: tap's steps t < p - tap*d read the history
        s = tap * d
        n_past = min(max(p - s, 0), t_len)
        for i in range(c):
            row = tap * c + i
            for t in range(n_past):
                cols[row, t] = past[i, s + t]
            for t in range(n_past, t_len):
                cols[row, t] = x[i, s + t - p]
    for i in range(e):
        for t in range(t_len):
            cols[k * c + i, t] = extra[i, t]
    if p:
        for i in range(c):
            if t_len >= p:
                for j in range(p):
                    past[i, j] = x[i, t_len - p + j]
            else:
                for j in range(p - t_len):
                    past[i, j] = past[i, j + t_len]
                for j in range(t_len):
                    past[i, p - t_len + j] = x[i, j]
    y = np.dot(w, cols)
    for i in range(y.shape[0]):
        bi = b[i]
        for t in range(t_len):
            y[i, t] += bi
    return y


@njit(cache=True, nogil=True)
def layer_cpu(x, c, past, w, b, wr, br, ws, skips, k, d):  # pragma: no cover - numba
    """One stream: x [C, T], c [A, T], past [C, P] (updated), skips [C, T] (updated) -> new x [C, T]."""
    ch, t_len = x.shape
    h = causal_conv_cpu(x, past, w, b, k, d, c)
    g = np.empty((ch, t_len), np.float32)
    for i in range(ch):
        for t in range(t_len):
            g[i, t] = h[i, t] / (np.float32(1.0) + np.exp(-h[i + ch, t]))
    s = np.dot(ws, g)
    out = np.dot(wr, g)
    for i in range(ch):
        bi = br[i]
        for t in range(t_len):
            skips[i, t] += s[i, t]
            out[i, t] = x[i, t] + out[i, t] + bi  # the order of reference(): (x + wr @ g) + br
    return out


@cuda.jit(cache=False)
def _layer_cuda(x, c, past, w, b, wr, br, ws, skips, xo, k, d, tile):  # pragma: no cover - device / simulator
    bi = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    sh = cuda.shared.array(SHARED, dtype=np.float32)
    ch, t_len = x.shape[1], x.shape[2]
    a_ch = c.shape[1]
    p = past.shape[2]
    for t0 in range(0, t_len, tile):
        tt = min(tile, t_len - t0)
        # phase 1: g[ch, t] = GLU(w @ [taps; c] + b) for this time tile, into shared memory
        for e in range(tid, ch * tt, nthreads):
            o, t = e // tt, t0 + e % tt
            acc_a = b[o]
            acc_g = b[o + ch]
            for tap in range(k):
                j = tap * d + t
                for i in range(ch):
                    v = past[bi, i, j] if j < p else x[bi, i, j - p]
                    acc_a += w[o, tap * ch + i] * v
                    acc_g += w[o + ch, tap * ch + i] * v
            for i in range(a_ch):
                v = c[bi, i, t]
                acc_a += w[o, k * ch + i] * v
                acc_g += w[o + ch, k * ch + i] * v
            sh[o * tile + e % tt] = acc_a / (1.0 + math.exp(-acc_g))
        cuda.syncthreads()
        # phase 2: residual and skip 1x1 from g
        for e in range(tid, ch * tt, nthreads):
            o, tl = e // tt, e % tt
            r = br[o]
            s = np.float32(0.0)
            for i in range(ch):
                gv = sh[i * tile + tl]
                r += wr[o, i] * gv
                s += ws[o, i] * gv
            xo[bi, o, t0 + tl] = x[bi, o, t0 + tl] + r
            skips[bi, o, t0 + tl] += s
        cuda.syncthreads()
    # phase 3: new history = last p of (past ++ x): stage in shared memory, then write (past is read and written)
    for e in range(tid, ch * p, nthreads):
        i, j = e // p, e % p
        src = t_len + j
        sh[e] = past[bi, i, src] if src < p else x[bi, i, src - p]
    cuda.syncthreads()
    for e in range(tid, ch * p, nthreads):
        past[bi, e // p, e % p] = sh[e]


def launch_cuda(x, c, past, w, b, wr, br, ws, skips, xo, dilation: int, stream=0) -> None:
    """Device arrays (or host arrays under the simulator); one block per stream."""
    ch, p = x.shape[1], past.shape[2]
    k = (w.shape[1] - c.shape[1]) // ch
    tile = max(1, min(x.shape[2], SHARED // ch))
    if ch * p > SHARED:
        raise ValueError(f"history of {ch} x {p} floats exceeds the kernel's shared memory ({SHARED} floats)")
    threads = min(THREADS, max(32, ch * tile))
    _layer_cuda[x.shape[0], threads, stream](x, c, past, w, b, wr, br, ws, skips, xo, k, dilation, tile)


@torch.library.custom_op("rtvc::student_layer", mutates_args=("past", "skips"))
def student_layer(x: torch.Tensor, c: torch.Tensor, past: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                  wr: torch.Tensor, br: torch.Tensor, ws: torch.Tensor, skips: torch.Tensor,
                  dilation: int) -> torch.Tensor:
    raise NotImplementedError(f"rtvc::student_layer has no kernel for device {x.device}")


@student_layer.register_kernel("cpu")
def _(x, c, past, w, b, wr, br, ws, skips, dilation):
    k = (w.shape[1] - c.shape[1]) // x.shape[1]
    out = torch.empty_like(x)
    xn, cn, pn, sn, on = x.contiguous().numpy(), c.contiguous().numpy(), past.numpy(), skips.numpy(), out.numpy()
    wn, bn, wrn, brn, wsn = (t.contiguous().numpy() for t in (w, b, wr, br, ws))
    for i in range(x.shape[0]):
        on[i] = layer_cpu(xn[i], cn[i], pn[i], wn, bn, wrn, brn, wsn, sn[i], k, dilation)
    return out


@student_layer.register_kernel("cuda")
def _(x, c, past, w, b, wr, br, ws, skips, dilation):
    out = torch.empty_like(x)
    stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
    arrays = [cuda.as_cuda_array(t.contiguous()) for t in (x, c)] + [cuda.as_cuda_array(past)] + \
        [cuda.as_cuda_array(t.contiguous()) for t in (w, b, wr, br, ws)] + [cuda.as_cuda_array(skips), cuda.as_cuda_array(out)]
    launch_cuda(*arrays, dilation=dilation, stream=stream)
    return out


@student_layer.register_fake
def _(x, c, past, w, b, wr, br, ws, skips, dilation):
    return torch.empty_like(x)
