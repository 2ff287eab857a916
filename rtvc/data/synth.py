"""``rtvc data synth``: a multi-speaker corpus from Debian's offline TTS engines, in folder-per-speaker layout.

Voices (genuinely different speakers): flite awb (Scottish male), rms (US male), slt (US female), kal16
(US male, diphone), festival ked (US male, LPC diphone), espeak-ng en-us+f3 (formant female) and en+m3 (formant
male); four more espeak-ng accent/variant pairs widen the range of voices the content encoder sees (formant
synthesis: the same engine, but other formant scales, pitch ranges and accents).  Sentences come from a seeded
generator (no corpus download), so every run can make as many unique sentences as it needs.
Install the engines with ``bash scripts/install_tts.sh`` (flite, festival + festvox-kdlpc16k, espeak-ng).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class TTSVoice:
    name: str      # speaker folder name
    engine: str    # "flite" | "festival" | "espeak-ng"
    voice: str     # engine's voice id
    gender: str

    @property
    def program(self) -> str:
        return "text2wave" if self.engine == "festival" else self.engine

    def command(self, text: str, out: Path) -> list[str]:
        """The command line; festival's text2wave reads the text from stdin (``stdin``)."""
        if self.engine == "flite":
            return ["flite", "-voice", self.voice, "-t", text, "-o", str(out)]
        if self.engine == "festival":
            return ["text2wave", "-eval", f"(voice_{self.voice})", "-o", str(out)]
        return ["espeak-ng", "-v", self.voice, "-s", "150", "-w", str(out), text]

    def stdin(self, text: str) -> str | None:
        return text if self.engine == "festival" else None


VOICES = (
    TTSVoice("awb", "flite", "awb", "male"),
    TTSVoice("rms", "flite", "rms", "male"),
    TTSVoice("slt", "flite", "slt", "female"),
    TTSVoice("kal", "flite", "kal16", "male"),
    TTSVoice("esf", "espeak-ng", "en-us+f3", "female"),
    TTSVoice("esm", "espeak-ng", "en+m3", "male"),
    TTSVoice("ked", "festival", "ked_diphone", "male"),
    TTSVoice("esm2", "espeak-ng", "en-gb-x-rp+m7", "male"),
    TTSVoice("esf2", "espeak-ng", "en-029+f2", "female"),
    TTSVoice("esm3", "espeak-ng", "en-us-nyc+m5", "male"),
    TTSVoice("esf3", "espeak-ng", "en-gb-scotland+f4", "female"),
)

_ADJ = ("quiet old small bright heavy yellow clever gentle silent broken golden narrow distant frozen wooden "
        "ancient busy careful curious empty honest lucky modern nervous patient proud rapid simple sudden tall "
        "warm wild young bitter brave calm eager fancy fierce grumpy hollow jolly lazy mighty polite").split()
_NOUN = ("dog garden teacher river window engine letter doctor village ladder basket hammer island kitchen "
         "mountain pencil rabbit sailor station tiger ticket violin wagon bridge candle castle farmer forest "
         "guitar harbor jacket lemon market needle orange parrot pilot pocket puzzle rocket shadow soldier "
         "spider storm tunnel wallet whistle wizard").split()
_VERB = ("found carried painted watched followed opened cleaned repaired dropped noticed pushed borrowed "
         "described counted delivered guarded hid lifted measured ordered packed pulled reached saved "
         "shared shook signed tested touched visited washed wrapped").split()
_PLACE = ("near the station", "behind the old barn", "after the long storm", "before sunrise", "in the crowded market",
          "under the wooden bridge", "at the edge of town", "during the quiet night", "beside the frozen lake",
          "on the narrow road", "inside the busy kitchen", "across the wide river", "by the harbor wall")
