"""The encoder's auxiliary phone loss (train.phone_ctc): espeak-ng transcripts, whole-utterance batches, a CTC head
that trains with the VQ-VAE (its codes frozen during the head's warm-up), and never reaches the voice model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rtvc.checkpoint import load_checkpoint
from rtvc.data.dataset import Corpus
from rtvc.data.prepare import CorpusError, prepare_corpus
from rtvc.phones import PhoneHead, PhoneTargets, phonemize
from rtvc.train import Dist, PhoneWarmup, export_voice_model, phone_loss, train_student, train_vqvae
from rtvc.vqvae import VQVAE

from conftest import write_folder_corpus

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@needs_espeak
def test_phonemize_keeps_multi_letter_phonemes_whole_and_drops_stress():
    assert phonemize("Cheese.", "en-us") == ["tʃ", "iː", "z"]
    assert phonemize("the teacher", "en-us") == ["ð", "ə", "t", "iː", "tʃ", "ɚ"]


def test_phonemize_without_espeak_says_what_to_do(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(CorpusError, match="espeak-ng.*phone_ctc = 0"):
        phonemize("hello", "en-us")


@needs_espeak
def test_phone_targets_batches_and_refusals(prepared, tmp_path):
    cfg, cache = prepared
    corpus = Corpus(cache, cfg.model)
    t = PhoneTargets(corpus, ("low", "mid"), "en-us")
    assert t and all(corpus.utts[i]["speaker"] in ("low", "mid") for s in t.items.values() for i in s)
    b = t.batch("train", 3, np.random.default_rng(0))
    n, frames = b["mel"].shape[0], b["frames"]
    assert n == 3 and b["mel"].shape[2] == int(frames.max()) and b["phones"].shape[0] == int(b["lengths"].sum())
    assert int(b["phones"].min()) >= 1 and int(b["phones"].max()) <= len(t.vocab)  # 0 is CTC's blank
    with pytest.raises(CorpusError, match="phone_voices.*nobody"):
        PhoneTargets(corpus, ("nobody",), "en-us")
    raw = write_folder_corpus(tmp_path / "raw", {"a": 100.0, "b": 200.0}, n=4)
    for f in raw.rglob("*.txt"):
        f.unlink()
    prepare_corpus(cfg, raw, tmp_path / "cache", val_fraction=0.25, progress=False)
    assert not PhoneTargets(Corpus(tmp_path / "cache", cfg.model), (), "en-us")  # no text: nothing to spell


def test_phone_loss_steers_the_encoder_only_after_the_warm_up(tiny_cfg):
    """frozen: the head learns, the encoder gets no gradient from it; then both do (fresh random data)."""
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    v = VQVAE(tiny_cfg.model.n_mels, 2, tiny_cfg.vqvae)
    head = PhoneHead(tiny_cfg.vqvae.code_dim, 5)
    batch = {"mel": torch.randn(2, tiny_cfg.model.n_mels, 30), "frames": torch.tensor([30, 24]),
             "phones": torch.randint(1, 6, (7,)), "lengths": torch.tensor([4, 3])}
    for frozen in (True, False):
        v.zero_grad(), head.zero_grad()
        ctc, commit = phone_loss(v, head, batch, None, frozen=frozen, device=torch.device("cpu"))
        assert torch.isfinite(ctc) and ctc.item() > 0
        (ctc + commit).backward()
        assert head.net[0].weight.grad.abs().sum() > 0
        enc = v.encoder.inp.weight.grad
        assert (enc is None or enc.abs().sum() == 0) if frozen else enc.abs().sum() > 0


@needs_espeak
def test_vqvae_with_phone_ctc_trains_resumes_and_exports_without_the_head(prepared, tmp_path):
    cfg, cache = prepared
    cfg = cfg.replace(**{"train.phone_ctc": 0.5, "train.phone_warmup": 2, "train.phone_utterances": 3,
                         "train.student_target": "audio", "train.phone_warmup_ctc": 1e6})  # no guard restart
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=1, progress=False)
    assert "phone_head" not in load_checkpoint(p, "vqvae")["models"]  # mid-warm-up: a resume warms up afresh
    p = train_vqvae(cfg, cache, ck, steps=4, progress=False)
    first = load_checkpoint(p, "vqvae")
    assert "phone_head" in first["models"] and "phone_head" in first["optims"]
    train_vqvae(cfg, cache, ck, steps=5, progress=False)
    w0 = first["models"]["phone_head"]["net.0.weight"]
    w1 = load_checkpoint(p, "vqvae")["models"]["phone_head"]["net.0.weight"]
    assert not torch.equal(w0, w1) and (w1 - w0).abs().max() < 3 * cfg.train.learning_rate  # resumed, one step on
    train_student(cfg, cache, ck, steps=1, progress=False)
    export_voice_model(ck, tmp_path / "model.pt")
    assert not any("phone" in k for k in torch.load(tmp_path / "model.pt", weights_only=False)["vqvae"])


@needs_espeak
def test_a_changed_phone_set_relearns_the_head_from_a_fresh_warm_up(prepared, tmp_path):
    """Another phone set (here: the same text in another language's phones) resumes the VQ-VAE and relearns the
    head and its optimiser instead of loading weights and Adam moments of the old shape."""
    cfg, cache = prepared
    cfg = cfg.replace(**{"train.phone_ctc": 0.5, "train.phone_warmup": 1, "train.phone_utterances": 3,
                         "train.phone_warmup_ctc": 1e6})
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=2, progress=False)
    rows = load_checkpoint(p, "vqvae")["models"]["phone_head"]["net.2.weight"].shape[0]
    other = cfg.replace(**{"train.phone_language": "de"})
    train_vqvae(other, cache, ck, steps=4, progress=False)
    corpus = Corpus(cache, cfg.model)
    want = len(PhoneTargets(corpus, (), "de").vocab) + 1
    assert want != rows and load_checkpoint(p, "vqvae")["models"]["phone_head"]["net.2.weight"].shape[0] == want


def test_the_warm_up_guard_restarts_a_stalled_head_then_trains_on_without_it(tiny_cfg, capsys):
    """At the warm-up's end a head whose loss is above train.phone_warmup_ctc gets fresh weights, a fresh optimiser
    state and another warm-up; after train.phone_warmup_restarts of them the codes stay detached from it for good.
    A head that learns ends its warm-up on time."""
    t = tiny_cfg.replace(**{"train.phone_warmup": 3, "train.phone_warmup_ctc": 4.0,
                            "train.phone_warmup_restarts": 1}).train
    torch.manual_seed(0)
    head = PhoneHead(8, 5)
    opt = torch.optim.Adam(head.parameters())
    head.net[0].weight.sum().backward()
    opt.step()
    w0 = head.net[0].weight.detach().clone()
    warm = PhoneWarmup(head, opt, t, 10, Dist())
    assert warm.frozen(10) and warm.frozen(12) and not warm.frozen(13)
    for step in (10, 11, 12):
        warm.record(step, 6.0)
    assert not torch.equal(head.net[0].weight, w0) and not opt.state            # restarted
    assert warm.frozen(13) and warm.frozen(15) and not warm.frozen(16)          # a second warm-up
    assert "restarted it for another 3-step warm-up (1 of 1)" in capsys.readouterr().out
    for step in (13, 14, 15):
        warm.record(step, 5.0)
    assert warm.frozen(16) and warm.frozen(10_000)                              # given up: no phone loss
    out = capsys.readouterr().out
    assert "WITHOUT the phone loss" in out and f"now {t.seed}" in out
    ok = PhoneWarmup(head, opt, t, 0, Dist())
    for step, loss in enumerate((3.9, 3.5, 3.0)):
        ok.record(step, loss)
    assert not ok.frozen(3) and "stalled" not in capsys.readouterr().out
