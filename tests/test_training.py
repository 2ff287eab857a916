"""Training: every stage runs (forward, backward, optimiser step, checkpoint, resume, validation samples), a short
overfit drives the loss far below its start, and DDP over two gloo processes gives single-process gradients."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from rtvc.checkpoint import CheckpointError, load_checkpoint
from rtvc.config import ConfigError
from rtvc.data.dataset import Corpus, SegmentDataset
from rtvc.data.prepare import CorpusError
from rtvc.train import (SpeakerAdversary, export_teacher, export_voice_model, teardown_distributed,
                        train_student, train_teacher, train_vqvae, vqvae_loss)
from rtvc.voice import VoiceConverter, VoiceModel
from rtvc.vqvae import VQVAE

from conftest import make_tiny_config


def test_all_stages_train_resume_and_export(prepared, tmp_path):
    cfg, cache = prepared
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=3, progress=False)
    assert load_checkpoint(p, "vqvae")["step"] == 3
    before = load_checkpoint(p, "vqvae")["models"]["vqvae"]
    train_vqvae(cfg, cache, ck, steps=5, progress=False)  # resumes at 3
    after = load_checkpoint(p, "vqvae")
    assert after["step"] == 5 and after["config"] == cfg.to_dict()
    assert any(not torch.equal(before[k], after["models"]["vqvae"][k]) for k in before)
    train_teacher(cfg, cache, ck, steps=3, progress=False)  # adversarial_start=2: the GAN branch runs too
    train_student(cfg, cache, ck, steps=4, progress=False)  # 2 distillation + 2 fine-tuning steps
    assert (ck / "model.pt").is_file()
    for name in ("vqvae_0000003.png", "vqvae_0000003_converted.wav", "teacher_0000003.wav", "student_0000003.png"):
        assert (ck / "samples" / name).is_file(), name
    model = VoiceModel.load(ck / "model.pt")
    assert model.speakers == ["high", "low", "mid"]
    # the VQ-VAE stage measured its voices' mean content for source centring, and the file carries it
    assert sorted(model.content) == model.speakers
    assert all(v.shape == (cfg.vqvae.code_dim,) and np.isfinite(v).all() for v in model.content.values())
    y = VoiceConverter(model, "low").convert(np.zeros(model.cfg.model.hop_length * 3, np.float32))
    assert y.shape == (model.cfg.model.hop_length * 3,) and np.isfinite(y).all()
    export_voice_model(ck, tmp_path / "again.pt")
    assert (tmp_path / "again.pt").stat().st_size < 30e6
    # a setting the file records instead of its checkpoints'; one that reshapes a network does not load
    quiet = VoiceModel.load(export_voice_model(ck, tmp_path / "quiet.pt", ["student.voice_bar_hz=0"]))
    assert quiet.cfg.student.voice_bar_hz == 0.0 and quiet.student.synth.bar == (0, 0.0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        export_voice_model(ck, tmp_path / "wide.pt", ["student.residual_channels=12"])
    with pytest.raises(ConfigError, match="voice_bar_hz"):
        export_voice_model(ck, tmp_path / "bad.pt", ["student.voice_bar_hz=-1"])
    slim = load_checkpoint(export_teacher(ck, tmp_path / "teacher.pt"), "teacher")  # what eval and distillation read
    assert set(slim["models"]) == {"teacher"} and not slim["optims"] and slim["step"] == 3
    # another pitch tracker setting: resuming refuses (other inputs), --finetune continues from the weights
    retuned = cfg.replace(**{"model.yin_voicing_threshold": 0.4})
    with pytest.raises(CheckpointError, match="--finetune"):
        train_vqvae(retuned, cache, ck, steps=6, progress=False)
    train_vqvae(retuned, cache, ck, steps=6, progress=False, finetune=True)
    assert load_checkpoint(p, "vqvae")["step"] == 6


def test_resume_takes_the_configured_learning_rate(prepared, tmp_path):
    """A resumed stage keeps Adam's moments but runs at today's train.learning_rate (annealing a run by resuming it
    with a lower rate), not the rate stored in the optimiser state."""
    cfg, cache = prepared
    ck = tmp_path / "ck"
    train_vqvae(cfg, cache, ck, steps=2, progress=False)
    low = cfg.replace(**{"train.learning_rate": cfg.train.learning_rate / 4})
    train_vqvae(low, cache, ck, steps=3, progress=False)
    saved = load_checkpoint(ck / "vqvae.pt", "vqvae")["optims"]["vqvae"]
    assert saved["param_groups"][0]["lr"] == low.train.learning_rate and saved["state"]


def test_finetune_on_a_corpus_with_more_voices(prepared, tmp_path):
    """A corpus grown by a voice: resuming refuses; --finetune keeps every known voice's speaker row, gives the new
    one the known rows' mean, and normalises the mels with the checkpoint's statistics, not the grown corpus's."""
    from rtvc.data.prepare import prepare_corpus

    from conftest import write_folder_corpus
    cfg, cache = prepared
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=2, progress=False)
    old = load_checkpoint(p, "vqvae")
    raw = write_folder_corpus(tmp_path / "raw", {"low": 100.0, "mid": 150.0, "high": 230.0, "aaa": 320.0}, n=8)
    grown = tmp_path / "grown"
    prepare_corpus(cfg, raw, grown, val_fraction=0.25, progress=False)
    assert not np.allclose(Corpus(grown, cfg.model).mel_mean, old["stats"]["mel_mean"])  # the new voice moves them
    with pytest.raises(CheckpointError, match="--finetune"):
        train_vqvae(cfg, grown, ck, steps=3, progress=False)
    train_vqvae(cfg, grown, ck, steps=3, progress=False, finetune=True)  # one Adam step: each weight moves <= ~lr
    new = load_checkpoint(p, "vqvae")
    assert new["stats"]["speakers"] == ["aaa", "high", "low", "mid"]
    np.testing.assert_allclose(new["stats"]["mel_mean"], old["stats"]["mel_mean"])
    t_old, t_new = old["models"]["vqvae"]["speakers.weight"], new["models"]["vqvae"]["speakers.weight"]
    step = 1.5 * cfg.train.learning_rate
    for i, v in enumerate(old["stats"]["speakers"]):
        torch.testing.assert_close(t_new[new["stats"]["speakers"].index(v)], t_old[i], rtol=0, atol=step)
    torch.testing.assert_close(t_new[0], t_old.mean(0), rtol=0, atol=step)
    assert (t_new[0] - t_old).abs().amax(1).min() > 10 * step  # ... and is none of the old rows
    shrunk = tmp_path / "shrunk"
    prepare_corpus(cfg, write_folder_corpus(tmp_path / "raw2", {"low": 100.0, "mid": 150.0}, n=8), shrunk,
                   val_fraction=0.25, progress=False)
    with pytest.raises(CheckpointError, match="lacks voices"):
        train_vqvae(cfg, shrunk, ck, steps=6, progress=False, finetune=True)


