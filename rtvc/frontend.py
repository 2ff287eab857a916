"""Causal analysis: log-mel and YIN pitch per hop, from a window that *ends* at the newest sample.

Frame ``t`` covers samples ``[(t+1)*hop - win, (t+1)*hop)``: it is complete the moment hop ``t`` has arrived,
so analysis adds no lookahead (the window's centre lies (win/2) in the past; the models learn with that).
Offline, the signal is left-padded with ``win - hop`` zeros; streaming, those samples come from the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import librosa
import numpy as np
import torch
from numba import njit

from .config import ModelConfig
from .streaming import StreamingModule

# log-F0 normalisation shared by training and conversion: z = (ln f0 - LF0_MEAN) / LF0_STD
LF0_MEAN, LF0_STD = math.log(150.0), 0.5
LOG_EPS = 1e-5


@dataclass
class FrameState:
    past: torch.Tensor  # [B, win - hop] the samples before the current hop


class Frontend(StreamingModule):
    """wav [B, N*hop] -> frames [B, N, win] -> normalised log-mel [B, n_mels, N] (+ F0 via :func:`yin`).

    ``mel_mean`` / ``mel_std`` [n_mels] are corpus statistics set by data preparation and saved with models.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.hop, self.win = cfg, cfg.hop_length, cfg.win_length
        fb = mel_filters(cfg)
        self.register_buffer("fb", torch.from_numpy(fb).float(), persistent=False)  # [n_mels, n_fft//2+1]
        self.register_buffer("window", torch.hann_window(self.win, periodic=True), persistent=False)
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))

    receptive_field = property(lambda self: self.win)

    @property
    def analysis_delay(self) -> float:
        """Samples by which the analysis window's centre trails the centre of the hop it drives, (win - hop) / 2:
        where the output's content (pitch, envelope) sits relative to the input: a causal window's group delay,
        not lookahead (every input sample still reaches the output within the one-hop algorithmic latency).
        15 ms at the default 40 ms window and 10 ms hop."""
        return (self.win - self.hop) / 2

    def init_state(self, batch, device, dtype):
        return FrameState(torch.zeros(batch, self.win - self.hop, device=device, dtype=dtype))

    def frames(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, N*hop] -> [B, N, win]; streaming keeps the last ``win - hop`` samples."""
        if wav.shape[-1] % self.hop:
            raise ValueError(f"frontend input must be whole hops of {self.hop} samples, got {wav.shape[-1]}")
        if not self.is_streaming:
            full = torch.nn.functional.pad(wav, (self.win - self.hop, 0))
        else:
            st: FrameState = self._state  # type: ignore[assignment]
            full = torch.cat([st.past, wav], dim=1)
            st.past.copy_(full[:, full.shape[1] - (self.win - self.hop):])
        return full.unfold(1, self.win, self.hop)

    def log_mel(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, N, win] -> log-mel [B, n_mels, N] (un-normalised)."""
        spec = torch.fft.rfft(frames * self.window, n=self.cfg.n_fft)
        power = spec.real.square() + spec.imag.square()
        return torch.log(torch.clamp(self.fb @ power.transpose(1, 2), min=LOG_EPS))

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, N*hop] -> (normalised log-mel [B, n_mels, N], frames [B, N, win] for pitch tracking)."""
        fr = self.frames(wav)
        return self.normalize(self.log_mel(fr)), fr

    def numpy_args(self, slot: int = 0) -> tuple:
        """Arguments of :func:`stream_numpy`: numpy views of the filterbank, window, statistics and batch slot
        ``slot``'s streaming history (inside ``streaming()``), so both paths share one state."""
        return (self._state.past[slot].numpy(), self.window.numpy(), self.fb.numpy(), self.mel_mean.numpy(),
                self.mel_std.numpy(), self.hop, self.cfg.n_fft)


