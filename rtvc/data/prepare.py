"""``rtvc data prepare DIR``: read a corpus, resample, trim, split, and cache features for training.

Layouts (detected):
  * VCTK:      DIR/wav48_silence_trimmed/p225/p225_001_mic1.flac (or wav48/.../*.wav) + DIR/txt/p225/p225_001.txt
  * LibriTTS:  DIR/[subset/]<speaker>/<chapter>/<speaker>_<chapter>_*.wav + same-stem .normalized.txt
  * folders:   DIR/<speaker>/*.wav|flac|ogg (+ optional same-stem .txt), e.g. what `rtvc data synth` writes

Train/validation split is by *text* as well as by file: a sentence is validation for every speaker or for
none, so no validation sentence is ever heard in training (files without text are split by file name).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import soxr
import torch
from tqdm import tqdm

from ..config import Config
from ..frontend import Frontend, yin

AUDIO_EXT = (".wav", ".flac", ".ogg")


class CorpusError(ValueError):
    """A problem with the user's corpus, phrased so they can fix it."""


@dataclass(frozen=True)
class Item:
    speaker: str
    path: Path
    text: str | None


def _text_for(path: Path, candidates: list[Path]) -> str | None:
    for c in candidates:
        if c.is_file():
            return c.read_text(encoding="utf-8", errors="replace").strip()
    return None


