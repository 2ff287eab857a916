"""rtvc eval: the metrics behave on known cases, and a run over a small held-out TTS test set writes the report."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import harmonic, make_tiny_config

pytestmark = pytest.mark.skipif(not (shutil.which("flite") and shutil.which("espeak-ng")),
                                reason="flite/espeak-ng not installed (scripts/install_tts.sh)")


def test_metric_sanity():
    from rtvc.evaluate import Metrics, cosine
    m = Metrics()
    a, b = harmonic(2.0, 24000, 120.0, 1), harmonic(2.0, 24000, 220.0, 2)
    lf0_a, mc_a = m.world(a, 24000)
    lf0_b, mc_b = m.world(b, 24000)
    assert m.mcd(mc_a, mc_a) == 0.0 and m.mcd(mc_a, mc_b) > 1.0
    assert m.lf0_corr(lf0_a, lf0_a) == pytest.approx(1.0)
    assert abs(np.nanmedian(lf0_a) - np.log(120.0)) < 0.1
    c = m.contour(a, 24000)
    assert abs(c.shape[0] - lf0_a.shape[0]) <= 2 and np.mean(~np.isnan(c)) > 0.6  # same 5 ms grid, mostly voiced
    assert abs(np.nanmedian(c) - np.log(120.0)) < 0.05 and abs(np.nanmedian(m.contour(b, 24000)) - np.log(220.0)) < 0.05
    e = m.embed(a, 24000)
    assert cosine(e, e) == pytest.approx(1.0)


_CALLS = []


def _stateful() -> int:
    """Stands in for SPTK's RAPT, whose result depends on the calls before it (static state in its C code)."""
    _CALLS.append(1)
    return len(_CALLS)


def test_contours_do_not_depend_on_what_was_analysed_before():
    """RAPT keeps state between calls (on the held-out set, a second pass over 40 utterances in the same order gave
    40 different contours); Metrics.contour runs it in a child forked from a process that never ran it, so every
    call starts from the same state."""
    from rtvc.evaluate import Metrics, _in_fresh_fork
    assert [_stateful() for _ in range(3)] == [1, 2, 3]
    assert [_in_fresh_fork(_stateful) for _ in range(3)] == [4, 4, 4]
    a, b = harmonic(1.5, 24000, 110.0, 3), harmonic(1.0, 24000, 230.0, 4)
    first = Metrics.contour(a, 24000)
    Metrics.contour(b, 24000)
    np.testing.assert_array_equal(Metrics.contour(a, 24000), first)


def test_contour_delay_is_measured():
    """A system whose contours trail their sources by 5 frames (with tracker-like noise and unvoiced gaps) is
    compared at 5, not at the window's delay; a zero-delay system at 0."""
    from rtvc.evaluate import Metrics, contour_delay
    rng = np.random.default_rng()
    pairs, same = [], []
    for _ in range(6):
        # a log-F0 contour that decorrelates within a few frames (so a wrong lag scores visibly lower)
        src = np.log(100.0) + np.convolve(rng.normal(0.0, 0.1, 401), [0.5, 0.5], mode="valid")
        src[rng.random(400) < 0.2] = np.nan
        out = np.concatenate([np.full(5, np.nan), src[:-5]]) + rng.normal(0.0, 0.01, 400)
        pairs.append((out, src))
        same.append((src + rng.normal(0.0, 0.01, 400), src))
    lag, curve = contour_delay(pairs)
    assert lag == 5 and curve[5] > 0.9 and curve[0] < 0.5 and len(curve) == 11
    assert contour_delay(same)[0] == 0
    assert Metrics.lf0_corr(*pairs[0], lag=5) == pytest.approx(curve[5], abs=0.05)
    assert contour_delay([(np.full(50, np.nan), np.full(50, np.nan))])[0] == 0  # nothing voiced: no delay


def test_world_shift_keeps_the_contour():
    """The ceiling row: a pitch glide shifted by WORLD keeps its contour (correlation ~1) at the new median."""
    from rtvc.evaluate import Metrics, world_shift
    rate = 24000
    t = np.arange(2 * rate) / rate
    f0 = 120.0 * np.exp(0.15 * np.sin(2 * np.pi * 2.0 * t))   # +-15% vibrato at 2 Hz
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 20)).astype(np.float32) * 0.1
    y = world_shift(x, rate, np.log(120.0), np.log(180.0))
    assert y.shape == x.shape
    lf0_x, _ = Metrics.world(x, rate)
    lf0_y, _ = Metrics.world(y, rate)
    assert Metrics.lf0_corr(lf0_y, lf0_x) > 0.95
    assert Metrics.lf0_corr(Metrics.contour(y, rate), Metrics.contour(x, rate)) > 0.95  # the metric's own tracker
    assert abs(np.nanmedian(lf0_y) - np.nanmedian(lf0_x) - np.log(1.5)) < 0.05


