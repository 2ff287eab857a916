"""VoiceConverter: frontend -> encoder -> VQ -> decoder -> student vocoder, one hop at a time.

The same ``_run`` serves streaming (inside the modules' streaming state) and offline (whole utterance, no
state), so ``convert_offline(x) == concat(convert(hop) for hop in x)`` up to float rounding (tests: 1e-5).
Algorithmic latency: one hop (the frontend's window ends at the newest sample; every conv is causal; the
student emits the samples of hop t from mel frame t), i.e. 10 ms at the default config, before resampling.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .centring import ContentLearner
from .checkpoint import load_checkpoint
from .config import Config
from .frontend import Frontend, PitchStats, SourcePitch, stream_numpy
from .streaming import StreamingModule
from .vocoder import Student
from .vqvae import VQVAE, content_mean


STAGES = ("frontend", "pitch", "encoder", "vq+decoder", "encoder+vq+decoder (fused)", "vocoder")  # profiled


@dataclass
class StageTimes:
    """Seconds per call of each stage (filled only when profiling)."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STAGES})


class VoiceModel(StreamingModule):
    """The streaming stack's modules, built from a config (what a voice-model file holds)."""

    def __init__(self, cfg: Config, speakers: list[str], pitch: dict[str, PitchStats], prior: PitchStats,
                 content: dict[str, list[float]] | None = None) -> None:
        """``content``: each voice's mean content vector [code_dim] (:func:`rtvc.vqvae.content_mean` over its
        training recordings), the reference a measured source is centred on; empty for a model saved without."""
        super().__init__()
        if not speakers:
            raise ValueError("a voice model needs at least one speaker")
        self.cfg, self.speakers, self.pitch, self.prior = cfg, list(speakers), dict(pitch), prior
        self.content = {k: np.asarray(v, np.float32) for k, v in (content or {}).items()}
        self.frontend = Frontend(cfg.model)
        self.vqvae = VQVAE(cfg.model.n_mels, len(speakers), cfg.vqvae)
        self.student = Student(cfg.model, cfg.student)

    @property
    def source_prior(self) -> PitchStats:
        """Pitch statistics assumed for a source nobody measured: the corpus mean, a typical speaker's spread
        (the median of the voices' own, not the pooled spread across voices, which is 3x wider)."""
        spread = float(np.median([p.std for p in self.pitch.values()])) if self.pitch else self.prior.std
        return PitchStats(self.prior.mean, spread)

    def pitch_prior(self, source: PitchStats | None) -> tuple[PitchStats, bool]:
        """(statistics the pitch mapping starts from, whether they were measured) for a source: its measured
        ones if given, else :attr:`source_prior`."""
        return (source, True) if source is not None else (self.source_prior, False)

    @torch.no_grad()
    def measure_content(self, wav: np.ndarray) -> np.ndarray:
        """A source recording [n] at the model rate -> its mean content vector [code_dim] over speech frames (a
        calibration, like :func:`rtvc.frontend.measure_pitch`)."""
        hop = self.cfg.model.hop_length
        if self.vqvae.encoder.is_streaming:  # a streaming encoder would take the recording as the stream's past
            raise RuntimeError("measure_content needs the model out of streaming mode (VoiceConverter.measure_content)")
        x = torch.from_numpy(np.pad(np.asarray(wav, np.float32), (0, (-wav.shape[0]) % hop)))[None]
        mel, _ = self.frontend(x)
        return content_mean(self.vqvae.encoder, [mel[0]]).numpy()

    def content_shift(self, source: np.ndarray | None) -> np.ndarray | None:
        """What source centring adds to a measured source's encoder output [code_dim]: ``vqvae.source_centring``
        x (the voices' mean content - the source's); None when the source or the voices' means were not measured
        or centring is off."""
        if source is None or not self.centres:
            return None
        ref = np.mean(np.stack(list(self.content.values())), 0)
        return (self.cfg.vqvae.source_centring * (ref - np.asarray(source, np.float32))).astype(np.float32)

    @property
    def centres(self) -> bool:
        """Whether source centring applies: it is on and this file records its voices' content means."""
        return bool(self.content) and self.cfg.vqvae.source_centring > 0

    def speaker_id(self, name: str) -> int:
        if name not in self.speakers:
            raise KeyError(f"unknown voice '{name}'; this model has: {', '.join(self.speakers)}")
        return self.speakers.index(name)

    def state_for_file(self) -> dict:
        return {"kind": "voice_model", "config": self.cfg.to_dict(), "speakers": self.speakers,
                "pitch": {k: [v.mean, v.std] for k, v in self.pitch.items()}, "prior": [self.prior.mean, self.prior.std],
                "content": {k: v.tolist() for k, v in self.content.items()},
                "frontend": self.frontend.state_dict(), "vqvae": self.vqvae.state_dict(),
                "student": self.student.state_dict()}

    def save(self, path: str | Path) -> None:
        torch.save(self.state_for_file(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> "VoiceModel":
        ck = load_checkpoint(path, kind="voice_model")
        m = cls(Config.from_saved(ck["config"]), ck["speakers"],
                {k: PitchStats(*v) for k, v in ck["pitch"].items()}, PitchStats(*ck["prior"]), ck.get("content"))
        m.frontend.load_state_dict(ck["frontend"])
        m.vqvae.load_state_dict(ck["vqvae"])
        m.student.load_state_dict(ck["student"])
        return m.eval()


class VoiceConverter:
    """Implements the engine's :class:`~rtvc.converter.Converter` for one target voice (switchable)."""

    def __init__(self, model: VoiceModel, voice: str | None = None, transpose: float = 0.0,
                 device: str | torch.device = "cpu", profile: bool = False, fused: bool = True,
                 source: PitchStats | None = None, content: np.ndarray | None = None,
                 learner: ContentLearner | None = None) -> None:
        """``source``: the speaker's measured pitch statistics (:func:`rtvc.frontend.measure_pitch`), if known;
        otherwise the pitch mapping learns them while they speak. ``content``: their measured mean content
        (:meth:`VoiceModel.measure_content`), if known: the encoder's output is then centred on the training
        voices' (:meth:`VoiceModel.content_shift`). ``learner``: without ``content``, learn it while they speak
        (:class:`rtvc.centring.ContentLearner`, fed every streamed hop; a measured content stops it)."""
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        cfg = model.cfg.model
        self.cfg, self.sample_rate, self.hop, self.latency = model.cfg, cfg.sample_rate, cfg.hop_length, 0
        self.source = source
        self.source_pitch = SourcePitch(cfg, *model.pitch_prior(source))
        self.transpose = float(transpose)
        self._set_shift(content)
        self.learner = learner if content is None and model.centres else None
        self._set_voice(voice or model.speakers[0])
        self.profile, self.times = profile, StageTimes()
        self.model.start_streaming(1)
        # CPU, one stream: the whole step in numpy and numba (fused_step) on the modules' own streaming state
        self.fused = fused and self.device.type == "cpu"
        self._fused_args: tuple | None = None  # fused_args(): views of the streaming state, rebuilt with it
        self._seen: tuple[np.ndarray, np.ndarray] | None = None  # the last hops' encoder output and mel

    def _set_voice(self, voice: str) -> None:
        idx = self.model.speaker_id(voice)
        self.voice = voice
        self.name = voice
        with torch.no_grad():
            self._spk = self.model.vqvae.speakers.weight[idx:idx + 1].detach().clone()
        self._target = self.model.pitch.get(voice, self.model.prior)
        self._fused_args = None  # speaker biases changed / maybe a copied model

    def _set_shift(self, content: np.ndarray | None) -> None:
        shift = self.model.content_shift(content)
        self.content = content
        self._shift = None if shift is None else torch.from_numpy(shift).to(self.device)
        self._fused_args = None  # the fused step's codebook norms carry the shift

    def with_voice(self, voice: str, transpose: float | None = None) -> "VoiceConverter":
        """A converter for another voice that *continues* this one's streaming state (for a crossfade)."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)  # modules carry the state: copy both
        other.source_pitch = copy.deepcopy(self.source_pitch)
        other.times = StageTimes()
        self.learner = None  # the learner goes on with the new converter (the old one only finishes a crossfade)
        other._set_voice(voice)  # also drops the fused-kernel views of the old model's state
        if transpose is not None:
            other.transpose = float(transpose)
        return other

    # ------------------------------------------------------------------------------------------ run
    def _tick(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        if self.profile:
            self.times.samples[name].append(t - t0)
        return t

    @torch.inference_mode()
    def _run(self, wav: torch.Tensor, mel_only: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """wav [1, N*hop] -> [1, N*hop]; streaming or offline depending on the modules' mode. ``mel_only``:
        return what the vocoder gets instead, the decoder's normalised mel [1, n_mels, N] and the mapped pitch
        [1, 2, N] (e.g. for another vocoder; torch path)."""
        m = self.model
        t = time.perf_counter()
        mel, frames = m.frontend(wav)
        t = self._tick("frontend", t)
        fr = frames[0].float().cpu().numpy()
        pitch = self.source_pitch(fr, self._target, self.transpose)
        pitch_t = torch.from_numpy(pitch)[None].to(self.device)
        t = self._tick("pitch", t)
        z = m.vqvae.encoder(mel)
        t = self._tick("encoder", t)
        if self.learner is not None:  # what source centring learns from (convert())
            self._seen = (z[0].cpu().numpy(), mel[0].cpu().numpy())
        zc = z if self._shift is None else z + self._shift[None, :, None]
        mel_hat = m.vqvae.render(zc, self._spk, pitch_t)
        t = self._tick("vq+decoder", t)
        if mel_only:
            return mel_hat, pitch_t
        y = m.student(mel_hat, pitch_t)[:, 0]
        self._tick("vocoder", t)
        return y

    def _run_fused(self, x: np.ndarray) -> np.ndarray:
        """:meth:`_run` streaming on the CPU for this one stream (:func:`fused_step`): x [N*hop] -> [N*hop]."""
        if self._fused_args is None:
            self._fused_args = fused_args(self.model, self._spk, 0, self._shift)
        y, mel, z = fused_step(x, self._fused_args, lambda fr: self.source_pitch(fr, self._target, self.transpose),
                               self._tick)
        self._seen = (z, mel)
        return y

    def convert(self, x: np.ndarray) -> np.ndarray:
        """One or more whole hops [k*hop] float32 -> same length, streaming."""
        if x.ndim != 1 or x.shape[0] % self.hop or x.shape[0] == 0:
            raise ValueError(f"{self.name}: expected whole hops of {self.hop} samples, got shape {x.shape}")
        if self.fused and self.model.vqvae.encoder.is_streaming:
            y = self._run_fused(np.ascontiguousarray(x, dtype=np.float32))
        else:
            wav = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)
            y = self._run(wav)[0].cpu().numpy()
        if self.learner is not None:  # encoder output [D, N], mel [n_mels, N] of these hops, and their voicing
            z, mel = self._seen
            content = self.learner.push(z.T, mel.mean(0), self.source_pitch.last_voiced)
            if content is not None:  # a new estimate of the speaker's mean content: centre on it from the next hop
                self._set_shift(content)
        return y

    def reset(self) -> None:
        self.model.reset_streaming()
        self.source_pitch.reset()

    def set_source(self, source: PitchStats | None) -> None:
        """A newly measured (or forgotten: None) source pitch range; restarts the pitch mapping's statistics."""
        self.source = source
        self.source_pitch.set_prior(*self.model.pitch_prior(source))

    @property
    def centring(self) -> str:
        """Source centring's state, for status lines: off, learning (no estimate yet), learned xN, measured."""
        if not self.model.centres:
            return "off"
        if self.learner is not None:
            return self.learner.state
        return "measured" if self.content is not None else "off"

    def set_source_content(self, content: np.ndarray | None) -> None:
        """A newly measured (or forgotten: None) source mean content [code_dim]: source centring follows it (and no
        longer learns it while they speak)."""
        if content is not None:
            self.learner = None
        self._set_shift(content)

    def measure_content(self, x: np.ndarray) -> np.ndarray:
        """The mean content [code_dim] of a recording ``x`` [n] at the model rate (:meth:`VoiceModel.measure_content`).
        The encoder runs offline for it, so the stream restarts (as after :meth:`reset`): measure before converting."""
        self.model.stop_streaming()
        try:
            return self.model.measure_content(x)
        finally:
            self.model.start_streaming(1)
            self._fused_args = None  # new state tensors
            self.source_pitch.reset()

    def convert_offline(self, x: np.ndarray) -> np.ndarray:
        """Whole utterance [n] (padded to whole hops, then trimmed back) in one offline forward, no state.

        Afterwards the streaming state is fresh (as after :meth:`reset`)."""
        n = x.shape[0]
        pad = (-n) % self.hop
        wav = torch.from_numpy(np.pad(np.asarray(x, np.float32), (0, pad)))[None].to(self.device)
        saved = self.source_pitch
        self.source_pitch = SourcePitch(self.cfg.model, *self.model.pitch_prior(self.source))
        self.model.stop_streaming()
        try:
            return self._run(wav)[0, :n].cpu().numpy()
        finally:
            self.model.start_streaming(1)
            self._fused_args = None  # new state tensors
            self.source_pitch = saved


def _frame_args(model: VoiceModel, spk: torch.Tensor, slot: int, shift: torch.Tensor | None = None) -> tuple:
    """(encoder args, codebook, ||codebook||^2, decoder args, recogniser args or None, shift [code_dim], 1 / phone
    temperature) for :func:`kernels.frame_stack.frame_convert`, bound to batch slot ``slot`` of the streaming
    state and speaker embedding ``spk`` [1, S]. ``shift`` [code_dim]: source centring. The nearest code to z + s
    minimises ||c||^2 - 2 c.s - 2 c.z, so the shift folds into the norms the kernel already subtracts from: no
    cost per frame (the recogniser reads z + s itself)."""
    from kernels.frame_stack import stack_args
    v = model.vqvae

    def convs(m) -> list:
        return [m.inp, *(b.conv for b in m.blocks), m.out]

    def no_bias(m) -> np.ndarray:
        return np.zeros((len(m.blocks) + 1, m.inp.c_out), np.float32)

    with torch.no_grad():
        spk_bias = v.decoder.spk(spk).reshape(-1, v.decoder.inp.c_out).numpy()
        cb = v.vq.codebook.detach().contiguous().numpy()
    s = np.zeros(cb.shape[1], np.float32) if shift is None else shift.cpu().numpy().astype(np.float32)
    norms = (cb * cb).sum(1) - 2.0 * cb @ s
    phn = None if v.phones is None else stack_args(convs(v.phones), no_bias(v.phones), slot)
    return (stack_args(convs(v.encoder), no_bias(v.encoder), slot), cb, norms.astype(np.float32),
            stack_args(convs(v.decoder), spk_bias, slot), phn, s, np.float32(1.0 / v.temperature))


def fused_args(model: VoiceModel, spk: torch.Tensor, slot: int, shift: torch.Tensor | None = None) -> tuple:
    """Everything :func:`fused_step` needs for batch slot ``slot`` of the streaming model and speaker embedding
    ``spk`` [1, S]: numpy views of the slot's state (so the torch path and this one alternate mid-stream) and
    of the weights. Rebuild after the state tensors are replaced (``start_streaming``) or the speaker changes.
    ``shift``: source centring (:func:`_frame_args`)."""
    from kernels.student_step import student_args
    lifter = model.vqvae.encoder.lifter
    return (model.frontend.numpy_args(slot), None if lifter is None else lifter.numpy(),
            _frame_args(model, spk, slot, shift), student_args(model.student, slot))


def fused_step(x: np.ndarray, args: tuple, pitch_of, tick) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One stream's streaming step on the CPU, numpy end to end: frontend (:func:`rtvc.frontend.stream_numpy`),
    pitch (``pitch_of(frames [N, win]) -> [2, N]``, the stream's tracker and mapping), one numba call for encoder
    -> VQ (+ phone recogniser) -> decoder (:func:`kernels.frame_stack.frame_convert`), one for the vocoder
    (:func:`kernels.student_step.student_step`). x [N*hop] float32 -> (y [N*hop] float32, the frontend's mel
    [n_mels, N], the encoder's output [code_dim, N]: what source centring learns from). Per 10 ms hop eager torch
    spends most of its time dispatching ops (``rtvc bench``: fused vs plain torch). ``tick(stage, t0) -> t``:
    stage timing (:meth:`VoiceConverter._tick`). ``args``: :func:`fused_args`."""
    from kernels.frame_stack import frame_convert
    from kernels.student_step import student_step
    fe, lifter, (enc, cb, cb_norm, dec, phn, shift, inv_t), stu = args
    t = time.perf_counter()
    mel, frames = stream_numpy(x, fe)
    t = tick("frontend", t)
    pitch = pitch_of(frames)
    t = tick("pitch", t)
    out, z = np.empty_like(mel), np.empty((cb.shape[1], mel.shape[1]), np.float32)
    frame_convert(mel if lifter is None else lifter @ mel, pitch, enc, cb, cb_norm, dec, out, z, phn, shift, inv_t)
    t = tick("encoder+vq+decoder (fused)", t)
    y = student_step(out, pitch, *stu)
    tick("vocoder", t)
    return y, mel, z


def make_voice_model(cfg: Config, speakers: list[str], seed: int = 0) -> VoiceModel:
    """A randomly initialised voice model (tests, benchmarks) with plausible pitch statistics."""
    torch.manual_seed(seed)
    stats = {s: PitchStats(float(np.log(100 + 40 * i)), 0.2) for i, s in enumerate(speakers)}
    m = VoiceModel(cfg, speakers, stats, PitchStats(float(np.log(140)), 0.3)).eval()
    for p in m.parameters():  # keep random activations in a sane range through deep stacks
        if p.dim() > 1:
            nn.init.normal_(p, 0.0, 0.5 / np.sqrt(p.shape[1] * (p.shape[2] if p.dim() > 2 else 1)))
    return m
