"""Streaming == offline (max abs error <= 1e-5, float32) for every module and the whole converter, with random
chunk sizes from one hop to many, three seeds each; and causality: future input never changes past output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtvc.config import load_config
from rtvc.frontend import Frontend, yin
from rtvc.streaming import CausalConv1d
from rtvc.vocoder import Student
from rtvc.voice import VoiceConverter, make_voice_model
from rtvc.vqvae import VQVAE, Decoder, Encoder

CFG = load_config()  # default sizes: what ships
TOL = 1e-5
SEEDS = [0, 1, 2]


def _chunks(n: int, rng: np.random.Generator, max_chunk: int = 9) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < n:
        k = int(rng.integers(1, max_chunk + 1))
        out.append((pos, min(n, pos + k)))
        pos += k
    return out


def _stream(module, fn, x: torch.Tensor, rng, unit: int = 1, batch: int = 1):
    """Run ``fn`` over time-chunks of x (time = last dim, chunk sizes in multiples of ``unit``) in streaming mode."""
    outs = []
    with torch.no_grad(), module.streaming(batch):
        for a, b in _chunks(x.shape[-1] // unit, rng):
            outs.append(fn(x[..., a * unit: b * unit]))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("seed", SEEDS)
def test_causal_conv(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    conv = CausalConv1d(5, 7, 3, dilation=4)
    x = torch.randn(2, 5, 50)
    with torch.no_grad():
        off = conv(x)
    assert (_stream(conv, conv, x, rng, batch=2) - off).abs().max() <= TOL


@pytest.mark.parametrize("seed", SEEDS)
def test_frontend_mel_and_pitch(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fe = Frontend(CFG.model)
    hop = CFG.model.hop_length
    t = torch.arange(hop * 40) / CFG.model.sample_rate
    x = (0.3 * torch.sin(2 * torch.pi * (120 + 30 * seed) * t) + 0.01 * torch.randn(t.shape))[None]
    with torch.no_grad():
        mel_off, fr_off = fe(x)
    mel_st = _stream(fe, lambda c: fe(c)[0], x, rng, unit=hop)
    assert (mel_st - mel_off).abs().max() <= TOL
    frames_st = _stream(fe, lambda c: fe.frames(c).transpose(1, 2), x, rng, unit=hop).transpose(1, 2)
    assert torch.equal(frames_st, fr_off)  # identical frames -> identical per-frame pitch
    f0, voiced = yin(fr_off[0].numpy(), CFG.model)
    assert voiced[5:].all() and np.allclose(f0[5:], 120 + 30 * seed, rtol=0.02)


@pytest.mark.parametrize("seed", SEEDS)
def test_encoder_decoder_student(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    c, n = CFG.vqvae, CFG.model.n_mels
    mel = torch.randn(1, n, 30)
    enc, dec = Encoder(n, c).eval(), Decoder(n, c).eval()
    stu = Student(CFG.model, CFG.student).eval()
    with torch.no_grad():
        assert (_stream(enc, enc, mel, rng) - enc(mel)).abs().max() <= TOL
        q, spk, pitch = torch.randn(1, c.code_dim, 30), torch.randn(1, c.speaker_dim), torch.randn(1, 2, 30)
        both = torch.cat([q, pitch], 1)
        fn = lambda z: dec(z[:, : c.code_dim], spk, z[:, c.code_dim:])  # noqa: E731
        assert (_stream(dec, fn, both, rng) - dec(q, spk, pitch)).abs().max() <= TOL
        # pitch as the decoder gets it: held normalised log-F0 with unvoiced stretches (the excitation's phase and
        # noise counter must carry across chunks)
        sp = torch.stack([0.4 * torch.randn(1, 30), (torch.rand(1, 30) > 0.3).float()], 1)
        off = stu(mel, sp)
        st = torch.cat([stu_chunk for stu_chunk in _student_chunks(stu, mel, sp, rng)], -1)
        assert off.shape[-1] == 30 * CFG.model.hop_length
        assert (st - off).abs().max() <= TOL


def _student_chunks(stu, mel, pitch, rng):
    with stu.streaming(1):
        for a, b in _chunks(mel.shape[-1], rng):
            yield stu(mel[..., a:b], pitch[..., a:b])


def _speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * 0.8 * t)
    ph = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * ph) / k for k in range(1, 15)) * (np.sin(2 * np.pi * 1.1 * t) > -0.4)
    return (0.2 * x + 0.003 * rng.standard_normal(t.shape)).astype(np.float32)


def _centred_model(names: list[str], seed: int, content_seed: int):
    """A random voice model whose file records (random) voice content means, so source centring applies."""
    m = make_voice_model(CFG, names, seed=seed)
    rng = np.random.default_rng(content_seed)
    m.content = {v: rng.standard_normal(CFG.vqvae.code_dim).astype(np.float32) for v in names}
    return m


@pytest.mark.parametrize("seed", SEEDS)
def test_full_converter_streaming_equals_offline(seed):
    rng = np.random.default_rng(seed)
    vc = VoiceConverter(make_voice_model(CFG, ["a", "b", "c"], seed=seed), voice="b", transpose=2.0)
    hop = vc.hop
    x = _speech_like(1.5, vc.sample_rate, seed)
    x = x[: x.shape[0] // hop * hop]
    off = vc.convert_offline(x)
    st = np.concatenate([vc.convert(x[a * hop: b * hop]) for a, b in _chunks(x.shape[0] // hop, rng, 12)])
    assert np.abs(off).max() > 1e-3, "degenerate test: silent output"
    assert np.abs(st - off).max() <= TOL


def test_converter_is_causal():
    vc = VoiceConverter(make_voice_model(CFG, ["a", "b"], seed=3), voice="a")
    x = _speech_like(1.0, vc.sample_rate, 3)
    cut = 12 * vc.hop + 17  # mid-hop: the hop holding `cut` and later may change, nothing before that hop
    y = vc.convert_offline(x)
    x2 = x.copy()
    x2[cut:] = np.random.default_rng(0).standard_normal(x.shape[0] - cut).astype(np.float32)
    y2 = vc.convert_offline(x2)
    start = cut // vc.hop * vc.hop
    assert np.array_equal(y[:start], y2[:start]), "future input changed past output"
    assert not np.allclose(y[start:], y2[start:]), "degenerate test: output ignores input"


@pytest.mark.parametrize("module", ["encoder", "decoder", "student", "vqvae"])
def test_modules_are_causal(module):
    torch.manual_seed(0)
    n, c = CFG.model.n_mels, CFG.vqvae
    mel, mel2 = torch.randn(1, n, 40), None
    mel2 = mel.clone()
    mel2[..., 25:] = torch.randn(1, n, 15)
    with torch.no_grad():
        if module == "encoder":
            m = Encoder(n, c)
            a, b, unit = m(mel), m(mel2), 1
        elif module == "decoder":
            m = Decoder(n, c)
            spk, p = torch.randn(1, c.speaker_dim), torch.zeros(1, 2, 40)
            a, b, unit = m(mel[:, : c.code_dim], spk, p), m(mel2[:, : c.code_dim], spk, p), 1
        elif module == "student":
            m = Student(CFG.model, CFG.student)
            p = torch.stack([torch.zeros(1, 40), torch.ones(1, 40)], 1)
            a, b, unit = m(mel, p), m(mel2, p), CFG.model.hop_length
        else:  # with the phone recogniser between encoder and decoder
            m = VQVAE(n, 3, CFG.replace(**{"vqvae.phone_channels": 32}).vqvae).eval()
            spk, p = torch.tensor([1]), torch.zeros(1, 2, 40)
            a, b, unit = m(mel, spk, p)["mel"], m(mel2, spk, p)["mel"], 1
    assert torch.equal(a[..., : 25 * unit], b[..., : 25 * unit])
    assert not torch.allclose(a[..., 25 * unit:], b[..., 25 * unit:])


def test_reset_per_slot():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 3, 3, 2)
    x = torch.randn(2, 3, 10)
    with torch.no_grad(), conv.streaming(2):
        conv(x)
        conv.reset_streaming([1])
        y = conv(x)
        conv.reset_streaming()
        y0 = conv(x)
    assert torch.allclose(y[1], y0[1]) and not torch.allclose(y[0], y0[0])


def test_voice_switch_continues_state():
    vc = VoiceConverter(make_voice_model(CFG, ["a", "b"], seed=1), voice="a")
    x = _speech_like(0.5, vc.sample_rate, 1)
    hop = vc.hop
    for i in range(10):
        vc.convert(x[i * hop:(i + 1) * hop])
    other = vc.with_voice("b", transpose=-3)
    assert other.name == "b" and other.latency == vc.latency == 0
    same = vc.with_voice("a")
    np.testing.assert_allclose(same.convert(x[10 * hop: 11 * hop]), vc.convert(x[10 * hop: 11 * hop]), atol=1e-6)
    with pytest.raises(KeyError, match="unknown voice 'zz'"):
        vc.with_voice("zz")
    with pytest.raises(ValueError, match="whole hops"):
        vc.convert(np.zeros(100, np.float32))


@pytest.mark.parametrize("cepstra,phones", [(0, 0), (24, 0), (24, 48)])
def test_fused_cpu_kernel_equals_torch_streaming(cepstra, phones):
    """kernels.frame_stack (numba, shares the modules' state) == the torch streaming path, mid-stream switchable;
    with the encoder's input smoothed across frequency (vqvae.encoder_cepstra), and with a phone recogniser whose
    sharpened posteriors the decoder reads (vqvae.phone_channels, phone_temperature), too."""
    cfg = CFG.replace(**{"vqvae.encoder_cepstra": cepstra, "vqvae.phone_channels": phones,
                         "vqvae.phone_temperature": 0.7})
    model = make_voice_model(cfg, ["a", "b"], seed=4)
    x = _speech_like(1.0, CFG.model.sample_rate, 4)
    hop = CFG.model.hop_length
    fused, plain = VoiceConverter(model, "b", fused=True), VoiceConverter(make_voice_model(cfg, ["a", "b"], seed=4), "b", fused=False)
    a = np.concatenate([fused.convert(x[i * hop:(i + 2) * hop]) for i in range(0, 60, 2)])
    b = np.concatenate([plain.convert(x[i * hop:(i + 2) * hop]) for i in range(0, 60, 2)])
    assert np.abs(a - b).max() <= TOL and np.abs(a).max() > 1e-3
    fused.fused = False  # switch paths mid-stream: the state is the same tensors
    fused.convert(x[60 * hop: 61 * hop])
    fused.fused = True
    np.testing.assert_allclose(fused.convert(x[61 * hop: 62 * hop]), (plain.convert(x[60 * hop: 61 * hop]),
                               plain.convert(x[61 * hop: 62 * hop]))[1], atol=TOL)


def test_phone_posteriors_reach_the_decoder():
    """vqvae.phone_channels: the decoder reads codes and below them the recogniser's posteriors (a distribution
    per frame, sharper at a lower phone_temperature); forward(phones=False) puts zeros there; the offline render
    == streaming render in chunks; the recogniser widens the receptive field by its own."""
    from rtvc.frame_phones import FRAME_PHONES
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    c = CFG.replace(**{"vqvae.phone_channels": 32, "vqvae.phone_temperature": 0.5}).vqvae
    v, plain = VQVAE(8, 2, c).eval(), VQVAE(8, 2, CFG.vqvae)
    assert v.decoder.inp.c_in == c.code_dim + len(FRAME_PHONES) + 2 and plain.decoder.inp.c_in == c.code_dim + 2
    assert v.receptive_field == plain.receptive_field + v.phones.receptive_field - 1
    z, q = torch.randn(2, c.code_dim, 30), torch.randn(2, c.code_dim, 30)
    with torch.no_grad():
        post = v.decoder_input(z, q)[:, c.code_dim:]
        sharp = v.decoder_input(z, q, 0.5)[:, c.code_dim:]
        off = v.decoder_input(z, q, phones=False)
    assert torch.allclose(post.sum(1), torch.ones(2, 30), atol=1e-5) and (post >= 0).all()
    assert (sharp.max(1).values >= post.max(1).values - 1e-6).all()
    assert torch.equal(off[:, : c.code_dim], q) and not off[:, c.code_dim:].any()
    spk, pitch = torch.randn(2, c.speaker_dim), torch.randn(2, 2, 30)
    with torch.no_grad():
        whole = v.render(z, spk, pitch)
        with v.streaming(2):
            chunks = [v.render(z[..., a:b], spk, pitch[..., a:b]) for a, b in _chunks(30, rng)]
    assert (torch.cat(chunks, -1) - whole).abs().max() <= TOL


def test_source_centring():
    """A measured source's content shift (vqvae.source_centring): the fused kernel (the shift folded into its code
    norms) == the torch streaming path == offline; it changes the output; it is off without voice content means,
    at setting 0, and for an unmeasured source; calibrate() measures it from a recording."""
    from rtvc.convert import calibrate
    model = make_voice_model(CFG, ["a", "b"], seed=4)
    x = _speech_like(1.0, CFG.model.sample_rate, 4)
    hop = CFG.model.hop_length
    x = x[: 60 * hop]
    assert model.content_shift(np.zeros(CFG.vqvae.code_dim)) is None  # a file without voice content means
    rng = np.random.default_rng(0)
    model.content = {v: rng.standard_normal(CFG.vqvae.code_dim).astype(np.float32) for v in model.speakers}
    src = model.measure_content(x)
    shift = model.content_shift(src)
    np.testing.assert_allclose(shift, np.mean(list(model.content.values()), 0) - src, rtol=1e-5, atol=1e-6)
    fused = VoiceConverter(model, "b", fused=True, content=src)
    plain = VoiceConverter(make_voice_model(CFG, ["a", "b"], seed=4), "b", fused=False)
    plain.model.content = model.content
    plain.set_source_content(src)
    a = np.concatenate([fused.convert(x[i * hop:(i + 2) * hop]) for i in range(0, 60, 2)])
    b = np.concatenate([plain.convert(x[i * hop:(i + 2) * hop]) for i in range(0, 60, 2)])
    assert np.abs(a - b).max() <= TOL
    assert np.abs(fused.convert_offline(x) - a).max() <= TOL
    plain.set_source_content(None)
    plain.reset()
    unshifted = np.concatenate([plain.convert(x[i * hop:(i + 2) * hop]) for i in range(0, 60, 2)])
    assert np.abs(unshifted - a).max() > 1e-3, "degenerate test: the shift changed no code"
    off = make_voice_model(CFG.replace(**{"vqvae.source_centring": 0.0}), ["a"], seed=4)
    off.content = {"a": np.ones(CFG.vqvae.code_dim, np.float32)}
    assert off.content_shift(src) is None
    vc = VoiceConverter(model, "a")
    assert vc.content is None and vc._shift is None
    assert calibrate(vc, x, CFG.model.sample_rate)
    np.testing.assert_allclose(vc.content, src, atol=1e-5)


def test_content_learner_window():
    """ContentLearner keeps exactly the last window (pushes of any size, wrapping), estimates every ``every_s``
    once enough voiced frames are in it, by the calibration's rule over the window; bad input is an error."""
    from rtvc.centring import ContentLearner
    from rtvc.vqvae import speech_level_mask
    rng = np.random.default_rng(3)
    n, d = 400, CFG.vqvae.code_dim
    z, level = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    voiced = np.arange(n) >= 40  # nothing voiced for the first 0.4 s
    learner = ContentLearner(CFG, window_s=1.0, every_s=0.5, min_voiced_s=0.3)  # 100 frames, every 50, 30 voiced
    got, k = {}, 0
    for step in (1, 3, 17, 2, 30, 7, 150, 5, 185):  # frames per push; one longer than the window
        out = learner.push(z[k:k + step], level[k:k + step], voiced[k:k + step])
        k += step
        if out is not None:
            got[k] = out
        last = slice(max(0, k - 100), k)
        rows = (learner.pos - np.arange(min(k, 100), 0, -1)) % 100  # oldest first
        np.testing.assert_array_equal(learner.z[rows], z[last])
        np.testing.assert_array_equal(learner.level[rows], level[last])
    # estimates: not before 30 voiced frames are in (frame 70) nor before 50 frames since the last one
    assert sorted(got) == [210, 400]
    w = slice(300, 400)
    expect = z[w][speech_level_mask(torch.from_numpy(level[w])).numpy()].mean(0)
    np.testing.assert_allclose(got[400], expect, rtol=1e-6)
    assert learner.updates == 2
    with pytest.raises(ValueError, match="min_voiced_s"):
        ContentLearner(CFG, window_s=1.0, every_s=1.0, min_voiced_s=2.0)
    with pytest.raises(ValueError, match="same 2 frames"):
        learner.push(z[:2], level[:2], voiced[:3])


