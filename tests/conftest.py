"""Shared fixtures: tiny model configs (fast to build, train and stream) and a small prepared corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtvc.config import Config, load_config

# Small enough that every stage trains a step in well under a second on CPU; structure identical to default.
TINY = {
    "vqvae.encoder_channels": 16, "vqvae.encoder_layers": 3, "vqvae.codebook_size": 16, "vqvae.code_dim": 8,
    "vqvae.speaker_dim": 8, "vqvae.decoder_channels": 16, "vqvae.decoder_layers": 3,
    "teacher.layers": 3, "teacher.stacks": 1, "teacher.residual_channels": 8, "teacher.gate_channels": 16,
    "teacher.skip_channels": 8,
    "student.layers": 4, "student.stacks": 2, "student.residual_channels": 8, "student.aux_channels": 8,
    "train.batch_size": 4, "train.segment_hops": 16, "train.vocoder_segment_hops": 8, "train.validate_every": 3,
    "train.checkpoint_every": 3, "train.num_workers": 0, "train.adversarial_start": 2,
    "train.stft_fft_sizes": [256, 512], "train.stft_hop_sizes": [60, 120], "train.stft_win_sizes": [240, 480],
}


def make_tiny_config(**overrides) -> Config:
    return load_config().replace(**{**TINY, **overrides})


@pytest.fixture
def tiny_cfg() -> Config:
    return make_tiny_config()


def harmonic(seconds: float, rate: int, f0: float, seed: int) -> np.ndarray:
    """A voiced, vowel-like test signal with a pitch contour and a pause, distinct per 'speaker'."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    ph = 2 * np.pi * np.cumsum(f) / rate
    x = sum(np.sin(k * ph + rng.uniform(0, 6)) * np.exp(-0.3 * k) for k in range(1, 20))
    x *= (np.sin(2 * np.pi * 0.7 * t + seed) > -0.6)
    x = np.concatenate([np.zeros(rate // 10), x, np.zeros(rate // 10)])
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write_folder_corpus(root: Path, speakers: dict[str, float], n: int = 6, rate: int = 16000) -> Path:
    """root/<speaker>/<i>.wav + .txt; sentence i has the same text for every speaker (a parallel corpus)."""
    for s, (name, f0) in enumerate(speakers.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sf.write(str(d / f"{name}_{i:03d}.wav"), harmonic(1.2 + 0.1 * i, rate, f0, 100 * s + i), rate)
            (d / f"{name}_{i:03d}.txt").write_text(f"sentence number {i}\n")
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> tuple[Config, Path]:
    """A prepared cache of three synthetic speakers (no TTS needed), shared by the training tests."""
    from rtvc.data.prepare import prepare_corpus
    root = tmp_path_factory.mktemp("corpus")
    write_folder_corpus(root / "raw", {"low": 100.0, "mid": 150.0, "high": 230.0}, n=8)
    cfg = make_tiny_config()
    prepare_corpus(cfg, root / "raw", root / "cache", val_fraction=0.25, progress=False)
    return cfg, root / "cache"
