"""``rtvc train phones``: phone posteriors for a trained voice model (``vqvae.phone_channels``).

Runs on a voice-model file (``--init``: what ``rtvc export`` wrote, or the bundled model) and a prepared corpus whose
utterances have text (``rtvc data synth`` writes it; VCTK and LibriTTS have it), in three parts:

1. frame labels for every utterance with text (:mod:`rtvc.frame_phones`: MBROLA readings of its text, DTW on the
   model's content, the majority of three), cached in ``<cache>/phone_labels.npz``;
2. the recogniser, on the frozen encoder's output of augmented mels (the VQ-VAE stage's augmentation: the unseen
   reader is who it must work for), cross-entropy with label smoothing 0.1 (transferred labels are a frame off at
   many phone edges), ``train.phone_recogniser_steps``, one cycle up to ``train.phone_recogniser_lr``, batches of
   2 x ``batch_size`` segments of 2 x ``segment_hops``;
3. the decoder, reading codes and posteriors, rebuilding the clean mel (L1 + L2) of the model's own voices,
   ``train.phone_decoder_steps`` at ``train.phone_decoder_lr``. The posteriors' input weights start at zero, so
   it starts as the model's decoder and learns what the posteriors add.

Encoder, codebook, speaker table and vocoder stay as they were. Resumable: ``<checkpoint_dir>/phones.pt`` every
``train.checkpoint_every`` steps (and the label cache). Writes the voice-model file with both at the end.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .augment import ContentAugment, RoomAugment
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config
from .data.dataset import Corpus, CorpusError, dtw_warp
from .data.synth import VOICES, synthesize
from .evaluate import _read
from .frame_phones import FRAME_PHONES, MBROLA_VOICES, SILENCE, frame_labels, mbrola_phones, vote
from .train import pair_decoder_input, parallel_pairs
from .voice import VoiceModel


@torch.no_grad()
def unit_content(model: VoiceModel, mel: np.ndarray) -> np.ndarray:
    """Normalised mel [n_mels, T] -> the encoder's output as unit vectors [code_dim, T] (what DTW compares)."""
    return F.normalize(model.vqvae.encoder(torch.from_numpy(mel)[None])[0], dim=0).numpy()