def test_content_learned_while_speaking():
    """A converter with a ContentLearner and no measured content learns what a calibration on the same speech
    measures (VoiceModel.measure_content), centres on it from the next hop on (fused and torch paths alike),
    leaves the stream's own state alone, and stops learning once a calibration sets the content."""
    from rtvc.centring import ContentLearner
    model = _centred_model(["a", "b"], 4, 0)
    rate, hop = CFG.model.sample_rate, CFG.model.hop_length
    x = _speech_like(2.0, rate, 5)[: 180 * hop]
    expect = model.measure_content(x[: 50 * hop])
    for fused in (True, False):
        learner = ContentLearner(CFG, window_s=1.0, every_s=0.5, min_voiced_s=0.1)
        vc = VoiceConverter(model, "b", learner=learner, fused=fused)
        assert vc.centring == "learning"
        ref = VoiceConverter(_centred_model(["a", "b"], 4, 0), "b", fused=fused)
        for i in range(0, 50, 2):  # the first estimate comes with hop 50 (0.5 s)
            np.testing.assert_allclose(vc.convert(x[i * hop:(i + 2) * hop]), ref.convert(x[i * hop:(i + 2) * hop]),
                                       atol=TOL)
        assert learner.updates == 1 and vc.centring == "learned x1"
        np.testing.assert_allclose(vc.content, expect, rtol=1e-4, atol=1e-4)
        ref.set_source_content(vc.content)  # the same centring from the same hop on, on an untouched state
        y = vc.convert(x[50 * hop:53 * hop])
        np.testing.assert_allclose(y, ref.convert(x[50 * hop:53 * hop]), atol=TOL)
        vc.set_source_content(vc.content)
        assert vc.learner is None and vc.centring == "measured"
        model.stop_streaming()
    assert VoiceConverter(model, "a", content=expect, learner=learner).learner is None
    plain = make_voice_model(CFG, ["a"], seed=4)  # no voice content means in the file: nothing to learn
    assert VoiceConverter(plain, "a", learner=ContentLearner(CFG, 1.0, 0.5, 0.3)).centring == "off"


