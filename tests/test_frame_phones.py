"""Phone posteriors (vqvae.phone_channels): frame labels from MBROLA timings, the recogniser added to a voice model
without changing what it computes, and `rtvc train phones` (labels cached, both parts train, resume, a model out)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rtvc.checkpoint import CheckpointError, load_checkpoint
from rtvc.data.dataset import Corpus
from rtvc.frame_phones import FRAME_PHONES, SILENCE, frame_labels, mbrola_phones, vote
from rtvc.train import train_student, train_vqvae
from rtvc.train_phones import train_phones, with_recogniser
from rtvc.voice import VoiceConverter, VoiceModel, make_voice_model

from conftest import harmonic, make_tiny_config

PHONES = {"vqvae.phone_channels": 8, "vqvae.phone_layers": 3}


def test_frame_labels_read_each_window_centre_and_vote_by_majority():
    # hop 10 ms, window 40 ms: frame t's window is centred at (t + 1) * 10 - 20 ms
    lab = frame_labels([("_", 0, 30), ("h", 30, 60), ("@U", 60, 95), ("xx", 95, 120)], 12, 240, 960, 24000)
    names = [FRAME_PHONES[i] for i in lab]
    assert names == ["_", "_", "_", "_", "h", "h", "h", "@U", "@U", "@U", "@U", "_"]  # unknown phone -> silence
    assert lab[-1] == SILENCE
    assert vote(np.array([[1, 2, 3, 4], [1, 5, 6, 4], [7, 5, 8, 9]])).tolist() == [1, 5, 3, 4]


@pytest.mark.skipif(shutil.which("espeak-ng") is None or not Path("/usr/share/mbrola/us1").is_dir(),
                    reason="espeak-ng with MBROLA us1 is not installed (scripts/install_tts.sh)")
def test_mbrola_timings_cover_the_reading():
    phones = mbrola_phones("mb-us1", "Hello there.")
    assert phones[0][1] == 0 and all(a[2] == b[1] for a, b in zip(phones, phones[1:]))
    spoken = [p for p, _, _ in phones if p != "_"]
    assert spoken and set(spoken) <= set(FRAME_PHONES) and "h" in spoken and "D" in spoken


def test_with_recogniser_starts_as_the_model_it_extends():
    """The posteriors' decoder weights start at zero: the extended model converts exactly as the original."""
    cfg = make_tiny_config()
    model = make_voice_model(cfg, ["a", "b"], seed=2)
    model.content = {"a": np.zeros(cfg.vqvae.code_dim, np.float32), "b": np.ones(cfg.vqvae.code_dim, np.float32)}
    ext = with_recogniser(model, cfg.replace(**PHONES))
    assert ext.vqvae.phones is not None and ext.cfg.vqvae.phone_channels == 8 and sorted(ext.content) == ["a", "b"]
    x = harmonic(0.6, cfg.model.sample_rate, 140.0, 3)
    x = x[: len(x) // cfg.model.hop_length * cfg.model.hop_length]
    np.testing.assert_allclose(VoiceConverter(ext, "b").convert_offline(x),
                               VoiceConverter(model, "b").convert_offline(x), atol=1e-5)
    with pytest.raises(ValueError, match="phone_channels > 0"):
        with_recogniser(model, cfg)
    with pytest.raises(ValueError, match="already has"):
        with_recogniser(ext, cfg.replace(**PHONES))


def test_train_phones_labels_trains_resumes_and_writes_a_voice_model(prepared, tmp_path):
    cfg, cache0 = prepared
    cfg = cfg.replace(**{"train.student_target": "audio"})
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    ck = tmp_path / "ck"
    train_vqvae(cfg, cache, ck, steps=2, progress=False)
    train_student(cfg, cache, ck, steps=2, progress=False)
    base = VoiceModel.load(ck / "model.pt")
    # labels as the MBROLA step would leave them (no TTS needed here): every utterance with text
    corpus = Corpus(cache, cfg.model)
    rng = np.random.default_rng(0)
    np.savez(cache / "phone_labels.npz", **{u["id"]: rng.integers(0, len(FRAME_PHONES), u["frames"])
                                            for u in corpus.utts if u.get("text")})
    pc = cfg.replace(**PHONES)
    out = train_phones(pc, cache, ck, ck / "model.pt", tmp_path / "phones.pt", steps=(3, 3), progress=False)
    ck_state = load_checkpoint(ck / "phones.pt", "phones")
    assert ck_state["step"] == 6
    model = VoiceModel.load(out)
    assert model.vqvae.phones is not None and model.speakers == base.speakers
    # encoder, codebook, speakers and vocoder kept; the decoder learnt to read the posteriors
    for name in ("encoder", "vq", "speakers"):
        for (k, a), b in zip(getattr(model.vqvae, name).state_dict().items(),
                             getattr(base.vqvae, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k}"
    w = model.vqvae.decoder.inp.weight[:, cfg.vqvae.code_dim: cfg.vqvae.code_dim + len(FRAME_PHONES)]
    assert w.abs().max() > 0
    y = VoiceConverter(model, "low").convert(np.zeros(cfg.model.hop_length * 3, np.float32))
    assert np.isfinite(y).all()
    # resumes at step 6 (a longer decoder part), and only from the model it started on
    train_phones(pc, cache, ck, ck / "model.pt", tmp_path / "phones.pt", steps=(3, 4), progress=False)
    assert load_checkpoint(ck / "phones.pt", "phones")["step"] == 7
    shutil.copy(ck / "model.pt", tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="continues"):
        train_phones(pc, cache, ck, tmp_path / "other.pt", tmp_path / "x.pt", steps=(3, 5), progress=False)
    # the student fine-tuned on that model's own decoder (posteriors and all): a fresh checkpoint folder takes the
    # model's VQ-VAE as its vqvae.pt, and the exported file keeps it unchanged next to the new student
    ck2 = tmp_path / "ck2"
    model = VoiceModel.load(out)  # as the resumed run above left it
    train_student(pc, cache, ck2, steps=2, progress=False, init=out)
    tuned = VoiceModel.load(ck2 / "model.pt")
    assert tuned.vqvae.phones is not None and tuned.speakers == model.speakers
    for (k, a), b in zip(tuned.vqvae.state_dict().items(), model.vqvae.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(tuned.student.state_dict().values(),
                                                     model.student.state_dict().values()))
    # a model that has a recogniser: its decoder trains on, half of each batch rebuilt across voices
    # (train.phone_parallel_fraction); the recogniser, encoder, codebook and speakers stay
    fc = pc.replace(**{"train.phone_parallel_fraction": 0.5, "train.phone_decoder_ema": 0.0})
    cont = train_phones(fc, cache, tmp_path / "ck3", out,
                        tmp_path / "cont.pt", steps=(3, 2), progress=False)
    assert load_checkpoint(tmp_path / "ck3" / "phones.pt", "phones")["step"] == 2
    cont = VoiceModel.load(cont)
    for name in ("phones", "encoder", "vq", "speakers"):
        for (k, a), b in zip(getattr(cont.vqvae, name).state_dict().items(),
                             getattr(model.vqvae, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k}"
    assert any(not torch.equal(a, b) for a, b in zip(cont.vqvae.decoder.state_dict().values(),
                                                     model.vqvae.decoder.state_dict().values()))
    # train.phone_decoder_ema: the file gets the average of the decoder after each step (the first step's weights,
    # then decay x average + (1 - decay) x new), the same run's weights otherwise; the checkpoint keeps it to resume
    one = VoiceModel.load(train_phones(fc, cache, tmp_path / "ck4", out, tmp_path / "one.pt", steps=(3, 1),
                                       progress=False)).vqvae.decoder.state_dict()
    ec = fc.replace(**{"train.phone_decoder_ema": 0.9})
    avg = VoiceModel.load(train_phones(ec, cache, tmp_path / "ck5", out, tmp_path / "ema.pt", steps=(3, 2),
                                       progress=False)).vqvae.decoder.state_dict()
    for k, two in cont.vqvae.decoder.state_dict().items():
        torch.testing.assert_close(avg[k], 0.9 * one[k] + 0.1 * two, rtol=1e-5, atol=1e-6, msg=k)
    assert "decoder_ema" in load_checkpoint(tmp_path / "ck5" / "phones.pt", "phones")
    with pytest.raises(CheckpointError, match="without train.phone_decoder_ema"):
        train_phones(ec, cache, tmp_path / "ck3", out, tmp_path / "x.pt", steps=(3, 3), progress=False)


def test_cross_voice_step_reads_the_posteriors(prepared):
    """`rtvc enrol` (and `train vqvae --parallel`) on a model with a recogniser: the pairs carry the source's
    posteriors at the conversion temperature, warped with its codes, and the decoder step reads them. Before
    session 29 the bundled model's enrolment failed (the decoder got the codes alone: 66 of 107 channels)."""
    from rtvc.train import parallel_pairs, parallel_step
    cfg, cache = prepared
    corpus = Corpus(cache, cfg.model)
    model = with_recogniser(make_voice_model(cfg, corpus.speakers, seed=3), cfg.replace(**PHONES))
    v = model.vqvae
    pairs = parallel_pairs(v, corpus, 0.5, torch.device("cpu"))
    i = corpus.indices("train")[0]
    z = v.encoder(torch.from_numpy(corpus.utts[i]["mel"])[None])
    want = torch.softmax(v.phones(z)[0] / v.temperature, 0)
    np.testing.assert_allclose(pairs.phones[i].astype(np.float32), want.detach().numpy(), atol=1e-3)
    before = [p.detach().clone() for p in v.decoder.parameters()]
    opt = torch.optim.Adam(v.decoder.parameters(), 1e-3)
    batch = next(pairs.batches(4, 16, 1, 0))
    assert batch["phones"].shape == (4, len(FRAME_PHONES), 16)
    assert np.isfinite(parallel_step(v, v.decoder, opt, batch)["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, v.decoder.parameters()))
