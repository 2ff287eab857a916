"""Source enrolment (``rtvc enrol``): a voice model adapted to one speaker's way of speaking.

Why: the decoder learns to rebuild each voice from that voice's own codes, and an unseen source's codes carry its
own pronunciation, timing and voice quality, which the decoder renders poorly in other voices. Training the decoder
on cross-voice pairs from other voices helps that source little (the bundled model, held-out source kal: MCD
-0.13 dB), while 100 readings *by that source* bring -0.57 dB with similarity unchanged (model card). So: the user
reads the prompts once (:func:`write_prompts`), every target voice reads the same prompts (its TTS engine: the
voices ``rtvc data synth`` makes), and the decoder learns to rebuild each voice's reading from the user's codes
(:class:`~rtvc.data.dataset.ParallelPairs` with the user's readings as the only sources, warped by DTW on the
encoder's content). Encoder, codebook, speaker table, pitch mapping and vocoder are unchanged: the result is a
voice model with the same voices, size and latency, for that speaker.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import Config
from .data.dataset import Corpus
from .data.prepare import CorpusError, _normalise_text, load_clip, prepare_corpus
from .data.synth import VOICES, sentences, synth_corpus
from .voice import VoiceModel

PROMPT_SEED = 4242   # the sentence generator's seed for prompts (training corpora use 0, test sets 9999)
SOURCE_SPK = -1      # the enrolled speaker's index in the enrolment corpus: a source only, never a decoder voice


def write_prompts(out_dir: str | Path, n: int, exclude: set[str] = frozenset()) -> list[Path]:
    """``out_dir/prompt_NNN.txt``, ``n`` sentences none of which is in ``exclude`` (e.g. a test set's, so that
    evaluating an enrolled model on it stays held out); returns the files."""
    norm = {_normalise_text(t) for t in exclude}
    texts = [t for t in sentences(4 * n + 50, PROMPT_SEED) if _normalise_text(t) not in norm][:n]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        paths.append(out / f"prompt_{i:03d}.txt")
        paths[-1].write_text(t + "\n", encoding="utf-8")
    return paths


def read_recordings(folder: str | Path) -> list[tuple[str, Path]]:
    """(text, wav) for every ``*.wav`` in ``folder`` with its ``.txt`` next to it (what :func:`write_prompts`
    writes); a recording without its text is an error, a prompt without a recording is skipped."""
    folder = Path(folder)
    wavs = sorted(folder.glob("*.wav"))
    if not wavs:
        raise CorpusError(f"{folder}: no recordings (*.wav); read the prompts from `rtvc enrol prompts {folder}` "
                          f"and save each as the prompt's name with .wav")
    lonely = [w.name for w in wavs if not w.with_suffix(".txt").is_file()]
    if lonely:
        raise CorpusError(f"{folder}: {len(lonely)} recording(s) without the text read in them ({lonely[:3]}): each "
                          f"NAME.wav needs NAME.txt")
    return [(w.with_suffix(".txt").read_text(encoding="utf-8").strip(), w) for w in wavs]


def enrol(cfg: Config, model_path: str | Path, recordings: str | Path, out: str | Path,
          voices: list[str] | None = None, progress: bool = True) -> dict:
    """Adapt the decoder of the voice model at ``model_path`` to the speaker of ``recordings``
    (:func:`read_recordings`) for ``voices`` (default: every voice of the model a TTS engine here can read);
    ``cfg.enrol`` sets the steps per voice, rate and self-pair share. Writes the adapted voice model to ``out``; returns a summary."""
    from .train import parallel_pairs, parallel_step
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = VoiceModel.load(model_path)
    tts = {v.name for v in VOICES}
    voices = voices or [v for v in model.speakers if v in tts]
    bad = [v for v in voices if v not in model.speakers or v not in tts]
    if bad or not voices:
        raise ValueError(f"enrolment needs each voice's own reading of your prompts, from a TTS voice rtvc can "
                         f"synthesise that the model has: {bad or 'none'} cannot (the model's: {model.speakers}; "
                         f"TTS voices: {sorted(tts)})")
    recs = read_recordings(recordings)
    mcfg = model.cfg.model
    with tempfile.TemporaryDirectory(prefix="rtvc-enrol-") as tmp:
        synth_corpus(Path(tmp) / "voices", voices=voices, texts=[t for t, _ in recs], progress=progress)
        prepare_corpus(model.cfg, Path(tmp) / "voices", Path(tmp) / "cache", val_fraction=0.0, progress=progress)
        corpus = Corpus(Path(tmp) / "cache", mcfg, (model.frontend.mel_mean.numpy(), model.frontend.mel_std.numpy()))
    for u in corpus.utts:  # the decoder's speaker rows are the model's, not this corpus's order
        u["spk"] = model.speaker_id(u["speaker"])
    for i, (text, path) in enumerate(recs):
        # as the live path sees the voice: no band limit, the model's own frontend and normalisation
        x, _ = load_clip(path, mcfg.sample_rate, min_seconds=0.5)
        x = np.pad(x, (0, (-x.shape[0]) % mcfg.hop_length))
        with torch.no_grad():
            mel, _ = model.frontend(torch.from_numpy(x)[None])
        corpus.utts.append({"id": f"enrolled__{i}", "speaker": "(enrolled)", "text": text, "frames": mel.shape[2],
                            "split": "train", "spk": SOURCE_SPK, "mel": mel[0].numpy(), "pitch": None, "wav": x})
    e = cfg.enrol
    steps = e.steps_per_voice * len(voices)  # each voice learns from its own pairs
    pairs = parallel_pairs(model.vqvae, corpus, e.self_fraction, torch.device("cpu"), sources={SOURCE_SPK})
    opt = torch.optim.Adam(model.vqvae.decoder.parameters(), lr=e.learning_rate)
    losses = []
    for batch in tqdm(pairs.batches(cfg.train.batch_size, cfg.train.segment_hops, steps, cfg.train.seed),
                      total=steps, desc="enrol", unit="step", disable=not progress):
        losses.append(parallel_step(model.vqvae, model.vqvae.decoder, opt, batch)["loss"])
    model.eval()
    # the decoder learned this speaker's own codes, not centred ones: a calibrated conversion must not move them
    # (source centring, vqvae.source_centring; untested together with enrolment)
    model.cfg = model.cfg.replace(**{"vqvae.source_centring": 0.0})
    model.save(out)
    return {"out": str(out), "recordings": len(recs), "voices": voices, "pairs": len(pairs.idx),
            "steps": steps, "loss_first": float(np.mean(losses[:100])), "loss_last": float(np.mean(losses[-100:])),
            "seconds": round(time.perf_counter() - t0, 1)}


def testset_texts(root: str | Path) -> set[str]:
    """The sentences of the test set at ``root`` (``testset.json``), or none when there is none."""
    from .data.synth import known_texts
    return known_texts(root) if (Path(root) / "testset.json").is_file() else set()