def test_encoder_lifter():
    """vqvae.encoder_cepstra: the encoder's input keeps a smooth envelope and loses a harmonic ripple 2-3 mel bins
    apart (a low voice's resolved harmonics); it is a projection; 0 or >= n_mels leaves the mel as it is."""
    from rtvc.vqvae import VQVAE
    n = CFG.model.n_mels
    k = torch.arange(n, dtype=torch.float32)
    env = torch.exp(-((k - 20) / 12) ** 2) + 0.5 * torch.exp(-((k - 45) / 8) ** 2)
    ripple = 0.4 * torch.cos(2 * math.pi * k / 2.5)
    enc = VQVAE(n, 2, CFG.replace(**{"vqvae.encoder_cepstra": 24}).vqvae).encoder
    out = enc.envelope((env + ripple)[None, :, None])[0, :, 0]
    assert (out - env).norm() < 0.12 * ripple.norm()  # 0.09: ~1% of its energy is left, at the band edge
    torch.testing.assert_close(enc.envelope(enc.envelope(env[None, :, None])), enc.envelope(env[None, :, None]))
    assert enc.envelope(torch.randn(8, n, 1)).is_contiguous()  # the fused kernels' layout, for any batch
    for keep in (0, n):
        enc = VQVAE(n, 2, CFG.replace(**{"vqvae.encoder_cepstra": keep}).vqvae).encoder
        assert enc.lifter is None and torch.equal(enc.envelope(env[None, :, None]), env[None, :, None])