def test_finetune_refuses_a_wideband_corpus_until_prepared_band_limited(prepared, tmp_path):
    """A voice recorded at 48 kHz added to a model trained on 16 kHz audio: its kept normalisation would put the
    upper mel bins hundreds of spreads out, so the corpus is refused with the fix (`--band-hz`), which works."""
    import soundfile as sf

    from rtvc.data.prepare import prepare_corpus

    from conftest import write_folder_corpus
    cfg, cache = prepared
    ck = tmp_path / "ck"
    train_vqvae(cfg, cache, ck, steps=2, progress=False)
    raw = write_folder_corpus(tmp_path / "raw", {"low": 100.0, "mid": 150.0, "high": 230.0}, n=8)
    write_folder_corpus(raw, {"wide": 180.0}, n=8, rate=48000)
    for f in (raw / "wide").glob("*.wav"):  # breath noise up to 24 kHz over the voice
        x, sr = sf.read(str(f))
        sf.write(str(f), x + 0.02 * np.random.default_rng(0).standard_normal(x.shape), sr)
    prepare_corpus(cfg, raw, tmp_path / "wide", val_fraction=0.25, progress=False)
    with pytest.raises(CorpusError, match="--band-hz"):
        train_vqvae(cfg, tmp_path / "wide", ck, steps=3, progress=False, finetune=True)
    prepare_corpus(cfg, raw, tmp_path / "banded", val_fraction=0.25, progress=False, band_hz=8000)
    train_vqvae(cfg, tmp_path / "banded", ck, steps=3, progress=False, finetune=True)
    assert load_checkpoint(ck / "vqvae.pt", "vqvae")["step"] == 3


