"""Harmonic-plus-noise synthesis driven by the mel envelope: the student's DSP half.

The student adds its network output to this signal, so it starts (zero-initialised head) as a source-filter vocoder
whose spectral envelope is exactly the mel it was given, and only learns what DSP misses (glottal shape, voicing
detail). Why: the network alone (109 k params, a few ms of receptive field, hours of CPU training) reached a
copy-synthesis MCD of 7.6 dB; this synthesis alone reaches ~4 dB with no training (figures in the model card).

Per frame t (mel [n_mels] + F0, the mel's power as the frontend measured it):
  * envelope: mean power per FFT bin of each mel band (band power / filter weight sum), interpolated in log to a
    uniform grid of ``GRID`` points over 0..Nyquist;
  * harmonics k = 1..K at k*F0 with amplitude sqrt(4 P(kF0) F0 / (sr * sum(w^2)) * h(kF0)) -- the sinusoid whose
    Hann-windowed periodogram averages to P over a band (h: the harmonic share, below);
  * noise: counter-hashed uniform noise, shaped in the frequency domain block by block: block t holds the noise
    samples of hops t and t+1 (the noise is a pure function of the sample counter, so these are known early),
    is multiplied by sqrt(3 P (1 - h) / sum(w^2)) (uniform noise has variance 1/3) on the grid = its rfft bins,
    Hann-windowed and overlap-added: hop t = second half of block t-1 + first half of block t. (An FIR of a
    few ms smeared the strong low band into 0.5-1 kHz by up to +3 in log power; this has the grid's resolution.);
  * h(f) = (1 - voiced_noise) for f < harmonic_below_hz, falling linearly to 0 at noise_above_hz; 0 when unvoiced.
Within hop t, harmonic amplitudes move linearly from frame t-1's to frame t's (state), F0 is held and the phase
is continuous, and the noise blocks cross-fade, so frame edges do not click. Everything after the hop's frame is known is causal: no added latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig, StudentConfig
from .frontend import LF0_MEAN, LF0_STD, LOG_EPS, mel_centers, mel_filters
from .streaming import StreamingModule

NOISE_SEED = 1 << 30  # offset into the hash sequence: independent of the excitation's noise
# The frontend clamps band power at LOG_EPS, so a decoded band at about that level means silence, not noise at the
# floor's power (which sounded at -61 dBFS in every pause and above the training data's 8 kHz band): the synthesis
# subtracts twice the floor (a decoder lands within ~0.4 nepers of it) from each band's power, down to a 30 dB
# lower floor. Bands 20 dB above the floor lose < 2%.
FLOOR_SUBTRACT, FLOOR_MIN = 2.0 * LOG_EPS, 1e-3 * LOG_EPS


@dataclass
class EnvelopeState:
    """Per stream: fundamental phase [B] (float64), samples emitted [B] (int64), the previous frame's harmonic
    amplitudes [B, K] and the second half of its noise block [B, hop] (float32)."""

    phase: torch.Tensor
    count: torch.Tensor
    amp: torch.Tensor
    tail: torch.Tensor


def voice_bar(mel, pitch, bands: int, level: float):
    """pitch with the voicing of every frame whose ``bands`` lowest mel bands average above ``level`` set (the
    held log-F0 it carries then sounds): the ``[student] voice_bar_*`` rule. mel [..., n_mels, N] normalised,
    pitch [..., 2, N]; torch tensors or numpy arrays (the numba step's), returned new, the input untouched.
    Arithmetic, not a masked assignment, so a CUDA graph can capture it."""
    if bands == 0:
        return pitch
    bar = mel[..., :bands, :].mean(-2) > level
    out = pitch.clone() if isinstance(pitch, torch.Tensor) else pitch.copy()
    out[..., 1, :] = pitch[..., 1, :] + (1 - pitch[..., 1, :]) * bar
    return out


def hash_noise(n: torch.Tensor) -> torch.Tensor:
    """Uniform noise in [-1, 1) as a pure function of the sample counter ``n`` (int64, any shape): the same
    sequence offline and in any chunking, no generator state (a 32-bit integer mix; period 2^31 samples)."""
    x = ((n % 2147483648) * 2654435761) % 4294967296
    x = ((x ^ (x >> 16)) * 73244475) % 4294967296
    x = x ^ (x >> 16)
    return x.double() * (2.0 / 4294967296.0) - 1.0


def pitch_to_f0(pitch: torch.Tensor) -> torch.Tensor:
    """pitch [B, 2, N] (normalised held log-F0, voicing) -> F0 Hz [B, N] float64, 0 where unvoiced."""
    f0 = torch.exp(pitch[:, 0].double() * LF0_STD + LF0_MEAN)
    return torch.where(pitch[:, 1] > 0.5, f0, torch.zeros_like(f0))


def run_phase(f0: torch.Tensor, hop: int, rate: float, state) -> torch.Tensor:
    """F0 per frame [B, N] -> phase of every sample [B, N*hop] (float64, before its own increment), continuing
    ``state.phase`` and advancing it (and ``state.count``) in place when streaming."""
    inc = f0.repeat_interleave(hop, dim=1) * (2.0 * math.pi / rate)
    start = state.phase[:, None] if state is not None else inc.new_zeros(f0.shape[0], 1)
    phase = start + torch.cumsum(inc, dim=1) - inc
    if state is not None:
        state.phase.copy_(torch.remainder(phase[:, -1] + inc[:, -1], 2.0 * math.pi))
    return phase


class EnvelopeSynth(StreamingModule):
    """mel [B, n_mels, N] (normalised, as the decoder emits it) + pitch [B, 2, N] -> wav [B, 1, N*hop]."""

    def __init__(self, mcfg: ModelConfig, scfg: StudentConfig) -> None:
        super().__init__()
        self.rate, self.hop = mcfg.sample_rate, mcfg.hop_length
        self.K = scfg.envelope_harmonics
        self.voiced_noise, self.h_lo, self.h_hi = scfg.voiced_noise, scfg.harmonic_below_hz, scfg.noise_above_hz
        fb = mel_filters(mcfg)
        centers = mel_centers(mcfg)
        # the voice bar's bands: those centred below voice_bar_hz (6 of 80 below 300 Hz at the defaults)
        self.bar = (int((centers < scfg.voice_bar_hz).sum()), scfg.voice_bar_level)
        self.grid = self.hop + 1                          # the rfft bins of a 2-hop noise block: 50 Hz apart at 24 kHz
        self.df = mcfg.sample_rate / (2 * self.hop)
        freqs = np.arange(self.grid) * self.df
        interp = np.stack([np.interp(freqs, centers, np.eye(mcfg.n_mels)[b]) for b in range(mcfg.n_mels)], 1)
        win = np.hanning(mcfg.win_length + 1)[:-1]  # periodic Hann, as the frontend's window
        self.w2 = float(np.sum(win ** 2))
        share = np.clip((self.h_hi - freqs) / (self.h_hi - self.h_lo), 0.0, 1.0) * (1 - self.voiced_noise)
        self.register_buffer("interp", torch.from_numpy(interp).float(), persistent=False)           # [G, n_mels]
        self.register_buffer("log_weight", torch.from_numpy(np.log(fb.sum(1))).float(), persistent=False)  # [n_mels]
        self.register_buffer("share", torch.from_numpy(share).float(), persistent=False)           # [G] harmonic share
        self.register_buffer("block_window", torch.hann_window(2 * self.hop, periodic=True), persistent=False)
        self.register_buffer("k", torch.arange(1, self.K + 1, dtype=torch.float64), persistent=False)
        # corpus log-mel statistics (the decoder's mel is normalised with them); set by training, saved with it
        self.register_buffer("mel_mean", torch.zeros(mcfg.n_mels))
        self.register_buffer("mel_std", torch.ones(mcfg.n_mels))

    receptive_field = property(lambda self: 2 * self.hop)

    def normalised_by(self, mel_mean: torch.Tensor | np.ndarray, mel_std: torch.Tensor | np.ndarray) -> bool:
        """Whether this synthesis reads mels normalised with these statistics (a vocoder trained on other mels
        would render them at the wrong power)."""
        return bool(torch.allclose(self.mel_mean.cpu(), torch.as_tensor(mel_mean, dtype=torch.float32)) and
                    torch.allclose(self.mel_std.cpu(), torch.as_tensor(mel_std, dtype=torch.float32)))

    def init_state(self, batch, device, dtype):
        return EnvelopeState(torch.zeros(batch, dtype=torch.float64, device=device),
                             torch.zeros(batch, dtype=torch.int64, device=device),
                             torch.zeros(batch, self.K, device=device), torch.zeros(batch, self.hop, device=device))

    def voiced(self, mel: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        """The pitch [B, 2, N] this synthesis (and its vocoder's excitation) sounds for mel [B, n_mels, N]: the
        tracker's, plus the voice bar's frames (:func:`voice_bar`)."""
        return voice_bar(mel, pitch, *self.bar)

    def log_envelope(self, mel: torch.Tensor) -> torch.Tensor:
        """normalised mel [B, n_mels, N] -> log mean power per FFT bin (of the frontend's analysis) on the grid
        [B, G, N]."""
        power = torch.exp(mel * self.mel_std[:, None] + self.mel_mean[:, None]) - FLOOR_SUBTRACT
        logmel = torch.log(torch.clamp(power, min=FLOOR_MIN)) - self.log_weight[:, None]
        return torch.einsum("gm,bmn->bgn", self.interp, logmel)

    @torch.no_grad()
    def forward(self, mel: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        b, _, n = mel.shape
        hop, st = self.hop, self._state
        env = self.log_envelope(mel.float())                                                 # [B, G, N]
        f0 = pitch_to_f0(pitch)                                                              # [B, N] float64
        # harmonic amplitudes per frame, zero above noise_above_hz (share 0) and 0.95 Nyquist
        fk = (self.k[None, :, None] * f0[:, None]).float()                                   # [B, K, N]
        pos = torch.clamp(fk / self.df, max=self.grid - 1.001)
        i0 = pos.long()
        frac = pos - i0
        lp = torch.gather(env, 1, i0) * (1 - frac) + torch.gather(env, 1, i0 + 1) * frac
        sh = self.share[i0] * (fk < 0.475 * self.rate)
        amp = torch.sqrt(4.0 * torch.exp(lp) * f0[:, None].float() / (self.rate * self.w2) * sh)  # [B, K, N]
        amp0 = st.amp[:, :, None] if st is not None else amp.new_zeros(b, self.K, 1)
        amp_prev = torch.cat([amp0, amp[:, :, :-1]], 2)
        r = torch.arange(1, hop + 1, device=mel.device, dtype=torch.float32) / hop          # [hop]
        phase = run_phase(f0, hop, self.rate, st)                                            # [B, T] float64
        # sin((k+1) p) by the Chebyshev recurrence in float64, as the numba path (and ~10x cheaper than K sines
        # of a [B, K, T] argument); on CPU only up to the highest harmonic that sounds in this chunk (on a GPU all K:
        # finding that top is a device->host sync, which a CUDA graph cannot capture)
        top = self.K
        if not mel.is_cuda:
            sounding = ((amp > 0) | (amp_prev > 0)).any(2).any(0).nonzero()
            top = int(sounding.max()) + 1 if sounding.numel() else 0
        p = torch.remainder(phase, 2.0 * math.pi)
        c2, s_prev, s_cur = 2.0 * torch.cos(p), torch.zeros_like(p), torch.sin(p)
        harm = torch.zeros_like(p)
        for k in range(top):
            ramp = (amp_prev[:, k, :, None] + (amp - amp_prev)[:, k, :, None] * r).reshape(b, n * hop)
            harm += ramp * s_cur
            s_prev, s_cur = s_cur, c2 * s_cur - s_prev
        harm = harm.float()                                                                  # [B, T]
        # noise blocks: samples of hops t, t+1, shaped by frame t's envelope, windowed, overlap-added
        voiced = (f0 > 0).float()
        gain = torch.sqrt(3.0 * torch.exp(env) * (1.0 - self.share[None, :, None] * voiced[:, None]) / self.w2)
        n0 = st.count[:, None] if st is not None else torch.zeros(b, 1, dtype=torch.int64, device=mel.device)
        u = hash_noise(n0 + NOISE_SEED + torch.arange((n + 1) * hop, device=mel.device)[None]).float()
        blocks = torch.fft.irfft(torch.fft.rfft(u.unfold(1, 2 * hop, hop)) * gain.transpose(1, 2), n=2 * hop)
        blocks = blocks * self.block_window                                                  # [B, N, 2*hop]
        tail0 = st.tail[:, None] if st is not None else blocks.new_zeros(b, 1, hop)
        noise = (blocks[:, :, :hop] + torch.cat([tail0, blocks[:, :-1, hop:]], 1)).reshape(b, -1)
        if st is not None:
            st.count.add_(n * hop)
            st.amp.copy_(amp[:, :, -1])
            st.tail.copy_(blocks[:, -1, hop:])
        return (harm + noise)[:, None].to(mel.dtype)