def test_excitation_source():
    """The student's source: sines at k * F0 (voiced only, none above Nyquist), noise that is a pure function of
    the sample index, and a phase that runs on across chunks."""
    from rtvc.frontend import LF0_MEAN, LF0_STD
    from rtvc.vocoder import Excitation, hash_noise
    rate, hop, sub, h = 24000, 240, 4, 8
    ex = Excitation(rate, hop, sub, h)
    f0 = 2000.0  # harmonics 6.. (12 kHz and up) are above 0.95 Nyquist
    z = (math.log(f0) - LF0_MEAN) / LF0_STD
    pitch = torch.tensor([[[z] * 4, [1.0, 1.0, 0.0, 1.0]]])
    e = ex(pitch)                                                       # [1, (h+1)*sub, 4*hop/sub]
    src = e.reshape(1, h + 1, sub, -1).transpose(2, 3).reshape(1, h + 1, -1)  # unfold: [1, h+1, 4*hop]
    t = torch.arange(hop, dtype=torch.float64)
    assert torch.allclose(src[0, 0, :hop].double(), torch.sin(2 * math.pi * f0 * t / rate), atol=1e-5)
    assert torch.allclose(src[0, 1, :hop].double(), torch.sin(2 * 2 * math.pi * f0 * t / rate), atol=1e-5)
    assert src[0, 5:h].abs().max() == 0 and src[0, 4].abs().max() > 0.9  # 5 * 2 kHz < 11.4 kHz <= 6 * 2 kHz
    assert src[0, :h, 2 * hop: 3 * hop].abs().max() == 0                 # unvoiced frame: noise only
    n = torch.arange(4 * hop)
    assert torch.equal(src[0, h], hash_noise(n).float())
    u = hash_noise(torch.arange(200000))
    assert -1 <= u.min() < -0.99 and 0.99 < u.max() < 1 and abs(float(u.mean())) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01  # white
    with ex.streaming(1):  # chunked == offline, incl. the phase and the counter
        parts = [ex(pitch[..., a:b]) for a, b in ((0, 1), (1, 3), (3, 4))]
    assert (torch.cat(parts, -1) - e).abs().max() < 1e-5


