"""Training data: the prepared cache (``manifest.json`` + ``feats/*.npz``) and random fixed-length segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ModelConfig
from ..frontend import LOG_EPS, PitchStats, lf0_features, mel_centers
from .prepare import CorpusError


class Corpus:
    """All prepared utterances in memory (the corpora rtvc trains on are small), with their statistics."""

    def __init__(self, cache: str | Path, model_cfg: ModelConfig,
                 mel_stats: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``mel_stats``: (mean, std) [n_mels] to normalise with instead of the cache's own (a model fine-tuned on
        a grown corpus keeps the normalisation it, and the vocoder fed by it, were trained with)."""
        cache = Path(cache)
        mf = cache / "manifest.json"
        if not mf.is_file():
            raise CorpusError(f"{cache} has no manifest.json: run `rtvc data prepare CORPUS --out {cache}` first")
        man = json.loads(mf.read_text(encoding="utf-8"))
        want = {"sample_rate": model_cfg.sample_rate, "hop_length": model_cfg.hop_length, "n_mels": model_cfg.n_mels,
                "win_length": model_cfg.win_length, "n_fft": model_cfg.n_fft}
        got = {k: man["model"].get(k) for k in want}
        if got != want:
            raise CorpusError(f"{cache} was prepared with {got}, but the config has {want}: prepare it again")
        self.manifest = man
        self.speakers: list[str] = man["speakers"]
        mean, std = mel_stats if mel_stats is not None else (man["mel_mean"], man["mel_std"])
        self.mel_mean = np.asarray(mean, np.float32)
        self.mel_std = np.asarray(std, np.float32)
        self.pitch = {k: PitchStats(*v) for k, v in man["pitch"].items()}
        self.prior = PitchStats(*man["prior"])
        self.hop = model_cfg.hop_length
        self.utts = []
        for u in man["utterances"]:
            z = np.load(cache / "feats" / f"{u['id']}.npz")
            mel = (z["logmel"] - self.mel_mean[:, None]) / self.mel_std[:, None]
            pitch, _ = lf0_features(z["f0"], z["voiced"])
            self.utts.append({**u, "mel": mel.astype(np.float32), "pitch": pitch, "wav": z["wav"],
                              "spk": self.speakers.index(u["speaker"])})
        if mel_stats is not None:
            self._check_band(man, model_cfg)

    def _check_band(self, man: dict, model_cfg: ModelConfig) -> None:
        """A kept normalisation from a model trained on band-limited audio (every mel bin above the band at the
        log floor, spread near zero) puts a wideband corpus's upper bins hundreds of spreads from the mean: the
        L2 loss would be dominated by them (measured: loss 43 instead of 0.4 with 32 kHz voices added)."""
        own = (np.asarray(man["mel_mean"], np.float32) - self.mel_mean) / self.mel_std
        far = np.flatnonzero(np.abs(own) > 10.0)
        if far.size:
            lo = float(mel_centers(model_cfg)[far[0]])
            raise CorpusError(f"this corpus has energy where the checkpoint's training audio had none (mel bins from "
                              f"{lo:.0f} Hz lie up to {np.abs(own).max():.0f} spreads from its mean): prepare it again "
                              f"band-limited, `rtvc data prepare CORPUS --band-hz {int(lo // 1000 * 1000)}`")

    def indices(self, split: str) -> list[int]:
        return [i for i, u in enumerate(self.utts) if u["split"] == split]

    def silence_mel(self) -> np.ndarray:
        return ((np.log(LOG_EPS) - self.mel_mean) / self.mel_std).astype(np.float32)


class SegmentDataset(Dataset):
    """Item i = a random ``frames``-long segment (deterministic in (seed, i)) of a random utterance of ``split``:
    ``mel`` [n_mels, F] normalised, ``pitch`` [2, F], ``speaker`` int, and ``wav`` [F*hop] when asked."""

    def __init__(self, corpus: Corpus, split: str, frames: int, length: int, seed: int, with_wav: bool) -> None:
        self.c, self.frames, self.length, self.seed, self.with_wav = corpus, frames, length, seed, with_wav
        self.idx = corpus.indices(split)
        if not self.idx:
            raise CorpusError(f"no '{split}' utterances in the prepared corpus (add data or change the split)")
        w = np.array([corpus.utts[i]["frames"] for i in self.idx], np.float64)
        self.p = w / w.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        u = self.c.utts[self.idx[rng.choice(len(self.idx), p=self.p)]]
        n, f = u["frames"], self.frames
        start = int(rng.integers(0, n - f + 1)) if n >= f else 0
        mel = u["mel"][:, start: start + f]
        pitch = u["pitch"][:, start: start + f]
        wav = u["wav"][start * self.c.hop: (start + f) * self.c.hop]
        if n < f:  # pad short utterances with silence
            mel = np.concatenate([mel, np.repeat(self.c.silence_mel()[:, None], f - n, 1)], 1)
            pitch = np.pad(pitch, ((0, 0), (0, f - n)))
            wav = np.pad(wav, (0, (f - n) * self.c.hop))
        out = {"mel": torch.from_numpy(np.ascontiguousarray(mel)), "pitch": torch.from_numpy(np.ascontiguousarray(pitch)),
               "speaker": torch.tensor(u["spk"])}
        if self.with_wav:
            out["wav"] = torch.from_numpy(np.ascontiguousarray(wav))
        return out
