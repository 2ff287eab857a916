"""Vocoders: the offline Parallel WaveGAN teacher, the small causal streaming student, the discriminator and
the multi-resolution STFT loss.

Teacher (Yamamoto et al. 2020's generator, 30 non-causal dilated gated layers) and student (causal everywhere) are
both driven by an :class:`Excitation` (harmonic sines at the pitch the decoder was given, plus deterministic
noise) instead of PWG's noise, and both add their output to the same envelope synthesis; their residual stacks run
at ``sample_rate / r`` (r = last upsample factor) and a sub-pixel head emits r samples per step, so one 10 ms hop
costs 60 steps instead of 240.
In streaming, each student layer is *one GEMM* (the dilated taps of x and the conditioning stacked) plus
the residual / skip 1x1 accumulated in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass

from .config import Config, ModelConfig, StudentConfig, TeacherConfig, TrainConfig
from .envelope import EnvelopeSynth, hash_noise, pitch_to_f0, run_phase
from .streaming import CausalConv1d, StreamingModule, gemm, receptive_field


# ------------------------------------------------------------------------------------------------ teacher

class _TeacherLayer(nn.Module):
    def __init__(self, res: int, gate: int, skip: int, aux: int, k: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(res, gate, k, padding=(k - 1) // 2 * dilation, dilation=dilation)
        self.aux = nn.Conv1d(aux, gate, 1, bias=False)
        self.out = nn.Conv1d(gate // 2, res + skip, 1)
        self.res = res

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (self.conv(x) + self.aux(c)).chunk(2, dim=1)
        o = self.out(torch.tanh(a) * torch.sigmoid(b))
        return (x + o[:, : self.res]) * math.sqrt(0.5), o[:, self.res:]


class Teacher(nn.Module):
    """Offline Parallel WaveGAN generator, source-filter driven: mel [B, n_mels, N] + pitch [B, 2, N] ->
    wav [B, 1, N*hop].

    PWG's non-causal stack of dilated gated layers (paper size by default: 30 layers, 64 channels), fed like the
    student: the :class:`Excitation` (harmonic sines at the given pitch + noise, in place of PWG's white noise) and
    the envelope synthesis, to which its sub-pixel head's output is added (zero-initialised: it starts as the
    synthesis and learns a residual). Why not PWG's noise input: from noise a teacher needs ~400k GPU steps to
    learn periodicity; given the periods it learns to shape them in thousands, so a teacher is trainable on a CPU
    too. The stack runs at ``sample_rate / r`` (r = the last upsample factor), as the student's; the envelope
    synthesis is the ``[student]`` section's (``envelope_*``, ``voiced_noise``, ``harmonics``), so teacher and
    student differ only in what their networks add -- the part distillation transfers."""

    def __init__(self, mcfg: ModelConfig, cfg: TeacherConfig, scfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        *self.factors, self.sub = cfg.upsample_factors
        self.upsample = nn.ModuleList()
        for f in self.factors:  # nearest stretch + smoothing along time only, as in PWG
            conv = nn.Conv2d(1, 1, (1, 2 * f + 1), padding=(0, f), bias=False)
            nn.init.constant_(conv.weight, 1.0 / (2 * f + 1))
            self.upsample.append(conv)
        self.source = Excitation(mcfg.sample_rate, mcfg.hop_length, self.sub, scfg.harmonics)
        self.synth = EnvelopeSynth(mcfg, scfg)
        self.first = nn.Conv1d((scfg.harmonics + 2) * self.sub, cfg.residual_channels, 1)  # excitation ++ synthesis
        per = cfg.layers // cfg.stacks
        self.layers = nn.ModuleList(
            _TeacherLayer(cfg.residual_channels, cfg.gate_channels, cfg.skip_channels, mcfg.n_mels, cfg.kernel_size,
                          2 ** (i % per))
            for i in range(cfg.layers))
        self.last = nn.Sequential(nn.ReLU(), nn.Conv1d(cfg.skip_channels, cfg.skip_channels, 1), nn.ReLU(),
                                  nn.Conv1d(cfg.skip_channels, self.sub, 1))
        nn.init.zeros_(self.last[-1].weight)
        nn.init.zeros_(self.last[-1].bias)

    @classmethod
    def build(cls, cfg: Config) -> "Teacher":
        return cls(cfg.model, cfg.teacher, cfg.student)

    def upsample_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, N] -> [B, n_mels, N * hop / r] (the stack's step rate)."""
        c = mel[:, None]
        for f, conv in zip(self.factors, self.upsample):
            c = conv(c.repeat_interleave(f, dim=3))
        return c[:, 0]

    def forward(self, mel: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        c = self.upsample_mel(mel)
        pitch = self.synth.voiced(mel, pitch)
        dsp = self.synth(mel, pitch)                                                          # [B, 1, T]
        x, skips = self.first(torch.cat([self.source(pitch), fold(dsp, self.sub)], dim=1)), 0.0
        for layer in self.layers:
            x, s = layer(x, c)
            skips = skips + s
        y = self.last(skips * math.sqrt(1.0 / len(self.layers)))                              # [B, r, T/r]
        return unfold(y) + dsp


# ------------------------------------------------------------------------------------------------ student

@dataclass
class ExcitationState:
    """Per stream: the fundamental's phase (radians, float64 so hours of audio stay exact) ``phase`` [B] and the
    number of samples emitted so far ``count`` [B] (int64: the noise counter)."""

    phase: torch.Tensor
    count: torch.Tensor


class Excitation(StreamingModule):
    """Source signal for the student, folded to its step rate: pitch [B, 2, N] (normalised held log-F0 and
    voicing, as the decoder gets it) -> [B, (harmonics + 1) * sub, N * hop / sub]. Channel ``j * sub + r`` at step
    t holds sample ``t * sub + r`` of source j: sin(k * phase) for k = 1..harmonics (zero when unvoiced or when
    k * F0 is above 0.95 Nyquist), then noise. F0 is held per frame; the phase runs continuously across frames
    and chunks (state), so no click at hop edges."""

    def __init__(self, sample_rate: int, hop: int, sub: int, harmonics: int) -> None:
        super().__init__()
        self.rate, self.hop, self.sub, self.harmonics = sample_rate, hop, sub, harmonics
        self.register_buffer("k", torch.arange(1, harmonics + 1, dtype=torch.float64), persistent=False)

    def init_state(self, batch, device, dtype):
        return ExcitationState(torch.zeros(batch, dtype=torch.float64, device=device),
                               torch.zeros(batch, dtype=torch.int64, device=device))

    def forward(self, pitch: torch.Tensor) -> torch.Tensor:
        b, _, n = pitch.shape
        f0 = pitch_to_f0(pitch)                                                              # [B, N]
        phase = run_phase(f0, self.hop, self.rate, self._state)                              # [B, T]
        f0 = f0.repeat_interleave(self.hop, dim=1)
        n0 = self._state.count[:, None] if self._state is not None else torch.zeros(b, 1, dtype=torch.int64, device=pitch.device)
        idx = n0 + torch.arange(f0.shape[1], device=pitch.device)[None]
        if self._state is not None:
            self._state.count.add_(f0.shape[1])
        k = self.k[None, :, None]
        audible = (f0[:, None] > 0) & (k * f0[:, None] < 0.475 * self.rate)  # voiced, below 0.95 Nyquist
        sines = torch.sin(k * phase[:, None]) * audible                                    # [B, H, T]
        src = torch.cat([sines, hash_noise(idx)[:, None]], dim=1).to(pitch.dtype)        # [B, H+1, T]
        return fold(src, self.sub)


def fold(x: torch.Tensor, sub: int) -> torch.Tensor:
    """[B, C, T] -> [B, C*sub, T/sub]: channel ``j*sub + r`` at step t holds sample ``t*sub + r`` of channel j."""
    b, _, t = x.shape
    return x.reshape(b, -1, t // sub, sub).transpose(2, 3).reshape(b, -1, t // sub)


def unfold(y: torch.Tensor) -> torch.Tensor:
    """A sub-pixel head's output [B, sub, T/sub] -> wav [B, 1, T]: step t emits samples ``t*sub .. t*sub + sub-1``
    (``fold`` of one channel, inverted)."""
    return y.transpose(1, 2).reshape(y.shape[0], 1, -1)

class _StudentLayer(StreamingModule):
    """Causal gated layer: GLU(dilated conv(x) + aux(c)) -> residual and skip 1x1.

    Streaming, per chunk: one GEMM over [dilated taps of x; c] (the conditioning enters the same matrix), one
    GLU, and two in-place GEMM accumulations into x and the skip sum (7 torch ops; op overhead, not arithmetic,
    dominates a 10 ms chunk on CPU). GLU (a * sigmoid(b)) instead of PWG's tanh(a) * sigmoid(b): one op, and
    the student only has to imitate the teacher's output, not its architecture.
    """

    def __init__(self, ch: int, aux: int, k: int, dilation: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(ch, 2 * ch, k, dilation)
        self.aux = nn.Conv1d(aux, 2 * ch, 1, bias=False)
        self.res = nn.Conv1d(ch, ch, 1)
        self.skip = nn.Conv1d(ch, ch, 1, bias=False)

    def init_state(self, batch, device, dtype):
        self._w = torch.cat([self.conv.gemm_weight(), self.aux.weight[:, :, 0]], dim=1).detach().contiguous()
        self._b = self.conv.bias.detach()[:, None].contiguous()
        self._wr, self._ws = self.res.weight[:, :, 0].detach().contiguous(), self.skip.weight[:, :, 0].detach().contiguous()
        self._br = self.res.bias.detach()[:, None].contiguous()
        return None

    def forward(self, x: torch.Tensor, c: torch.Tensor, skips: torch.Tensor) -> torch.Tensor:
        """x [B, ch, T], c [B, aux, T]; adds this layer's skip output into ``skips`` [B, ch, T] (in place when
        streaming); returns the new x."""
        if self.conv.is_streaming and x.shape[0] == 1 and not x.is_cuda:
            g = F.glu(gemm(self._w, self._b, self.conv.taps(x, extra=c)), dim=1)[0]
            skips[0].addmm_(self._ws, g)
            x[0].addmm_(self._wr, g).add_(self._br)
            return x
        if self.conv.is_streaming:  # many streams / GPU: the fused custom op (one launch, state in place)
            import kernels.student_layer  # noqa: F401  (registers torch.ops.rtvc.student_layer)
            return torch.ops.rtvc.student_layer(x, c, self.conv._state.past, self._w, self._b[:, 0], self._wr,
                                                self._br[:, 0], self._ws, skips, self.conv.d)
        g = F.glu(self.conv(x) + self.aux(c), dim=1)
        skips += self.skip(g)
        return x + self.res(g)


class Student(StreamingModule):
    """Causal streaming vocoder. mel [B, n_mels, N] + pitch [B, 2, N] -> wav [B, 1, N*hop]; ``hop`` samples per
    mel frame."""

    def __init__(self, mcfg: ModelConfig, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg, n_mels, sample_rate = cfg, mcfg.n_mels, mcfg.sample_rate
        *ups, self.sub = cfg.upsample_factors
        a, ch = cfg.aux_channels, cfg.residual_channels
        self.cond = CausalConv1d(n_mels, a, 2)
        self.ups = nn.ModuleList(CausalConv1d(a, a, 3) for _ in ups)
        self.source = Excitation(sample_rate, math.prod(cfg.upsample_factors), self.sub, cfg.harmonics)
        self.synth = EnvelopeSynth(mcfg, cfg)
        # conditioning ++ folded excitation ++ folded envelope synthesis
        self.first = CausalConv1d(a + (cfg.harmonics + 2) * self.sub, ch, 1)
        per = cfg.layers // cfg.stacks
        self.layers = nn.ModuleList(_StudentLayer(ch, a, cfg.kernel_size, 2 ** (i % per)) for i in range(cfg.layers))
        # The last layer's residual output feeds nothing, so its 1x1 never gets a gradient: frozen, because DDP
        # stops at the second step on a trainable parameter without one. (Streaming still computes it: ~2% of the
        # layers' arithmetic, kept so every layer runs the same fused op.)
        self.layers[-1].res.requires_grad_(False)
        self.head1 = CausalConv1d(ch, ch, 1)
        self.head2 = CausalConv1d(ch, self.sub, 1)
        nn.init.zeros_(self.head2.weight)  # the network starts as a pure residual on the envelope synthesis
        nn.init.zeros_(self.head2.bias)

    @property
    def receptive_field(self) -> int:
        """In output samples."""
        return receptive_field([l.conv for l in self.layers]) * self.sub

    def forward(self, mel: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        c = F.leaky_relu(self.cond(mel), 0.2)
        for f, conv in zip(self.cfg.upsample_factors, self.ups):
            c = F.leaky_relu(conv(c.repeat_interleave(f, dim=2)), 0.2)
        pitch = self.synth.voiced(mel, pitch)
        dsp = self.synth(mel, pitch)                                                          # [B, 1, T]
        x = self.first(torch.cat([c, self.source(pitch), fold(dsp, self.sub)], dim=1))
        skips = torch.zeros_like(x)
        for layer in self.layers:
            x = layer(x, c, skips)
        y = self.head2(F.leaky_relu(self.head1(F.leaky_relu(skips, 0.2)), 0.2))  # [B, sub, T/sub]
        return unfold(y) + dsp


# ------------------------------------------------------------------------------------------ discriminator

class Discriminator(nn.Module):
    """Parallel WaveGAN discriminator: 10 dilated conv layers, 64 channels. wav [B, 1, T] -> scores [B, 1, T]."""

    def __init__(self, layers: int = 10, channels: int = 64) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = 1
        for i in range(layers - 1):
            d = 1 if i == 0 else i
            mods += [nn.Conv1d(c_in, channels, 3, padding=d, dilation=d), nn.LeakyReLU(0.2)]
            c_in = channels
        mods.append(nn.Conv1d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.net(wav)


# ------------------------------------------------------------------------------------------------ losses

def _magnitude(spec: torch.Tensor) -> torch.Tensor:
    return (spec.real.square() + spec.imag.square()).clamp(min=1e-7).sqrt()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over resolutions. y_hat, y [B, T] -> (sc, mag)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.res = list(zip(cfg.stft_fft_sizes, cfg.stft_hop_sizes, cfg.stft_win_sizes))
        for i, (_, _, w) in enumerate(self.res):
            self.register_buffer(f"win{i}", torch.hann_window(w), persistent=False)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sc = mag = 0.0
        for i, (n_fft, hop, win) in enumerate(self.res):
            w = getattr(self, f"win{i}")
            # Floor the *power* at 1e-7 (magnitude 3.2e-4, as Parallel WaveGAN does): a magnitude floor of 1e-7
            # lets near-silent bins (pauses, the empty band above 8 kHz of 16 kHz corpora) reach log|S| = -16 and
            # dominate the log-magnitude term with detail nobody can hear.
            s_hat = _magnitude(torch.stft(y_hat, n_fft, hop, win, w, return_complex=True))
            s = _magnitude(torch.stft(y, n_fft, hop, win, w, return_complex=True))
            sc = sc + torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp(min=1e-7)
            mag = mag + F.l1_loss(torch.log(s_hat), torch.log(s))
        return sc / len(self.res), mag / len(self.res)
