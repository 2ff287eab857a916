"""Corpus building and preparation: TTS synthesis, the three layouts, the text-disjoint split, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from rtvc.data.prepare import CorpusError, prepare_corpus, scan_corpus
from rtvc.data.synth import sentences, synth_corpus

from conftest import harmonic, make_tiny_config, write_folder_corpus

needs_tts = pytest.mark.skipif(not all(shutil.which(p) for p in ("flite", "espeak-ng", "text2wave")),
                               reason="flite/espeak-ng/festival not installed (scripts/install_tts.sh)")


def test_sentence_generator_is_unique_and_seeded():
    a = sentences(300, seed=1)
    assert len(set(a)) == 300 and a == sentences(300, seed=1) and a != sentences(300, seed=2)


@needs_tts
def test_synth_writes_parallel_folder_corpus(tmp_path):
    counts = synth_corpus(tmp_path, 3, ["awb", "esf", "ked"], progress=False)
    assert counts == {"awb": 3, "esf": 3, "ked": 3}
    k, k_rate = sf.read(str(tmp_path / "ked" / "ked_00002.wav"))  # festival reads its text from stdin
    assert k.shape[0] > k_rate // 2 and np.abs(k).max() > 0.05
    x, rate = sf.read(str(tmp_path / "awb" / "awb_00001.wav"))
    assert x.shape[0] > rate // 2 and np.abs(x).max() > 0.05
    assert (tmp_path / "esf" / "esf_00001.txt").read_text() == (tmp_path / "awb" / "awb_00001.txt").read_text()
    with pytest.raises(ValueError, match="unknown TTS voice"):
        synth_corpus(tmp_path, 1, ["nobody"], progress=False)


def test_a_missing_voice_names_its_debian_package(tmp_path, monkeypatch):
    from rtvc.data.synth import TTSVoice
    monkeypatch.setattr(TTSVoice, "installed", property(lambda v: v.name != "czf"))
    with pytest.raises(RuntimeError, match=r"\['czf'\] not installed.*festival festvox-czech-dita"):
        synth_corpus(tmp_path, 1, ["awb", "czf"], progress=False)
    assert not (tmp_path / "awb").exists()  # refused before synthesising anything


def test_an_mbrola_voice_is_driven_by_espeak_ng(tmp_path, monkeypatch):
    """MBROLA's databases need the mbrola binary and the voice's folder too, not only espeak-ng on PATH."""
    from rtvc.data import synth
    mbf = next(v for v in synth.VOICES if v.name == "mbf")
    assert mbf.command("Hello.", tmp_path / "a.wav")[:3] == ["espeak-ng", "-v", "mb-us1"]
    assert set(mbf.packages) == {"mbrola-us1", "mbrola", "espeak-ng"}
    monkeypatch.setattr(synth.shutil, "which", lambda p: f"/usr/bin/{p}" if p == "espeak-ng" else None)
    assert not mbf.installed  # espeak-ng alone cannot speak with it
    with pytest.raises(RuntimeError, match=r"\['mbf'\] not installed.*espeak-ng mbrola mbrola-us1"):
        synth_corpus(tmp_path, 1, ["mbf"], progress=False)


def test_rhvoice_and_pico_voices_are_driven_by_their_own_programs(tmp_path, monkeypatch):
    """RHVoice-test reads the text from stdin; pico2wave takes it as an argument; an RHVoice voice also needs
    its voice folder, not only the program."""
    from rtvc.data import synth
    bdl = next(v for v in synth.VOICES if v.name == "bdl")
    pcf = next(v for v in synth.VOICES if v.name == "pcf")
    assert bdl.command("Hello.", tmp_path / "a.wav") == ["RHVoice-test", "-p", "bdl", "-o", str(tmp_path / "a.wav")]
    assert bdl.stdin("Hello.") == "Hello." and bdl.rate == 16000  # RHVoice writes 24 kHz: kept at 16 like the rest
    assert pcf.command("Hello.", tmp_path / "b.wav") == ["pico2wave", "-l", "en-US", "-w", str(tmp_path / "b.wav"),
                                                         "Hello."]
    assert pcf.stdin("Hello.") is None
    assert set(bdl.packages) == {"rhvoice", "rhvoice-english"}
    monkeypatch.setattr(synth.shutil, "which", lambda p: f"/usr/bin/{p}")
    monkeypatch.setattr(synth.Path, "is_dir", lambda p: False)
    assert not bdl.installed and pcf.installed


@needs_tts
def test_a_sentence_the_engine_cannot_say_is_left_out_of_a_corpus_not_a_testset(tmp_path, monkeypatch, capsys):
    """festival exits 0 on some errors and leaves an empty file (its Italian voices on a few sentences)."""
    from rtvc.data.synth import TTSVoice
    say = TTSVoice.command
    monkeypatch.setattr(TTSVoice, "command", lambda v, text, out: ["true"] if "bad" in text else say(v, text, out))
    counts = synth_corpus(tmp_path / "c", 0, ["awb"], progress=False, texts=["A good one.", "A bad one."])
    assert counts == {"awb": 1} and "1 of 2 sentences gave no audio" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="1 of 2 sentences"):
        synth_corpus(tmp_path / "t", 0, ["awb"], progress=False, texts=["A good one.", "A bad one."], strict=True)
    with pytest.raises(RuntimeError, match="2 of 2 sentences"):  # a voice that never speaks: a broken install
        synth_corpus(tmp_path / "n", 0, ["awb"], progress=False, texts=["A bad one.", "Also bad."])


def _vctk(root):
    for spk in ("p225", "p226"):
        (root / "wav48_silence_trimmed" / spk).mkdir(parents=True)
        (root / "txt" / spk).mkdir(parents=True)
        for i in range(1, 4):
            for mic in (1, 2):
                sf.write(str(root / "wav48_silence_trimmed" / spk / f"{spk}_{i:03d}_mic{mic}.flac"),
                         harmonic(1.5, 48000, 120 + 30 * i, i), 48000)
            (root / "txt" / spk / f"{spk}_{i:03d}.txt").write_text(f"Please call Stella {i}.")
    return root


def _libritts(root):
    for spk, ch in (("19", "198"), ("26", "495")):
        d = root / "train-clean-100" / spk / ch
        d.mkdir(parents=True)
        for i in range(3):
            stem = f"{spk}_{ch}_000000_00000{i}"
            sf.write(str(d / f"{stem}.wav"), harmonic(1.5, 24000, 140, i), 24000)
            (d / f"{stem}.normalized.txt").write_text(f"Text {i}.")
    return root


def test_layouts_are_detected(tmp_path):
    layout, items = scan_corpus(_vctk(tmp_path / "vctk"))
    assert layout == "vctk" and len(items) == 6 and {i.speaker for i in items} == {"p225", "p226"}
    assert all(i.text and i.text.startswith("Please call Stella") for i in items)
    layout, items = scan_corpus(_libritts(tmp_path / "libri"))
    assert layout == "libritts" and {i.speaker for i in items} == {"19", "26"} and items[0].text == "Text 0."
    layout, items = scan_corpus(write_folder_corpus(tmp_path / "f", {"a": 100.0}, n=2))
    assert layout == "folders" and [i.text for i in items] == ["sentence number 0", "sentence number 1"]


def test_prepare_vctk_and_split_by_text(tmp_path):
    cfg = make_tiny_config()
    man = prepare_corpus(cfg, _vctk(tmp_path / "vctk"), tmp_path / "cache", val_fraction=0.5, progress=False)
    assert man["layout"] == "vctk" and man["speakers"] == ["p225", "p226"]
    split = {}
    for u in man["utterances"]:
        split.setdefault(u["text"], set()).add(u["split"])
    assert all(len(s) == 1 for s in split.values()), "a sentence is in train for one speaker, val for another"
    saved = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(saved["mel_mean"]) == cfg.model.n_mels and set(saved["pitch"]) == {"p225", "p226"}
    z = np.load(tmp_path / "cache" / "feats" / f"{man['utterances'][0]['id']}.npz")
    assert z["wav"].shape[0] == z["logmel"].shape[1] * cfg.model.hop_length  # whole hops at the model rate


def test_prepare_errors_are_clear(tmp_path):
    cfg = make_tiny_config()
    with pytest.raises(CorpusError, match="does not exist"):
        prepare_corpus(cfg, tmp_path / "nope", tmp_path / "c", progress=False)
    (tmp_path / "empty" / "spk").mkdir(parents=True)
    with pytest.raises(CorpusError, match="contains no audio files"):
        prepare_corpus(cfg, tmp_path / "empty", tmp_path / "c", progress=False)
    bad = write_folder_corpus(tmp_path / "bad", {"a": 120.0}, n=2)
    (bad / "a" / "broken.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(CorpusError, match="cannot read .*broken.wav"):
        prepare_corpus(cfg, bad, tmp_path / "c", progress=False)
    (bad / "a" / "broken.wav").unlink()
    sf.write(str(bad / "a" / "stereo.wav"), np.stack([harmonic(1, 16000, 120, 0)] * 2, 1), 16000)
    with pytest.raises(CorpusError, match="mono/stereo mismatch for speaker 'a'"):
        prepare_corpus(cfg, bad, tmp_path / "c", progress=False)
    (bad / "a" / "stereo.wav").unlink()
    sf.write(str(bad / "a" / "short.wav"), harmonic(0.2, 16000, 120, 0)[:3000], 16000)
    with pytest.raises(CorpusError, match="too short after trimming"):
        prepare_corpus(cfg, bad, tmp_path / "c", progress=False)
    man = prepare_corpus(cfg, bad, tmp_path / "c", skip_bad=True, progress=False)
    assert len(man["skipped"]) == 1 and len(man["utterances"]) == 2
