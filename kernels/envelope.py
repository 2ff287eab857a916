"""Fused CPU streaming step of :class:`rtvc.envelope.EnvelopeSynth` (numba) for one stream, on the module's own
streaming state (views), so the torch and numba paths can alternate mid-stream.

The torch module evaluates sin(k * phase) for every harmonic; here the harmonics come from the Chebyshev
recurrence sin((k+1)p) = 2 cos(p) sin(kp) - sin((k-1)p) (one multiply-add each, float64) and stop at the highest
harmonic that sounds in either of the two frames a hop interpolates between. The noise blocks' FFTs run inside
numba through rocket-fft (pocketfft, as numpy's), so the whole synthesis is one compiled call.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from rtvc.envelope import FLOOR_MIN, FLOOR_SUBTRACT


@njit(cache=True, nogil=True)
def _hash_noise(n):  # pragma: no cover - numba
    x = ((n % 2147483648) * 2654435761) % 4294967296  # the same integer mix as rtvc.envelope.hash_noise
    x = ((x ^ (x >> 16)) * 73244475) % 4294967296
    x = x ^ (x >> 16)
    return np.float64(x) * (2.0 / 4294967296.0) - 1.0


@njit(cache=True, nogil=True)
def _harmonics(env, pitch, amp_prev, phase, share, rate, hop, df, w2, lf0_mean, lf0_std):  # pragma: no cover
    """Harmonic part for one stream: env [G, N] log envelope -> [N * hop] float32 and voicing [N];
    ``amp_prev`` [K] and ``phase`` [1] advance in place."""
    g_n, n = env.shape
    K = amp_prev.shape[0]
    out = np.zeros(n * hop, np.float32)
    voiced_out = np.zeros(n, np.float32)
    amp = np.empty(K, np.float32)
    ramp = np.empty(hop, np.float32)  # the amplitudes' linear interpolation across the hop, (j + 1) / hop
    for j in range(hop):
        ramp[j] = np.float32((j + 1) / hop)
    c2, s_prev, s_cur, acc = np.empty(hop), np.empty(hop), np.empty(hop), np.empty(hop)
    ph = phase[0]
    for i in range(n):
        voiced = pitch[1, i] > 0.5
        voiced_out[i] = np.float32(voiced)
        f0 = math.exp(np.float64(pitch[0, i]) * lf0_std + lf0_mean) if voiced else 0.0
        f0f = np.float32(f0)
        top = 0
        for k in range(K):
            fk = np.float32((k + 1) * f0)
            pos = min(fk / np.float32(df), np.float32(g_n - 1.001))
            i0 = int(pos)
            frac = pos - np.float32(i0)
            lp = env[i0, i] * (np.float32(1.0) - frac) + env[i0 + 1, i] * frac
            sh = share[i0] if fk < 0.475 * rate else np.float32(0.0)
            amp[k] = np.sqrt(np.float32(4.0) * np.exp(lp) * f0f / np.float32(rate * w2) * sh)
            if amp[k] > 0 or amp_prev[k] > 0:
                top = k + 1
        inc = f0 * (2.0 * np.pi / rate)
        for j in range(hop):
            p = ph % (2.0 * np.pi)
            c2[j] = 2.0 * math.cos(p)
            s_prev[j], s_cur[j], acc[j] = 0.0, math.sin(p), 0.0
            ph += inc
        # sin((k+1) p) by the Chebyshev recurrence; harmonic-major, so the inner loop runs across the hop's
        # independent samples and vectorises (sample-major, each sample's chain of multiply-adds is serial)
        for k in range(top):
            a0, da = amp_prev[k], amp[k] - amp_prev[k]
            for j in range(hop):
                acc[j] += (a0 + da * ramp[j]) * s_cur[j]
                nxt = c2[j] * s_cur[j] - s_prev[j]
                s_prev[j] = s_cur[j]
                s_cur[j] = nxt
        for j in range(hop):
            out[i * hop + j] = np.float32(acc[j])
        amp_prev[:] = amp
    phase[0] = ph % (2.0 * np.pi)
    return out, voiced_out


@njit(cache=True, nogil=True)
def _noise_blocks(c0, n, hop, seed):  # pragma: no cover - numba
    """The N overlapping noise blocks [N, 2*hop] of this chunk: block b is samples b*hop .. b*hop + 2*hop of the
    counter-hashed noise from ``c0``."""
    u = np.empty((n + 1) * hop, np.float32)
    for s in range(u.shape[0]):
        u[s] = np.float32(_hash_noise(c0 + s + seed))
    blocks = np.empty((n, 2 * hop), np.float32)
    for b in range(n):
        blocks[b] = u[b * hop:b * hop + 2 * hop]
    return blocks


@njit(cache=True, nogil=True)
def _gain(env, share, voiced, w2):  # pragma: no cover - numba
    """Noise gain per grid bin and frame, transposed for the blocks' spectra: [N, G]."""
    g_n, n = env.shape
    gain = np.empty((n, g_n), np.float32)
    for i in range(n):
        for g in range(g_n):
            gain[i, g] = np.sqrt(np.float32(3.0) * np.exp(env[g, i]) * (np.float32(1.0) - share[g] * voiced[i])
                                 / np.float32(w2))
    return gain