def test_teacher_is_driven_like_the_student():
    """The offline teacher shares the student's source: at initialisation (zero head) both output exactly the same
    envelope synthesis, so distillation transfers only what the networks add. Once its head is trained, the teacher
    follows the pitch it is given and is non-causal: a change in the last frame reaches back into earlier ones."""
    from rtvc.vocoder import Teacher
    torch.manual_seed(0)
    teacher, student = Teacher.build(CFG).eval(), Student(CFG.model, CFG.student).eval()
    hop, n = CFG.model.hop_length, 60  # the teacher hears ~0.5 s (51 frames) each way
    mel = torch.randn(2, CFG.model.n_mels, n) * 0.5
    pitch = torch.stack([torch.randn(2, n) * 0.3, (torch.rand(2, n) > 0.3).float()], 1)
    pitch[:, 1, -1] = 1.0  # voiced: the change below is heard
    with torch.no_grad():
        y = teacher(mel, pitch)
        assert y.shape == (2, 1, n * hop)
        assert torch.equal(y, teacher.synth(mel, teacher.synth.voiced(mel, pitch)))
        assert torch.equal(y, student(mel, pitch))
        torch.nn.init.normal_(teacher.last[-1].weight, std=0.1)
        y = teacher(mel, pitch)
        later = pitch.clone()
        later[:, 0, -1] += 1.0
        changed = (teacher(mel, later) - y).abs()[0, 0]
    assert changed[(n - 2) * hop:(n - 1) * hop].max() > 1e-4  # the frame before the change hears it
    assert changed[:hop].max() == 0                             # 59 frames back: beyond its reach, untouched


