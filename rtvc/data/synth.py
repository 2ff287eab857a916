"""``rtvc data synth``: a multi-speaker corpus from Debian's offline TTS engines, in folder-per-speaker layout.

Voices (genuinely different speakers): flite awb (Scottish male), rms (US male), slt (US female), kal16
(US male, diphone), festival ked (US male, LPC diphone), espeak-ng en-us+f3 (formant female) and en+m3 (formant
male); four more espeak-ng accent/variant pairs widen the range of voices the content encoder sees (formant
synthesis: the same engine, but other formant scales, pitch ranges and accents). Nine festival voices of other
languages (Italian, Czech, Finnish, Russian, Catalan; mostly diphone voices recorded from real speakers) read the
same English text with their own letter-to-sound rules: accented English from more real vocal tracts, for
training the content encoder (a source voice it never saw sounds less foreign to it). MBROLA's four English
diphone voices (us1 female, us2 / us3 US male, en1 British male; real speakers' diphones, read through espeak-ng's
English phones and prosody) add more real vocal tracts reading English, as do RHVoice's HTS voices (CMU ARCTIC's
bdl and clb, two Russian speakers' English), SVOX Pico's two English women and festival's rab. Sentences come from a
seeded generator (no corpus download), so every run can make as many unique sentences as it needs.
Install the engines and voices with ``bash scripts/install_tts.sh``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import soxr
from tqdm import tqdm


@dataclass(frozen=True)
class TTSVoice:
    name: str      # speaker folder name
    engine: str    # "flite" | "festival" | "espeak-ng" | "mbrola" (an MBROLA diphone voice, driven by espeak-ng)
    #                | "rhvoice" (RHVoice-test) | "pico" (SVOX Pico's pico2wave; ``voice`` is its language)
    voice: str     # engine's voice id
    gender: str
    package: str   # the Debian package that provides it
    rate: int = 0  # resample the engine's output to this rate (0: keep it)

    @property
    def program(self) -> str:
        return {"festival": "text2wave", "mbrola": "espeak-ng", "rhvoice": "RHVoice-test",
                "pico": "pico2wave"}.get(self.engine, self.engine)

    @property
    def packages(self) -> tuple[str, ...]:
        """The Debian packages it needs: its own, and the engine that drives it (festival; espeak-ng and mbrola)."""
        return {"festival": (self.package, "festival"),
                "mbrola": (self.package, "mbrola", "espeak-ng"),
                "rhvoice": (self.package, "rhvoice")}.get(self.engine, (self.package,))

    @property
    def installed(self) -> bool:
        """The engine is on PATH and, for festival and MBROLA, this voice's files are installed."""
        if not shutil.which(self.program):
            return False
        if self.engine == "festival":
            return any(Path("/usr/share/festival/voices").glob(f"*/{self.voice}"))
        if self.engine == "mbrola":  # espeak-ng's "mb-us1" reads /usr/share/mbrola/us1/us1
            return shutil.which("mbrola") is not None and Path(f"/usr/share/mbrola/{self.voice[3:]}").is_dir()
        if self.engine == "rhvoice":
            return Path(f"/usr/share/RHVoice/voices/{self.voice}").is_dir()
        return True

    def command(self, text: str, out: Path) -> list[str]:
        """The command line; festival's text2wave reads the text from stdin (``stdin``)."""
        if self.engine == "flite":
            return ["flite", "-voice", self.voice, "-t", text, "-o", str(out)]
        if self.engine == "festival":
            return ["text2wave", "-eval", f"(voice_{self.voice})", "-o", str(out)]
        if self.engine == "rhvoice":
            return ["RHVoice-test", "-p", self.voice, "-o", str(out)]
        if self.engine == "pico":
            return ["pico2wave", "-l", self.voice, "-w", str(out), text]
        return ["espeak-ng", "-v", self.voice, "-s", "150", "-w", str(out), text]  # espeak-ng and mbrola

    def stdin(self, text: str) -> str | None:
        return text if self.engine in ("festival", "rhvoice") else None