def stream_numpy(wav: np.ndarray, args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Frontend.forward` streaming for one stream, one numba call (what the fused CPU step runs: eager
    torch spends ~4x as long on op dispatch for one 10 ms hop): wav [N*hop] float32 -> (normalised log-mel
    [n_mels, N] float32, frames [N, win]); ``args``: :meth:`Frontend.numpy_args` (its history advances)."""
    hop = args[5]
    if wav.ndim != 1 or wav.shape[0] % hop:
        raise ValueError(f"frontend input must be whole hops of {hop} samples, got shape {wav.shape}")
    return _log_mel_stream(wav, *args)


@njit(cache=True, nogil=True)
def _log_mel_stream(wav, past, window, fb, mean, std, hop, n_fft):  # pragma: no cover - numba
    p, win, n = past.shape[0], window.shape[0], wav.shape[0] // hop
    full = np.empty(p + wav.shape[0], np.float32)
    full[:p] = past
    full[p:] = wav
    past[:] = full[full.shape[0] - p:]
    frames = np.empty((n, win), np.float32)
    for i in range(n):
        frames[i] = full[i * hop:i * hop + win]
    spec = np.fft.rfft(frames * window, n=n_fft)  # rocket-fft: numpy's FFT inside numba
    power = np.empty((spec.shape[1], n), np.float32)  # [F, N]
    for i in range(n):
        for f in range(spec.shape[1]):
            power[f, i] = spec[i, f].real * spec[i, f].real + spec[i, f].imag * spec[i, f].imag
    mel = np.dot(fb, power)
    for b in range(mel.shape[0]):
        for i in range(n):
            mel[b, i] = (np.log(max(mel[b, i], np.float32(LOG_EPS))) - mean[b]) / std[b]
    return mel, frames


def mel_filters(cfg: ModelConfig) -> np.ndarray:
    """The frontend's mel filter bank [n_mels, n_fft // 2 + 1] (librosa, Slaney-normalised)."""
    return librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)


def mel_centers(cfg: ModelConfig) -> np.ndarray:
    """Centre frequencies (Hz) [n_mels] of the frontend's mel filters (librosa's bank: n_mels + 2 edges)."""
    return librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)[1:-1]


# ------------------------------------------------------------------------------------------------ pitch

TRACK = 6  # tracker state entries (see new_track)
# In-range rough onsets (model.yin_onset_range) need the speaker's mean ln F0 from at least this many voiced frames
# (50 ms; or a calibration), which then follows the last ~RANGE_FRAMES voiced frames (5 s of voicing)
ONSET_RANGE_AFTER, RANGE_FRAMES = 5.0, 500.0

@njit(cache=True, nogil=True)
def _shorter(d, g, tau_min, tau_max, loose, margin):  # pragma: no cover
    """Octave check of a period candidate ``g`` on the normalised difference ``d``: the dip near g/2 (twice, for
    g/4) if it is below ``loose`` and less than ``margin`` above d[g]. Why: a rough voice's dip at twice its period
    can be the first below the strict threshold, or the deepest (held-out source: the first 0.2 s of one sentence
    at 52 Hz instead of 100), and continuity, which never jumps an octave, then holds the voice an octave low for
    the whole stretch. Onsets only: checking continuing frames too (moving up to a strictly deeper half-period
    dip) made 2.2% of the held-out source's frames an octave high (vs RAPT, 20 sentences)."""
    for _ in range(2):
        c = int(g / 2 + 0.5)
        if c + 2 < tau_min:  # no half period within the search range
            break
        h = max(tau_min, c - 2)
        for tau in range(h + 1, min(tau_max - 1, c + 2) + 1):
            if d[tau] < d[h]:
                h = tau
        if not (h < g and d[h] < loose and d[h] < d[g] + margin):
            break
        g = h
    return g


@njit(cache=True, nogil=True)
def _yin(frames, sr, fmin, fmax, threshold, loose, max_jump, hold, confirm, release, octave, onset_range, dec,
         track, f0, voiced):  # pragma: no cover
    n, w = frames.shape
    m = w // dec
    x = np.empty(m, np.float64)
    rate = sr / dec
    tau_min = max(2, int(rate / fmax))
    tau_max = min(m // 2, int(math.ceil(rate / fmin)))
    wi = m - tau_max
    d = np.empty(tau_max + 2, np.float64)
    for i in range(n):
        f0[i] = 0.0
        voiced[i] = False
        track[1] += 1.0  # frames since the last voiced one (reset below when this one is voiced)
        # decimate by averaging `dec` samples: the pitch search needs no more than ~12 kHz
        energy = 0.0
        for j in range(m):
            acc = 0.0
            for k in range(dec):
                acc += frames[i, j * dec + k]
            x[j] = acc / dec
            energy += x[j] * x[j]
        if energy / m < 1e-7:  # below -70 dBFS: silence
            track[2] = 0.0
            track[3] = 0.0
            continue
        # YIN difference function and cumulative-mean normalisation
        d[0] = 1.0
        run = 0.0
        for tau in range(1, tau_max + 1):
            s = 0.0
            for j in range(wi):
                diff = x[j] - x[j + tau]
                s += diff * diff
            run += s
            d[tau] = s * tau / run if run > 0 else 1.0
        best = -1
        prev = track[0]
        cont = prev > 0 and track[1] <= hold
        if cont:
            # continuing a voiced stretch: the dip below the loose threshold nearest the tracked period (a dip's
            # depth plus its log-distance), never one more than max_jump away: junk dips at small lags in
            # fricative-voiced frames were 5% of the held-out source's frames (3-7x F0), each ruining the contour
            cost = 1e9
            for tau in range(max(tau_min, 1), tau_max):
                if d[tau] < loose and d[tau] <= d[tau - 1] and d[tau] < d[tau + 1]:
                    jump = abs(math.log(tau / prev))
                    if jump <= max_jump and d[tau] + jump < cost:
                        cost = d[tau] + jump
                        best = tau
        else:
            # a voiced stretch starts at YIN's own rule: the first dip below the strict threshold ...
            for tau in range(tau_min, tau_max):
                if d[tau] < threshold:
                    while tau + 1 < tau_max and d[tau + 1] < d[tau]:
                        tau += 1
                    best = tau
                    break
        # ... or at a global minimum below the loose threshold that held its period over `confirm` frames
        g = tau_min
        for tau in range(tau_min + 1, tau_max):
            if d[tau] < d[g]:
                g = tau
        if octave > 0:  # an onset's candidates at the shortest period whose dip is nearly as deep
            g = _shorter(d, g, tau_min, tau_max, loose, octave)
            if best >= 0 and not cont:
                best = _shorter(d, best, tau_min, tau_max, loose, octave)
        if d[g] < loose:
            if track[2] > 0 and abs(math.log(g / track[2])) <= max_jump:
                track[3] += 1.0
            else:
                track[3] = 1.0
            track[2] = g
        else:
            track[2] = 0.0
            track[3] = 0.0
        if best < 0 and not cont and (track[3] >= confirm or (
                onset_range > 0 and track[3] >= 1 and track[5] >= ONSET_RANGE_AFTER
                and abs(math.log(rate / g) - track[4]) <= onset_range)):
            best = g
        if best < 0:
            if track[0] > 0 and track[1] <= release:
                # release: a voiced stretch's last period sounds on for `release` frames (the tracked state stays:
                # these frames neither extend the hold nor start anything)
                f0[i] = rate / track[0]
                voiced[i] = True
            continue
        # parabolic interpolation of the dip
        a, b, c = d[best - 1], d[best], d[best + 1]
        den = a - 2 * b + c
        shift = 0.5 * (a - c) / den if den > 0 else 0.0
        track[0] = best + shift
        track[1] = 0.0
        f0[i] = rate / (best + shift)
        voiced[i] = True
        # the speaker's running mean ln F0 (cumulative, then over the last ~RANGE_FRAMES voiced frames)
        track[5] += 1.0
        track[4] += (math.log(f0[i]) - track[4]) / min(track[5], RANGE_FRAMES)


def new_track(known: PitchStats | None = None) -> np.ndarray:
    """A fresh tracker state [TRACK] float64: tracked period, frames since voiced, onset candidate period and count,
    running mean ln F0 and its voiced-frame count. A ``known`` speaker (measured pitch statistics, a calibration)
    starts with its mean, so in-range onsets start at once from the first word."""
    track = np.zeros(TRACK)
    if known is not None:
        track[4], track[5] = known.mean, ONSET_RANGE_AFTER
    return track


def yin(frames: np.ndarray, cfg: ModelConfig, track: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """frames [N, win] float32 -> (f0 Hz [N] float64, voiced bool [N]); ``track`` [TRACK] float64 is the tracker's
    state (:func:`new_track`; continued and updated in place when streaming; fresh when None)."""
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    n = frames.shape[0]
    f0, voiced = np.zeros(n, np.float64), np.zeros(n, np.bool_)
    dec = max(1, cfg.sample_rate // 12000)
    track = new_track() if track is None else track
    if track.shape != (TRACK,):
        raise ValueError(f"pitch tracker state must have shape ({TRACK},), got {track.shape}")
    _yin(frames, float(cfg.sample_rate), cfg.f0_min, cfg.f0_max, cfg.yin_threshold, cfg.yin_voicing_threshold,
         cfg.yin_max_jump, cfg.yin_hold_frames, cfg.yin_confirm_frames, cfg.yin_release_frames, cfg.yin_octave_margin,
         cfg.yin_onset_range, dec, track, f0, voiced)
    return f0, voiced


def lf0_features(f0: np.ndarray, voiced: np.ndarray, last: float = 0.0) -> tuple[np.ndarray, float]:
    """Decoder pitch input [2, N]: normalised log-F0 (held through unvoiced frames: causal) and voicing.

    ``last`` is the held value before the first frame (streaming state); returns the new held value.
    """
    z = np.zeros((2, f0.shape[0]), np.float32)
    for i in range(f0.shape[0]):
        if voiced[i] and f0[i] > 0:
            last = (math.log(float(f0[i])) - LF0_MEAN) / LF0_STD
        z[0, i] = last
        z[1, i] = float(voiced[i])
    return z, last


@dataclass
class PitchStats:
    """Mean / std of voiced ln F0 for one speaker."""

    mean: float
    std: float


class PitchMapper:
    """Maps source F0 to the target speaker's range: z-score under the source's *running* statistics (causal,
    exponential forgetting over ``tau_frames``), then target mean/std, plus a transpose in semitones.

    The running statistics start from a prior worth ``weights`` = (mean, variance) voiced frames. A source whose
    statistics were measured (``known``, e.g. from a calibration recording) keeps them until ~100 frames say
    otherwise; an unknown one (the corpus mean and a typical speaker's spread) follows its own mean from the
    first voiced frame: a slowly converging mean bends the whole contour of the first seconds (log-F0
    correlation with the source over 10 held-out utterances: 0.65 with a 20-frame prior, 0.75 with 1 frame,
    0.84 with measured statistics; YIN itself scores 0.84)."""

    KNOWN, UNKNOWN = (100.0, 100.0), (1.0, 50.0)

    def __init__(self, prior: PitchStats, known: bool = False, tau_frames: float = 300.0) -> None:
        self.prior, self.alpha = prior, 1.0 / tau_frames
        self.weights = self.KNOWN if known else self.UNKNOWN
        self.reset()

    def reset(self) -> None:
        self.mean, self.var, self.seen = self.prior.mean, self.prior.std ** 2, 0.0

    def __call__(self, f0: np.ndarray, voiced: np.ndarray, target: PitchStats, transpose: float) -> np.ndarray:
        out = np.zeros_like(f0)
        shift = transpose * math.log(2.0) / 12.0
        wm, wv = self.weights
        for i in range(f0.shape[0]):
            if not (voiced[i] and f0[i] > 0):
                continue
            lf = math.log(float(f0[i]))
            self.seen += 1.0
            am, av = max(self.alpha, 1.0 / (self.seen + wm)), max(self.alpha, 1.0 / (self.seen + wv))
            self.mean += am * (lf - self.mean)
            self.var = (1 - av) * (self.var + av * (lf - self.mean) ** 2)
            z = (lf - self.mean) / math.sqrt(max(self.var, 1e-4))
            out[i] = math.exp(target.mean + z * target.std + shift)
        return out


def measure_pitch(wav: np.ndarray, cfg: ModelConfig) -> PitchStats:
    """Voiced ln-F0 mean / std of a recording [n] at the model rate, by the same tracker as conversion (for a
    source's calibration: what the pitch mapping would otherwise have to learn during the first seconds)."""
    fe = Frontend(cfg)
    x = np.pad(np.asarray(wav, np.float32), (0, (-wav.shape[0]) % cfg.hop_length))
    with torch.no_grad():
        frames = fe.frames(torch.from_numpy(x)[None])[0].numpy()
    f0, voiced = yin(frames, cfg)
    if voiced.sum() < 10:
        raise ValueError("too little voiced speech to measure a pitch range (need at least 0.1 s)")
    lf = np.log(f0[voiced].astype(np.float64))
    return PitchStats(float(lf.mean()), float(lf.std()))


class SourcePitch:
    """One stream's causal pitch path: YIN tracker (state: :func:`new_track`; a measured source's mean ln F0 seeds
    its onset range) -> mapping to the target's range (:class:`PitchMapper`) -> decoder features
    (:func:`lf0_features`, held log-F0)."""

    def __init__(self, cfg: ModelConfig, prior: PitchStats, known: bool = False) -> None:
        self.cfg, self.mapper, self.held = cfg, PitchMapper(prior, known), 0.0
        self.known = prior if known else None
        self.track = new_track(self.known)
        self.last_voiced = np.zeros(0, bool)

    def reset(self) -> None:
        self.mapper.reset()
        self.track[:] = new_track(self.known)
        self.held = 0.0

    def set_prior(self, prior: PitchStats, known: bool = False) -> None:
        """A new calibration (or none): the pitch mapping's statistics restart from ``prior``, and so does the
        tracker's running mean (the onset range's centre); the tracked period carries on."""
        self.mapper = PitchMapper(prior, known)
        self.known = prior if known else None
        self.track[4:] = new_track(self.known)[4:]

    def __call__(self, frames: np.ndarray, target: PitchStats, transpose: float) -> np.ndarray:
        """frames [N, win] (the frontend's analysis windows) -> decoder pitch input [2, N] float32."""
        f0, voiced = yin(frames, self.cfg, self.track)
        self.last_voiced = voiced  # [N] bool: what the last call tracked as voiced (rtvc.centring.ContentLearner)
        pitch, self.held = lf0_features(self.mapper(f0, voiced, target, transpose), voiced, self.held)
        return pitch