@pytest.mark.parametrize("kind", ["voiced", "noise"])
def test_envelope_synthesis_reproduces_the_mel(kind):
    """The student's DSP half: a signal synthesised from a mel (+ its pitch), analysed again, has that mel: the
    harmonic and noise calibrations against the frontend's periodogram (log power, mean over frames 5..)."""
    from rtvc.envelope import EnvelopeSynth
    from rtvc.frontend import Frontend, lf0_features, yin
    rate, hop = CFG.model.sample_rate, CFG.model.hop_length
    fe, synth = Frontend(CFG.model), EnvelopeSynth(CFG.model, CFG.student)
    if kind == "voiced":
        x = torch.from_numpy(_speech_like(1.0, rate, 3))[None]
    else:  # coloured noise: a resonance at 1.5 kHz over a tilt
        g = torch.Generator().manual_seed(3)
        w = torch.randn(1, rate, generator=g)
        x = 0.05 * torch.from_numpy(scipy_lfilter(w[0].numpy(), rate)).float()[None]
    x = x[:, : x.shape[1] // hop * hop]
    with torch.no_grad():
        mel, fr = fe(x)
        f0, voiced = yin(fr[0].numpy(), CFG.model)
        voiced &= kind == "voiced"  # the noise is synthesised as unvoiced (its resonance may look periodic)
        pitch, _ = lf0_features(f0, voiced)
        y = synth(mel, torch.from_numpy(pitch)[None])[:, 0]
        mel_y, _ = fe(y)
    if kind == "voiced":
        keep = torch.from_numpy(voiced)[10:]
        assert keep.float().mean() > 0.5
    else:
        keep = torch.ones(mel.shape[2] - 10, dtype=torch.bool)
    diff = (mel_y - mel)[0, :, 10:][:, keep]                      # [n_mels, frames]: log power error
    bands = diff.reshape(8, 10, -1).mean((1, 2))                  # 8 groups of 10 mel bands
    assert bands.abs().max() < 0.8, bands                          # within ~3.5 dB per band group
    assert diff.mean().abs() < 0.4, diff.mean()


def test_voice_bar_voices_the_tracker_unvoiced_frames_with_a_low_band():
    """[student] voice_bar_*: an unvoiced frame whose lowest bands (centred below 300 Hz: 6 of 80) average above the
    level is voiced at the held log-F0; voiced frames and frames without the bar are untouched; torch == numpy (the
    numba step's); off at 0 Hz. The vocoders sound it: the student's output changes exactly where the rule fires."""
    from rtvc.envelope import voice_bar
    n = 8
    mel = torch.full((1, CFG.model.n_mels, n), -1.0)
    mel[0, :6, [1, 2, 5]] = torch.tensor([0.5, -0.2, 0.1])[:, None].T  # bar above 0, below, above (a voiced frame)
    mel[0, 6:, 3] = 3.0                                                # loud, but not in the bar's bands
    pitch = torch.tensor([[[0.3] * n, [0, 0, 0, 0, 0, 1, 0, 0]]])
    synth = Student(CFG.model, CFG.student).synth
    assert synth.bar == (6, 0.0)
    got = synth.voiced(mel, pitch)
    assert got[0, 1].tolist() == [0, 1, 0, 0, 0, 1, 0, 0] and torch.equal(got[0, 0], pitch[0, 0])
    assert pitch[0, 1, 1] == 0  # the input is not changed
    np.testing.assert_array_equal(voice_bar(mel[0].numpy(), pitch[0].numpy(), *synth.bar), got[0].numpy())
    assert voice_bar(mel, pitch, 0, 0.0) is pitch
    off = CFG.replace(**{"student.voice_bar_hz": 0.0})
    torch.manual_seed(1)
    on_student = Student(CFG.model, CFG.student).eval()
    off_student = Student(off.model, off.student).eval()
    off_student.load_state_dict(on_student.state_dict())
    torch.nn.init.normal_(on_student.head2.weight, std=0.1)  # the network's part too, not only the synthesis
    off_student.head2.weight.data.copy_(on_student.head2.weight)
    with torch.no_grad():
        diff = (on_student(mel, pitch) - off_student(mel, pitch)).abs()[0, 0].reshape(n, -1).amax(1)
    assert diff[0] == 0 and diff[1] > 1e-4  # the first frame the rule voices changes; nothing before it


def scipy_lfilter(w: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import lfilter
    r, th = 0.97, 2 * np.pi * 1500 / rate
    y = lfilter([1.0], [1.0, -2 * r * np.cos(th), r * r], w)
    return lfilter([1.0], [1.0, -0.5], y)


def test_yin_voicing_rules():
    """A rough voice (a 130 Hz tone in noise at -3 dB SNR: normalised difference ~0.3 at the period) is voiced once
    its period held for yin_confirm_frames, with the right F0; it is never voiced under YIN's strict rule alone;
    white noise never is. A clean tone is voiced from its first frame."""
    from rtvc.frontend import Frontend, yin
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 24000
    fe = Frontend(CFG.model)
    m = CFG.model
    strict = CFG.replace(**{"model.yin_voicing_threshold": m.yin_threshold}).model
    first = m.win_length // m.hop_length  # frames until the analysis window is all signal
    tone = np.sin(2 * np.pi * 130 * t)
    for x, want in ((tone, first), (tone + 0.7 * rng.standard_normal(t.shape), first + m.yin_confirm_frames),
                    (rng.standard_normal(t.shape), None)):
        fr = fe.frames(torch.from_numpy(x.astype(np.float32))[None])[0].numpy()
        f0, v = yin(fr, m)
        if want is None:
            assert not v.any()
            continue
        assert v[want:].all() and abs(np.median(f0[want:]) - 130) < 6
        if want > first:
            assert not yin(fr, strict)[1].any()


def test_yin_onset_range():
    """A rough onset (130 Hz in noise) after a pause is voiced at its first fully analysed frame when its F0 is
    within model.yin_onset_range of the speaker's running mean (a clean 130 Hz stretch before the pause), and only
    after yin_confirm_frames with the range off; a fresh tracker needs the range armed (5 voiced frames) or a
    calibration's mean (:func:`new_track`), whose distance from the onset decides."""
    import dataclasses
    from rtvc.frontend import Frontend, PitchStats, new_track, yin
    m = CFG.model
    assert m.yin_onset_range > 0
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 24000
    clean, rough = np.sin(2 * np.pi * 130 * t), np.sin(2 * np.pi * 130 * t) + 0.7 * rng.standard_normal(t.shape)
    fe = Frontend(m)
    x = np.concatenate([clean, np.zeros(4800), rough]).astype(np.float32)
    fr = fe.frames(torch.from_numpy(x)[None])[0].numpy()
    inside = (12000 + 4800) // m.hop_length + m.win_length // m.hop_length - 1  # first frame all rough voice
    off = dataclasses.replace(m, yin_onset_range=0.0)
    for cfg, want in ((m, inside), (off, inside + m.yin_confirm_frames - 1)):
        f0, v = yin(fr, cfg)
        assert np.flatnonzero(v[inside - 3:])[0] + inside - 3 == want
        assert v[want:].all() and abs(np.median(f0[want:]) - 130) < 6
    fr = fe.frames(torch.from_numpy(rough.astype(np.float32))[None])[0].numpy()
    first = m.win_length // m.hop_length - 1
    for track, want in ((None, first + m.yin_confirm_frames - 1), (new_track(PitchStats(math.log(130), 0.1)), first),
                        (new_track(PitchStats(math.log(260), 0.1)), first + m.yin_confirm_frames - 1)):
        assert np.flatnonzero(yin(fr, m, track)[1])[0] == want


def test_yin_tracker_rejects_jumps():
    """Continuing a voiced stretch, the tracker follows a glide but never jumps more than yin_max_jump per frame:
    a 120 Hz tone whose frames from 0.5 s on carry a strong 600 Hz partial (a dip at a 5x shorter lag, what voiced
    fricatives look like) stays at 120 Hz, where a fresh tracker on those frames alone reports the junk period."""
    from rtvc.frontend import Frontend, yin
    t = np.arange(24000) / 24000
    f = 120 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))            # +-5% vibrato: followed
    x = np.sin(2 * np.pi * np.cumsum(f) / 24000)
    x[12000:] = 0.5 * x[12000:] + 2.0 * np.sin(2 * np.pi * 600 * t[12000:])
    fr = Frontend(CFG.model).frames(torch.from_numpy(x.astype(np.float32))[None])[0].numpy()
    f0, v = yin(fr, CFG.model)
    lo = CFG.model.win_length // CFG.model.hop_length
    assert (~v[lo:]).sum() <= 1  # at most the frame whose window straddles the step in the signal
    assert np.all(np.abs(np.log(f0[lo:][v[lo:]] / 120)) < 0.08)
    f0_fresh, _ = yin(fr[60:], CFG.model)
    assert np.median(f0_fresh) > 400