def test_init_from_a_voice_model(prepared, tmp_path):
    """--init: a stage with no checkpoint starts from a voice-model file's weights (step 0) in its mel normalisation,
    its voices keep their speaker rows on a grown corpus; an existing checkpoint wins; a teacher starts fresh in
    its mel normalisation."""
    from rtvc.data.prepare import prepare_corpus
    from rtvc.train import stage_from_voice_model

    from conftest import write_folder_corpus
    cfg, cache = prepared
    cfg = cfg.replace(**{"train.student_target": "audio"})
    ck = tmp_path / "ck"
    train_vqvae(cfg, cache, ck, steps=2, progress=False)
    train_student(cfg, cache, ck, steps=2, progress=False)
    bundled = VoiceModel.load(ck / "model.pt")
    raw = write_folder_corpus(tmp_path / "raw", {"low": 100.0, "mid": 150.0, "high": 230.0, "mine": 320.0}, n=8)
    grown = tmp_path / "grown"
    prepare_corpus(cfg, raw, grown, val_fraction=0.25, progress=False)
    ck2 = tmp_path / "ck2"
    p = train_vqvae(cfg, grown, ck2, steps=1, progress=False, init=ck / "model.pt")
    new = load_checkpoint(p, "vqvae")
    assert new["step"] == 1 and new["stats"]["speakers"] == ["high", "low", "mid", "mine"]
    np.testing.assert_allclose(new["stats"]["mel_mean"], bundled.frontend.mel_mean.numpy(), rtol=1e-6)
    table, old = new["models"]["vqvae"]["speakers.weight"], bundled.vqvae.speakers.weight.detach()
    for i, v in enumerate(bundled.speakers):
        torch.testing.assert_close(table[new["stats"]["speakers"].index(v)], old[i], rtol=0,
                                   atol=1.5 * cfg.train.learning_rate)
    train_vqvae(cfg, grown, ck2, steps=2, progress=False)  # resumes its own checkpoint, in its normalisation
    resumed = load_checkpoint(p, "vqvae")
    assert resumed["step"] == 2 and resumed["stats"]["mel_mean"] == new["stats"]["mel_mean"]
    train_vqvae(cfg, grown, ck2, steps=3, progress=False, init=ck / "model.pt")  # an existing checkpoint wins
    assert load_checkpoint(p, "vqvae")["step"] == 3
    train_student(cfg, grown, ck2, steps=1, progress=False, init=ck / "model.pt")
    assert VoiceModel.load(ck2 / "model.pt").speakers == ["high", "low", "mid", "mine"]
    # a voice model holds no teacher: one starts fresh in the model's mel normalisation (what its decoder emits)
    p = train_teacher(cfg, grown, ck2, steps=1, progress=False, init=ck / "model.pt")
    t = load_checkpoint(p, "teacher")
    np.testing.assert_allclose(t["stats"]["mel_mean"], bundled.frontend.mel_mean.numpy(), rtol=1e-6)
    torch.testing.assert_close(t["models"]["teacher"]["synth.mel_mean"], bundled.frontend.mel_mean)
    # a student on another corpus's normalisation cannot imitate that teacher: its targets would be mis-scaled
    ck3 = tmp_path / "ck3"
    ck3.mkdir()
    for f in ("vqvae.pt", "teacher.pt"):
        (ck3 / f).write_bytes((ck2 / f).read_bytes())
    with pytest.raises(CheckpointError, match="another mel normalisation"):
        train_student(cfg.replace(**{"train.student_target": "teacher"}), grown, ck3, steps=1, progress=False)
    with pytest.raises(CheckpointError, match="unknown stage 'disc'"):
        stage_from_voice_model(ck / "model.pt", "disc")


