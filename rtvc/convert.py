"""Offline conversion through the *streaming* engine (same code path as live), and converter selection."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .config import Config
from .converter import Converter, DelayConverter
from .engine import StreamEngine

PASSTHROUGH = "passthrough (no voice model)"
CALIBRATION_S = 120  # seconds of a file measured for its speaker's pitch range before conversion


class NoVoiceModel(RuntimeError):
    """Raised when a voice is requested but no voice model is configured."""


def load_converter(cfg: Config, voice: str | None = None, transpose: float = 0.0) -> Converter:
    """The converter for ``cfg.paths.model``; a labelled passthrough while no voice model is configured."""
    if not cfg.paths.model:
        if voice:
            raise NoVoiceModel(f"voice '{voice}' requested, but no voice model is configured (paths.model is empty)")
        return DelayConverter(cfg.model.sample_rate, cfg.model.hop_length, 0, name=PASSTHROUGH)
    path = Path(cfg.paths.model)
    if not path.is_file():
        raise NoVoiceModel(f"paths.model = '{path}' does not exist (train one: see README, or leave it empty)")
    from .checkpoint import CheckpointError
    from .voice import VoiceConverter, VoiceModel
    try:
        model = VoiceModel.load(path)
    except CheckpointError as e:
        raise NoVoiceModel(str(e)) from None
    if voice is not None and voice not in model.speakers:
        raise NoVoiceModel(f"unknown voice '{voice}'; {path} has: {', '.join(model.speakers)}")
    from .centring import make_learner
    # source centring learned while they speak; a calibration (calibrate() below) replaces it with a measurement
    return VoiceConverter(model, voice, transpose, learner=make_learner(model, cfg.engine))


def calibrate(conv: Converter, x: np.ndarray, rate: int) -> bool:
    """Measure the speaker's pitch range in a recording ``x`` [n] at ``rate`` before conversion starts, so the pitch
    mapping is right from the first second instead of learning it while they speak, and their mean content, which
    source centring moves to the training voices'. A file being converted is
    its own calibration; ``rtvc live --calibrate`` takes one of the live speaker. False (and the converter
    unchanged) when it has too little voiced speech, or there is no voice model to calibrate."""
    from .voice import VoiceConverter
    if not isinstance(conv, VoiceConverter):
        return False
    import soxr
    from .frontend import measure_pitch
    x = x[: CALIBRATION_S * rate]  # a couple of minutes pin a speaker's range; frames of more only cost memory
    xm = soxr.resample(x, rate, conv.sample_rate) if rate != conv.sample_rate else x
    try:
        stats = measure_pitch(xm, conv.cfg.model)
    except ValueError:  # too little voiced speech: nothing to calibrate on
        return False
    conv.set_source(stats)
    # ... and where their speech sits in content space (source centring: vqvae.source_centring)
    conv.set_source_content(conv.measure_content(xm))
    return True


def stream_array(engine: StreamEngine, x: np.ndarray, block: int) -> np.ndarray:
    """Stream ``x`` [n] through ``engine`` in blocks of ``block`` samples; output [n] with the latency removed."""
    if block < 1:
        raise ValueError(f"block must be >= 1 sample, got {block}")
    lat = engine.latency_samples
    padded = np.concatenate([np.asarray(x, np.float32), np.zeros(lat, np.float32)])  # flush the tail through
    out = np.concatenate([engine.process(padded[i: i + block]) for i in range(0, padded.shape[0], block)])
    return out[lat:]


def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono [n] (channels averaged) and its rate; clear errors on bad input."""
    import soundfile as sf
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file {p} does not exist")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError with terse text
        raise ValueError(f"cannot read {p} as audio: {e}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{p} contains no audio samples")
    return data.mean(axis=1).astype(np.float32), int(rate)


def convert_file(cfg: Config, src: str | Path, dst: str | Path, voice: str | None = None, transpose: float = 0.0,
                 block_ms: float = 10.0) -> dict:
    """Convert ``src`` to ``dst`` at the source's sample rate; returns a summary dict."""
    import soundfile as sf
    x, rate = read_mono(src)
    conv = load_converter(cfg, voice, transpose)
    calibrate(conv, x, rate)
    if conv.name == PASSTHROUGH:
        print(f"rtvc: no voice model configured: output is a PASSTHROUGH of the input "
              f"(streamed through the engine at {rate} Hz <-> {conv.sample_rate} Hz)", file=sys.stderr)
    engine = StreamEngine(conv, rate, cfg.engine)
    y = stream_array(engine, x, max(1, round(rate * block_ms / 1000)))
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > 1.0:  # never write a clipped file silently
        y = y / peak
    sf.write(str(dst), y, rate, subtype="PCM_16")
    st = engine.stats()
    return {"input": str(src), "output": str(dst), "sample_rate": rate, "seconds": x.shape[0] / rate,
            "converter": conv.name, "latency_ms": engine.latency_ms, "hops": st.hops,
            "compute_ms_p50": st.compute_ms_p50, "underruns": st.underruns}