def test_yin_release():
    """A tone that turns into white noise stays voiced at the tone's F0 for exactly yin_release_frames frames after
    the tracker last found its period, then is unvoiced; with the release off it stops at once; silence ends a
    stretch with no release (nothing to sound)."""
    import dataclasses
    from rtvc.frontend import Frontend, yin
    rng = np.random.default_rng(3)
    m = CFG.model
    assert m.yin_release_frames > 0
    t = np.arange(24000) / 24000
    tone = np.sin(2 * np.pi * 140 * t)
    fe = Frontend(m)
    for tail, release in ((rng.standard_normal(12000), m.yin_release_frames), (np.zeros(12000), 0)):
        x = np.concatenate([tone[:12000], tail]).astype(np.float32)
        fr = fe.frames(torch.from_numpy(x)[None])[0].numpy()
        off = dataclasses.replace(m, yin_release_frames=0)
        _, v_off = yin(fr, off)
        last = int(np.flatnonzero(v_off)[-1])  # the last frame whose period the tracker found
        assert 45 <= last < 50 + m.win_length // m.hop_length
        f0, v = yin(fr, m)
        assert np.array_equal(v[: last + 1], v_off[: last + 1])
        assert v[last + 1: last + 1 + release].all() and not v[last + 1 + release:].any()
        np.testing.assert_allclose(f0[last + 1: last + 1 + release], f0[last], rtol=1e-9)


