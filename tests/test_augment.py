"""Training augmentation of the encoder's input: formant warp and colour, and the room / noise simulation, checked
against what the frontend makes of the same change done to a waveform."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import harmonic, make_tiny_config
from rtvc.augment import ContentAugment, RoomAugment
from rtvc.config import ConfigError, load_config
from rtvc.frontend import Frontend


def test_content_augment_warps_and_colours():
    """Warp factor 1 is the identity; a spectral peak (a formant) moves by the factor in Hz, in un-normalised
    log-mel (normalisation undone and redone); width and eq 0 leave the batch untouched; the colouring is a
    smooth gain within its dB bound, constant over time."""
    cfg = make_tiny_config().model
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=cfg.n_mels), 0.5 + rng.random(cfg.n_mels)
    fw = ContentAugment(cfg, mean, std, 0.15, 0.0)
    np.testing.assert_allclose(fw.matrix(1.0).numpy(), np.eye(cfg.n_mels), atol=1e-6)
    k = cfg.n_mels // 2
    log_mel = np.full(cfg.n_mels, -5.0)
    log_mel[k] = 0.0
    for alpha in (0.88, 1.13):
        mel = torch.from_numpy(((log_mel - mean) / std)[None, :, None].astype(np.float32))
        fw.width = 0.0
        assert fw(mel) is mel
        warped = (fw.matrix(alpha) @ torch.from_numpy(log_mel.astype(np.float32))).numpy() + 5.0
        peak = np.interp((np.arange(cfg.n_mels) * warped).sum() / warped.sum(), np.arange(cfg.n_mels), fw.centers)
        assert abs(peak / fw.centers[k] - alpha) < 0.02
    fw.width = 0.15
    x = torch.randn(6, cfg.n_mels, 5, generator=torch.Generator().manual_seed(0))
    y = fw(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.allclose(y, x) and torch.isfinite(y).all()
    # colour only: a smooth per-segment gain in dB, the same for every frame, within +-eq_db
    fw.width, fw.eq_db = 0.0, 6.0
    y = fw(x, torch.Generator().manual_seed(2))
    gain_db = ((y - x) * torch.from_numpy(std).float()[None, :, None]) * 10 / np.log(10)
    assert torch.allclose(gain_db, gain_db[:, :, :1], atol=1e-4) and gain_db.abs().max() <= 6.0 + 1e-4
    assert gain_db.abs().max() > 1.0


# ----------------------------------------------------------------------------------------------------- DDP


def _log_mel(fe: Frontend, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return fe.log_mel(fe.frames(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None]))


def _room(**kw) -> tuple[RoomAugment, Frontend, int]:
    cfg = load_config()
    return RoomAugment(cfg.model, dataclasses.replace(cfg.train, **kw)), Frontend(cfg.model), cfg.model.sample_rate


def _speech_frames(ref: torch.Tensor) -> torch.Tensor:
    return ref > ref.max() - 40 * math.log(10) / 10  # within 40 dB of the loudest bin


@pytest.mark.parametrize("snr", [20.0, 5.0])
def test_mel_noise_matches_noise_added_to_the_waveform(snr):
    """White noise at an SNR added in the mel power domain ~ the frontend's mel of the waveform with noise at that
    SNR: the error is far below the noise's own effect and unbiased on voiced frames (fresh noise each run)."""
    room, fe, rate = _room(noise_prob=1.0, noise_snr_db=(snr, snr))
    x = harmonic(2.0, rate, 140.0, int(np.random.default_rng().integers(1000)))
    x = x[: x.size // 240 * 240]
    n = np.random.default_rng().standard_normal(x.size).astype(np.float32)
    clean, wav = _log_mel(fe, x), _log_mel(fe, x + n * np.sqrt((x ** 2).mean() / 10 ** (snr / 10)))
    start = torch.randint(0, room.bank.shape[1] - clean.shape[2], (1,))
    aug = torch.log(room.noise(torch.exp(clean), torch.tensor([snr]), torch.tensor([0.0]), start))
    assert (aug - wav).abs().mean() < 0.5 * (clean - wav).abs().mean()
    assert abs(float((aug - wav)[_speech_frames(wav)].mean())) < 0.15  # nepers: ~0.6 dB


def test_mel_reverb_decays_at_its_rt60_with_its_energy_ratio():
    """One loud frame in silence: its tail falls 60 dB per RT60 (no damping) and holds 10^(-DRR/10) of its
    energy; a recording through a matching exponential room is matched better than by the dry mel."""
    room, fe, rate = _room(reverb_prob=1.0, reverb_rt60=(0.2, 2.0))
    t, hop_s = 300, 240 / 24000
    p = torch.full((1, 80, t), 1e-12)
    p[:, :, 10] = 1.0
    rt60, drr = 0.6, 6.0
    out = room.reverb(p, torch.tensor([rt60]), torch.tensor([drr]), torch.tensor([0.0]))
    tail = out[0, 0, 11:]  # frames after the impulse (the pre-roll, 1/300 of its power, has decayed 50+ dB by then)
    slope = (torch.log(tail[40]) - torch.log(tail[10])) / 30  # nepers of power per frame
    assert abs(float(slope) / (-math.log(1e6) * hop_s / rt60) - 1) < 0.02
    assert abs(float(tail.sum()) / 10 ** (-drr / 10) - 1) < 0.05
    # against a waveform convolved with an exponentially decaying noise tail of the same RT60 and DRR
    rng = np.random.default_rng()
    x = harmonic(2.0, rate, 120.0, int(rng.integers(1000)))
    x = x[: x.size // 240 * 240]
    tt = np.arange(int(1.5 * rt60 * rate)) / rate
    ir = rng.standard_normal(tt.size) * np.exp(-0.5 * math.log(1e6) * tt / rt60)
    ir[0] = 0.0
    ir *= np.sqrt(10 ** (-drr / 10) / (ir ** 2).sum())
    ir[0] = 1.0
    clean, wav = _log_mel(fe, x), _log_mel(fe, np.convolve(x, ir)[: x.size])
    aug = torch.log(room.reverb(torch.exp(clean), torch.tensor([rt60]), torch.tensor([drr]), torch.tensor([0.0])))
    speech = _speech_frames(wav)
    assert (aug - wav)[speech].abs().mean() < 0.75 * (clean - wav)[speech].abs().mean()


def test_room_augment_draws_per_segment_and_is_off_at_zero():
    cfg = make_tiny_config()
    mean, std = np.zeros(cfg.model.n_mels), np.ones(cfg.model.n_mels)
    zero = dataclasses.replace(cfg.train, reverb_prob=0.0, noise_prob=0.0)
    off = ContentAugment(cfg.model, mean, std, 0.0, 0.0, RoomAugment(cfg.model, zero))
    x = torch.randn(8, cfg.model.n_mels, 20) - 4
    assert off.room is None and off(x) is x
    tr = dataclasses.replace(cfg.train, reverb_prob=0.5, noise_prob=0.5)
    on = ContentAugment(cfg.model, mean, std, 0.0, 0.0, RoomAugment(cfg.model, tr))
    y = on(x, torch.Generator().manual_seed(0))
    changed = (y - x).abs().amax(dim=(1, 2)) > 1e-4
    assert torch.isfinite(y).all() and 0 < int(changed.sum()) < 8  # some segments, not all
    assert (y >= x - 1e-4).all()  # a room and noise only ever add power


@pytest.mark.parametrize("key,value,match", [("reverb_prob", 1.5, "reverb_prob"),
                                             ("noise_snr_db", [30.0, 5.0], "noise_snr_db"),
                                             ("reverb_rt60", [0.5], "reverb_rt60")])
def test_room_config_is_validated(key, value, match):
    from rtvc.config import Config
    d = load_config().to_dict()
    d["train"][key] = value
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(d)