def test_student_without_a_teacher(prepared, tmp_path):
    """student_target="audio": the student trains on the recordings, no teacher checkpoint needed."""
    cfg, cache = prepared
    cfg = cfg.replace(**{"train.student_target": "audio"})
    ck = tmp_path / "ck"
    train_vqvae(cfg, cache, ck, steps=2, progress=False)
    train_student(cfg, cache, ck, steps=4, progress=False)
    assert not (ck / "teacher.pt").exists() and (ck / "model.pt").is_file()
    assert load_checkpoint(ck / "student.pt", "student")["step"] == 4


def test_vqvae_overfits_one_batch(prepared):
    cfg, cache = prepared
    torch.manual_seed(0)
    corpus = Corpus(cache, cfg.model)
    ds = SegmentDataset(corpus, "train", 16, 4, 0, with_wav=False)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    model = VQVAE(cfg.model.n_mels, len(corpus.speakers), cfg.vqvae).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = vqvae_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_code_substitution_feeds_the_decoder_near_codes_only_in_training():
    """On about the configured share of frames the decoder reads a 2nd..max_rank-th nearest code of that frame; the
    codes, the commitment loss and the codebook update keep the nearest; eval mode never substitutes; the encoder
    still gets the straight-through gradient."""
    torch.manual_seed(0)
    cfg = make_tiny_config(**{"vqvae.codebook_size": 32, "vqvae.code_dim": 8})
    z = torch.randn(4, 8, 500, requires_grad=True)
    plain, sub = VQVAE(cfg.model.n_mels, 2, cfg.vqvae).vq, VQVAE(cfg.model.n_mels, 2, cfg.vqvae).vq
    sub.load_state_dict(plain.state_dict())
    before = sub.codebook.clone()
    q0, c0, commit0, _ = plain.train()(z)
    q, c, commit, _ = sub.train()(z, substitute=0.3, max_rank=4)
    torch.testing.assert_close(c, c0)
    torch.testing.assert_close(commit, commit0)
    torch.testing.assert_close(sub.codebook, plain.codebook)   # the same EMA update
    flat = z.detach().transpose(1, 2).reshape(-1, 8)
    near = torch.cdist(flat, before).argsort(1)[:, :4]                   # ranks 1..4 under the codebook it used
    qf = q.detach().transpose(1, 2).reshape(-1, 8)
    match = torch.isclose(qf[:, None, :], before[near], atol=1e-5).all(2)  # [N, 4]: the rank each frame read
    assert match.any(1).all()
    swapped = ~match[:, 0]
    assert 0.25 < swapped.float().mean().item() < 0.35
    q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))               # straight-through
    sub.eval()
    q_eval, _, _, _ = sub(z.detach(), substitute=0.3, max_rank=4)
    torch.testing.assert_close(q_eval, sub.codebook[sub.nearest(flat)].reshape(4, 500, 8).transpose(1, 2))


def test_speaker_adversary_reverses_its_gradient_into_the_encoder():
    """The classifier's own weights get the plain cross-entropy gradient; the content vectors get it negated and
    scaled by the weight (the encoder is pushed to make the voice unrecognisable)."""
    torch.manual_seed(0)
    z = torch.randn(3, 8, 10, requires_grad=True)
    spk = torch.tensor([0, 2, 1])
    adv = SpeakerAdversary(8, 3, weight=0.5, hidden=16)
    ce, acc = adv(z, spk)
    ce.backward()
    g_rev, g_w = z.grad.clone(), adv.net[0].weight.grad.clone()
    z.grad = None
    adv.zero_grad()
    plain = torch.nn.functional.cross_entropy(adv.net(z), spk[:, None].expand(-1, 10))
    plain.backward()
    torch.testing.assert_close(g_rev, -0.5 * z.grad)
    torch.testing.assert_close(g_w, adv.net[0].weight.grad)
    assert 0.0 <= acc.item() <= 1.0 and ce.item() == pytest.approx(plain.item())


