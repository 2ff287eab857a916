"""Typed, frozen configuration loaded from ``config.toml``.

The repository's ``config.toml`` (shipped in the package as ``rtvc/defaults.toml``) holds every default; the
dataclasses below hold none, so there is exactly one place a default can live.  ``load_config`` merges the
defaults, an optional user file (only the keys it sets) and ``section.key=value`` overrides, then checks every
key: unknown keys (with a suggestion), missing keys, wrong types and inconsistent values are all ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


RESAMPLERS = ("sinc_fastest", "sinc_medium", "sinc_best", "linear", "zero_order_hold")


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int
    block_ms: float
    input_device: str | int
    output_device: str | int
    input_channel: int
    output_channels: int
    host_api: str
    device_latency: str
    passthrough: bool
    monitor: bool

    def __post_init__(self) -> None:
        _check(self.sample_rate == 0 or 8000 <= self.sample_rate <= 384000,
               f"audio.sample_rate={self.sample_rate}: use 0 (device default) or 8000..384000 Hz")
        _check(0 <= self.block_ms <= 1000, f"audio.block_ms={self.block_ms} must be in 0..1000 (0 = PortAudio chooses)")
        _check(self.input_channel >= 0, "audio.input_channel must be >= 0")
        _check(1 <= self.output_channels <= 32, "audio.output_channels must be in 1..32")
        if self.device_latency not in ("low", "high"):
            try:
                _check(float(self.device_latency) >= 0, "")
            except (ValueError, ConfigError):
                raise ConfigError(f'audio.device_latency="{self.device_latency}": use "low", "high" '
                                  'or a number of seconds such as "0.005"') from None


@dataclass(frozen=True)
class EngineConfig:
    resampler: str
    safety_ms: float
    max_backlog_ms: float
    catchup_silence_db: float
    crossfade_ms: float
    ring_ms: float
    learn_content_every_s: float
    learn_content_window_s: float
    learn_content_min_voiced_s: float

    def __post_init__(self) -> None:
        _check(self.resampler in RESAMPLERS,
               f'engine.resampler="{self.resampler}": choose one of {", ".join(RESAMPLERS)}')
        _check(self.safety_ms >= 0, "engine.safety_ms must be >= 0")
        _check(self.max_backlog_ms > 0, "engine.max_backlog_ms must be > 0 (it is the bound on extra delay)")
        _check(self.catchup_silence_db <= 0, "engine.catchup_silence_db is dBFS and must be <= 0")
        _check(self.crossfade_ms >= 0, "engine.crossfade_ms must be >= 0")
        _check(self.learn_content_every_s >= 0, "engine.learn_content_every_s must be >= 0 (0 = off)")
        _check(0 <= self.learn_content_min_voiced_s <= self.learn_content_window_s,
               "engine.learn_content_min_voiced_s must be in 0..learn_content_window_s")
        _check(self.learn_content_window_s > 0 or self.learn_content_every_s == 0,
               "engine.learn_content_window_s must be > 0 while learn_content_every_s is on")
        _check(self.ring_ms > 2 * (self.max_backlog_ms + self.safety_ms) + 100,
               f"engine.ring_ms={self.ring_ms} is too small: it must exceed 2*(max_backlog_ms + safety_ms) + 100 ms "
               f"= {2 * (self.max_backlog_ms + self.safety_ms) + 100:g} ms so the rings never overflow in normal use")


def _check_factors(section: str, factors: tuple[int, ...], hop: int) -> None:
    _check(len(factors) > 0 and all(f > 0 for f in factors),
           f"{section}.upsample_factors must be a non-empty list of positive integers")
    _check(math.prod(factors) == hop,
           f"{section}.upsample_factors {list(factors)} multiply to {math.prod(factors)}, but the vocoder must "
           f"upsample one mel frame to exactly model.hop_length={hop} samples")


@dataclass(frozen=True)
class ModelConfig:
    sample_rate: int
    hop_length: int
    n_fft: int
    win_length: int
    n_mels: int
    fmin: float
    fmax: float
    f0_min: float
    f0_max: float
    yin_threshold: float
    yin_voicing_threshold: float
    yin_max_jump: float
    yin_hold_frames: int
    yin_confirm_frames: int
    yin_release_frames: int
    yin_octave_margin: float
    yin_onset_range: float

    def __post_init__(self) -> None:
        _check(8000 <= self.sample_rate <= 96000, f"model.sample_rate={self.sample_rate} must be in 8000..96000")
        _check(self.hop_length > 0, "model.hop_length must be > 0")
        _check(self.hop_length <= self.win_length <= self.n_fft,
               f"model.win_length={self.win_length} must be in hop_length..n_fft ({self.hop_length}..{self.n_fft})")
        _check(self.n_mels > 0, "model.n_mels must be > 0")
        _check(0 <= self.fmin < self.fmax <= self.sample_rate / 2,
               f"model.fmin/fmax = {self.fmin}/{self.fmax} must satisfy 0 <= fmin < fmax <= sample_rate/2 "
               f"({self.sample_rate / 2:g})")
        _check(0 < self.f0_min < self.f0_max, "model.f0_min must be in 0..f0_max")
        _check(self.win_length >= 2 * self.sample_rate / self.f0_min,
               f"model.win_length={self.win_length} is shorter than two periods of f0_min={self.f0_min} Hz "
               f"({2 * self.sample_rate / self.f0_min:g} samples): the pitch tracker cannot see it")
        _check(0 < self.yin_threshold < 1, "model.yin_threshold must be in 0..1")
        _check(self.yin_threshold <= self.yin_voicing_threshold < 1,
               "model.yin_voicing_threshold must be in model.yin_threshold..1")
        _check(0 < self.yin_max_jump <= 1.0, "model.yin_max_jump must be in 0..1 (natural-log ratio per frame)")
        _check(self.yin_hold_frames >= 1, "model.yin_hold_frames must be >= 1")
        _check(self.yin_confirm_frames >= 1, "model.yin_confirm_frames must be >= 1")
        _check(0 <= self.yin_octave_margin <= 1, "model.yin_octave_margin must be in 0..1 (0 = off)")
        _check(0 <= self.yin_onset_range <= 2, "model.yin_onset_range must be in 0..2 (natural-log ratio; 0 = off)")
        _check(0 <= self.yin_release_frames <= self.yin_hold_frames,
               "model.yin_release_frames must be in 0..model.yin_hold_frames")

    @property
    def hop_ms(self) -> float:
        return 1000.0 * self.hop_length / self.sample_rate


@dataclass(frozen=True)
class VQVAEConfig:
    encoder_channels: int
    encoder_layers: int
    kernel_size: int
    codebook_size: int
    code_dim: int
    ema_decay: float
    commitment: float
    dead_code_threshold: float
    speaker_dim: int
    decoder_channels: int
    decoder_layers: int
    encoder_cepstra: int
    source_centring: float
    phone_channels: int
    phone_layers: int
    phone_temperature: float

    def __post_init__(self) -> None:
        _check(self.phone_channels >= 0, "vqvae.phone_channels must be >= 0 (0 = no phone recogniser)")
        _check(self.phone_layers >= 2, "vqvae.phone_layers must be >= 2 (an input and an output conv)")
        _check(self.phone_temperature > 0, "vqvae.phone_temperature must be > 0 (1 = the posteriors as trained)")
        _check(0.0 <= self.source_centring <= 2.0, "vqvae.source_centring must be in 0..2 (0 = off, 1 = the whole "
                                                    "measured offset)")
        _check(self.encoder_cepstra >= 0, "vqvae.encoder_cepstra must be >= 0 (0 = the encoder sees the whole mel)")
        for key in ("encoder_channels", "encoder_layers", "kernel_size", "codebook_size", "code_dim",
                    "speaker_dim", "decoder_channels", "decoder_layers"):
            _check(getattr(self, key) >= 1, f"vqvae.{key} must be >= 1")
        _check(0 < self.ema_decay < 1, "vqvae.ema_decay must be in 0..1")
        _check(self.commitment >= 0 and self.dead_code_threshold >= 0,
               "vqvae.commitment and vqvae.dead_code_threshold must be >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    layers: int
    stacks: int
    residual_channels: int
    gate_channels: int
    skip_channels: int
    kernel_size: int
    upsample_factors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check(self.layers >= 1 and self.stacks >= 1 and self.layers % self.stacks == 0,
               f"teacher.layers={self.layers} must be a positive multiple of teacher.stacks={self.stacks}")
        _check(self.kernel_size % 2 == 1, "teacher.kernel_size must be odd (symmetric, non-causal)")
        _check(self.gate_channels % 2 == 0, "teacher.gate_channels must be even (tanh half, sigmoid half)")


@dataclass(frozen=True)
class StudentConfig:
    layers: int
    stacks: int
    residual_channels: int
    aux_channels: int
    kernel_size: int
    upsample_factors: tuple[int, ...]
    harmonics: int
    envelope_harmonics: int
    voiced_noise: float
    harmonic_below_hz: float
    noise_above_hz: float
    voice_bar_hz: float
    voice_bar_level: float

    def __post_init__(self) -> None:
        _check(self.layers >= 1 and self.stacks >= 1 and self.layers % self.stacks == 0,
               f"student.layers={self.layers} must be a positive multiple of student.stacks={self.stacks}")
        _check(self.kernel_size >= 2, "student.kernel_size must be >= 2")
        _check(self.harmonics >= 1, "student.harmonics must be >= 1")
        _check(self.envelope_harmonics >= 1, "student.envelope_harmonics must be >= 1")
        _check(0.0 <= self.voiced_noise <= 1.0, "student.voiced_noise must be in 0..1")
        _check(0.0 <= self.harmonic_below_hz < self.noise_above_hz,
               "student.harmonic_below_hz must be >= 0 and below student.noise_above_hz")
        _check(self.voice_bar_hz >= 0.0, "student.voice_bar_hz must be >= 0 (0 = off)")


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    max_sessions: int
    max_frame_samples: int
    token: str
    allowed_origins: tuple[str, ...]
    device: str

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"server.port={self.port} must be in 0..65535")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               f'server.device="{self.device}": use "auto", "cpu", "cuda" or "cuda:N"')
        _check(self.max_sessions >= 1, "server.max_sessions must be >= 1")
        _check(self.max_frame_samples >= 1, "server.max_frame_samples must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    batch_size: int
    segment_hops: int
    vocoder_segment_hops: int
    learning_rate: float
    vqvae_steps: int
    teacher_steps: int
    student_steps: int
    student_finetune_steps: int
    student_target: str
    adversarial_start: int
    adversarial_weight: float
    stft_fft_sizes: tuple[int, ...]
    stft_hop_sizes: tuple[int, ...]
    stft_win_sizes: tuple[int, ...]
    validate_every: int
    checkpoint_every: int
    num_workers: int
    formant_warp: float
    spectral_eq_db: float
    reverb_prob: float
    reverb_rt60: tuple[float, ...]
    reverb_drr_db: tuple[float, ...]
    noise_prob: float
    noise_snr_db: tuple[float, ...]
    speaker_adversarial: float
    code_substitution: float
    code_substitution_rank: int
    parallel_self_fraction: float
    phone_ctc: float
    phone_voices: tuple[str, ...]
    phone_language: str
    phone_utterances: int
    phone_warmup: int
    phone_warmup_ctc: float
    phone_warmup_restarts: int
    phone_recogniser_steps: int
    phone_recogniser_lr: float
    phone_decoder_steps: int
    phone_decoder_lr: float
    phone_parallel_fraction: float
    phone_decoder_ema: float

    def __post_init__(self) -> None:
        for key in ("batch_size", "segment_hops", "vocoder_segment_hops", "vqvae_steps", "teacher_steps",
                    "student_steps", "validate_every", "checkpoint_every", "phone_recogniser_steps",
                    "phone_decoder_steps"):
            _check(getattr(self, key) >= 1, f"train.{key} must be >= 1")
        _check(self.learning_rate > 0 and self.phone_recogniser_lr > 0 and self.phone_decoder_lr > 0,
               "train.learning_rate, train.phone_recogniser_lr and train.phone_decoder_lr must be > 0")
        _check(0 <= self.formant_warp < 0.5, "train.formant_warp must be in 0..0.5")
        _check(0 <= self.spectral_eq_db <= 24, "train.spectral_eq_db must be in 0..24 dB")
        _check(0 <= self.speaker_adversarial <= 10, "train.speaker_adversarial must be in 0..10")
        _check(0 <= self.code_substitution < 1, "train.code_substitution must be in 0..1 (1 excluded)")
        _check(self.code_substitution_rank >= 2, "train.code_substitution_rank must be >= 2 (1 is the nearest code)")
        _check(0 <= self.parallel_self_fraction < 1, "train.parallel_self_fraction must be in 0..1 (1 excluded)")
        _check(0 <= self.phone_parallel_fraction < 1,
               "train.phone_parallel_fraction must be in 0..1 (1 excluded: the batch keeps own readings)")
        _check(0 <= self.phone_decoder_ema < 1, "train.phone_decoder_ema must be in 0..1 (1 excluded; 0 = off)")
        _check(0 <= self.phone_ctc <= 10, "train.phone_ctc must be in 0..10")
        _check(self.phone_utterances >= 1 and self.phone_warmup >= 0,
               "train.phone_utterances must be >= 1 and train.phone_warmup >= 0")
        _check(self.phone_warmup_ctc > 0 and self.phone_warmup_restarts >= 0,
               "train.phone_warmup_ctc must be > 0 and train.phone_warmup_restarts >= 0")
        _check(bool(self.phone_language.strip()), "train.phone_language must name an espeak-ng voice (e.g. en-us)")
        _check(0 <= self.reverb_prob <= 1 and 0 <= self.noise_prob <= 1, "train.reverb_prob and noise_prob must be in 0..1")
        for key, lo, hi in (("reverb_rt60", 0.05, 3.0), ("reverb_drr_db", -20.0, 40.0), ("noise_snr_db", -10.0, 60.0)):
            r = getattr(self, key)
            _check(len(r) == 2 and lo <= r[0] <= r[1] <= hi, f"train.{key} must be [low, high] within {lo:g}..{hi:g}")
        _check(self.student_target in ("teacher", "audio"), 'train.student_target must be "teacher" or "audio"')
        _check(self.num_workers >= 0 and self.adversarial_start >= 0 and self.student_finetune_steps >= 0,
               "train.num_workers, adversarial_start and student_finetune_steps must be >= 0")
        n = len(self.stft_fft_sizes)
        _check(n >= 1 and len(self.stft_hop_sizes) == n and len(self.stft_win_sizes) == n,
               "train.stft_fft_sizes, stft_hop_sizes and stft_win_sizes must have the same (non-zero) length")
        _check(all(w <= f for w, f in zip(self.stft_win_sizes, self.stft_fft_sizes)),
               "train.stft_win_sizes must not exceed the matching stft_fft_sizes")


@dataclass(frozen=True)
class EnrolConfig:
    prompts: int
    steps_per_voice: int
    learning_rate: float
    self_fraction: float

    def __post_init__(self) -> None:
        _check(self.prompts >= 1 and self.steps_per_voice >= 1, "enrol.prompts and enrol.steps_per_voice must be >= 1")
        _check(self.learning_rate > 0, "enrol.learning_rate must be > 0")
        _check(0 <= self.self_fraction < 1, "enrol.self_fraction must be in 0..1 (1 excluded)")


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str
    checkpoint_dir: str
    model: str


@dataclass(frozen=True)
class Config:
    audio: AudioConfig
    engine: EngineConfig
    model: ModelConfig
    vqvae: VQVAEConfig
    teacher: TeacherConfig
    student: StudentConfig
    server: ServerConfig
    train: TrainConfig
    enrol: EnrolConfig
    paths: PathsConfig

    def __post_init__(self) -> None:
        _check_factors("teacher", self.teacher.upsample_factors, self.model.hop_length)
        _check_factors("student", self.student.upsample_factors, self.model.hop_length)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists): what goes into checkpoints and ``from_dict`` reads back."""
        def conv(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {f.name: {k: conv(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return _build(cls, data, "")

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> "Config":
        """A config stored in a checkpoint: keys added to rtvc after it was written take today's defaults (so old
        checkpoints keep loading), except those that shape the networks (:data:`BUILT_WITHOUT`): a model saved
        before they existed gets the value that rebuilds it. Unknown keys and bad values are still errors."""
        base = default_dict()
        for (section, key), value in BUILT_WITHOUT.items():
            if key not in data.get(section, {}):
                base[section][key] = value
        return cls.from_dict(_merge(base, data))

    def replace(self, **overrides: Any) -> "Config":
        """New config with ``section.key`` overrides given as ``replace(**{"engine.safety_ms": 3.0})``."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(d, dotted, value)
        return Config.from_dict(d)


# ---------------------------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists become tuples."""
    if isinstance(tp, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
    elif typing.get_origin(tp) is tuple:
        if isinstance(value, (list, tuple)):
            (elem,) = [a for a in typing.get_args(tp) if a is not Ellipsis]
            return tuple(_coerce(elem, v, f"{where}[{i}]") for i, v in enumerate(value))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f' (did you mean "{prefix}{close[0]}"?)' if close else f" (known: {', '.join(names)})"
            raise ConfigError(f'unknown key "{prefix}{key}"{hint}')
    kwargs = {}
    for name in names:
        if name not in data:
            raise ConfigError(f'missing key "{prefix}{name}"')
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, data[name], f"{prefix}{name}")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------- loading

def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    _check(len(parts) == 2 and all(parts), f'override "{dotted}": use section.key, e.g. engine.safety_ms')
    section, key = parts
    if section not in d:
        close = difflib.get_close_matches(section, list(d), n=1)
        raise ConfigError(f'unknown section "{section}"' + (f' (did you mean "{close[0]}"?)' if close else ""))
    d[section][key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"engine.safety_ms=3"`` -> ``("engine.safety_ms", 3)``. The value is TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f'override "{text}": expected section.key=value')
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # e.g. --set audio.input_device=USB Mic
    return key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


# Keys added after models were saved without them, whose default would change what such a model computes (or
# misstate how it was trained: a VQ-VAE saved before the phone loss was trained without it): the value that
# rebuilds (describes) those models, (section, key) -> value.
BUILT_WITHOUT: dict[tuple[str, str], Any] = {
    ("vqvae", "encoder_cepstra"): 0, ("model", "yin_octave_margin"): 0.0, ("model", "yin_onset_range"): 0.0,
    ("student", "voice_bar_hz"): 0.0, ("train", "phone_ctc"): 0.0, ("vqvae", "phone_channels"): 0}


def default_dict() -> dict[str, Any]:
    text = resources.files("rtvc").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(user_file: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- user file <- ``section.key=value`` overrides, validated."""
    data = default_dict()
    if user_file:
        user = read_toml(user_file)
        for section, table in user.items():
            if section not in data:
                close = difflib.get_close_matches(section, list(data), n=1)
                raise ConfigError(f'{user_file}: unknown section "[{section}]"'
                                  + (f' (did you mean "[{close[0]}]"?)' if close else ""))
            if not isinstance(table, Mapping):
                raise ConfigError(f'{user_file}: "{section}" must be a table ([{section}])')
        data = _merge(data, user)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return Config.from_dict(data)
