"""Config: defaults load, round-trip, overrides, and every kind of mistake gives a clear message."""

import dataclasses

import pytest

from rtvc.config import Config, ConfigError, default_dict, load_config, parse_override


def test_defaults_load_and_round_trip():
    cfg = load_config()
    assert cfg.model.hop_length == 240 and cfg.model.sample_rate == 24000
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {s: dict(t) for s, t in default_dict().items()}  # config.toml holds every key


def test_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.engine.safety_ms = 1.0  # type: ignore[misc]


def test_overrides_and_user_file(tmp_path):
    user = tmp_path / "me.toml"
    user.write_text('[engine]\nsafety_ms = 2\n[audio]\ninput_device = "USB"\n')
    cfg = load_config(user, ["engine.max_backlog_ms=80", "audio.output_device=3", "server.allowed_origins=['http://a']",
                             "audio.host_api=JACK Audio"])
    assert cfg.engine.safety_ms == 2.0 and isinstance(cfg.engine.safety_ms, float)
    assert cfg.engine.max_backlog_ms == 80.0
    assert cfg.audio.input_device == "USB" and cfg.audio.output_device == 3
    assert cfg.server.allowed_origins == ("http://a",)
    assert cfg.audio.host_api == "JACK Audio"
    assert cfg.replace(**{"engine.crossfade_ms": 5}).engine.crossfade_ms == 5.0


@pytest.mark.parametrize("override, message", [
    ("engine.max_backlog=3", 'unknown key "engine.max_backlog" (did you mean "engine.max_backlog_ms"?)'),
    ("engin.safety_ms=3", 'unknown section "engin" (did you mean "engine"?)'),
    ("audio.block_ms=abc", "audio.block_ms: expected number, got str 'abc'"),
    ("model.hop_length=true", "model.hop_length: expected integer, got bool True"),
    ("model.hop_length=256", "teacher.upsample_factors [10, 6, 4] multiply to 240, but the vocoder must upsample "
                             "one mel frame to exactly model.hop_length=256"),
    ("student.upsample_factors=[10, 6]", "student.upsample_factors [10, 6] multiply to 60"),
    ("model.win_length=600", "shorter than two periods of f0_min"),
    ("model.fmax=20000", "fmax <= sample_rate/2 (12000)"),
    ("engine.resampler=best", 'engine.resampler="best": choose one of'),
    ("engine.max_backlog_ms=0", "engine.max_backlog_ms must be > 0"),
    ("engine.ring_ms=50", "engine.ring_ms=50.0 is too small"),
    ("teacher.upsample_factors=[4, 'x']", "teacher.upsample_factors[1]: expected integer"),
    ("audio.device_latency=fast", 'audio.device_latency="fast"'),
    ("train.student_target=mel", 'train.student_target must be "teacher" or "audio"'),
    ("nodot=1", "use section.key"),
    ("novalue", "expected section.key=value"),
])
def test_bad_values_are_explained(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_user_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine\nsafety_ms=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[engnie]\nsafety_ms=1\n")
    with pytest.raises(ConfigError, match=r'unknown section "\[engnie\]" \(did you mean "\[engine\]"\?\)'):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_missing_key_in_checkpoint_dict():
    d = load_config().to_dict()
    del d["model"]["n_mels"]
    with pytest.raises(ConfigError, match='missing key "model.n_mels"'):
        Config.from_dict(d)


def test_saved_config_from_an_older_rtvc_takes_new_defaults():
    d = load_config(None, ["model.n_mels=64"]).to_dict()
    del d["server"]["device"], d["train"]["student_target"]  # keys a checkpoint written before they existed lacks
    cfg = Config.from_saved(d)
    assert cfg.model.n_mels == 64 and cfg.server.device == "auto" and cfg.train.student_target == "teacher"
    d["model"]["n_mesl"] = 3
    with pytest.raises(ConfigError, match="n_mesl"):
        Config.from_saved(d)


def test_saved_config_keeps_the_networks_it_was_built_with():
    """A key that shapes what a network computes, missing from a saved config, takes the value that rebuilds the
    saved model (BUILT_WITHOUT), whatever today's default; a saved value always wins."""
    from rtvc.config import BUILT_WITHOUT
    cfg = load_config(None, ["vqvae.encoder_cepstra=24"])
    d = cfg.to_dict()
    assert Config.from_saved(d).vqvae.encoder_cepstra == 24
    for section, key in BUILT_WITHOUT:
        del d[section][key]
    saved = Config.from_saved(d)
    assert all(getattr(getattr(saved, sec), key) == v for (sec, key), v in BUILT_WITHOUT.items())


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b = 2.5") == ("a.b", 2.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=USB Mic") == ("a.b", "USB Mic")
    assert parse_override('a.b="3"') == ("a.b", "3")
