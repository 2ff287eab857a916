"""``rtvc train vqvae|teacher|student``: training loops with progress bars, validation samples, resumable
checkpoints (full config inside) and DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on GPU).

Stages: the VQ-VAE on mels; the Parallel WaveGAN teacher on ground-truth mels (multi-resolution STFT loss, then
+ adversarial); the causal student distilled from the teacher's waveforms, then fine-tuned on the VQ-VAE's
decoder mels against the real audio, so it matches what it gets at conversion time.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, ModelConfig, TrainConfig, parse_override
from .data.dataset import Corpus, ParallelPairs, SegmentDataset
from .augment import ContentAugment, RoomAugment
from .frontend import PitchStats
from .phones import PhoneHead, PhoneTargets
from .vocoder import Discriminator, MultiResolutionSTFTLoss, Student, Teacher
from .voice import VoiceModel
from .vqvae import VQVAE, content_mean

STAGES = ("vqvae", "teacher", "student")
# [train] keys only the VQ-VAE stage reads (its augmentation, adversary and phone loss): an exported model records
# them from vqvae.pt, not from student.pt (trained at other times, e.g. before the phone loss existed)
VQVAE_TRAIN_KEYS = ("formant_warp", "spectral_eq_db", "reverb_prob", "reverb_rt60", "reverb_drr_db", "noise_prob",
                    "noise_snr_db", "speaker_adversarial", "code_substitution", "code_substitution_rank", "phone_ctc",
                    "phone_voices", "phone_language", "phone_utterances", "phone_warmup", "phone_warmup_ctc",
                    "phone_warmup_restarts")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, device)


def teardown_distributed() -> None:
    """Leave the process group cleanly once a stage is done (a no-op in a single process). The DDP wrappers must
    be gone first (``gc.collect``: they hold the group) and every rank must arrive (``barrier``): a gloo group
    still referenced, or torn down while a peer is still talking to it, is destroyed during interpreter
    finalisation and aborts the process (SIGABRT, "terminate called without an active exception"); measured
    in 1 of ~12 two-process runs before this."""
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient flows back negated and scaled (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class SpeakerAdversary(nn.Module):
    """Training-only speaker classifier on the encoder's content vectors [B, code_dim, T], per frame (a 3-frame
    context: it may look ahead, it never runs in streaming), behind a gradient reversal of ``weight``: the
    classifier learns to name the voice, the encoder learns to make that impossible (speaker information the
    codes would otherwise leak into a conversion). ``speaker_rows``: its output has one row per training voice,
    so a checkpoint's classifier is relearned, not reloaded, when the voice set changes."""

    speaker_rows = True

    def __init__(self, code_dim: int, n_speakers: int, weight: float, hidden: int = 128) -> None:
        super().__init__()
        self.weight = weight
        self.net = nn.Sequential(nn.Conv1d(code_dim, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv1d(hidden, hidden, 1), nn.LeakyReLU(0.2), nn.Conv1d(hidden, n_speakers, 1))

    def forward(self, content: torch.Tensor, speaker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """content [B, D, T], speaker [B] -> (cross-entropy, frame accuracy), both scalars."""
        logits = self.net(_ReverseGradient.apply(content, self.weight))              # [B, n_speakers, T]
        target = speaker[:, None].expand(-1, content.shape[2])
        return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def vqvae_loss(model: nn.Module, batch: dict[str, torch.Tensor], augment: ContentAugment | None = None,
               adversary: nn.Module | None = None, substitute: float = 0.0,
               max_rank: int = 8) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + L2 on normalised mel) + commitment; with ``augment``, the encoder sees an augmented
    copy of the mel it must reconstruct; with ``adversary`` (:class:`SpeakerAdversary`), + its cross-entropy
    (reversed into the encoder); ``substitute``, ``max_rank``: ``train.code_substitution`` (the decoder reads near
    codes on that share of frames). ``model`` may be DDP-wrapped."""
    out = model(batch["mel"] if augment is None else augment(batch["mel"]), batch["speaker"], batch["pitch"],
                substitute, max_rank)
    l1 = F.l1_loss(out["mel"], batch["mel"])
    l2 = F.mse_loss(out["mel"], batch["mel"])
    loss = l1 + l2 + out["commit"]
    logs = {"loss": loss.item(), "l1": l1.item(), "commit": out["commit"].item(), "ppl": out["perplexity"].item()}
    if adversary is not None:
        ce, acc = adversary(out["content"], batch["speaker"])
        loss = loss + ce
        logs.update(spk_ce=ce.item(), spk_acc=acc.item())
    return loss, logs


def _update(opt: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor) -> None:
    """One generator step: backward, clip the gradient norm at 10 (GAN spikes), update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()


def stft_loss(stft: MultiResolutionSTFTLoss, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sc, mag = stft(y_hat.reshape(y_hat.shape[0], -1), y.reshape(y.shape[0], -1))
    return sc + mag


class StageRunner:
    """Shared machinery: models/optimisers, checkpoint resume, DDP, the loop, validation cadence."""

    def __init__(self, stage: str, cfg: Config, cache: str | Path, ckpt_dir: str | Path, d: Dist,
                 finetune: bool = False, init: str | Path | None = None) -> None:
        """A stage's checkpoint always continues in its own mel normalisation (a corpus grown by new voices has
        other statistics; the weights learned the checkpoint's). ``finetune``: continue it even though [model] or
        the voice set changed. ``init``: a voice-model file whose weights start the stage when it has no
        checkpoint yet (implies ``finetune``)."""
        self.stage, self.cfg, self.d = stage, cfg, d
        self.ckpt_dir = Path(ckpt_dir)
        self.path = self.ckpt_dir / f"{stage}.pt"
        self.saved = load_checkpoint(self.path, kind=stage) if self.path.is_file() else None
        if self.saved is None and init is not None:
            self.saved = stage_from_voice_model(init, stage)
        self.finetune = finetune or init is not None
        # a checkpoint's weights learned its corpus's mel normalisation: resuming keeps it (a resumed stage started
        # by --init would otherwise switch, silently, to the cache's own statistics mid-run)
        keep = self.saved["stats"] if self.saved is not None else None
        self.corpus = Corpus(cache, cfg.model, (keep["mel_mean"], keep["mel_std"]) if keep else None)
        self.models: dict[str, nn.Module] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.loaded: set[str] = set()  # the models resume() reloaded from the checkpoint
        self.unsaved: set[str] = set()  # models left out of the checkpoint for now (a phone head still warming up)
        self.extra_stats: dict = {}  # what a stage measures of its trained model for the voice-model file
        self.step = 0

    def add(self, name: str, model: nn.Module, train: bool = True) -> nn.Module:
        model = model.to(self.d.device)
        self.models[name] = model
        if train:
            self.optims[name] = torch.optim.Adam(model.parameters(), lr=self.cfg.train.learning_rate, betas=(0.5, 0.9))
        return model

    def stats(self) -> dict:
        c = self.corpus
        return {"speakers": c.speakers, "mel_mean": c.mel_mean.tolist(), "mel_std": c.mel_std.tolist(),
                "pitch": {k: [v.mean, v.std] for k, v in c.pitch.items()}, "prior": [c.prior.mean, c.prior.std],
                **self.extra_stats}

    def resume(self) -> None:
        """Continue from the stage's checkpoint. Its [model] config must match, unless ``finetune``: then a
        changed [model] section (say, pitch tracker settings: the same networks, other inputs) is accepted as long
        as every weight still has its shape, and training continues on the new inputs."""
        if self.saved is None:
            return
        ck = self.saved
        if Config.from_saved(ck["config"]).model != self.cfg.model and not self.finetune:
            raise CheckpointError(f"{self.path} was trained with another [model] config; use --restart to start "
                                  f"over or --finetune to continue from its weights")
        old, new = ck["stats"]["speakers"], self.corpus.speakers
        if old == new or not any("speakers.weight" in m for m in ck["models"].values()):
            old = new  # the voice set matters only to a model with a speaker table
        elif not self.finetune:
            raise CheckpointError(f"{self.path} was trained on voices {old}, the corpus has {new}; use --finetune to "
                                  f"continue on the new voice set, or --restart")
        for k, m in self.models.items():
            if k not in ck["models"] or (old != new and getattr(m, "speaker_rows", False)):
                continue
            state = _speaker_rows(ck["models"][k], old, new) if old != new else ck["models"][k]
            mine = m.state_dict()
            if getattr(m, "relearned_when_reshaped", False) and any(v.shape != mine[n].shape for n, v in state.items()):
                continue  # e.g. a phone head for another phone set: relearned, not reloaded
            m.load_state_dict(state)
            self.loaded.add(k)
        for k, o in self.optims.items():
            # a model not reloaded starts its optimiser afresh too; Adam's moments have the table's old shape
            if k in self.loaded and k in ck["optims"] and old == new:
                o.load_state_dict(ck["optims"][k])
                for group in o.param_groups:  # the saved state carries its learning rate: today's config wins
                    group["lr"] = self.cfg.train.learning_rate
        self.step = int(ck["step"])

    def save(self) -> None:
        if not self.d.main:
            return
        kept = [k for k in self.models if k not in self.unsaved]
        save_checkpoint(self.path, {"kind": self.stage, "config": self.cfg.to_dict(), "step": self.step,
                                    "stats": self.stats(), "models": {k: self.models[k].state_dict() for k in kept},
                                    "optims": {k: self.optims[k].state_dict() for k in kept if k in self.optims}})

    @property
    def per_rank(self) -> int:
        """Items per batch on this process: ``train.batch_size`` split across the ranks."""
        return max(1, self.cfg.train.batch_size // self.d.world)

    def loader(self, frames: int, steps: int, with_wav: bool) -> DataLoader:
        t = self.cfg.train
        ds = SegmentDataset(self.corpus, "train", frames, self.per_rank * self.d.world * steps, t.seed + self.step,
                            with_wav)
        sampler = DistributedSampler(ds, self.d.world, self.d.rank, shuffle=False) if self.d.world > 1 else None
        return DataLoader(ds, batch_size=self.per_rank, sampler=sampler, num_workers=t.num_workers, drop_last=True,
                          persistent_workers=False)

    def wrap(self, model: nn.Module) -> nn.Module:
        return DDP(model) if self.d.world > 1 else model

    def loop(self, total: int, frames: int, with_wav: bool, step_fn: Callable[[dict], dict[str, float]],
             validate: Callable[[], dict[str, float]], progress: bool = True,
             batches: Callable[[int], Iterable[dict]] | None = None) -> None:
        """``batches(remaining)``: the stage's own batches instead of random segments (:meth:`loader`)."""
        remaining = total - self.step
        if remaining <= 0:
            if self.d.main:
                print(f"{self.stage}: already at step {self.step} >= {total}; nothing to do")
            return
        t = self.cfg.train
        bar = tqdm(total=total, initial=self.step, desc=self.stage, disable=not (progress and self.d.main))
        for batch in (batches(remaining) if batches else self.loader(frames, remaining, with_wav)):
            batch = {k: v.to(self.d.device) for k, v in batch.items()}
            logs = step_fn(batch)
            self.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            if self.d.main and (self.step % t.validate_every == 0 or self.step == total):
                val = validate()
                bar.write(f"{self.stage} step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
            if self.step % t.checkpoint_every == 0 or self.step == total:
                self.save()
        bar.close()
        self.sync()

    def sync(self) -> None:
        """Wait for every rank: rank 0 alone writes files, which the others may read next (the teacher's
        checkpoint when the student stage follows in the same process)."""
        if self.d.world > 1:
            dist.barrier()


def stage_from_voice_model(path: str | Path, stage: str) -> dict:
    """A stage checkpoint (step 0, fresh optimisers) holding a voice-model file's weights and corpus statistics:
    e.g. the bundled default voices continued on a corpus with the user's own voices added. A voice model holds
    no teacher: ``teacher`` gives its statistics alone, so a new teacher learns in that model's mel normalisation
    (the mels its decoder emits, what the offline teacher pipeline vocodes)."""
    if stage not in STAGES:
        raise CheckpointError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    ck = load_checkpoint(path, kind="voice_model")
    stats = {"speakers": ck["speakers"], "mel_mean": ck["frontend"]["mel_mean"].tolist(),
             "mel_std": ck["frontend"]["mel_std"].tolist(), "pitch": ck["pitch"], "prior": ck["prior"],
             "content": ck.get("content", {})}
    return {"kind": stage, "config": ck["config"], "step": 0, "stats": stats,
            "models": {stage: ck[stage]} if stage in ck else {}, "optims": {}}


def _speaker_rows(state: dict, old: list[str], new: list[str], key: str = "speakers.weight") -> dict:
    """A state dict's speaker table [len(old), D] re-indexed to ``new``: every known voice keeps its row, a new
    voice starts at the known voices' mean (then learns its own). Dropping a voice is refused."""
    if key not in state:
        return state
    lost = sorted(set(old) - set(new))
    if lost:
        raise CheckpointError(f"the corpus lacks voices the checkpoint was trained on: {lost}")
    table = state[key]
    rows = [table[old.index(v)] if v in old else table.mean(0) for v in new]
    return {**state, key: torch.stack(rows)}


# ------------------------------------------------------------------------------------------------ stages

def _batch_segments(corpus: Corpus, frames: int, n: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    ds = SegmentDataset(corpus, "val", frames, n, seed, with_wav=True)
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def train_vqvae(cfg: Config, cache: str | Path, ckpt_dir: str | Path, steps: int | None = None,
                progress: bool = True, finetune: bool = False, init: str | Path | None = None,
                parallel: bool = False) -> Path:
    """``parallel``: cross-voice decoder training on a parallel corpus instead (:func:`parallel_step`)."""
    d = setup_distributed()
    torch.manual_seed(cfg.train.seed)
    r = StageRunner("vqvae", cfg, cache, ckpt_dir, d, finetune, init)
    model = r.add("vqvae", VQVAE(cfg.model.n_mels, len(r.corpus.speakers), cfg.vqvae))
    w = cfg.train.speaker_adversarial
    adversary = (r.add("speaker_adversary", SpeakerAdversary(cfg.vqvae.code_dim, len(r.corpus.speakers), w))
                 if w else None)
    phones, head = _phone_head(r, cfg) if cfg.train.phone_ctc and not parallel else (None, None)
    r.resume()
    # a fresh head learns on frozen codes before it steers them
    warm = PhoneWarmup(head, r.optims.get("phone_head"), cfg.train, r.step, d) if (
        head is not None and "phone_head" not in r.loaded) else None
    opt = r.optims["vqvae"]
    # the parallel mode runs the decoder alone (its own DDP wrapper below): nothing else is wrapped
    net = r.wrap(model) if not parallel else None
    adv_net = r.wrap(adversary) if adversary is not None and not parallel else None
    augment = ContentAugment(cfg.model, r.corpus.mel_mean, r.corpus.mel_std, cfg.train.formant_warp,
                             cfg.train.spectral_eq_db, RoomAugment(cfg.model, cfg.train, cfg.train.seed))

    def step(batch: dict) -> dict[str, float]:
        model.train()
        loss, logs = vqvae_loss(net, batch, augment, adv_net, cfg.train.code_substitution,
                                cfg.train.code_substitution_rank)
        frozen = warm is not None and warm.frozen(r.step)
        if head is not None:
            rng = np.random.default_rng((cfg.train.seed, r.step, d.rank))
            ctc, commit = phone_loss(model, head, phones.batch("train", cfg.train.phone_utterances, rng), augment,
                                     frozen=frozen, device=d.device)
            loss = loss + cfg.train.phone_ctc * ctc + commit
            logs["phone_ctc"] = ctc.item()
        aux = [r.optims[k] for k in ("speaker_adversary", "phone_head") if k in r.optims]
        for o in aux:
            o.zero_grad(set_to_none=True)
        _update(opt, model, loss)
        if head is not None and d.world > 1:  # the head is not DDP-wrapped (it reads a second forward): average it
            for p in head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= d.world
        for o in aux:
            o.step()
        if frozen:
            warm.record(r.step, logs["phone_ctc"])
            # a head still warming up (or given up on) is not saved: a resume then starts a fresh warm-up rather than
            # let a head that may not read the codes steer them at once
            r.unsaved = {"phone_head"} if warm.frozen(r.step + 1) else set()
        return logs

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            b = _batch_segments(r.corpus, cfg.train.segment_hops, 8, d.device, 0)
            _, logs = vqvae_loss(model, b, None, adversary)
            if head is not None:
                vb = phones.batch("val" if phones.items["val"] else "train", 8, np.random.default_rng(0))
                logs["phone_ctc"] = phone_loss(model, head, vb, None, frozen=True, device=d.device)[0].item()
            used = int((model.vq.ema_count / model.vq.ema_count.sum() > 1e-3).sum())
            _save_sample(r, b, model)
        return {**{f"val_{k}": v for k, v in logs.items()}, "codes_used": used}

    batches = None
    if parallel:
        pairs = parallel_pairs(model, r.corpus, cfg.train.parallel_self_fraction, d.device)
        batches = lambda n: pairs.batches(r.per_rank, cfg.train.segment_hops, n, cfg.train.seed + r.step + 1000 * d.rank)
        dec = r.wrap(model.decoder)
        step = lambda batch: parallel_step(model, dec, opt, batch)
    r.loop(steps or cfg.train.vqvae_steps, cfg.train.segment_hops, False, step, validate, progress, batches)
    if d.main:  # the voices' mean content, which source centring moves a measured source to (vqvae.source_centring)
        r.extra_stats["content"] = voice_content_means(model, r.corpus)
        r.save()
    r.sync()
    return r.path


def voice_content_means(model: VQVAE, corpus: Corpus, per_voice: int = 50) -> dict[str, list[float]]:
    """Each voice's mean content [code_dim] (:func:`rtvc.vqvae.content_mean`) over up to ``per_voice`` of its
    training utterances, clean (no augmentation): speaker -> list."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for k, name in enumerate(corpus.speakers):
        utts = [u for u in corpus.utts if u["spk"] == k and u["split"] == "train"][:per_voice]
        if utts:
            mels = (torch.from_numpy(u["mel"]).to(device) for u in utts)
            out[name] = content_mean(model.encoder, mels).cpu().tolist()
    model.train(was)
    return out


class PhoneWarmup:
    """A fresh phone head's warm-up on frozen codes (``train.phone_warmup`` steps), and its guard.

    Why the guard: a fresh CTC head can sit on its plateau. In session 17 (seed 1234 on 23 voices) its loss stayed
    at ~6 per phone where a head that reads the codes is at ~2.5 by step 600, and once the warm-up ended, that head
    steered the codes with noise (MCD +0.2-0.3 dB). So at the warm-up's end the head's mean loss over its last 100
    steps must be under ``train.phone_warmup_ctc``. Otherwise the head restarts (fresh weights, fresh optimiser
    state) for another warm-up, at most ``train.phone_warmup_restarts`` times; after that its codes stay frozen to
    it (the stage trains on without the phone loss) and a message says so. A head still warming up (or given up
    on) is left out of the checkpoint, so a resume warms up a fresh one. Under DDP the decision uses the mean over
    ranks and a restarted head is broadcast from rank 0, so every replica keeps the same head."""

    def __init__(self, head: PhoneHead, opt: torch.optim.Optimizer, t: TrainConfig, step: int, d: Dist) -> None:
        self.head, self.opt, self.t, self.d = head, opt, t, d
        self.until, self.restarts, self.off = step + t.phone_warmup, 0, False
        self.losses: list[float] = []

    def frozen(self, step: int) -> bool:
        """Whether the codes are detached from the head at ``step`` (the warm-up, or a head given up on)."""
        return self.off or step < self.until

    def record(self, step: int, ctc: float) -> None:
        """The head's loss at ``step`` (0-based); at the warm-up's last step, check it."""
        if self.off or step >= self.until:
            return
        self.losses.append(ctc)
        if step + 1 < self.until:
            return
        tail = torch.tensor(float(np.mean(self.losses[-100:])))
        if self.d.world > 1:
            dist.all_reduce(tail)
            tail /= self.d.world
        self.losses = []
        if tail.item() <= self.t.phone_warmup_ctc:
            return
        if self.restarts >= self.t.phone_warmup_restarts:
            self.off = True
            if self.d.main:
                print(f"train.phone_ctc: the phone head did not learn to read the codes (CTC {tail.item():.2f} per "
                      f"phone after {self.restarts + 1} warm-ups of {self.t.phone_warmup} steps, above "
                      f"train.phone_warmup_ctc = {self.t.phone_warmup_ctc}); the stage goes on WITHOUT the phone "
                      f"loss. Another seed (--set train.seed=N, now {self.t.seed}) or a longer "
                      "train.phone_warmup may learn.", flush=True)
            return
        self.restarts += 1
        for m in self.head.modules():
            if m is not self.head and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.opt.state.clear()
        if self.d.world > 1:
            for p in self.head.parameters():
                dist.broadcast(p.data, 0)
        self.until = step + 1 + self.t.phone_warmup
        if self.d.main:
            print(f"train.phone_ctc: phone head stalled (CTC {tail.item():.2f} per phone after its warm-up, above "
                  f"{self.t.phone_warmup_ctc}); restarted it for another {self.t.phone_warmup}-step warm-up "
                  f"({self.restarts} of {self.t.phone_warmup_restarts})", flush=True)


def _phone_head(r: StageRunner, cfg: Config) -> tuple[PhoneTargets | None, PhoneHead | None]:
    """The phone targets and CTC head of ``train.phone_ctc`` (:mod:`rtvc.phones`), or (None, None) when no
    training utterance of ``train.phone_voices`` has text (a corpus without transcripts trains without it)."""
    t = cfg.train
    phones = PhoneTargets(r.corpus, t.phone_voices, t.phone_language)
    if not phones:
        if r.d.main:
            print("train.phone_ctc: no training utterance has text; the phone loss is off for this corpus")
        return None, None
    return phones, r.add("phone_head", PhoneHead(cfg.vqvae.code_dim, len(phones.vocab)))


def phone_loss(model: VQVAE, head: PhoneHead, batch: dict[str, torch.Tensor], augment: ContentAugment | None,
               frozen: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(CTC loss, the codes' commitment loss) of ``head`` on the codes of whole utterances (``batch`` from
    :meth:`PhoneTargets.batch`), their mel augmented as the reconstruction's is. ``frozen``: the codes are
    detached (only the head learns). Runs the unwrapped encoder: under DDP its gradient joins the wrapped forward's
    in the same backward (the autograd engine sums a parameter's contributions before DDP's hook reduces them)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    mel = batch["mel"] if augment is None else augment(batch["mel"])
    q, _, commit, _ = model.vq(model.encoder(mel))
    return head(q.detach() if frozen else q, batch), (0.0 if frozen else commit)


@torch.no_grad()
def parallel_pairs(model: VQVAE, corpus: Corpus, self_fraction: float, device: torch.device,
                    sources: set[int] | None = None, targets: set[int] | None = None) -> ParallelPairs:
    """The encoder's unit-norm content and code indices of every training utterance (~40 s for 14k on 2 CPU
    threads), and with a phone recogniser its posteriors at the conversion temperature (what the decoder reads
    when it converts; float16, ~80 B per frame), for :class:`ParallelPairs`."""
    model.eval()
    content, codes, phones = {}, {}, {} if model.phones is not None else None
    for i in corpus.indices("train"):
        z = model.encoder(torch.from_numpy(corpus.utts[i]["mel"])[None].to(device))   # [1, D, T]
        codes[i] = model.vq.nearest(z[0].t()).cpu().numpy()
        content[i] = F.normalize(z[0], dim=0).cpu().numpy()
        if phones is not None:
            phones[i] = F.softmax(model.phones(z)[0] / model.temperature, dim=0).cpu().numpy().astype(np.float16)
    return ParallelPairs(corpus, content, codes, self_fraction, sources, targets, phones)


def pair_decoder_input(model: VQVAE, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A :class:`ParallelPairs` batch's decoder input [B, D (+ P), F]: its codes' codebook vectors, and below them
    its posteriors when the pairs carry them (a model with a recogniser)."""
    q = model.vq.codebook.detach()[batch["codes"]].transpose(1, 2)                      # [B, D, F]
    return q if "phones" not in batch else torch.cat([q, batch["phones"].float()], 1)


def parallel_step(model: VQVAE, dec: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> dict[str, float]:
    """Cross-voice decoder step: voice B's mel rebuilt from another voice's codes (and phone posteriors, with a
    recogniser) of the same text (warped onto B's timeline; :class:`ParallelPairs`), L1 + L2. The encoder, codebook
    and speaker table stay as they are: the codes a source makes, and what each voice's embedding means, do not
    move under a trained student."""
    model.eval()
    model.decoder.train()
    out = dec(pair_decoder_input(model, batch), model.speakers(batch["speaker"]).detach(), batch["pitch"])
    l1, l2 = F.l1_loss(out, batch["mel"]), F.mse_loss(out, batch["mel"])
    _update(opt, model, l1 + l2)
    return {"loss": (l1 + l2).item(), "l1": l1.item()}


def _adversarial(r: StageRunner, gen_loss: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor,
                 disc: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
    """LSGAN: adds the generator's adversarial term once ``adversarial_start`` is reached; steps D."""
    t = r.cfg.train
    if r.step < t.adversarial_start:
        return gen_loss, {}
    opt_d = r.optims["disc"]
    d_loss = F.mse_loss(disc(y), torch.ones_like(y)) + F.mse_loss(disc(y_hat.detach()), torch.zeros_like(y))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    adv = F.mse_loss(disc(y_hat), torch.ones_like(y_hat))  # after the D step: its graph sees the new weights
    return gen_loss + t.adversarial_weight * adv, {"adv": adv.item(), "d": d_loss.item()}


def train_teacher(cfg: Config, cache: str | Path, ckpt_dir: str | Path, steps: int | None = None,
                  progress: bool = True, finetune: bool = False, init: str | Path | None = None) -> Path:
    d = setup_distributed()
    torch.manual_seed(cfg.train.seed)
    r = StageRunner("teacher", cfg, cache, ckpt_dir, d, finetune, init)
    teacher = r.add("teacher", Teacher.build(cfg))
    _synth_stats(teacher, r.corpus)
    disc = r.wrap(r.add("disc", Discriminator()))
    r.resume()
    net, opt = r.wrap(teacher), r.optims["teacher"]
    stft = MultiResolutionSTFTLoss(cfg.train).to(d.device)

    def step(batch: dict) -> dict[str, float]:
        teacher.train()
        y = batch["wav"][:, None]
        y_hat = net(batch["mel"], batch["pitch"])
        loss = stft_loss(stft, y_hat, y)
        logs = {"stft": loss.item()}
        loss, adv_logs = _adversarial(r, loss, y_hat, y, disc)
        _update(opt, teacher, loss)
        return {**logs, **adv_logs}

    def validate() -> dict[str, float]:
        teacher.eval()
        with torch.no_grad():
            b = _batch_segments(r.corpus, cfg.train.vocoder_segment_hops, 4, d.device, 0)
            y_hat = teacher(b["mel"], b["pitch"])
            _save_audio(r, b["wav"][0], y_hat[0, 0], b["mel"][0])
            return {"val_stft": stft_loss(stft, y_hat, b["wav"][:, None]).item()}

    r.loop(steps or cfg.train.teacher_steps, cfg.train.vocoder_segment_hops, True, step, validate, progress)
    return r.path


def _synth_stats(vocoder: Student | Teacher, corpus: Corpus) -> None:
    """The envelope synthesis reads absolute power from the normalised mels: the corpus statistics (saved with the
    vocoder)."""
    vocoder.synth.mel_mean.copy_(torch.from_numpy(corpus.mel_mean))
    vocoder.synth.mel_std.copy_(torch.from_numpy(corpus.mel_std))


def _load_stage(stage: str, ckpt_dir: Path, build: Callable[[Config], nn.Module], device,
                speakers: list[str] | None = None) -> nn.Module:
    """``<ckpt_dir>/<stage>.pt``'s model for another stage to use (frozen, eval mode). ``speakers``: the corpus's
    voices, to which its speaker table is re-indexed (:func:`_speaker_rows`)."""
    path = ckpt_dir / f"{stage}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run `rtvc train {stage}` first (or `rtvc train {stage} --init "
                              f"MODEL` to continue a voice-model file)")
    ck = load_checkpoint(path, kind=stage)
    m = build(Config.from_saved(ck["config"]))
    state = ck["models"][stage]
    m.load_state_dict(_speaker_rows(state, ck["stats"]["speakers"], speakers) if speakers is not None else state)
    return m.to(device).eval()


def train_student(cfg: Config, cache: str | Path, ckpt_dir: str | Path, steps: int | None = None,
                  progress: bool = True, finetune: bool = False, init: str | Path | None = None) -> Path:
    d = setup_distributed()
    torch.manual_seed(cfg.train.seed)
    ckpt_dir = Path(ckpt_dir)
    r = StageRunner("student", cfg, cache, ckpt_dir, d, finetune, init)
    n_spk = len(r.corpus.speakers)
    distill = cfg.train.student_target == "teacher"
    # Without distillation the teacher is optional: when one exists its distance is still logged at validation.
    teacher = (_load_stage("teacher", ckpt_dir, Teacher.build, d.device)
               if distill or (ckpt_dir / "teacher.pt").is_file() else None)
    if init is not None and not (ckpt_dir / "vqvae.pt").is_file():
        # fine-tuning a voice model's student on its own decoder's mels: that VQ-VAE becomes the stage's (and the
        # exported file's) vqvae.pt
        if d.main:
            save_checkpoint(ckpt_dir / "vqvae.pt", stage_from_voice_model(init, "vqvae"))
        r.sync()
    vqvae = _load_stage("vqvae", ckpt_dir, lambda c: VQVAE(c.model.n_mels, n_spk, c.vqvae), d.device,
                        r.corpus.speakers)
    if teacher is not None and not teacher.synth.normalised_by(r.corpus.mel_mean, r.corpus.mel_std):
        raise CheckpointError(f"{ckpt_dir / 'teacher.pt'} was trained in another mel normalisation than this "
                              f"student's: train the teacher on the same corpus, or with --init of the same model")
    student = r.add("student", Student(cfg.model, cfg.student))
    _synth_stats(student, r.corpus)
    disc = r.wrap(r.add("disc", Discriminator()))
    r.resume()
    net, opt = r.wrap(student), r.optims["student"]
    stft = MultiResolutionSTFTLoss(cfg.train).to(d.device)
    total = steps or cfg.train.student_steps
    finetune_from = total - min(cfg.train.student_finetune_steps, total // 2)

    def step(batch: dict) -> dict[str, float]:
        student.train()
        with torch.no_grad():
            if r.step < finetune_from:  # imitate the teacher (distillation) or the audio on ground-truth mels
                mel = batch["mel"]
                target = teacher(mel, batch["pitch"]) if distill else batch["wav"][:, None]
            else:  # fine-tuning: the VQ-VAE's decoder mels, against the real audio
                # at the posteriors' conversion temperature: the mels the student will be given
                mel = vqvae(batch["mel"], batch["speaker"], batch["pitch"], temperature=vqvae.temperature)["mel"]
                target = batch["wav"][:, None]
        y_hat = net(mel, batch["pitch"])
        loss = stft_loss(stft, y_hat, target)
        logs = {"stft": loss.item(), "phase": float(r.step >= finetune_from)}
        loss, adv_logs = _adversarial(r, loss, y_hat, batch["wav"][:, None], disc)
        _update(opt, student, loss)
        return {**logs, **adv_logs}

    def validate() -> dict[str, float]:
        student.eval()
        with torch.no_grad():
            b = _batch_segments(r.corpus, cfg.train.vocoder_segment_hops, 4, d.device, 0)
            y_hat = student(b["mel"], b["pitch"])
            _save_audio(r, b["wav"][0], y_hat[0, 0], b["mel"][0])
            logs = {"val_stft_vs_audio": stft_loss(stft, y_hat, b["wav"][:, None]).item()}
            if teacher is not None:
                logs["val_stft_vs_teacher"] = stft_loss(stft, y_hat, teacher(b["mel"], b["pitch"])).item()
            return logs

    r.loop(total, cfg.train.vocoder_segment_hops, True, step, validate, progress)
    if d.main:
        export_voice_model(ckpt_dir, ckpt_dir / "model.pt")
    r.sync()
    return r.path


TRAINERS = {"vqvae": train_vqvae, "teacher": train_teacher, "student": train_student}


# ------------------------------------------------------------------------------------------------ export

def export_voice_model(ckpt_dir: str | Path, out: str | Path, settings: Iterable[str] = ()) -> Path:
    """Bundle vqvae.pt + student.pt (+ corpus statistics) into one small inference file for `paths.model`.
    ``settings``: ``section.key=value`` the file records instead of its checkpoints' values (e.g.
    ``student.voice_bar_hz=300`` for a student trained before that key existed); one that reshapes a network fails
    when the weights are loaded."""
    ckpt_dir = Path(ckpt_dir)
    vq = load_checkpoint(ckpt_dir / "vqvae.pt", kind="vqvae")
    st = load_checkpoint(ckpt_dir / "student.pt", kind="student")
    cfg, vq_cfg = Config.from_saved(st["config"]), Config.from_saved(vq["config"])
    # [model] from the VQ-VAE: its decoder was trained on that frontend's mels and that tracker's pitch. The
    # student may have been trained under other tracker settings (a fine-tuned VQ-VAE), but never on other audio
    # framing or mel bands: those shape both networks' inputs
    framing = ("sample_rate", "hop_length", "n_fft", "win_length", "n_mels", "fmin", "fmax")
    if any(getattr(cfg.model, k) != getattr(vq_cfg.model, k) for k in framing):
        raise CheckpointError(f"{ckpt_dir}: student.pt and vqvae.pt were trained with different [model] framing "
                              f"({', '.join(framing)})")
    cfg = cfg.replace(**{f"{sec}.{k}": v for sec in ("model", "vqvae") for k, v in vq_cfg.to_dict()[sec].items()})
    # ... and the VQ-VAE's own training recipe, so the file records how its encoder and decoder were trained
    cfg = cfg.replace(**{f"train.{k}": getattr(vq_cfg.train, k) for k in VQVAE_TRAIN_KEYS})
    cfg = cfg.replace(**dict(parse_override(text) for text in settings))
    s = vq["stats"]
    model = VoiceModel(cfg, s["speakers"], {k: PitchStats(*v) for k, v in s["pitch"].items()}, PitchStats(*s["prior"]),
                       s.get("content"))
    model.vqvae.load_state_dict(vq["models"]["vqvae"])
    model.student.load_state_dict(st["models"]["student"])
    model.frontend.mel_mean.copy_(torch.tensor(s["mel_mean"]))
    model.frontend.mel_std.copy_(torch.tensor(s["mel_std"]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model.state_for_file())
    return out


def export_teacher(ckpt_dir: str | Path, out: str | Path) -> Path:
    """teacher.pt without its optimiser and discriminator: the weights, config and corpus statistics that
    ``rtvc eval --teacher`` and distillation (as ``<checkpoint_dir>/teacher.pt``) read."""
    ck = load_checkpoint(Path(ckpt_dir) / "teacher.pt", kind="teacher")
    save_checkpoint(out, {**ck, "models": {"teacher": ck["models"]["teacher"]}, "optims": {}})
    return Path(out)


# ------------------------------------------------------------------------------------------------ samples

def _save_audio(r: StageRunner, ref: torch.Tensor, gen: torch.Tensor, mel: torch.Tensor) -> None:
    import soundfile as sf
    out = r.ckpt_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{r.stage}_{r.step:07d}"
    sf.write(f"{stem}.wav", gen.detach().cpu().numpy().clip(-1, 1), r.cfg.model.sample_rate)
    _spectrogram_png(f"{stem}.png", {"input mel": mel.cpu().numpy(), "reference": _logspec(ref), "generated": _logspec(gen)})


def _save_sample(r: StageRunner, b: dict, model: VQVAE) -> None:
    """VQ-VAE validation: reconstruct one segment and convert it to another speaker; vocode with the teacher or
    student checkpoint when one exists (Griffin-Lim otherwise)."""
    n_spk = len(r.corpus.speakers)
    other = (b["speaker"][:1] + 1) % n_spk
    rec = model(b["mel"][:1], b["speaker"][:1], b["pitch"][:1])["mel"]
    conv = model(b["mel"][:1], other, b["pitch"][:1])["mel"]
    out = r.ckpt_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"vqvae_{r.step:07d}"
    _spectrogram_png(f"{stem}.png", {"source": b["mel"][0].cpu().numpy(), "reconstructed": rec[0].cpu().numpy(),
                                     f"as {r.corpus.speakers[int(other)]}": conv[0].cpu().numpy()})
    import soundfile as sf
    sf.write(f"{stem}_converted.wav", _vocode(r, conv[0], b["pitch"][0]), r.cfg.model.sample_rate)


def _vocode(r: StageRunner, mel: torch.Tensor, pitch: torch.Tensor) -> np.ndarray:
    """mel [n_mels, N], pitch [2, N] -> wav: the student when trained, else the teacher, else Griffin-Lim."""
    for stage, build in (("student", lambda c: Student(c.model, c.student)),
                         ("teacher", Teacher.build)):
        if (r.ckpt_dir / f"{stage}.pt").is_file():
            try:
                voc = _load_stage(stage, r.ckpt_dir, build, mel.device)
                with torch.no_grad():
                    y = voc(mel[None], pitch[None])
                    return y[0, 0].cpu().numpy().clip(-1, 1)
            except (CheckpointError, ConfigError, RuntimeError):  # e.g. written by another rtvc version mid-run:
                pass  # a validation sample must never stop training
    import librosa
    m = r.cfg.model
    logmel = mel.cpu().numpy() * r.corpus.mel_std[:, None] + r.corpus.mel_mean[:, None]
    return librosa.feature.inverse.mel_to_audio(np.exp(logmel), sr=m.sample_rate, n_fft=m.n_fft, hop_length=m.hop_length,
                                                win_length=m.win_length, power=2.0, fmin=m.fmin, fmax=m.fmax, n_iter=16)


def _logspec(wav: torch.Tensor) -> np.ndarray:
    w = wav.detach().float().cpu().reshape(-1)
    s = torch.stft(w, 1024, 240, 960, torch.hann_window(960), return_complex=True).abs()
    return torch.log(s.clamp(min=1e-5)).numpy()


def _spectrogram_png(path: str, panels: dict[str, np.ndarray]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), squeeze=False)
    for ax, (title, img) in zip(axes[:, 0], panels.items()):
        ax.imshow(img, origin="lower", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
