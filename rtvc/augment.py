"""Training-time augmentation of the content encoder's input (never of what the decoder must rebuild).

Everything here acts on the frontend's log-mel, so it runs on cached features with no audio in the loop:
:class:`ContentAugment` changes *who* speaks (formant warp, voice colour); :class:`RoomAugment` puts the voice in
a room and behind noise, as a microphone hears it. The codes then cannot carry either, and a conversion keeps the
target voice when the input is a real microphone in a real room.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import ModelConfig, TrainConfig
from .frontend import Frontend, mel_centers, mel_filters

NEPER_PER_DB = math.log(10) / 10  # log-mel is ln(power)
DECAY_60DB = math.log(1e6)  # ln of the power ratio a 60 dB decay (RT60) spans


class RoomAugment:
    """Reverberation and additive noise in the mel *power* domain, per segment [B, n_mels, T].

    * reverb (probability ``reverb_prob``): the power of each bin gets a diffuse tail, a causal exponential decay
      whose RT60 is drawn in ``reverb_rt60`` s (shorter towards the top bin by a random damping up to 50%: air
      and walls absorb highs), at a direct-to-reverberant ratio drawn in ``reverb_drr_db``. The segment is
      assumed to follow speech of its own mean power (a tail already sounding at its first frame, as in the
      middle of an utterance). Power adds because a late tail is uncorrelated with the direct sound.
    * noise (probability ``noise_prob``): white noise through the frontend's own analysis (so each bin's level
      and frame-to-frame fluctuation are a real noise floor's), tilted by a random slope of -6..0 dB per octave
      (white to brown: fans, hum, street), at an SNR drawn in ``noise_snr_db`` against the segment's mean power
      (bandwidth-weighted, as a waveform's SNR is).
    """

    BANK_FRAMES = 4096

    def __init__(self, cfg: ModelConfig, train: TrainConfig, seed: int = 0) -> None:
        self.hop_s = cfg.hop_length / cfg.sample_rate
        self.reverb_prob, self.rt60, self.drr_db = train.reverb_prob, train.reverb_rt60, train.reverb_drr_db
        self.noise_prob, self.snr_db = train.noise_prob, train.noise_snr_db
        self.taps = math.ceil(self.rt60[1] / self.hop_s)  # the longest tail has decayed 60 dB by then
        self.u = torch.linspace(0.0, 1.0, cfg.n_mels)[:, None]  # [n_mels, 1] position along the mel axis
        octaves = torch.from_numpy(np.log2(mel_centers(cfg) / 1000.0)).float()
        self.octaves = octaves[:, None]  # [n_mels, 1] relative to 1 kHz
        # a mel bin holds its band's mean power density (Slaney filters: equal sums), so a signal's power is the
        # bins weighted by their bandwidths (~1 / the filter's peak): SNR is a ratio of signal powers
        bw = 1.0 / mel_filters(cfg).max(axis=1)
        self.bandwidth = torch.from_numpy(bw / bw.mean()).float()[:, None]  # [n_mels, 1]
        self.bank = self._noise_bank(cfg, seed) if self.noise_prob > 0 else None

    @classmethod
    def _noise_bank(cls, cfg: ModelConfig, seed: int) -> torch.Tensor:
        """Mel power [n_mels, BANK_FRAMES] of unit-variance white noise, by the frontend's own analysis."""
        fe = Frontend(cfg)
        g = torch.Generator().manual_seed(seed)
        skip = cfg.win_length // cfg.hop_length  # the first frames see the zero left-padding
        x = torch.randn(1, (cls.BANK_FRAMES + skip) * cfg.hop_length, generator=g)
        with torch.no_grad():
            return torch.exp(fe.log_mel(fe.frames(x)))[0, :, skip:]

    @property
    def active(self) -> bool:
        return self.reverb_prob > 0 or self.noise_prob > 0

    @staticmethod
    def _draw(n: int, lo_hi: tuple[float, float], gen: torch.Generator | None) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    def reverb(self, power: torch.Tensor, rt60: torch.Tensor, drr_db: torch.Tensor,
               damping: torch.Tensor) -> torch.Tensor:
        """power [B, M, T], rt60 / drr_db / damping [B] -> reverberant power [B, M, T]."""
        b, m, t = power.shape
        u = self.u.to(power.device)[None]
        rt = (rt60[:, None, None] * (1 - damping[:, None, None] * u)).clamp(min=self.hop_s)  # [B, M, 1]
        d = torch.exp(-DECAY_60DB * self.hop_s / rt)  # power kept per frame
        # tail h[j] = a d^j (j >= 1) with sum_j a d^j = 10^(-drr/10): the reverberant / direct energy ratio
        a = torch.pow(10.0, -drr_db / 10)[:, None, None] * (1 - d) / d
        j = torch.arange(1, self.taps + 1, dtype=power.dtype, device=power.device)
        h = a * torch.pow(d, j)  # [B, M, taps]
        pre = power.mean(dim=2, keepdim=True).expand(b, m, self.taps)  # speech before the segment
        x = torch.cat([pre, power], dim=2)
        n = x.shape[2] + self.taps
        kernel = torch.cat([torch.zeros_like(h[..., :1]), h], 2)  # no tail at lag 0: that is the direct sound
        tail = torch.fft.irfft(torch.fft.rfft(x, n) * torch.fft.rfft(kernel, n), n)
        return power + tail[..., self.taps:self.taps + t].clamp(min=0)

    def noise(self, power: torch.Tensor, snr_db: torch.Tensor, slope_db: torch.Tensor,
              start: torch.Tensor) -> torch.Tensor:
        """power [B, M, T] + coloured noise at ``snr_db`` [B] (slope dB/octave [B], bank offsets [B])."""
        t = power.shape[2]
        idx = start[:, None] + torch.arange(t)[None]  # [B, T]
        n = self.bank[:, idx].permute(1, 0, 2).to(power.device)  # [B, M, T]
        # slope s dB/octave: power gain 10^(s * octaves / 10)
        n = n * torch.pow(10.0, self.octaves.to(power.device)[None] * slope_db[:, None, None] / 10)
        bw = self.bandwidth.to(power.device)[None]
        ratio = (power * bw).sum(1).mean(1) / (n * bw).sum(1).mean(1) / torch.pow(10.0, snr_db / 10)  # [B]
        return power + ratio[:, None, None] * n

    def __call__(self, log_mel: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Un-normalised log-mel [B, n_mels, T] -> the same, each segment in its own room / noise draw."""
        b, dev = log_mel.shape[0], log_mel.device
        power = torch.exp(log_mel)
        if self.reverb_prob > 0:
            on = (torch.rand(b, generator=gen) < self.reverb_prob).to(dev)
            draws = [self._draw(b, self.rt60, gen), self._draw(b, self.drr_db, gen),
                     0.5 * torch.rand(b, generator=gen)]
            wet = self.reverb(power, *(v.to(dev) for v in draws))
            power = torch.where(on[:, None, None], wet, power)
        if self.noise_prob > 0:
            on = (torch.rand(b, generator=gen) < self.noise_prob).to(dev)
            start = torch.randint(0, self.bank.shape[1] - log_mel.shape[2] + 1, (b,), generator=gen)
            draws = [self._draw(b, self.snr_db, gen), -6 * torch.rand(b, generator=gen)]
            noisy = self.noise(power, *(v.to(dev) for v in draws), start)
            power = torch.where(on[:, None, None], noisy, power)
        return torch.log(power)


class ContentAugment:
    """Training augmentation for the content encoder: its input log-mel is changed in ways that say *who* speaks
    and *through what*, never *what*, while the decoder must rebuild the unchanged mel of the segment's own
    speaker; so the codes cannot carry them. Measured motive: an unseen source (kal, LPC diphone voice)
    converted at similarity 0.77 to the targets where a training voice's unseen sentences reach 0.87.

    * formant warp: the frequency axis scaled by a random factor per segment (log-uniform in [1/(1+w), 1+w]):
      what a longer or shorter vocal tract does to formants (linear interpolation between mel bins at the
      scaled centre frequencies);
    * spectral colour: a random smooth gain curve per segment (3 cosine terms over the mel axis, at most
      ``eq_db`` dB): voice quality (tilt of the glottal source) and microphone / room colouring.

    * room and noise (``room``, :class:`RoomAugment`), between the two: a voice is warped by its vocal tract,
      then heard in a room, then coloured by the microphone.

    All act on un-normalised log-mel (bins have their own statistics: normalisation is undone and redone)."""

    def __init__(self, cfg: ModelConfig, mel_mean: np.ndarray, mel_std: np.ndarray, width: float,
                 eq_db: float = 0.0, room: RoomAugment | None = None) -> None:
        self.centers = mel_centers(cfg)
        self.mean = torch.as_tensor(mel_mean, dtype=torch.float32)[:, None]
        self.std = torch.as_tensor(mel_std, dtype=torch.float32)[:, None]
        self.width, self.eq_db = width, eq_db
        self.room = room if room is not None and room.active else None
        u = torch.linspace(0.0, 1.0, cfg.n_mels)
        self.basis = torch.stack([torch.cos(math.pi * k * u) for k in (1, 2, 3)])  # [3, n_mels]

    def matrix(self, alpha: float) -> torch.Tensor:
        """[n_mels, n_mels] W with warped = W @ log_mel: output bin k reads the input at centre_k / alpha."""
        n = self.centers.shape[0]
        pos = np.interp(self.centers / alpha, self.centers, np.arange(n))  # fractional input bin, clamped
        lo = np.minimum(np.floor(pos).astype(int), n - 2)
        frac = pos - lo
        w = np.zeros((n, n), np.float32)
        w[np.arange(n), lo] = 1 - frac
        w[np.arange(n), lo + 1] += frac
        return torch.from_numpy(w)

    def __call__(self, mel: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """normalised mel [B, n_mels, T] -> the same, each segment warped and coloured by its own draw."""
        if self.width <= 0 and self.eq_db <= 0 and self.room is None:
            return mel
        mean, std = self.mean.to(mel.device), self.std.to(mel.device)
        log_mel = mel * std + mean
        if self.width > 0:
            r = math.log1p(self.width)
            alphas = torch.exp((2 * torch.rand(mel.shape[0], generator=gen) - 1) * r).tolist()
            log_mel = torch.bmm(torch.stack([self.matrix(a) for a in alphas]).to(mel.device), log_mel)
        if self.room is not None:
            log_mel = self.room(log_mel, gen)
        if self.eq_db > 0:
            # 3 cosine terms of at most eq_db/3 each
            coef = (2 * torch.rand(mel.shape[0], 3, generator=gen) - 1) * (self.eq_db / 3 * NEPER_PER_DB)
            log_mel = log_mel + (coef @ self.basis).to(mel.device)[:, :, None]
        return (log_mel - mean) / std