def scan_corpus(root: str | Path) -> tuple[str, list[Item]]:
    """Detect the layout and list (speaker, audio file, text) items."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist")
    wav_dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("wav48")]
    if wav_dirs and (root / "txt").is_dir():  # VCTK
        items = []
        for f in sorted(p for p in wav_dirs[0].rglob("*") if p.suffix in AUDIO_EXT):
            if f.stem.endswith("_mic2"):
                continue  # VCTK 0.92 has two microphones per utterance; use mic1
            spk = f.parent.name
            base = re.sub(r"_mic\d$", "", f.stem)
            items.append(Item(spk, f, _text_for(f, [root / "txt" / spk / f"{base}.txt"])))
        return "vctk", items
    if next(root.rglob("*.normalized.txt"), None) is not None:  # LibriTTS
        items = []
        for f in sorted(root.rglob("*.wav")):
            spk = f.stem.split("_")[0]
            items.append(Item(spk, f, _text_for(f, [f.with_suffix(".normalized.txt"), f.with_suffix(".original.txt")])))
        return "libritts", items
    speakers = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not speakers:
        raise CorpusError(f"{root} has no speaker folders: expected {root}/<speaker>/*.wav (or a VCTK/LibriTTS tree)")
    items = []
    for d in speakers:
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in AUDIO_EXT and not p.name.endswith(".tmp.wav"))
        if not files:
            raise CorpusError(f"speaker folder {d} contains no audio files ({', '.join(AUDIO_EXT)})")
        items += [Item(d.name, f, _text_for(f, [f.with_suffix(".txt")])) for f in files]
    return "folders", items


def _normalise_text(t: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", t.lower()).strip()


def is_validation(item: Item, fraction: float) -> bool:
    """Deterministic split by text hash (or file name without text)."""
    key = _normalise_text(item.text) if item.text else f"{item.speaker}/{item.path.name}"
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def load_clip(path: Path, rate: int, min_seconds: float, top_db: float = 40.0,
              band_hz: float = 0.0) -> tuple[np.ndarray, int]:
    """Read, mix to mono, resample to ``rate``, trim silence; returns (wav, original channel count).
    ``band_hz`` > 0: nothing above it is kept (resampled through ``2 * band_hz``, soxr's anti-alias filter)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise CorpusError(f"cannot read {path}: {e}") from None
    channels = data.shape[1]
    x = data.mean(axis=1)
    if band_hz and 2 * band_hz < min(sr, rate):
        x, sr = soxr.resample(x, sr, int(2 * band_hz), "HQ").astype(np.float32), int(2 * band_hz)
    if sr != rate:
        x = soxr.resample(x, sr, rate, "HQ").astype(np.float32)
    x, _ = librosa.effects.trim(x, top_db=top_db, frame_length=1024, hop_length=256)
    if x.shape[0] < min_seconds * rate:
        raise CorpusError(f"{path} is too short after trimming silence ({x.shape[0] / rate:.2f} s < {min_seconds} s)")
    return x.astype(np.float32), channels


def prepare_corpus(cfg: Config, root: str | Path, out: str | Path, val_fraction: float = 0.05,
                   min_seconds: float = 0.5, skip_bad: bool = False, progress: bool = True,
                   band_hz: float = 0.0) -> dict:
    """Cache features of every utterance under ``out`` and write ``out/manifest.json``; returns the manifest.
    ``band_hz``: band-limit every clip (e.g. 8000 to add wideband recordings to a model trained on 16 kHz voices,
    like the bundled one)."""
    layout, items = scan_corpus(root)
    if not items:
        raise CorpusError(f"{root}: no audio files found")
    m = cfg.model
    frontend = Frontend(m)
    out = Path(out)
    (out / "feats").mkdir(parents=True, exist_ok=True)
    channels: dict[str, tuple[int, Path]] = {}
    utts, skipped = [], []
    for item in tqdm(items, desc="prepare", unit="utt", disable=not progress):
        try:
            x, ch = load_clip(item.path, m.sample_rate, min_seconds, band_hz=band_hz)
            first = channels.setdefault(item.speaker, (ch, item.path))
            if first[0] != ch:
                raise CorpusError(f"mono/stereo mismatch for speaker '{item.speaker}': {first[1]} has {first[0]} "
                                  f"channel(s) but {item.path} has {ch}; convert the corpus to one channel layout")
        except CorpusError as e:
            if not skip_bad:
                raise CorpusError(f"{e} (use --skip-bad to skip such files)") from None
            skipped.append(str(e))
            continue
        x = np.pad(x, (0, (-x.shape[0]) % m.hop_length))
        with torch.no_grad():
            frames = frontend.frames(torch.from_numpy(x)[None])
            logmel = frontend.log_mel(frames)[0].numpy()
        f0, voiced = yin(frames[0].numpy(), m)
        uid = f"{item.speaker}__{item.path.stem}"
        np.savez(out / "feats" / f"{uid}.npz", wav=x, logmel=logmel.astype(np.float32), f0=f0.astype(np.float32),
                 voiced=voiced)
        utts.append({"id": uid, "speaker": item.speaker, "text": item.text, "frames": int(logmel.shape[1]),
                     "split": "val" if is_validation(item, val_fraction) else "train"})
    if not utts:
        raise CorpusError(f"{root}: every file was skipped: {skipped[:3]}")
    manifest = _statistics(out, utts)
    manifest.update(layout=layout, source=str(Path(root).resolve()), skipped=skipped,
                    model={"sample_rate": m.sample_rate, "hop_length": m.hop_length, "win_length": m.win_length,
                           "n_fft": m.n_fft, "n_mels": m.n_mels, "fmin": m.fmin, "fmax": m.fmax})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _statistics(out: Path, utts: list[dict]) -> dict:
    """Mel mean/std over training frames; ln-F0 mean/std per speaker and overall (the conversion prior)."""
    s1 = s2 = 0.0
    n = 0
    lf0: dict[str, list[np.ndarray]] = {}
    for u in utts:
        z = np.load(out / "feats" / f"{u['id']}.npz")
        if u["split"] == "train":
            s1 = s1 + z["logmel"].sum(1)
            s2 = s2 + np.square(z["logmel"].astype(np.float64)).sum(1)
            n += z["logmel"].shape[1]
        lf0.setdefault(u["speaker"], []).append(np.log(z["f0"][z["voiced"]]))
    if n == 0:
        raise CorpusError("no training utterances: the corpus is too small for a validation split")
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-4))
    pitch = {}
    for spk, parts in lf0.items():
        v = np.concatenate(parts)
        pitch[spk] = [float(v.mean()), float(max(v.std(), 0.05))] if v.size > 10 else [float(np.log(150.0)), 0.3]
    allv = np.array([p[0] for p in pitch.values()])
    prior = [float(allv.mean()), float(np.mean([p[1] for p in pitch.values()]) + allv.std())]
    speakers = sorted({u["speaker"] for u in utts})
    return {"speakers": speakers, "utterances": utts, "mel_mean": mean.tolist(), "mel_std": std.tolist(),
            "pitch": pitch, "prior": prior}