@njit(cache=True, nogil=True)
def _overlap_add(harm, blocks, window, tail):  # pragma: no cover - numba
    """harm [N*hop] + the windowed noise blocks [N, 2*hop] overlapped by a hop: the first block's first half adds
    to the previous chunk's ``tail`` [hop]; ``tail`` then holds the last block's windowed second half."""
    n, hop = blocks.shape[0], blocks.shape[1] // 2
    out = np.empty(n * hop, np.float32)
    for b in range(n):
        for j in range(hop):
            prev = tail[j] if b == 0 else np.float32(blocks[b - 1, hop + j]) * window[hop + j]
            out[b * hop + j] = harm[b * hop + j] + (np.float32(blocks[b, j]) * window[j] + prev)
    for j in range(hop):
        tail[j] = np.float32(blocks[n - 1, hop + j]) * window[hop + j]
    return out


def envelope_synth(mel: np.ndarray, pitch: np.ndarray, synth: tuple) -> np.ndarray:
    """mel [n_mels, N] (normalised), pitch [2, N] -> [N * hop] float32; the state views in ``synth`` advance.
    One numba call (the noise blocks' FFTs through rocket-fft's numba support for ``np.fft``): per 10 ms hop
    live, each Python-level numpy call costs tens of microseconds once the caches have gone cold between hops."""
    return _envelope_synth(mel, pitch, *synth)


@njit(cache=True, nogil=True)
def _envelope_synth(mel, pitch, phase, count, amp_prev, tail, interp, log_weight, mel_mean, mel_std, share, window,
                    rate, hop, df, w2, lf0_mean, lf0_std, seed):  # pragma: no cover - numba
    n_mels, n = mel.shape
    log_mel = np.empty((n_mels, n), np.float32)
    for b in range(n_mels):
        for i in range(n):
            power = np.exp(mel[b, i] * mel_std[b] + mel_mean[b]) - np.float32(FLOOR_SUBTRACT)  # silence: see there
            log_mel[b, i] = np.log(max(power, np.float32(FLOOR_MIN))) - log_weight[b]
    env = np.dot(interp, log_mel)                                                        # [G, N]
    harm, voiced = _harmonics(env, pitch, amp_prev, phase, share, rate, hop, df, w2, lf0_mean, lf0_std)
    spec = np.fft.rfft(_noise_blocks(count[0], n, hop, seed))
    spec *= _gain(env, share, voiced, w2)
    count[0] += n * hop
    return _overlap_add(harm, np.fft.irfft(spec, n=2 * hop), window, tail)


def envelope_args(synth, slot: int = 0) -> tuple:
    """Arguments bound to a streaming :class:`rtvc.envelope.EnvelopeSynth` (constants + views of slot ``slot``)."""
    from rtvc.envelope import NOISE_SEED
    from rtvc.frontend import LF0_MEAN, LF0_STD
    st = synth._state
    return (st.phase[slot:slot + 1].numpy(), st.count[slot:slot + 1].numpy(), st.amp[slot].numpy(), st.tail[slot].numpy(),
            synth.interp.numpy(), synth.log_weight.numpy(), synth.mel_mean.numpy(), synth.mel_std.numpy(),
            synth.share.numpy(), synth.block_window.numpy(), float(synth.rate), synth.hop, float(synth.df),
            float(synth.w2), LF0_MEAN, LF0_STD, NOISE_SEED)
