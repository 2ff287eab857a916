"""The whole path on CPU: `rtvc data synth` -> `rtvc data prepare` -> `rtvc train vqvae/teacher/student` (short,
tiny config) -> `rtvc convert` of a held-out sentence with the resulting voice model. Quality is not judged here
(the default-model issue measures it); every step must work and produce sane audio."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import TINY

pytestmark = pytest.mark.skipif(not (shutil.which("flite") and shutil.which("espeak-ng")),
                                reason="flite/espeak-ng not installed (scripts/install_tts.sh)")


def test_synth_prepare_train_convert(tmp_path):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    sets += [f"--set=paths.data_dir={json.dumps(str(tmp_path / 'data'))}",
             f"--set=paths.checkpoint_dir={json.dumps(str(tmp_path / 'ck'))}"]

    def rtvc(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "rtvc", *sets, *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"rtvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    rtvc("data", "synth", "--sentences", "10", "--voices", "awb,slt,esf")
    out = rtvc("data", "prepare", str(tmp_path / "data" / "synth"), "--val-fraction", "0.2")
    assert "3 speakers, 30 utterances" in out
    for stage in ("vqvae", "teacher", "student"):
        rtvc("train", stage, "--steps", "4")
    model = tmp_path / "ck" / "model.pt"
    assert model.is_file() and model.stat().st_size < 30e6

    man = json.loads((tmp_path / "data" / "cache" / "manifest.json").read_text())
    train_texts = {u["text"] for u in man["utterances"] if u["split"] == "train"}
    held = next(u for u in man["utterances"] if u["split"] == "val" and u["speaker"] == "awb")
    assert held["text"] not in train_texts
    src = tmp_path / "data" / "synth" / "awb" / f"{held['id'].split('__')[1]}.wav"
    dst = tmp_path / "converted.wav"
    out = rtvc(f"--set=paths.model={json.dumps(str(model))}", "convert", str(src), str(dst), "--voice", "slt",
               "--transpose", "1")
    assert "converter 'slt'" in out
    x, rate_x = sf.read(str(src))
    y, rate_y = sf.read(str(dst))
    assert rate_x == rate_y and y.shape[0] == x.shape[0]
    assert np.isfinite(y).all() and np.abs(y).max() > 0
    assert "slt" in rtvc(f"--set=paths.model={json.dumps(str(model))}", "voices")

    # enrolment: an unseen voice (kal) reads the prompts; the adapted model differs from the original only in its
    # decoder, and converts
    from rtvc.data.synth import VOICES, synthesize
    from rtvc.voice import VoiceModel
    enrol = tmp_path / "enrol"
    rtvc("enrol", "prompts", str(enrol), "--n", "3")
    kal = next(v for v in VOICES if v.name == "kal")
    for t in sorted(enrol.glob("*.txt")):
        assert synthesize(kal, t.read_text().strip(), t.with_suffix(".wav")) is None
    mine = tmp_path / "mine.pt"
    out = rtvc("--set=enrol.steps_per_voice=2", "enrol", "train", str(enrol), "--out", str(mine), "--model", str(model),
               "--voices", "awb,slt")
    assert "3 readings, 2 voices" in out
    a, b = VoiceModel.load(model), VoiceModel.load(mine)
    assert a.speakers == b.speakers
    moved = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert moved and all(k.startswith("vqvae.decoder.") for k in moved), moved
    # its decoder learned this speaker's own codes: the file keeps the voices' content means, centring off
    assert sorted(b.content) == sorted(a.content) and b.cfg.vqvae.source_centring == 0.0
    rtvc("convert", str(src), str(dst), "--voice", "slt", "--model", str(mine))
    # a recording without its text, and a voice the model lacks, are refused with what to do
    sf.write(str(enrol / "extra.wav"), np.zeros(24000, np.float32), 24000)
    r = subprocess.run([sys.executable, "-m", "rtvc", *sets, "enrol", "train", str(enrol), "--out", str(mine),
                        "--model", str(model)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "extra.wav" in r.stderr and "needs NAME.txt" in r.stderr
    (enrol / "extra.wav").unlink()
    r = subprocess.run([sys.executable, "-m", "rtvc", *sets, "enrol", "train", str(enrol), "--out", str(mine),
                        "--model", str(model), "--voices", "rms"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "['rms'] cannot" in r.stderr
