"""Phone transcripts and the encoder's auxiliary CTC loss (training only; ``train.phone_ctc``).

Why: a conversion from an unseen voice keeps that voice's *rendering* in its code sequences (session 13's oracle:
the decoder renders an unseen source 0.65 dB closer to the targets once it has learnt that source's codes, and
other sources' pairs teach it little of that). Asking the codes to also spell the phones, whoever reads them, makes
the same phone from two voices closer to the same code sequence. The transcripts come from the corpus's own text,
through espeak-ng's phonemizer (IPA; multi-letter phonemes kept whole, stress dropped), so a corpus needs text,
not a phone alignment: CTC finds the alignment itself. A causal encoder may emit a phone late; CTC allows that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.dataset import Corpus, CorpusError

ZWJ = "\u200d"  # espeak-ng --ipa=3 joins the letters of one phoneme (t‍ʃ, e‍ɪ) with it
MAX_FRAMES = 1500  # utterances longer than 15 s are left out of the CTC batches (memory, not accuracy)


def phonemize(text: str, language: str) -> list[str]:
    """``text`` -> its phones by espeak-ng (``language``: an espeak-ng voice, e.g. ``en-us``), e.g. "Cheese." ->
    ['tʃ', 'iː', 'z']."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError("train.phone_ctc needs espeak-ng to transcribe the corpus's text into phones: install it "
                          "(scripts/install_tts.sh, or apt-get install espeak-ng) or set train.phone_ctc = 0")
    out = subprocess.run([exe, "-q", "--ipa=3", "-v", language, text], capture_output=True, text=True, check=True)
    phones: list[str] = []
    for ch in out.stdout.replace("ˈ", "").replace("ˌ", "").replace("\n", " "):
        if ch == " ":
            continue
        if phones and (ch in ("ː", ZWJ) or phones[-1].endswith(ZWJ)):
            phones[-1] += ch  # a length mark, or the next letter of a joined phoneme
        else:
            phones.append(ch)
    return [p.replace(ZWJ, "") for p in phones]


class PhoneTargets:
    """The corpus's utterances that have text and belong to ``voices`` (empty: every voice), with their phone
    indices (1-based; 0 is CTC's blank), and whole-utterance batches of them."""

    def __init__(self, corpus: Corpus, voices: tuple[str, ...], language: str) -> None:
        unknown = sorted(set(voices) - set(corpus.speakers))
        if unknown:
            raise CorpusError(f"train.phone_voices names voices the corpus lacks: {unknown} (it has {corpus.speakers})")
        self.corpus = corpus
        keep = set(voices or corpus.speakers)
        self.items = {split: [i for i in corpus.indices(split) if corpus.utts[i]["speaker"] in keep
                              and corpus.utts[i].get("text") and corpus.utts[i]["frames"] <= MAX_FRAMES]
                      for split in ("train", "val")}
        texts = sorted({corpus.utts[i]["text"] for s in self.items.values() for i in s})
        # one espeak-ng process per sentence (~15 ms each: 25 s for 1600 sentences), as many at once as there are
        # cores: espeak-ng's output has no reliable line-per-sentence mapping to batch them through one process
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            phones = dict(zip(texts, pool.map(lambda t: phonemize(t, language), texts)))
        self.vocab = sorted({p for ps in phones.values() for p in ps})
        index = {p: k + 1 for k, p in enumerate(self.vocab)}
        self.targets = {t: np.array([index[p] for p in ps], np.int64) for t, ps in phones.items()}

    def __bool__(self) -> bool:
        return bool(self.items["train"])

    def batch(self, split: str, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``n`` random whole utterances: ``mel`` [n, n_mels, T] (padded with silence), ``frames`` [n],
        ``phones`` [sum of lengths] (concatenated), ``lengths`` [n]."""
        c, pool = self.corpus, self.items[split]
        us = [c.utts[pool[k]] for k in rng.choice(len(pool), min(n, len(pool)), replace=False)]
        t = max(u["frames"] for u in us)
        sil = c.silence_mel()[:, None]
        mel = np.stack([np.concatenate([u["mel"], np.repeat(sil, t - u["frames"], 1)], 1) for u in us])
        tg = [self.targets[u["text"]] for u in us]
        return {"mel": torch.from_numpy(mel), "frames": torch.tensor([u["frames"] for u in us]),
                "phones": torch.from_numpy(np.concatenate(tg)), "lengths": torch.tensor([len(x) for x in tg])}


class PhoneHead(nn.Module):
    """Training-only per-frame phone classifier on the quantized codes [B, D, T] (no context of its own: what it
    reads must be in each frame's code). Not part of the voice model. ``relearned_when_reshaped``: a checkpoint's
    head for another phone set is relearned (weights and optimiser), not reloaded."""

    relearned_when_reshaped = True

    def __init__(self, code_dim: int, n_phones: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(code_dim, hidden, 1), nn.LeakyReLU(0.2), nn.Conv1d(hidden, n_phones + 1, 1))

    def forward(self, q: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """q [B, D, T] -> CTC loss per phone (mean over the batch), a scalar."""
        logp = F.log_softmax(self.net(q), dim=1).permute(2, 0, 1)                      # [T, B, n_phones + 1]
        return F.ctc_loss(logp, batch["phones"], batch["frames"], batch["lengths"], zero_infinity=True)