@torch.no_grad()
def _reference(model: VoiceModel, voice: str, text: str, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """An MBROLA voice's reading of ``text``: (unit content [D, T], frame labels [T])."""
    m = model.cfg.model
    tts = next(v for v in VOICES if v.engine == "mbrola" and v.voice == voice)
    wav = tmp / f"{voice}_{abs(hash(text))}.wav"
    err = synthesize(tts, text, wav)
    if err is not None:
        raise CorpusError(f"{voice} could not read {text!r}: {err}")
    x = _read(wav, m.sample_rate)
    x = np.pad(x, (0, (-len(x)) % m.hop_length))
    mel, _ = model.frontend(torch.from_numpy(x)[None])
    z = unit_content(model, mel[0].numpy())
    return z, frame_labels(mbrola_phones(voice, text), z.shape[1], m.hop_length, m.win_length, m.sample_rate)


def corpus_labels(model: VoiceModel, corpus: Corpus, path: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """Utterance id -> frame labels [frames] int64 (index into FRAME_PHONES) for every utterance with text;
    computed once per utterance and kept in ``path`` (npz)."""
    labels = dict(np.load(path)) if path.is_file() else {}
    todo = [u for u in corpus.utts if u.get("text") and u["id"] not in labels]
    if not todo:
        return labels
    texts = sorted({u["text"] for u in todo})
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        refs: dict[str, list] = {}
        for text in tqdm(texts, desc="phone labels: MBROLA readings", disable=not progress):
            refs[text] = list(pool.map(lambda v: _reference(model, v, text, Path(tmp)), MBROLA_VOICES))
    for u in tqdm(todo, desc="phone labels: DTW", disable=not progress):
        z = unit_content(model, u["mel"])
        labels[u["id"]] = vote(np.stack([lab[dtw_warp(zr, z)] for zr, lab in refs[u["text"]]]))
    np.savez(path, **labels)
    return labels


class LabelledSegments:
    """Random segments of the labelled utterances: mel [n, n_mels, F], pitch [n, 2, F], labels [n, F], speaker
    ids [n] (in the model's table: -1 for a voice it lacks), a short utterance padded with silence."""

    def __init__(self, corpus: Corpus, labels: dict[str, np.ndarray], speakers: list[str]) -> None:
        self.c = corpus
        self.utts = [u for u in corpus.utts if u["id"] in labels and u["split"] == "train"]
        if not self.utts:
            raise CorpusError("no training utterance with text to label: train phones needs a corpus with transcripts")
        self.labels = labels
        self.spk = [speakers.index(u["speaker"]) if u["speaker"] in speakers else -1 for u in self.utts]
        self.own = [i for i, s in enumerate(self.spk) if s >= 0]
        if not self.own:
            raise CorpusError(f"the corpus has none of the model's voices ({', '.join(speakers)}) for the decoder")

    def batch(self, rng: np.random.Generator, n: int, frames: int, own: bool) -> tuple[torch.Tensor, ...]:
        pool = self.own if own else range(len(self.utts))
        mel, pitch, lab, spk = [], [], [], []
        for k in rng.choice(pool, n):
            u = self.utts[k]
            start, m, p, _ = self.c.segment(u, frames, rng)
            lb = self.labels[u["id"]][start:start + frames]
            mel.append(m)
            pitch.append(p)
            lab.append(np.pad(lb, (0, frames - len(lb)), constant_values=SILENCE))
            spk.append(self.spk[k])
        return (torch.from_numpy(np.stack(mel)), torch.from_numpy(np.stack(pitch)), torch.from_numpy(np.stack(lab)),
                torch.tensor(spk))


def with_recogniser(model: VoiceModel, cfg: Config) -> VoiceModel:
    """``model`` rebuilt with ``cfg``'s phone recogniser (fresh) and a decoder that reads its posteriors: the
    decoder's weights for codes and pitch copied, those for the posteriors zero (it computes what it did)."""
    if model.vqvae.phones is not None:
        raise ValueError("this voice model already has a phone recogniser")
    v = cfg.vqvae
    if not v.phone_channels:
        raise ValueError("set vqvae.phone_channels > 0 (config.toml) to train a phone recogniser")
    new_cfg = model.cfg.replace(**{f"vqvae.{k}": getattr(v, k) for k in ("phone_channels", "phone_layers",
                                                                         "phone_temperature")})
    new = VoiceModel(new_cfg, model.speakers, model.pitch, model.prior, {k: x.tolist() for k, x in model.content.items()})
    state = model.state_for_file()
    d, p = model.cfg.vqvae.code_dim, len(FRAME_PHONES)
    dec = state["vqvae"]
    for k in ("decoder.inp.weight",):
        w = dec[k]  # [C_out, code_dim + 2, K]
        dec[k] = torch.cat([w[:, :d], w.new_zeros(w.shape[0], p, w.shape[2]), w[:, d:]], 1)
    dec.update({f"phones.{k}": t for k, t in new.vqvae.phones.state_dict().items()})
    new.frontend.load_state_dict(state["frontend"])
    new.vqvae.load_state_dict(dec)
    new.student.load_state_dict(state["student"])
    return new.eval()


def train_phones(cfg: Config, cache: str | Path, ckpt_dir: str | Path, init: str | Path, out: str | Path,
                 steps: tuple[int, int] | None = None, progress: bool = True) -> Path:
    """The stage (module docstring): ``init`` voice model (without a recogniser) -> ``out`` (with one).
    ``steps``: (recogniser, decoder) instead of ``train.phone_recogniser_steps``, ``train.phone_decoder_steps``."""
    t = cfg.train
    n_rec, n_dec = steps or (t.phone_recogniser_steps, t.phone_decoder_steps)
    torch.manual_seed(t.seed)
    model = VoiceModel.load(init)
    if model.vqvae.phones is None:
        model = with_recogniser(model, cfg)
    else:  # a model that has one: its decoder trains on (the recogniser is kept as it is)
        model.eval()
        n_rec = 0
    v = model.vqvae
    fe = model.frontend
    corpus = Corpus(cache, model.cfg.model, (fe.mel_mean.numpy(), fe.mel_std.numpy()))
    data = LabelledSegments(corpus, corpus_labels(model, corpus, Path(cache) / "phone_labels.npz", progress),
                            model.speakers)
    augment = ContentAugment(model.cfg.model, corpus.mel_mean, corpus.mel_std, t.formant_warp, t.spectral_eq_db,
                             RoomAugment(model.cfg.model, t, t.seed))
    # cross-voice items (train.phone_parallel_fraction of each decoder batch): a model voice's reading rebuilt from
    # any corpus voice's reading of the same text, codes and posteriors warped onto it (rtvc.data.ParallelPairs)
    # (at least one own reading per batch: a fraction just under 1 must not round the own part away)
    n_cross = min(round(t.batch_size * t.phone_parallel_fraction), t.batch_size - 1) if n_dec else 0
    if n_cross:
        own = {k for k, name in enumerate(corpus.speakers) if name in model.speakers}
        pairs = parallel_pairs(v, corpus, 0.0, torch.device("cpu"), targets=own)
        rows = torch.tensor([model.speakers.index(n) if n in model.speakers else -1 for n in corpus.speakers])
    rec_opt = torch.optim.AdamW(v.phones.parameters(), t.phone_recogniser_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(rec_opt, t.phone_recogniser_lr, total_steps=max(1, n_rec),
                                                pct_start=0.05)
    dec_opt = torch.optim.Adam(v.decoder.parameters(), t.phone_decoder_lr)
    # the decoder's moving average (train.phone_decoder_ema), what the voice model is written with
    ema = AveragedModel(v.decoder, multi_avg_fn=get_ema_multi_avg_fn(t.phone_decoder_ema)) \
        if t.phone_decoder_ema else None
    path, step = Path(ckpt_dir) / "phones.pt", 0
    if path.is_file():
        ck = load_checkpoint(path, kind="phones")
        if ck["init"] != str(init):
            raise CheckpointError(f"{path} continues {ck['init']}, not {init}: move it away to start over")
        v.phones.load_state_dict(ck["phones"])
        v.decoder.load_state_dict(ck["decoder"])
        rec_opt.load_state_dict(ck["rec_opt"])
        sched.load_state_dict(ck["sched"])
        dec_opt.load_state_dict(ck["dec_opt"])
        if ema is not None:
            if "decoder_ema" not in ck:
                raise CheckpointError(f"{path} was trained without train.phone_decoder_ema: move it away to start over")
            ema.load_state_dict(ck["decoder_ema"])
        step = int(ck["step"])

    def save() -> None:
        save_checkpoint(path, {"kind": "phones", "config": model.cfg.to_dict(), "init": str(init), "step": step,
                               "phones": v.phones.state_dict(), "decoder": v.decoder.state_dict(),
                               "rec_opt": rec_opt.state_dict(), "sched": sched.state_dict(),
                               "dec_opt": dec_opt.state_dict(),
                               **({"decoder_ema": ema.state_dict()} if ema is not None else {})})

    spk_table = v.speakers.weight.detach()
    bar = tqdm(total=n_rec + n_dec, initial=step, desc="phones", disable=not progress)
    while step < n_rec + n_dec:
        rng = np.random.default_rng((t.seed, step))
        recogniser = step < n_rec
        mel, pitch, lab, spk = data.batch(rng, 2 * t.batch_size if recogniser else t.batch_size - n_cross,
                                          2 * t.segment_hops if recogniser else t.segment_hops, own=not recogniser)
        with torch.no_grad():
            z = v.encoder(augment(mel))
        if recogniser:
            v.phones.train()
            logits = v.phones(z)
            loss = F.cross_entropy(logits, lab, label_smoothing=0.1)
            logs = {"ce": loss.item(), "acc": (logits.argmax(1) == lab).float().mean().item()}
            opt = rec_opt
        else:
            v.phones.eval()
            v.decoder.train()
            with torch.no_grad():
                q = v.vq.codebook[v.vq.nearest(z.transpose(1, 2).reshape(-1, z.shape[1]))]
                # the posteriors at the conversion temperature: as the decoder will read them
                x = v.decoder_input(z, q.reshape(z.shape[0], z.shape[2], -1).transpose(1, 2), v.temperature)
                if n_cross:
                    b = pairs.batch(rng, n_cross, t.segment_hops)
                    x, mel, pitch = (torch.cat([x, pair_decoder_input(v, b)]), torch.cat([mel, b["mel"]]),
                                     torch.cat([pitch, b["pitch"]]))
                    spk = torch.cat([spk, rows[b["speaker"]]])
            mel_hat = v.decoder(x, spk_table[spk], pitch)
            l1, l2 = F.l1_loss(mel_hat, mel), F.mse_loss(mel_hat, mel)
            loss, logs, opt = l1 + l2, {"l1": l1.item(), "l2": l2.item()}, dec_opt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if recogniser:
            sched.step()
        elif ema is not None:
            ema.update_parameters(v.decoder)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{x:.3g}" for k, x in logs.items()})
        if step % t.checkpoint_every == 0 or step == n_rec + n_dec:
            save()
    bar.close()
    if ema is not None and n_dec:
        v.decoder.load_state_dict(ema.module.state_dict())
    model.eval()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model.state_for_file())
    return Path(out)