def test_pitch_mapping_with_a_measured_source():
    """measure_pitch finds a tone's ln F0 statistics; with them known, the mapped contour of an intonated tone is
    the target's range from the first voiced frame (affine in ln F0: correlation ~1, mean = target mean), and
    a too-short or unvoiced recording is a clear error."""
    from rtvc.frontend import LF0_MEAN, LF0_STD, Frontend, PitchStats, SourcePitch, measure_pitch
    m = CFG.model
    t = np.arange(2 * 24000) / 24000
    f = 115 * np.exp(0.1 * np.sin(2 * np.pi * 0.7 * t))      # intonation: ln F0 +-0.1 around 115 Hz
    x = (0.5 * np.sin(2 * np.pi * np.cumsum(f) / 24000)).astype(np.float32)
    st = measure_pitch(x, m)
    assert abs(st.mean - np.log(f).mean()) < 0.02 and abs(st.std - np.log(f).std()) < 0.02
    fr = Frontend(m).frames(torch.from_numpy(x)[None])[0].numpy()
    target = PitchStats(5.3, 0.12)
    p = SourcePitch(m, st, known=True)(fr, target, 0.0)
    v = p[1] > 0
    lm = p[0][v] * LF0_STD + LF0_MEAN
    truth = np.log(f[::m.hop_length][: p.shape[1]])[v]
    assert np.corrcoef(lm, truth)[0, 1] > 0.99
    assert abs(lm.mean() - target.mean) < 0.02
    with pytest.raises(ValueError, match="voiced"):
        measure_pitch(np.random.default_rng(0).standard_normal(24000).astype(np.float32), m)


def test_set_source_seeds_the_onset_range():
    """A calibration given to a running converter (``set_source``) centres the tracker's onset range on it, as one
    given at construction does, survives ``reset``, and forgetting it (None) clears the centre."""
    from rtvc.frontend import ONSET_RANGE_AFTER, PitchStats, new_track
    vc = VoiceConverter(make_voice_model(CFG, ["a"], seed=1), "a")
    assert np.array_equal(vc.source_pitch.track, new_track())
    st = PitchStats(math.log(120.0), 0.15)
    vc.set_source(st)
    assert vc.source_pitch.track[4] == st.mean and vc.source_pitch.track[5] == ONSET_RANGE_AFTER
    vc.reset()
    assert np.array_equal(vc.source_pitch.track, VoiceConverter(vc.model, "a", source=st).source_pitch.track)
    vc.set_source(None)
    assert not vc.source_pitch.track[4:].any()