def test_testset_and_eval_report(tmp_path):
    from rtvc.data.synth import build_testset, known_texts
    from rtvc.evaluate import evaluate, load_testset
    from rtvc.voice import VoiceModel, make_voice_model
    man = build_testset(tmp_path / "ts", "esm", ["awb", "slt"], 2, {"The quick brown fox."}, progress=False)
    assert len(man["items"]) == 2 and all(set(it["refs"]) == {"awb", "slt"} for it in man["items"])
    with pytest.raises(ValueError, match="must not also be a target"):
        build_testset(tmp_path / "x", "awb", ["awb"], 1, set(), progress=False)
    # a development set: another seed, the test set's sentences left out (known_texts reads a test set or a cache)
    test_texts = known_texts(tmp_path / "ts")
    dev = build_testset(tmp_path / "dev", "esm", ["awb"], 2, test_texts, seed=4242, progress=False)
    assert len(test_texts) == 2 and not test_texts & known_texts(tmp_path / "dev")
    assert known_texts(tmp_path / "dev") == {it["text"] for it in dev["items"]}
    with pytest.raises(FileNotFoundError, match="neither a prepared cache"):
        known_texts(tmp_path / "nothing")
    cfg = make_tiny_config()
    make_voice_model(cfg, ["awb", "slt"], seed=0).save(tmp_path / "model.pt")
    model = VoiceModel.load(tmp_path / "model.pt")
    _save_teacher(tmp_path / "teacher.pt", cfg, model.frontend.mel_mean)
    res = evaluate(tmp_path / "model.pt", tmp_path / "ts", tmp_path / "ev", tmp_path / "teacher.pt", max_items=1,
                   progress=False)
    assert set(res["summary"]) == {"student (streaming)", "dsp baseline", "world shift (contour ceiling)",
                                   "teacher (offline)"}
    for s in res["summary"].values():
        o = s["overall"]
        assert -1 <= o["sim_target"] <= 1 and o["mcd_db"] > 0 and o["rtf"] > 0 and "lf0_corr_harvest" in o
        assert "lf0_corr_window" in o and "lf0_corr_unaligned" in o
    assert all(0 <= v <= 50 for v in res["lf0_lag_ms"].values()) and len(res["lf0_corr_by_lag"]["dsp baseline"]) == 11
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["targets"] == ["awb", "slt"]
    assert "| dsp baseline | esm → slt |" in (tmp_path / "ev" / "eval.md").read_text()
    assert len(list((tmp_path / "ev" / "spectrograms").glob("*.png"))) == 2
    # bench/code_agreement.py on the same model and test set: every pair of voices, shares in 0..1
    out = tmp_path / "agree.json"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/code_agreement.py", "--model", str(tmp_path / "model.pt"), "--testset",
                        str(tmp_path / "ts"), "--items", "1", "--out", str(out)], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 0, r.stderr
    agree = json.loads(out.read_text())
    assert set(agree["pairs"]) == {"esm-awb", "esm-slt", "awb-slt"} and all(0 <= v <= 1 for v in agree["pairs"].values())
    spec = importlib.util.spec_from_file_location("code_agreement", root / "bench" / "code_agreement.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    c = bench.codes(model, load_testset(tmp_path / "ts")[2][0].source_wav)
    assert bench.agreement(c, c) == 1.0  # a reading aligned with itself: every frame its own code
    # a teacher trained in another mel normalisation would vocode the decoder's mels at the wrong power
    _save_teacher(tmp_path / "other.pt", cfg, model.frontend.mel_mean + 1.0)
    with pytest.raises(ValueError, match="other mels than the voice model"):
        evaluate(tmp_path / "model.pt", tmp_path / "ts", tmp_path / "ev2", tmp_path / "other.pt", max_items=1,
                 progress=False)


def _save_teacher(path, cfg, mel_mean) -> None:
    """A freshly initialised teacher checkpoint (what `rtvc train teacher` writes) with the given mel statistics."""
    from rtvc.checkpoint import save_checkpoint
    from rtvc.vocoder import Teacher
    t = Teacher.build(cfg)
    t.synth.mel_mean.copy_(mel_mean)
    save_checkpoint(path, {"kind": "teacher", "config": cfg.to_dict(), "step": 0, "stats": {},
                           "models": {"teacher": t.state_dict()}, "optims": {}})
