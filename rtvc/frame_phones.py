"""Frame phone labels for the phone recogniser (``vqvae.phone_channels``): which phone each 10 ms frame holds.

espeak-ng's MBROLA voices (mb-us1/2/3, ``scripts/install_tts.sh``) print the phones they say with their durations
(``--pho``), so an MBROLA reading of a sentence is labelled exactly. Any other reading of the same sentence (another
voice, a human) gets its labels from those readings through DTW on the content encoder's output
(:func:`rtvc.data.dataset.dtw_warp`): the majority of the references' warped labels. A corpus only needs the text
of its utterances, as for the CTC phone loss (:mod:`rtvc.phones`).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

# The US MBROLA voices' phones (SAMPA), aspirated stops merged into their plain ones (the three voices differ in
# marking aspiration). "_" is silence. The recogniser's output rows, in this order: a model file's recogniser
# matches this list (changing it means retraining the phone stage).
FRAME_PHONES = ("4", "@", "@U", "A", "AI", "D", "E", "EI", "I", "N", "O", "S", "T", "U", "V", "Z", "_", "aU", "b",
                "d", "dZ", "f", "g", "h", "i", "j", "k", "l", "m", "n", "p", "r", "r=", "s", "t", "tS", "u", "v", "w",
                "z", "{")
SILENCE = FRAME_PHONES.index("_")
MERGE = {"t_h": "t", "k_h": "k", "p_h": "p"}
MBROLA_VOICES = ("mb-us1", "mb-us2", "mb-us3")


def mbrola_phones(voice: str, text: str, speed: int = 150) -> list[tuple[str, float, float]]:
    """(phone, start ms, end ms) of espeak-ng's MBROLA ``voice`` reading ``text`` at ``speed`` words per minute
    (150: ``rtvc data synth``'s rate)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("frame phone labels need espeak-ng and its MBROLA US voices: run scripts/install_tts.sh")
    out = subprocess.run([exe, "-v", voice, "-s", str(speed), "--pho", "-q", text], capture_output=True,
                         text=True, check=True).stdout
    phones, t = [], 0.0
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 2:
            phones.append((MERGE.get(f[0], f[0]), t, t + int(f[1])))
            t += int(f[1])
    if not phones:
        raise RuntimeError(f"espeak-ng -v {voice} --pho printed no phones for {text!r}: is mbrola-{voice[3:]} "
                           "installed (scripts/install_tts.sh)?")
    return phones


def frame_labels(phones: list[tuple[str, float, float]], n: int, hop: int, win: int, rate: int) -> np.ndarray:
    """Index into :data:`FRAME_PHONES` of each of ``n`` frames [n] int64, the phone at the centre of the frame's
    causal analysis window (frame t covers samples ((t + 1) hop - win, (t + 1) hop]). Phones outside the list
    (another language's) and uncovered time count as silence."""
    centre = ((np.arange(n) + 1) * hop - win / 2) / rate * 1000.0
    lab = np.full(n, SILENCE, np.int64)
    index = {p: k for k, p in enumerate(FRAME_PHONES)}
    for p, a, b in phones:
        lab[(centre >= a) & (centre < b)] = index.get(p, SILENCE)
    return lab


def vote(warped: np.ndarray) -> np.ndarray:
    """Labels [R, T] of R references warped onto one reading -> [T]: per frame, the label most references give
    (ties: the earliest reference's)."""
    agree = (warped[:, None, :] == warped[None, :, :]).sum(1)                       # [R, T]: who agrees with r
    return warped[agree.argmax(0), np.arange(warped.shape[1])]