def test_vqvae_with_speaker_adversary_trains_resumes_and_exports_without_it(prepared, tmp_path):
    """train.speaker_adversarial > 0 (with the room augmentation on): the classifier trains with the VQ-VAE, is
    checkpointed and resumed with it, relearned (not reloaded) on a changed voice set, and never reaches the
    voice-model file, whose config records the VQ-VAE's recipe even when the student was trained under another."""
    cfg, cache = prepared
    cfg = cfg.replace(**{"train.speaker_adversarial": 0.3, "train.student_target": "audio", "train.reverb_prob": 0.5,
                         "train.noise_prob": 0.5})
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=2, progress=False)
    first = load_checkpoint(p, "vqvae")
    assert "speaker_adversary" in first["models"] and "speaker_adversary" in first["optims"]
    train_vqvae(cfg, cache, ck, steps=3, progress=False)
    second = load_checkpoint(p, "vqvae")["models"]["speaker_adversary"]
    w0, w1 = first["models"]["speaker_adversary"]["net.0.weight"], second["net.0.weight"]
    assert not torch.equal(w0, w1) and (w1 - w0).abs().max() < 3 * cfg.train.learning_rate  # resumed, one step on
    plain = cfg.replace(**{"train.speaker_adversarial": 0.0, "train.reverb_prob": 0.0, "train.noise_prob": 0.0,
                           "train.phone_ctc": 0.0})
    train_student(plain, cache, ck, steps=1, progress=False)
    model = VoiceModel.load(export_voice_model(ck, tmp_path / "model.pt"))
    assert not any("adversary" in k for k in torch.load(tmp_path / "model.pt", weights_only=False)["vqvae"])
    assert model.speakers
    t = model.cfg.train
    assert (t.speaker_adversarial, t.reverb_prob, t.noise_prob) == (0.3, 0.5, 0.5)
    assert t.phone_ctc == cfg.train.phone_ctc > 0  # the VQ-VAE's recipe, not the student's
    from rtvc.data.prepare import prepare_corpus

    from conftest import write_folder_corpus
    grown = tmp_path / "grown"
    raw = write_folder_corpus(tmp_path / "raw", {"low": 100.0, "mid": 150.0, "high": 230.0, "aaa": 320.0}, n=8)
    prepare_corpus(cfg, raw, grown, val_fraction=0.25, progress=False)
    train_vqvae(cfg, grown, ck, steps=4, progress=False, finetune=True)
    assert load_checkpoint(p, "vqvae")["models"]["speaker_adversary"]["net.4.weight"].shape[0] == 4


def test_parallel_decoder_training_moves_only_the_decoder(prepared, tmp_path):
    """`rtvc train vqvae --parallel`: each voice rebuilt from another voice's codes of the same text. Only the
    decoder's weights move (the encoder, the codebook and its EMA statistics, the speaker table stay), the step
    counter and checkpoint continue, and the DTW warp maps a reading onto another of the same content exactly."""
    from rtvc.data.dataset import ParallelPairs, dtw_warp
    cfg, cache = prepared
    ck = tmp_path / "ck"
    p = train_vqvae(cfg, cache, ck, steps=2, progress=False)
    before = load_checkpoint(p, "vqvae")["models"]["vqvae"]
    train_vqvae(cfg, cache, ck, steps=5, progress=False, parallel=True)
    saved = load_checkpoint(p, "vqvae")
    after = saved["models"]["vqvae"]
    assert saved["step"] == 5
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("decoder.") for k in moved), moved
    # a reading spoken at half speed: each of its frames maps back to the frame it repeats
    rng = np.random.default_rng()
    za = rng.standard_normal((16, 30))
    za /= np.linalg.norm(za, axis=0)
    idx = np.repeat(np.arange(30), 2)
    assert np.array_equal(dtw_warp(za, za[:, idx]), idx)
    # a corpus whose voices never read the same text cannot give pairs
    corpus = Corpus(cache, cfg.model)
    for u in corpus.utts:
        u["text"] = None
    with pytest.raises(CorpusError, match="parallel corpus"):
        ParallelPairs(corpus, {}, {}, 0.5)


