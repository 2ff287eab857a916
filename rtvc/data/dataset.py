"""Training data: the prepared cache (``manifest.json`` + ``feats/*.npz``) and random fixed-length segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ModelConfig
from ..frontend import LOG_EPS, PitchStats, lf0_features, mel_centers
from .prepare import CorpusError, _normalise_text


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

    def segment(self, u: dict, f: int, rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """A random ``f``-frame segment of utterance ``u``: (its first frame, mel [n_mels, f], pitch [2, f], wav
        [f*hop]), a short utterance padded with silence."""
        n = u["frames"]
        start = int(rng.integers(0, n - f + 1)) if n >= f else 0
        mel, pitch = u["mel"][:, start: start + f], u["pitch"][:, start: start + f]
        wav = u["wav"][start * self.hop: (start + f) * self.hop]
        if n < f:
            mel = np.concatenate([mel, np.repeat(self.silence_mel()[:, None], f - n, 1)], 1)
            pitch = np.pad(pitch, ((0, 0), (0, f - n)))
            wav = np.pad(wav, (0, (f - n) * self.hop))
        return start, mel, pitch, wav


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
        _, mel, pitch, wav = self.c.segment(u, self.frames, rng)
        out = {"mel": torch.from_numpy(np.ascontiguousarray(mel)), "pitch": torch.from_numpy(np.ascontiguousarray(pitch)),
               "speaker": torch.tensor(u["spk"])}
        if self.with_wav:
            out["wav"] = torch.from_numpy(np.ascontiguousarray(wav))
        return out


def dtw_warp(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """Unit-norm content vectors of two readings of one text, A [D, Ta] and B [D, Tb] -> for every frame of B the
    last frame of A that DTW (cosine distance) aligns to it [Tb] int."""
    import librosa
    _, path = librosa.sequence.dtw(C=1.0 - za.T @ zb, backtrack=True)
    warp = np.zeros(zb.shape[1], np.int64)
    np.maximum.at(warp, path[:, 1], path[:, 0])  # several A frames per B frame: the latest (causal content)
    return warp


class ParallelPairs:
    """Cross-voice decoder training items from a parallel corpus (voices reading the same texts). For a random
    training utterance B: another voice's reading A of the same text (B itself with probability
    ``self_fraction``), A's content codes warped onto B's frames by :func:`dtw_warp` on the encoder's content,
    and a ``frames``-long segment of B. Item: ``codes`` [F] long (A's codes on B's timeline), ``mel`` [n_mels, F],
    ``pitch`` [2, F], ``speaker`` (B's). Why: the decoder only ever learns to rebuild a voice from that voice's own
    codes, and renders another engine's codes poorly in it (held-out flite source into espeak-ng voices: 8.97 dB
    MCD where an espeak-ng source gets 6.56); here it learns to from real readings. ``sources``: the speaker
    indices whose readings serve as A, and only as A (an enrolled source voice, :mod:`rtvc.enrol`; default: every
    voice is both); ``targets``: the speaker indices that may be B (a voice model's own voices, when the corpus
    has more; default: all). ``phones``: A's phone posteriors [P, T] per utterance (a model with a recogniser,
    ``vqvae.phone_channels``), warped with the codes: item key ``phones`` [P, F]."""

    def __init__(self, corpus: Corpus, content: dict[int, np.ndarray], codes: dict[int, np.ndarray],
                 self_fraction: float, sources: set[int] | None = None, targets: set[int] | None = None,
                 phones: dict[int, np.ndarray] | None = None) -> None:
        """``content``: unit-norm encoder output [D, T] and ``codes`` its code indices [T], per training utterance
        index of ``corpus``."""
        self.c, self.content, self.codes, self.self_fraction = corpus, content, codes, self_fraction
        self.phones = phones
        by_text: dict[str, list[int]] = {}
        for i in corpus.indices("train"):
            if corpus.utts[i].get("text"):
                by_text.setdefault(_normalise_text(corpus.utts[i]["text"]), []).append(i)
        spk = lambda i: corpus.utts[i]["spk"]
        self.partners = {i: [j for j in group if spk(j) != spk(i) and (sources is None or spk(j) in sources)]
                         for group in by_text.values() for i in group}
        self.idx = [i for i, p in self.partners.items() if p and (sources is None or spk(i) not in sources)
                    and (targets is None or spk(i) in targets)]
        if not self.idx:
            raise CorpusError("no two voices of the corpus read the same text in training: cross-voice training needs "
                              "a parallel corpus (transcripts shared across voices, as `rtvc data synth` makes)")
        w = np.array([corpus.utts[i]["frames"] for i in self.idx], np.float64)
        self.p = w / w.sum()
        self._warps: dict[tuple[int, int], np.ndarray] = {}

    def item(self, rng: np.random.Generator, frames: int) -> dict[str, torch.Tensor]:
        b = self.idx[rng.choice(len(self.idx), p=self.p)]
        ub = self.c.utts[b]
        if rng.random() < self.self_fraction:
            a, warp = b, slice(None)
        else:
            a = self.partners[b][rng.integers(len(self.partners[b]))]
            if (a, b) not in self._warps:  # ~5 ms per pair; a run revisits pairs, and ~20 bytes per frame is cheap
                self._warps[a, b] = dtw_warp(self.content[a], self.content[b])
            warp = self._warps[a, b]
        start, mel, pitch, _ = self.c.segment(ub, frames, rng)
        # a short utterance's silence padding holds its last code (and posteriors)
        pad = max(0, frames - ub["frames"])
        cut = lambda x: torch.from_numpy(np.ascontiguousarray(
            np.pad(x[..., warp][..., start: start + frames], [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge")))
        item = {"codes": cut(self.codes[a]), "mel": torch.from_numpy(np.ascontiguousarray(mel)),
                "pitch": torch.from_numpy(np.ascontiguousarray(pitch)), "speaker": torch.tensor(ub["spk"])}
        if self.phones is not None:
            item["phones"] = cut(self.phones[a])
        return item

    def batch(self, rng: np.random.Generator, n: int, frames: int) -> dict[str, torch.Tensor]:
        """``n`` items stacked: each key [n, ...]."""
        items = [self.item(rng, frames) for _ in range(n)]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def batches(self, n: int, frames: int, steps: int, seed: int):
        """``steps`` batches of ``n`` items (deterministic in ``seed``)."""
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            yield self.batch(rng, n, frames)