VOICES = (
    TTSVoice("awb", "flite", "awb", "male", "flite"),
    TTSVoice("rms", "flite", "rms", "male", "flite"),
    TTSVoice("slt", "flite", "slt", "female", "flite"),
    TTSVoice("kal", "flite", "kal16", "male", "flite"),
    TTSVoice("esf", "espeak-ng", "en-us+f3", "female", "espeak-ng"),
    TTSVoice("esm", "espeak-ng", "en+m3", "male", "espeak-ng"),
    TTSVoice("ked", "festival", "ked_diphone", "male", "festvox-kdlpc16k"),
    TTSVoice("esm2", "espeak-ng", "en-gb-x-rp+m7", "male", "espeak-ng"),
    TTSVoice("esf2", "espeak-ng", "en-029+f2", "female", "espeak-ng"),
    TTSVoice("esm3", "espeak-ng", "en-us-nyc+m5", "male", "espeak-ng"),
    TTSVoice("esf3", "espeak-ng", "en-gb-scotland+f4", "female", "espeak-ng"),
    # other languages' festival voices reading English (accented): training voices. The Czech (32 / 44.1 kHz) and
    # Finnish (22.05 kHz) ones are written at 16 kHz like flite's and festival's English voices: band above 8 kHz
    # in a few voices only would tie bandwidth to identity, and a model trained on 16 kHz voices, continued on
    # them (--finetune keeps its normalisation), would see those mel bins hundreds of spreads from its mean.
    TTSVoice("itf", "festival", "lp_diphone", "female", "festvox-italp16k"),
    TTSVoice("itm", "festival", "pc_diphone", "male", "festvox-itapc16k"),
    TTSVoice("czf", "festival", "czech_dita", "female", "festvox-czech-dita", 16000),
    TTSVoice("czm", "festival", "czech_machac", "male", "festvox-czech-machac", 16000),
    TTSVoice("czm2", "festival", "czech_ph", "male", "festvox-czech-ph", 16000),
    TTSVoice("fif", "festival", "suo_fi_lj_diphone", "female", "festvox-suopuhe-lj", 16000),
    TTSVoice("fim", "festival", "hy_fi_mv_diphone", "male", "festvox-suopuhe-mv", 16000),
    TTSVoice("rum", "festival", "msu_ru_nsh_clunits", "male", "festvox-ru"),
    TTSVoice("caf", "festival", "upc_ca_ona_hts", "female", "festvox-ca-ona-hts"),
    # MBROLA's English diphone voices (real speakers' recordings, like kal; espeak-ng's English phones and
    # prosody): Debian's contrib / non-free components, which `scripts/install_tts.sh` enables on Debian.
    # Licence: the MBROLA databases are free for non-commercial, non-military use.
    TTSVoice("mbf", "mbrola", "mb-us1", "female", "mbrola-us1"),
    TTSVoice("mbm", "mbrola", "mb-us2", "male", "mbrola-us2"),
    TTSVoice("mbm2", "mbrola", "mb-us3", "male", "mbrola-us3"),
    TTSVoice("mbm3", "mbrola", "mb-en1", "male", "mbrola-en1"),
    # Statistical-parametric (HTS) voices of other real speakers: RHVoice's CMU ARCTIC bdl (US male) and clb (US
    # female) and its two Russian speakers' English voices; SVOX Pico's US and British English women; festival's
    # rab (British male LPC diphone). Written at 16 kHz like the rest. Left out as duplicates of voices above:
    # RHVoice's alan (Alan W Black: flite's awb) and slt.
    TTSVoice("bdl", "rhvoice", "bdl", "male", "rhvoice-english", 16000),
    TTSVoice("clb", "rhvoice", "clb", "female", "rhvoice-english", 16000),
    TTSVoice("evg", "rhvoice", "evgeniy-eng", "male", "rhvoice-english", 16000),
    TTSVoice("lyu", "rhvoice", "lyubov", "female", "rhvoice-english", 16000),
    TTSVoice("pcf", "pico", "en-US", "female", "libttspico-utils"),
    TTSVoice("pcf2", "pico", "en-GB", "female", "libttspico-utils"),
    TTSVoice("rab", "festival", "rab_diphone", "male", "festvox-rablpc16k"),
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


def debian_packages(names: list[str] | None = None) -> list[str]:
    """The Debian packages the named voices (default: all) need; ``scripts/install_tts.sh`` installs these."""
    return sorted({p for v in VOICES if names is None or v.name in names for p in v.packages})


def synthesize(voice: TTSVoice, text: str, wav: Path) -> str | None:
    """Write ``wav`` (+ its ``.txt``) with one sentence; the engine's complaint when it wrote no audio (festival
    exits 0 on some errors, leaving an empty file), else None."""
    tmp = wav.with_suffix(".tmp.wav")
    r = subprocess.run(voice.command(text, tmp), input=voice.stdin(text), capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists() or tmp.stat().st_size <= 44:  # 44 bytes: a WAV header alone
        tmp.unlink(missing_ok=True)
        return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
    if voice.rate:
        x, sr = sf.read(str(tmp), dtype="float32")
        if sr != voice.rate:
            sf.write(str(tmp), soxr.resample(x, sr, voice.rate), voice.rate, subtype="PCM_16")
    wav.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    tmp.replace(wav)
    return None


def available_voices() -> list[TTSVoice]:
    return [v for v in VOICES if v.installed]


def synth_corpus(out_dir: str | Path, n_sentences: int = 200, voices: list[str] | None = None, seed: int = 0,
                 jobs: int = 2, progress: bool = True, texts: list[str] | None = None,
                 strict: bool = False) -> dict[str, int]:
    """Write ``out_dir/<speaker>/<id>.wav`` + ``.txt`` for every (voice, sentence); returns files per speaker.

    Every voice reads every sentence (a parallel corpus, which evaluation uses). Existing files are kept, so an
    interrupted run resumes. A sentence an engine cannot say (festival's Italian voices fail on a few) is left out
    of that voice with a warning; ``strict`` (the test set) makes it an error.
    """
    have = {v.name: v for v in available_voices()}
    wanted = voices or [v.name for v in VOICES]
    unknown = [v for v in wanted if v not in {x.name for x in VOICES}]
    if unknown:
        raise ValueError(f"unknown TTS voice(s) {unknown}; known: {[v.name for v in VOICES]}")
    missing = [v for v in wanted if v not in have]
    if missing:
        raise RuntimeError(f"TTS voice(s) {missing} not installed: run `bash scripts/install_tts.sh` (Debian packages "
                           f"{' '.join(debian_packages(missing))})")
    out = Path(out_dir)
    texts = texts if texts is not None else sentences(n_sentences, seed)
    jobs_list = []
    for name in wanted:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            wav = out / name / f"{name}_{i:05d}.wav"
            if not wav.exists():
                jobs_list.append((have[name], text, wav))

    def run(job: tuple[TTSVoice, str, Path]) -> str | None:
        return synthesize(*job)

    failed: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for job, err in tqdm(zip(jobs_list, pool.map(run, jobs_list)), total=len(jobs_list), desc="synth",
                             unit="utt", disable=not progress or not jobs_list):
            if err is not None:
                failed.setdefault(job[0].name, []).append(f"{job[2].name}: {err}")
    for name, errs in failed.items():
        have_any = any((out / name).glob("*.wav"))
        msg = f"{name}: {len(errs)} of {len(texts)} sentences gave no audio (first: {errs[0]})"
        if strict or not have_any:  # a test set must be complete; a voice that never speaks is a broken install
            raise RuntimeError(msg)
        print(f"rtvc data synth: warning: {msg}; the corpus keeps the others", file=sys.stderr)
    return {name: len(list((out / name).glob("*.wav"))) for name in wanted}


def known_texts(path: str | Path) -> set[str]:
    """The sentences a prepared cache (``manifest.json``: its utterances' texts) or a test set (``testset.json``)
    holds: what a new test set must leave out (``rtvc data testset --exclude``)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return {u["text"] for u in json.loads((p / "manifest.json").read_text())["utterances"] if u["text"]}
    if (p / "testset.json").is_file():
        from ..evaluate import load_testset
        return {it.text for it in load_testset(p)[2]}
    raise FileNotFoundError(f"{p}: neither a prepared cache (manifest.json) nor a test set (testset.json)")


def build_testset(out_dir: str | Path, source: str, targets: list[str], n_sentences: int, exclude_texts: set[str],
                  seed: int = 9999, progress: bool = True) -> dict:
    """A held-out parallel test set: ``n_sentences`` sentences none of which is in ``exclude_texts`` (the training
    corpus), read by the ``source`` voice (which must not be a target) and by every target voice. ``seed``: the
    sentence generator's; 9999 is the bundled model's test set, another seed with that test set excluded gives a
    development set to tune on. Writes ``out_dir/testset.json``."""
    if source in targets:
        raise ValueError(f"the source voice '{source}' must not also be a target")
    norm = {t.strip().lower() for t in exclude_texts}
    pool = [t for t in sentences(n_sentences * 4 + 50, seed) if t.strip().lower() not in norm]
    if len(pool) < n_sentences:
        raise ValueError("could not find enough sentences outside the training corpus")
    texts = pool[:n_sentences]
    out = Path(out_dir)
    synth_corpus(out, len(texts), [source, *targets], progress=progress, texts=texts, strict=True)
    items = [{"text": t, "source": f"{source}/{source}_{i:05d}.wav",
              "refs": {v: f"{v}/{v}_{i:05d}.wav" for v in targets}} for i, t in enumerate(texts)]
    man = {"source": source, "targets": targets, "items": items}
    (out / "testset.json").write_text(json.dumps(man, indent=1))
    return man
