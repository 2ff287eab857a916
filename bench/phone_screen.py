"""Phone posteriors as a decoder input: a screen for issue 5's MCD gap, outside the product (session 26).

The hypothesis: the decoder renders an unseen reader's codes poorly because the codes keep that reader's rendering
(model card, sessions 13 and 16). Phone identity is what two readers share. A causal frame phone recogniser on the
mel, trained on many voices, gives per-frame posteriors. A decoder that also reads them can render each target's
own version of the phone. Stages (WORK is any scratch folder; every stage reads what the previous one wrote):

    python bench/phone_screen.py data WORK                 # TTS corpus + features + frame labels (~25 min, 2 cores)
    python bench/phone_screen.py recogniser WORK --steps 10000         # ~22 min at 2 threads
    python bench/phone_screen.py decoder WORK --mode hybrid            # ~3 min; also: posteriors, control, oracle
    python bench/phone_screen.py eval WORK --mode hybrid               # 8 x 5 paired against the shipped model

Frame labels: espeak-ng's MBROLA voices print their phone timings (``--pho``), so their readings (mbf, mbm, mbm2)
are labelled exactly. Every other voice's reading of the same sentence gets the labels by DTW on the shipped
encoder's content (:func:`rtvc.data.dataset.dtw_warp`), the majority of the three references. The held-out
source's test readings are labelled the same way (for the recogniser's accuracy on an unseen reader, and for the
``oracle`` mode: the decoder given those labels, i.e. perfect phone identity).

Modes: ``posteriors``: the decoder reads the posteriors instead of the codes (its blocks start from the shipped
decoder's). ``hybrid``: it reads codes and posteriors; the posteriors' input weights start at zero, so training
starts from the shipped decoder. ``control``: hybrid with the posteriors zeroed (the same training without them).
``oracle``: posteriors replaced by one-hot labels, in training and in the evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtvc.augment import ContentAugment, RoomAugment  # noqa: E402
from rtvc.data.dataset import dtw_warp  # noqa: E402
from rtvc.data.synth import sentences, synth_corpus  # noqa: E402
from rtvc.evaluate import Metrics, _read, cosine, load_testset  # noqa: E402
from rtvc.frame_phones import FRAME_PHONES, MBROLA_VOICES, SILENCE, frame_labels, mbrola_phones, vote  # noqa: E402
from rtvc.frontend import SourcePitch, lf0_features, measure_pitch, yin  # noqa: E402
from rtvc.voice import VoiceModel  # noqa: E402
from rtvc.vqvae import Decoder, Encoder  # noqa: E402

REFS = dict(zip(("mbf", "mbm", "mbm2"), MBROLA_VOICES))  # labelled by their own timings
VOICES_EN = ("mbm3 awb rms slt esf esm ked esm2 esf2 esm3 esf3 bdl clb evg lyu pcf pcf2 rab "
             "itf itm czf czm czm2 fif fim rum caf").split()
MODES = ("posteriors", "hybrid", "control", "oracle")


class Screen:
    def __init__(self, work: str, model: str) -> None:
        self.work = Path(work)
        self.model = VoiceModel.load(model)
        self.cfg = self.model.cfg
        self.phones = FRAME_PHONES

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def features(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A recording -> (normalised mel [n_mels, T] f16, decoder pitch input [2, T], unit content [D, T])."""
        m, fe = self.cfg.model, self.model.frontend
        x = _read(path, m.sample_rate)
        x = np.pad(x, (0, (-len(x)) % m.hop_length))
        frames = fe.frames(torch.from_numpy(x)[None])
        mel = (fe.log_mel(frames)[0] - fe.mel_mean[:, None]) / fe.mel_std[:, None]
        f0, voiced = yin(frames[0].numpy(), m)
        z = F.normalize(self.model.vqvae.encoder(mel[None])[0], dim=0)
        return mel.numpy().astype(np.float16), lf0_features(f0, voiced)[0], z.numpy()

    def label_voice(self, texts: list[str], voice: str, out: Path, path_of) -> None:
        """Features and frame labels of ``voice``'s readings of ``texts`` -> ``out/<voice>.npy``."""
        m = self.cfg.model
        refs = {} if voice in REFS else {r: np.load(out / f"{r}.npy", allow_pickle=True).item() for r in REFS}
        res: dict[str, list] = {"mel": [], "pitch": [], "lab": [], "z": []}
        for i, text in enumerate(texts):
            path = path_of(voice, i)
            if not path.exists():  # a sentence the engine could not say
                for k in res:
                    res[k].append(None)
                continue
            mel, pitch, z = self.features(path)
            if voice in REFS:
                lab = frame_labels(mbrola_phones(REFS[voice], text), mel.shape[1], m.hop_length, m.win_length,
                                   m.sample_rate)
            else:
                lab = vote(np.stack([r["lab"][i][dtw_warp(r["z"][i].astype(np.float32), z)] for r in refs.values()]))
            res["mel"].append(mel)
            res["pitch"].append(pitch)
            res["lab"].append(lab)
            res["z"].append(z.astype(np.float16) if voice in REFS else None)
        np.save(out / f"{voice}.npy", np.array(res, dtype=object), allow_pickle=True)

    def data(self, n_sentences: int, testset: str) -> None:
        source, _, items = load_testset(testset)
        test = [it.text for it in items]
        held_out = set(test)
        texts = [t for t in sentences(n_sentences + 100) if t not in held_out][:n_sentences]
        voices = [*REFS, *VOICES_EN]
        t0 = time.time()
        synth_corpus(self.work / "synth", texts=texts, voices=voices, progress=False)
        synth_corpus(self.work / "synth_test", texts=test, voices=list(REFS), progress=False)
        print(f"synthesised in {time.time() - t0:.0f} s", flush=True)
        feats, ftest = self.work / "feats", self.work / "feats_test"
        feats.mkdir(exist_ok=True)
        ftest.mkdir(exist_ok=True)
        train_path = lambda v, i: self.work / "synth" / v / f"{v}_{i:05d}.wav"  # noqa: E731
        test_path = lambda v, i: (items[i].source_wav if v == source else  # noqa: E731
                                  self.work / "synth_test" / v / f"{v}_{i:05d}.wav")
        for v in voices:  # the references first: the others' labels come from theirs
            self.label_voice(texts, v, feats, train_path)
            print(f"labelled {v} ({time.time() - t0:.0f} s)", flush=True)
        for v in [*REFS, source]:
            self.label_voice(test, v, ftest, test_path)
        (self.work / "texts.json").write_text(json.dumps({"train": texts, "test": test, "source": source}))

    # ------------------------------------------------------------------ training
    def items(self, voices: list[str]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for v in voices:
            d = np.load(self.work / "feats" / f"{v}.npy", allow_pickle=True).item()
            out += [(v, mel.astype(np.float32), pitch, lab)
                    for mel, pitch, lab in zip(d["mel"], d["pitch"], d["lab"]) if mel is not None]
        return out

    def batch(self, items: list, rng: np.random.Generator, n: int, frames: int) -> tuple[torch.Tensor, ...]:
        """n random segments: mel [n, n_mels, F], pitch [n, 2, F], labels [n, F], speaker ids [n]."""
        mel, pitch, lab, spk = [], [], [], []
        for v, m_, p, lb in (items[k] for k in rng.integers(0, len(items), n)):
            s = int(rng.integers(0, max(1, m_.shape[1] - frames)))
            pad = frames - m_[:, s:s + frames].shape[1]
            mel.append(np.pad(m_[:, s:s + frames], ((0, 0), (0, pad)), constant_values=-2.0))
            pitch.append(np.pad(p[:, s:s + frames], ((0, 0), (0, pad))))
            lab.append(np.pad(lb[s:s + frames], (0, pad), constant_values=SILENCE))
            spk.append(self.model.speakers.index(v) if v in self.model.speakers else 0)
        return (torch.from_numpy(np.stack(mel)), torch.from_numpy(np.stack(pitch)), torch.from_numpy(np.stack(lab)),
                torch.tensor(spk))

    def augment(self) -> ContentAugment:
        """The VQ-VAE stage's own input augmentation (formant warp, colour, rooms and noise)."""
        fe, t = self.model.frontend, self.cfg.train
        return ContentAugment(self.cfg.model, fe.mel_mean.numpy(), fe.mel_std.numpy(), t.formant_warp,
                              t.spectral_eq_db, RoomAugment(self.cfg.model, t, 0))

    def recogniser(self, load: bool = False) -> Encoder:
        """Causal frame phone classifier: the content encoder's stack, 256 channels x 7 layers (31-frame receptive
        field, no lookahead), logits over the phones."""
        c = dataclasses.replace(self.cfg.vqvae, encoder_channels=256, encoder_layers=7, code_dim=len(self.phones),
                                encoder_cepstra=0)
        net = Encoder(self.cfg.model.n_mels, c)
        if load:
            net.load_state_dict(torch.load(self.work / "recogniser.pt"))
            net.eval()
        return net

    def train_recogniser(self, steps: int) -> None:
        items, net, aug = self.items([*REFS, *VOICES_EN]), self.recogniser(), self.augment()
        rng = np.random.default_rng(0)
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
        for step in range(steps):
            mel, _, lab, _ = self.batch(items, rng, 32, 128)
            with torch.no_grad():
                mel = aug(mel)
            logits = net(mel)
            loss = F.cross_entropy(logits, lab, label_smoothing=0.1)  # labels are off by a frame at many edges
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 500 == 0 or step == steps - 1:
                print(f"recogniser {step}: loss {loss.item():.3f}, frame accuracy "
                      f"{(logits.argmax(1) == lab).float().mean().item():.3f}", flush=True)
        torch.save(net.state_dict(), self.work / "recogniser.pt")
        self.accuracy()

    @torch.no_grad()
    def accuracy(self) -> None:
        net = self.recogniser(load=True)
        source = json.loads((self.work / "texts.json").read_text())["source"]
        for name, path in ((f"{source} (unseen reader, test sentences)", self.work / "feats_test" / f"{source}.npy"),
                           ("awb (training)", self.work / "feats" / "awb.npy"),
                           ("esm (training)", self.work / "feats" / "esm.npy")):
            d = np.load(path, allow_pickle=True).item()
            hit = n = 0
            for mel, lab in [(m_, lb) for m_, lb in zip(d["mel"], d["lab"]) if m_ is not None][:20]:
                pred = net(torch.from_numpy(mel.astype(np.float32))[None])[0].argmax(0).numpy()
                hit += int((pred == lab).sum())
                n += len(lab)
            print(f"frame accuracy, {name}: {hit / n:.3f}")

    def decoder(self, mode: str) -> Decoder:
        d0 = self.cfg.vqvae.code_dim
        c = dataclasses.replace(self.cfg.vqvae, code_dim=len(self.phones) + (0 if mode in ("posteriors", "oracle")
                                                                              else d0))
        return Decoder(self.cfg.model.n_mels, c)

    def decoder_input(self, mode: str, q: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        if mode in ("posteriors", "oracle"):
            return post
        return torch.cat([q, post * (0.0 if mode == "control" else 1.0)], 1)

    def train_decoder(self, mode: str, steps: int, lr: float) -> None:
        shipped = self.model.vqvae
        dec, d0 = self.decoder(mode), self.cfg.vqvae.code_dim
        dec.load_state_dict({k: v for k, v in shipped.decoder.state_dict().items() if not k.startswith("inp.")},
                            strict=False)
        if mode in ("hybrid", "control"):  # the shipped decoder, with zero weights on the posteriors
            with torch.no_grad():
                for k, v in dec.inp.state_dict().items():
                    old = shipped.decoder.inp.state_dict()[k]
                    if v.dim() == 3:
                        v.zero_()
                        v[:, :d0] = old[:, :d0]
                        v[:, d0 + len(self.phones):] = old[:, d0:]
                    else:
                        v.copy_(old)
        rec, aug = self.recogniser(load=True), self.augment()
        items = self.items([v for v in [*REFS, *VOICES_EN] if v in self.model.speakers and v not in
                            ("itf", "itm", "czf", "czm", "czm2", "fif", "fim", "rum", "caf")])
        table = shipped.speakers.weight.detach()
        opt, rng = torch.optim.Adam(dec.parameters(), lr), np.random.default_rng(1)
        for step in range(steps):
            mel, pitch, lab, spk = self.batch(items, rng, 16, 64)
            with torch.no_grad():
                amel = aug(mel)
                z = shipped.encoder(amel)
                q = shipped.vq.codebook[shipped.vq.nearest(z.transpose(1, 2).reshape(-1, z.shape[1]))]
                q = q.reshape(z.shape[0], z.shape[2], -1).transpose(1, 2)
                post = (F.one_hot(lab, len(self.phones)).transpose(1, 2).float() if mode == "oracle"
                        else F.softmax(rec(amel), 1))
            out = dec(self.decoder_input(mode, q, post), table[spk], pitch)
            loss = F.l1_loss(out, mel) + F.mse_loss(out, mel)  # the VQ-VAE stage's reconstruction loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 500 == 0 or step == steps - 1:
                print(f"decoder ({mode}) {step}: loss {loss.item():.3f}", flush=True)
        torch.save(dec.state_dict(), self.work / f"decoder_{mode}.pt")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, mode: str, testset: str, n_items: int) -> dict:
        """kal -> each target on the first ``n_items`` test sentences: the shipped pipeline (source centring and
        pitch range measured over the test utterances, as rtvc eval does) and the screened decoder, both vocoded
        by the shipped student; MCD and similarity as rtvc eval computes them."""
        model, v, rate = self.model, self.model.vqvae, self.cfg.model.sample_rate
        rec, dec = self.recogniser(load=True), self.decoder(mode)
        dec.load_state_dict(torch.load(self.work / f"decoder_{mode}.pt"))
        dec.eval()
        source, targets, items = load_testset(testset)
        xs = [_read(it.source_wav, rate) for it in items]
        src_pitch = measure_pitch(np.concatenate(xs), self.cfg.model)
        shift = torch.from_numpy(model.content_shift(model.measure_content(np.concatenate(xs))))
        oracle = np.load(self.work / "feats_test" / f"{source}.npy", allow_pickle=True).item()["lab"]
        met, rows = Metrics(), []
        for t in targets:
            spk = v.speakers.weight[model.speaker_id(t)][None]
            ref_emb = np.mean([met.embed(_read(it.refs[t], rate), rate) for it in items[:n_items]], 0)
            for i, (it, x) in enumerate(zip(items[:n_items], xs)):
                _, ref_mc = met.world(_read(it.refs[t], rate), rate)
                mel, frames = model.frontend(torch.from_numpy(np.pad(x, (0, (-len(x)) % 240)))[None])
                sp = SourcePitch(self.cfg.model, *model.pitch_prior(src_pitch))
                pitch = torch.from_numpy(sp(frames[0].float().numpy(), model.pitch.get(t, model.prior), 0.0))[None]
                q = v.vq.codebook[v.vq.nearest(v.encoder(mel)[0].t() + shift)].t()[None]
                if mode == "oracle":
                    lab = torch.from_numpy(oracle[i])
                    post = F.one_hot(lab, len(self.phones)).t()[None].float()[:, :, :mel.shape[2]]
                else:
                    post = F.softmax(rec(mel), 1)
                for name, mh in (("shipped", v.decoder(q, spk, pitch)),
                                 (mode, dec(self.decoder_input(mode, q, post), spk, pitch))):
                    y = model.student(mh, pitch)[0, 0, :len(x)].numpy()
                    rows.append({"system": name, "target": t, "text": it.text,
                                 "mcd_db": met.mcd(met.world(y, rate)[1], ref_mc),
                                 "sim_target": cosine(met.embed(y, rate), ref_emb)})
            print(t, flush=True)
        by = {(r["system"], r["target"], r["text"]): r for r in rows}
        summary = {}
        for key in ("mcd_db", "sim_target"):
            d = np.array([by[(mode, t, x)][key] - by[("shipped", t, x)][key] for (s, t, x) in by if s == mode])
            summary[key] = {"shipped": float(np.mean([r[key] for r in rows if r["system"] == "shipped"])),
                            mode: float(np.mean([r[key] for r in rows if r["system"] == mode])),
                            "paired": float(d.mean()), "stderr": float(d.std() / np.sqrt(len(d)))}
        summary["mcd_by_target"] = {s: {t: float(np.mean([r["mcd_db"] for r in rows if r["system"] == s and
                                                          r["target"] == t])) for t in targets}
                                    for s in ("shipped", mode)}
        result = {"mode": mode, "items": n_items, "summary": summary, "rows": rows}
        (self.work / f"eval_{mode}.json").write_text(json.dumps(result, indent=1))
        for key in ("mcd_db", "sim_target"):
            s = summary[key]
            print(f"{key}: shipped {s['shipped']:.3f}, {mode} {s[mode]:.3f}, paired {s['paired']:+.3f} +- "
                  f"{s['stderr']:.3f}")
        for s in ("shipped", mode):
            print(s, " ".join(f"{t} {m:.2f}" for t, m in summary["mcd_by_target"][s].items()))
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("data", "recogniser", "decoder", "eval"))
    p.add_argument("work")
    p.add_argument("--model", default="rtvc/models/default.pt")
    p.add_argument("--testset", default="data/testset")
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--mode", choices=MODES, default="hybrid")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    s = Screen(a.work, a.model)
    if a.stage == "data":
        s.data(a.sentences, a.testset)
    elif a.stage == "recogniser":
        s.train_recogniser(a.steps or 10000)
    elif a.stage == "decoder":
        s.train_decoder(a.mode, a.steps or 6000, a.lr)
    else:
        s.evaluate(a.mode, a.testset, a.items)


if __name__ == "__main__":
    main()
