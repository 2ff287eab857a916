"""The command line on a machine with no sound card: help, devices, convert, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import soundfile as sf

from rtvc import cli, devices


def rtvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtvc", *args], capture_output=True, text=True, timeout=120)


def test_help_tells_a_newcomer_what_to_run():
    r = rtvc("--help")
    assert r.returncode == 0
    for word in ("devices", "convert", "live", "config", "--set", "first steps"):
        assert word in r.stdout
    assert rtvc().returncode == 0  # no command: prints help


def test_devices_works_without_sound_card():
    r = rtvc("devices")
    assert r.returncode == 0, r.stderr
    assert "No audio devices found" in r.stdout or "default input" in r.stdout


def test_portaudio_missing_is_explained(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert cli.main(["devices"]) == 1
    assert "apt-get install libportaudio2" in capsys.readouterr().err
    with pytest.raises(devices.AudioUnavailable, match="PortAudio is missing"):
        devices.import_sounddevice()


def test_live_without_device_is_a_clear_error():
    r = rtvc("live", "--host-api", "NoSuchHostApi", "--duration", "1")
    assert r.returncode == 1
    assert "no audio input device found on host API 'NoSuchHostApi'" in r.stderr


def test_live_calibration_errors_come_before_any_device(tmp_path):
    """`rtvc live --calibrate`: a missing file, a recording with no voiced speech and a passthrough (nothing to
    calibrate) are clear errors, raised before a device is opened."""
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(24000, np.float32), 24000)
    for extra, message in (([str(tmp_path / "nope.wav")], "does not exist"), ([str(silent)], "too little voiced"),
                           ([str(silent), "--model", "passthrough"], "no voice model to calibrate")):
        if "passthrough" not in extra and not resources.files("rtvc").joinpath("models/default.pt").is_file():
            continue
        r = rtvc("live", "--host-api", "NoSuchHostApi", "--duration", "1", "--calibrate", *extra)
        assert r.returncode == 1 and message in r.stderr, r.stderr


def test_convert_bundled_sample_with_the_default_model(tmp_path):
    """The README's run command: the bundled sample through the bundled default voices (when this build has them)."""
    out = tmp_path / "out.wav"
    r = rtvc("convert", "--sample", str(out), "--voice", "slt")
    if not resources.files("rtvc").joinpath("models/default.pt").is_file():
        assert r.returncode == 1 and "no voice model is configured" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "converter 'slt'" in r.stdout and "PASSTHROUGH" not in r.stderr
    x, rate_x = sf.read(str(resources.files("rtvc").joinpath("samples/speech.wav")), dtype="float32")
    y, rate_y = sf.read(str(out), dtype="float32")
    assert rate_x == rate_y and y.shape == x.shape and np.isfinite(y).all()
    assert 0.01 < np.sqrt(np.mean(y ** 2)) and np.abs(y - x).max() > 0.05  # audible, and not the input


def test_convert_bundled_sample_is_labelled_passthrough(tmp_path):
    out = tmp_path / "out.wav"
    r = rtvc("convert", "--sample", str(out), "--passthrough")
    assert r.returncode == 0, r.stderr
    assert "PASSTHROUGH" in r.stderr and "passthrough (no voice model)" in r.stdout
    x, rate_x = sf.read(str(resources.files("rtvc").joinpath("samples/speech.wav")), dtype="float32")
    y, rate_y = sf.read(str(out), dtype="float32")
    assert rate_x == rate_y and y.shape == x.shape
    assert np.abs(y - x).max() < 2 / 32768  # 16-bit in and out, latency removed, identity rate: exact


def test_convert_resamples_through_the_engine(tmp_path):
    rate = 44100
    t = np.arange(rate) / rate
    x = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(str(src), np.stack([x, x], 1), rate, subtype="FLOAT")  # stereo in -> mono out
    assert cli.main(["convert", str(src), str(dst), "--block-ms", "7", "--passthrough"]) == 0
    y, r = sf.read(str(dst), dtype="float32")
    assert r == rate and y.shape == x.shape
    assert np.abs(y[2000:-2000] - x[2000:-2000]).max() < 2e-3


@pytest.mark.parametrize("args, message", [
    (["convert", "missing.wav", "o.wav"], "does not exist"),
    (["convert", "--sample", "o.wav", "--voice", "alice", "--passthrough"], "no voice model is configured"),
    (["--set", "paths.model=nope.pt", "convert", "--sample", "o.wav"], "does not exist"),
    (["--set", "engine.crossfade=3", "config"], 'did you mean "engine.crossfade_ms"'),
])
def test_errors_are_clear(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) in (1, 2)
    assert message in capsys.readouterr().err


def test_unreadable_audio(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    assert cli.main(["convert", str(bad), str(tmp_path / "o.wav")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_config_prints_toml():
    r = rtvc("--set", "engine.safety_ms=3", "config")
    assert r.returncode == 0 and "safety_ms = 3.0" in r.stdout