def test_parallel_pairs_with_source_only_voices(prepared):
    """Enrolment's pairs (`rtvc enrol`): a source-only voice's readings are every cross item's codes, and never an
    item's target (its speaker row need not exist in the decoder)."""
    from rtvc.data.dataset import ParallelPairs
    cfg, cache = prepared
    corpus = Corpus(cache, cfg.model)
    rng = np.random.default_rng()
    src = int(rng.integers(len(corpus.speakers)))
    train = corpus.indices("train")
    codes = {i: np.full(corpus.utts[i]["frames"], corpus.utts[i]["spk"]) for i in train}
    content = {}
    for i in train:
        z = rng.standard_normal((8, corpus.utts[i]["frames"]))
        content[i] = z / np.linalg.norm(z, axis=0)
    pairs = ParallelPairs(corpus, content, codes, 0.0, sources={src})
    assert pairs.idx and all(corpus.utts[i]["spk"] != src for i in pairs.idx)
    for b in pairs.batches(4, 16, 3, int(rng.integers(1 << 30))):
        assert (b["codes"] == src).all() and (b["speaker"] != src).all()
    # `rtvc train phones` (train.phone_parallel_fraction): targets limited to some voices, posteriors warped with
    # the codes (each frame's posterior row holds its utterance's voice and frame, so the warp is visible)
    tgt = int(rng.integers(len(corpus.speakers)))
    phones = {i: np.stack([np.full(corpus.utts[i]["frames"], corpus.utts[i]["spk"]),
                           np.arange(corpus.utts[i]["frames"])]).astype(np.float16) for i in train}
    pairs = ParallelPairs(corpus, content, codes, 0.0, targets={tgt}, phones=phones)
    assert pairs.idx and all(corpus.utts[i]["spk"] == tgt for i in pairs.idx)
    for b in pairs.batches(4, 16, 3, int(rng.integers(1 << 30))):
        assert (b["speaker"] == tgt).all() and (b["codes"] != tgt).all()
        assert b["phones"].shape == (4, 2, 16) and torch.equal(b["phones"][:, 0].long(), b["codes"])


def _batch(cfg, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"mel": torch.randn(n, cfg.model.n_mels, 12, generator=g), "pitch": torch.randn(n, 2, 12, generator=g),
            "speaker": torch.randint(0, 3, (n,), generator=g)}


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = make_tiny_config()
    torch.manual_seed(0)
    model = VQVAE(cfg.model.n_mels, 3, cfg.vqvae).train()
    net = torch.nn.parallel.DistributedDataParallel(model)
    full = _batch(cfg, 4)
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
    loss, _ = vqvae_loss(net, half)
    loss.backward()
    if rank == 0:
        torch.save(_grads(model), out)
    del net  # as when a stage returns: the product's teardown must then leave the group without aborting
    teardown_distributed()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    cfg = make_tiny_config()
    torch.manual_seed(0)
    model = VQVAE(cfg.model.n_mels, 3, cfg.vqvae).train()
    loss, _ = vqvae_loss(model, _batch(cfg, 4))
    loss.backward()
    ref = _grads(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert ref.keys() == got.keys() and len(ref) > 10
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def _stages_worker(rank: int, world: int, port: int, cfg, cache: str, ck: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # what torchrun sets: setup_distributed joins the group from these
    train_vqvae(cfg, cache, ck, steps=3, progress=False)
    train_vqvae(cfg, cache, ck, steps=5, progress=False, parallel=True)  # the decoder alone across voices
    train_teacher(cfg, cache, ck, steps=3, progress=False)  # adversarial_start=2: the GAN branch under DDP too
    train_student(cfg, cache, ck, steps=4, progress=False)  # distillation then fine-tuning, then rank 0 exports
    teardown_distributed()


def test_every_stage_trains_under_two_gloo_processes(prepared, tmp_path):
    """``torchrun --nproc_per_node 2 -m rtvc train <stage>`` in-process: each stage's DDP wrappers accept its
    graph (a parameter without a gradient, e.g. the student's last residual 1x1, stops DDP at the second step),
    rank 0 alone writes the checkpoints and the voice model, and both processes leave cleanly."""
    cfg, cache = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ck = tmp_path / "ck"
    mp.spawn(_stages_worker, args=(2, port, cfg, str(cache), str(ck)), nprocs=2, join=True)
    assert [load_checkpoint(ck / f"{k}.pt", k)["step"] for k in ("vqvae", "teacher", "student")] == [5, 3, 4]
    assert VoiceModel.load(ck / "model.pt").speakers == ["high", "low", "mid"]

