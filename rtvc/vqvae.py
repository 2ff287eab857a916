"""Causal VQ-VAE: content encoder -> vector quantizer -> speaker- and pitch-conditioned decoder, per mel frame.

All convs are causal (:class:`CausalConv1d`), so one 10 ms hop in gives one mel frame out with no lookahead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import scipy.fft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import VQVAEConfig
from .frame_phones import FRAME_PHONES
from .streaming import CausalConv1d, StreamingModule, receptive_field


class ResBlock(StreamingModule):
    """x + conv(leaky_relu(x)) (+ a per-stream conditioning bias), causal."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(channels, channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(F.leaky_relu(x, 0.2))
        return x + (h if bias is None else h + bias)


def _dilations(n: int) -> list[int]:
    return [(1, 2, 4)[i % 3] for i in range(n)]


def lifter(n_mels: int, keep: int) -> torch.Tensor:
    """[n_mels, n_mels] projection of a mel frame onto its first ``keep`` DCT-II coefficients (orthonormal DCT:
    D^T diag(1..1, 0..0) D), i.e. the frame smoothed across frequency."""
    d = scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:keep]  # rows: the first `keep` DCT bases
    return torch.from_numpy(d.T @ d).float()


class Encoder(StreamingModule):
    """normalised log-mel [B, n_mels, T] -> content vectors [B, code_dim, T]."""

    def __init__(self, n_mels: int, cfg: VQVAEConfig) -> None:
        super().__init__()
        keep = cfg.encoder_cepstra
        self.register_buffer("lifter", lifter(n_mels, keep) if 0 < keep < n_mels else None, persistent=False)
        c = cfg.encoder_channels
        self.inp = CausalConv1d(n_mels, c, cfg.kernel_size)
        self.blocks = nn.ModuleList(ResBlock(c, cfg.kernel_size, d) for d in _dilations(cfg.encoder_layers - 1))
        self.out = CausalConv1d(c, cfg.code_dim, 1)

    @property
    def receptive_field(self) -> int:
        return receptive_field([self.inp, *(b.conv for b in self.blocks)])

    def envelope(self, mel: torch.Tensor) -> torch.Tensor:
        """What the first conv sees: mel [B, n_mels, T] smoothed across frequency (``vqvae.encoder_cepstra``), or
        as it is. Stateless per frame, so the fused CPU step applies it before its own stack. (matmul, not einsum:
        its [B, n_mels, T] result is C-contiguous for any B, as the numba kernels were compiled for.)"""
        return mel if self.lifter is None else torch.matmul(self.lifter, mel)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.inp(self.envelope(mel))
        for b in self.blocks:
            x = b(x)
        return self.out(F.leaky_relu(x, 0.2))


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with EMA codebook updates and dead-code restarts (stateless per frame).

    Buffers: ``codebook`` [K, D], ``ema_count`` [K], ``ema_sum`` [K, D]. Under DDP the EMA statistics are
    all-reduced and restarts broadcast from rank 0, so every replica keeps the same codebook.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.code_dim
        self.register_buffer("codebook", torch.randn(k, d) * 0.1)
        self.register_buffer("ema_count", torch.ones(k))
        self.register_buffer("ema_sum", self.codebook.clone())

    def _distances(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> squared L2 distance to every code [N, K], less ||z||^2 (constant per row, so dropped)."""
        cb = self.codebook
        return torch.addmm((cb * cb).sum(1)[None, :], z, cb.t(), alpha=-2.0)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> code indices [N]."""
        return self._distances(z).argmin(dim=1)

    def forward(self, z: torch.Tensor, substitute: float = 0.0,
                max_rank: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (quantized [B, D, T] (straight-through), codes [B, T], commitment loss, perplexity).

        ``substitute`` (training only): the share of frames whose quantized output is one of the 2nd..``max_rank``-th
        nearest codes instead of the nearest (uniformly), so the decoder learns to render a neighbourhood of codes,
        not only the exact sequence its own voice produces: an unseen speaker's frame lands on the code a training
        voice would use for the same sound at rank 2-8 on 40% of frames. Model card, session 18: at 0.2 / 0.4 /
        0.6, MCD +0.03 / -0.07 / +0.02 dB on 8 x 5, one run each: no reliable gain, so off by default. The
        returned codes, the commitment loss and the codebook's update keep the nearest code."""
        b, d, t = z.shape
        flat = z.transpose(1, 2).reshape(-1, d)
        codes = self.nearest(flat.detach())
        q = self.codebook[codes]
        # the decoder's input, read before the EMA update below changes the codebook (as q is)
        dec = self.codebook[self._neighbours(flat.detach(), codes, substitute, max_rank)] if (
            self.training and substitute > 0) else q
        onehot = F.one_hot(codes, self.cfg.codebook_size).to(flat.dtype)
        probs = onehot.mean(0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        commit = F.mse_loss(flat, q.detach()) * self.cfg.commitment
        if self.training:
            self._ema_update(flat.detach(), onehot)
            dec = flat + (dec - flat).detach()  # straight-through estimator
        return dec.reshape(b, t, d).transpose(1, 2), codes.reshape(b, t), commit, perplexity

    @torch.no_grad()
    def _neighbours(self, flat: torch.Tensor, codes: torch.Tensor, share: float, max_rank: int) -> torch.Tensor:
        """codes [N] with a random ``share`` of them replaced by a 2nd..``max_rank``-th nearest code of their frame."""
        if share <= 0 or max_rank < 2:
            return codes
        swap = torch.nonzero(torch.rand(codes.shape[0], device=codes.device) < share).squeeze(1)
        if swap.numel() == 0:
            return codes
        dist_ = self._distances(flat[swap])
        near = dist_.topk(min(max_rank, dist_.shape[1]), dim=1, largest=False).indices  # [n, max_rank], nearest first
        pick = torch.randint(1, near.shape[1], (swap.numel(),), device=codes.device)
        out = codes.clone()
        out[swap] = near[torch.arange(swap.numel(), device=codes.device), pick]
        return out

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, onehot: torch.Tensor) -> None:
        count, total = onehot.sum(0), onehot.t() @ flat
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(count)
            dist.all_reduce(total)
            count /= dist.get_world_size()
            total /= dist.get_world_size()
        g = self.cfg.ema_decay
        self.ema_count.mul_(g).add_(count, alpha=1 - g)
        self.ema_sum.mul_(g).add_(total, alpha=1 - g)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.cfg.codebook_size * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        # dead-code restart: codes whose usage share fell below the threshold jump to random current inputs
        usage = self.ema_count / n
        dead = usage < self.cfg.dead_code_threshold / self.cfg.codebook_size
        if dead.any():
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            self.codebook[dead] = picks
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0
            if distributed:
                for buf in (self.codebook, self.ema_sum, self.ema_count):
                    dist.broadcast(buf, 0)


def phone_recogniser(cfg: VQVAEConfig) -> Encoder:
    """Causal frame phone recogniser (``vqvae.phone_channels``): content [B, code_dim, T] -> logits over
    :data:`FRAME_PHONES` [B, P, T], the encoder's conv stack at its own size (no lookahead; 7 layers of kernel 3,
    dilations 1-2-4: 31 frames of context)."""
    return Encoder(cfg.code_dim, dataclasses.replace(cfg, encoder_channels=cfg.phone_channels, encoder_cepstra=0,
                                                     encoder_layers=cfg.phone_layers, code_dim=len(FRAME_PHONES)))


def decoder_inputs(cfg: VQVAEConfig) -> int:
    """Channels the decoder reads besides pitch: the code, and the phone posteriors when there is a recogniser."""
    return cfg.code_dim + (len(FRAME_PHONES) if cfg.phone_channels else 0)


class Decoder(StreamingModule):
    """(codes [B, D, T] (+ phone posteriors [B, P, T] stacked under them, :func:`decoder_inputs`), speaker
    embedding [B, S], pitch [B, 2, T]) -> normalised log-mel [B, n_mels, T]."""

    def __init__(self, n_mels: int, cfg: VQVAEConfig) -> None:
        super().__init__()
        c = cfg.decoder_channels
        self.inp = CausalConv1d(decoder_inputs(cfg) + 2, c, cfg.kernel_size)
        self.blocks = nn.ModuleList(ResBlock(c, cfg.kernel_size, d) for d in _dilations(cfg.decoder_layers))
        self.spk = nn.Linear(cfg.speaker_dim, c * (len(self.blocks) + 1))  # a bias per block, per speaker
        self.out = CausalConv1d(c, n_mels, 1)

    @property
    def receptive_field(self) -> int:
        return receptive_field([self.inp, *(b.conv for b in self.blocks)])

    def forward(self, q: torch.Tensor, spk: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        biases = self.spk(spk)[:, :, None].chunk(len(self.blocks) + 1, dim=1)  # each [B, C, 1]
        x = self.inp(torch.cat([q, pitch], dim=1)) + biases[0]
        for blk, bias in zip(self.blocks, biases[1:]):
            x = blk(x, bias)
        return self.out(F.leaky_relu(x, 0.2))


def speech_frames(mel: torch.Tensor) -> torch.Tensor:
    """mel [n_mels, T] (normalised log-mel) -> bool [T]: frames whose mean over bins is above the recording's 30th
    percentile. A content mean is taken over these, so that how much pause a recording holds does not move it."""
    return speech_level_mask(mel.mean(0))


def speech_level_mask(level: torch.Tensor) -> torch.Tensor:
    """Frame levels [T] (mean normalised log-mel) -> bool [T]: above their 30th percentile (:func:`speech_frames`)."""
    return level > torch.quantile(level, 0.3)


@torch.no_grad()
def content_mean(encoder: Encoder, mels: Iterable[torch.Tensor]) -> torch.Tensor:
    """The encoder's mean output [code_dim] over the speech frames (:func:`speech_frames`) of recordings, each
    a normalised log-mel [n_mels, T]: where in content space a speaker sits (source centring, model card)."""
    total, n = None, 0
    for mel in mels:
        z = encoder(mel[None])[0][:, speech_frames(mel)]
        total = z.sum(1) if total is None else total + z.sum(1)
        n += z.shape[1]
    if not n:
        raise ValueError("no speech frames to measure a content mean on")
    return total / n


class VQVAE(StreamingModule):
    """Any-to-many voice conversion core on normalised log-mel frames."""

    def __init__(self, n_mels: int, n_speakers: int, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.encoder = Encoder(n_mels, cfg)
        self.vq = VectorQuantizer(cfg)
        self.speakers = nn.Embedding(n_speakers, cfg.speaker_dim)
        self.phones = phone_recogniser(cfg) if cfg.phone_channels else None
        self.decoder = Decoder(n_mels, cfg)
        self.temperature = cfg.phone_temperature

    @property
    def receptive_field(self) -> int:
        rec = 0 if self.phones is None else self.phones.receptive_field - 1
        return self.encoder.receptive_field + rec + self.decoder.receptive_field - 1

    def decoder_input(self, z: torch.Tensor, q: torch.Tensor, temperature: float = 1.0,
                      phones: bool = True) -> torch.Tensor:
        """Content z [B, D, T] (centred, as quantized) and its codes q [B, D, T] -> what the decoder reads
        [B, D (+ P), T]: the codes, and below them the phone posteriors softmax(logits / ``temperature``) when the
        model has a recogniser (zeros if not ``phones``: the VQ-VAE stage, before the recogniser is trained)."""
        if self.phones is None:
            return q
        if not phones:
            return torch.cat([q, q.new_zeros(q.shape[0], len(FRAME_PHONES), q.shape[2])], 1)
        return torch.cat([q, F.softmax(self.phones(z) / temperature, dim=1)], 1)

    def render(self, z: torch.Tensor, spk: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        """Conversion from content: z [B, D, T] (centred) -> nearest codes (+ phone posteriors, sharpened by
        ``vqvae.phone_temperature``) -> decoder with speaker embeddings spk [B, S] and pitch [B, 2, T] -> mel
        [B, n_mels, T]. Every runner's torch path (single stream, batched slots, the GPU graph step)."""
        b, d, t = z.shape
        q = self.vq.codebook[self.vq.nearest(z.transpose(1, 2).reshape(-1, d))].reshape(b, t, d).transpose(1, 2)
        return self.decoder(self.decoder_input(z, q, self.temperature), spk, pitch)

    def forward(self, mel: torch.Tensor, speaker: torch.Tensor, pitch: torch.Tensor, substitute: float = 0.0,
                max_rank: int = 8, phones: bool = True, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """mel [B, n_mels, T] (encoder input), speaker [B] (target ids), pitch [B, 2, T] -> dict with ``mel``
        [B, n_mels, T] and the encoder's continuous output ``content`` [B, code_dim, T]. ``substitute``,
        ``max_rank``: training's code substitution (:meth:`VectorQuantizer.forward`). ``phones``: the decoder
        reads the recogniser's posteriors (softmax(logits / ``temperature``): 1 as trained), else zeros in their
        place."""
        z = self.encoder(mel)
        q, codes, commit, ppl = self.vq(z, substitute, max_rank)
        out = self.decoder(self.decoder_input(z, q, temperature, phones), self.speakers(speaker), pitch)
        return {"mel": out, "codes": codes, "commit": commit, "perplexity": ppl, "content": z}