_NUM = "two three four five six seven eight nine ten eleven twelve twenty".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` unique English sentences from a seeded grammar (statements, questions, numbers)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    forms = (
        lambda: f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} "
                f"{rng.choice(_NOUN)} {rng.choice(_PLACE)}.",
        lambda: f"Why did the {rng.choice(_NOUN)} leave the {rng.choice(_ADJ)} {rng.choice(_NOUN)} "
                f"{rng.choice(_PLACE)}?",
        lambda: f"{rng.choice(_NUM).capitalize()} {rng.choice(_ADJ)} {rng.choice(_NOUN)}s {rng.choice(_VERB)} "
                f"a {rng.choice(_NOUN)} {rng.choice(_PLACE)}.",
        lambda: f"Please ask the {rng.choice(_NOUN)} if the {rng.choice(_NOUN)} is {rng.choice(_ADJ)} today.",
        lambda: f"We {rng.choice(_VERB)} {rng.choice(_NUM)} {rng.choice(_NOUN)}s, and then the "
                f"{rng.choice(_NOUN)} {rng.choice(_VERB)} them {rng.choice(_PLACE)}.",
    )
    while len(out) < n:
        s = rng.choice(forms)()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def available_voices() -> list[TTSVoice]:
    return [v for v in VOICES if shutil.which(v.program)]


def synth_corpus(out_dir: str | Path, n_sentences: int = 200, voices: list[str] | None = None, seed: int = 0,
                 jobs: int = 2, progress: bool = True, texts: list[str] | None = None) -> dict[str, int]:
    """Write ``out_dir/<speaker>/<id>.wav`` + ``.txt`` for every (voice, sentence); returns files per speaker.

    Every voice reads every sentence (a parallel corpus, which evaluation uses). Existing files are kept, so an
    interrupted run resumes.
    """
    have = {v.name: v for v in available_voices()}
    wanted = voices or [v.name for v in VOICES]
    unknown = [v for v in wanted if v not in {x.name for x in VOICES}]
    if unknown:
        raise ValueError(f"unknown TTS voice(s) {unknown}; known: {[v.name for v in VOICES]}")
    missing = [v for v in wanted if v not in have]
    if missing:
        raise RuntimeError(f"TTS engine for voice(s) {missing} is not installed: run `bash scripts/install_tts.sh` "
                           "(Debian packages flite, festival, festvox-kdlpc16k, espeak-ng)")
    out = Path(out_dir)
    texts = texts if texts is not None else sentences(n_sentences, seed)
    jobs_list = []
    for name in wanted:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            wav = out / name / f"{name}_{i:05d}.wav"
            if not wav.exists():
                jobs_list.append((have[name], text, wav))

    def run(job: tuple[TTSVoice, str, Path]) -> None:
        voice, text, wav = job
        tmp = wav.with_suffix(".tmp.wav")
        r = subprocess.run(voice.command(text, tmp), input=voice.stdin(text), capture_output=True, text=True)
        if r.returncode != 0 or not tmp.exists():
            raise RuntimeError(f"{voice.engine} failed for {wav.name}: {r.stderr.strip()}")
        wav.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        tmp.replace(wav)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for _ in tqdm(pool.map(run, jobs_list), total=len(jobs_list), desc="synth", unit="utt",
                      disable=not progress or not jobs_list):
            pass
    return {name: len(list((out / name).glob("*.wav"))) for name in wanted}


def build_testset(out_dir: str | Path, source: str, targets: list[str], n_sentences: int, exclude_texts: set[str],
                  seed: int = 9999, progress: bool = True) -> dict:
    """A held-out parallel test set: ``n_sentences`` sentences none of which is in ``exclude_texts`` (the training
    corpus), read by the ``source`` voice (which must not be a target) and by every target voice.
    Writes ``out_dir/testset.json``."""
    if source in targets:
        raise ValueError(f"the source voice '{source}' must not also be a target")
    norm = {t.strip().lower() for t in exclude_texts}
    pool = [t for t in sentences(n_sentences * 4 + 50, seed) if t.strip().lower() not in norm]
    if len(pool) < n_sentences:
        raise ValueError("could not find enough sentences outside the training corpus")
    texts = pool[:n_sentences]
    out = Path(out_dir)
    synth_corpus(out, len(texts), [source, *targets], progress=progress, texts=texts)
    items = [{"text": t, "source": f"{source}/{source}_{i:05d}.wav",
              "refs": {v: f"{v}/{v}_{i:05d}.wav" for v in targets}} for i, t in enumerate(texts)]
    man = {"source": source, "targets": targets, "items": items}
    (out / "testset.json").write_text(json.dumps(man, indent=1))
    return man
