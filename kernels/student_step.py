"""Fused CPU streaming step of the causal student vocoder (numba), on the torch modules' own streaming state.

Per chunk the eager torch path issues ~60 small ops (conditioning upsampler, 6 gated layers, head), each paying
~4 us of dispatch; here the same arithmetic is one compiled call whose GEMMs go to BLAS (``np.dot``). The conv
histories are numpy views of the modules' ``ConvState.past``, so both paths can alternate mid-stream.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rtvc.frontend import LF0_MEAN, LF0_STD

from .envelope import _hash_noise, envelope_args, envelope_synth
from .student_layer import causal_conv_cpu as _conv
from .student_layer import layer_cpu


@njit(cache=True, nogil=True)
def _leaky(x):  # pragma: no cover - numba
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[i, t]
            y[i, t] = v if v > 0 else np.float32(0.2) * v
    return y


@njit(cache=True, nogil=True)
def excitation(pitch, source, sub):  # pragma: no cover - numba
    """``rtvc.vocoder.Excitation`` for one stream: pitch [2, N] -> folded source [(H+1)*sub, N*hop/sub]; the
    phase and counter views in ``source`` advance in place."""
    phase, count, rate, hop, harmonics, lf0_mean, lf0_std = source
    n = pitch.shape[1]
    src = np.zeros(((harmonics + 1) * sub, n * hop // sub), np.float32)
    ph, c0 = phase[0], count[0]
    for i in range(n):
        voiced = pitch[1, i] > 0.5
        f0 = np.exp(np.float64(pitch[0, i]) * lf0_std + lf0_mean) if voiced else 0.0
        inc = f0 * (2.0 * np.pi / rate)
        top = 0
        if voiced:
            while top < harmonics and (top + 1) * f0 < 0.475 * rate:  # harmonics below Nyquist sound
                top += 1
        for j in range(hop):
            t = i * hop + j
            col, r = t // sub, t % sub
            if top:  # sin(k ph) by the Chebyshev recurrence, as kernels.envelope does (float64)
                c2 = 2.0 * np.cos(ph)
                s_prev, s_cur = 0.0, np.sin(ph)
                for k in range(top):
                    src[k * sub + r, col] = s_cur
                    s_prev, s_cur = s_cur, c2 * s_cur - s_prev
            src[harmonics * sub + r, col] = _hash_noise(c0 + t)
            ph += inc
    phase[0] = ph % (2.0 * np.pi)
    count[0] = c0 + n * hop
    return src


@njit(cache=True, nogil=True)
def _voice_bar(mel, pitch, bands, level):  # pragma: no cover - numba
    """:func:`rtvc.envelope.voice_bar` for one stream (numpy there costs ~25 us a hop in call overhead)."""
    out = pitch.copy()
    if bands == 0:
        return out
    for i in range(mel.shape[1]):
        s = np.float32(0.0)
        for b in range(bands):
            s += mel[b, i]
        if s / np.float32(bands) > level:
            out[1, i] = np.float32(1.0)  # = pitch + (1 - pitch) * bar, exactly
    return out


def student_step(mel: np.ndarray, pitch: np.ndarray, bar: tuple, synth: tuple, *net) -> np.ndarray:
    """mel [n_mels, N], pitch [2, N] (as the decoder got it) -> waveform [N * hop] (streaming; all histories,
    the excitation's and the envelope synthesis' state updated in place). ``bar, synth, *net``: :func:`student_args`."""
    pitch = _voice_bar(mel, pitch, *bar)  # as the torch module's synth.voiced: what synthesis and excitation sound
    return _student_net(mel, pitch, envelope_synth(mel, pitch, synth), *net)


@njit(cache=True, nogil=True)
def _student_net(mel, pitch, dsp, source, cond, ups, first, layers, head, sub):  # pragma: no cover - numba
    """The network on top of the envelope synthesis ``dsp`` [N * hop]: its output plus ``dsp``."""
    src = excitation(pitch, source, sub)
    folded = np.empty((sub, dsp.shape[0] // sub), np.float32)
    for t in range(dsp.shape[0]):
        folded[t % sub, t // sub] = dsp[t]
    none = np.empty((0, 1), np.float32)
    cw, cb, cp = cond
    c = _leaky(_conv(mel, cp, cw, cb, 2, 1, none[:, :0]))
    uws, ubs, ups_, factors = ups
    for i in range(len(uws)):
        f = factors[i]
        rep = np.empty((c.shape[0], c.shape[1] * f), np.float32)
        for t in range(c.shape[1]):
            for r in range(f):
                rep[:, t * f + r] = c[:, t]
        c = _leaky(_conv(rep, ups_[i], uws[i], ubs[i], 3, 1, none[:, :0]))
    fw, fb, fp = first
    x = _conv(np.concatenate((c, src, folded)), fp, fw, fb, 1, 1, none[:, :0])
    skips = np.zeros_like(x)
    lws, lbs, lps, dils, ks, rws, rbs, sws = layers
    for i in range(len(lws)):  # the same per-layer code as the rtvc::student_layer CPU op
        x = layer_cpu(x, c, lps[i], lws[i], lbs[i], rws[i], rbs[i], sws[i], skips, ks[i], dils[i])
    w1, b1, p1, w2, b2, p2 = head
    y = _conv(_leaky(_conv(_leaky(skips), p1, w1, b1, 1, 1, none[:, :0])), p2, w2, b2, 1, 1, none[:, :0])
    out = np.empty(y.shape[1] * sub, np.float32)
    for t in range(y.shape[1]):  # sub-pixel: step t emits samples t*sub .. t*sub+sub-1
        out[t * sub:(t + 1) * sub] = y[:, t] + dsp[t * sub:(t + 1) * sub]
    return out


def student_args(student, slot: int = 0) -> tuple:
    """Numba arguments bound to a streaming :class:`rtvc.vocoder.Student` (weights + views of slot ``slot``),
    led by its voice bar's (bands, level)."""
    def conv(m):
        return m._w.numpy(), np.ascontiguousarray(m._b.numpy()[:, 0]), m._state.past[slot].numpy()

    ups = [conv(u) for u in student.ups]
    factors = np.array(student.cfg.upsample_factors[:-1], np.int64)
    layers = student.layers
    lw = tuple(l._w.numpy() for l in layers)
    lb = tuple(np.ascontiguousarray(l._b.numpy()[:, 0]) for l in layers)
    lp = tuple(l.conv._state.past[slot].numpy() for l in layers)
    dils = np.array([l.conv.d for l in layers], np.int64)
    ks = np.array([l.conv.k for l in layers], np.int64)
    rw = tuple(l._wr.numpy() for l in layers)
    rb = tuple(np.ascontiguousarray(l._br.numpy()[:, 0]) for l in layers)
    sw = tuple(l._ws.numpy() for l in layers)
    ex = student.source
    source = (ex._state.phase[slot:slot + 1].numpy(), ex._state.count[slot:slot + 1].numpy(), float(ex.rate), ex.hop,
              ex.harmonics, LF0_MEAN, LF0_STD)
    return (student.synth.bar, envelope_args(student.synth, slot), source, conv(student.cond),
            (tuple(u[0] for u in ups), tuple(u[1] for u in ups), tuple(u[2] for u in ups), factors),
            conv(student.first), (lw, lb, lp, dils, ks, rw, rb, sw), (*conv(student.head1), *conv(student.head2)),
            student.sub)
