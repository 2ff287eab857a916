"""GraphStep: the whole streaming step (frontend -> pitch -> encoder -> VQ -> decoder -> student) for a fixed
batch of session slots, as fixed-shape tensor work with no host synchronisation, so it can be captured once as a
CUDA graph and replayed every hop.

Static buffers: ``inp`` [S, hop] (the hop of each slot), ``active`` [S] (1 where a slot has a hop this step),
``speaker`` [S], ``transpose`` [S]; ``out`` [S, hop]. Every layer's streaming state is updated in place; slots
that are inactive this step get their previous state back (``torch.where`` on each state tensor), so sessions
that idle, join (``reset_slot``) or leave never disturb the others and nothing is re-captured.
Pitch runs on the device too: YIN's difference function, cumulative-mean normalisation and dip search in float64
(the CPU numba tracker's arithmetic, vectorised), and the per-slot running pitch statistics as state tensors.
On CPU the same code runs eagerly (tests compare it with the per-stream converter).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig
from .frontend import LF0_MEAN, LF0_STD, ONSET_RANGE_AFTER, RANGE_FRAMES, TRACK, PitchMapper, PitchStats, new_track
from .batch import VoiceSlots
from .centring import ContentLearner
from .voice import VoiceModel


def _shorter(cmnd: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, tau_min: int, tau_max: int, loose: float,
             margin: float) -> torch.Tensor:
    """:func:`rtvc.frontend._shorter` per row: cmnd [N, tau_max+1], candidate periods g [N] -> [N]."""
    for _ in range(2):
        c = torch.floor(g.double() / 2 + 0.5).long()
        lo, hi = (c - 2).clamp(min=tau_min), (c + 2).clamp(max=tau_max - 1)
        near = (idx[None] >= lo[:, None]) & (idx[None] <= hi[:, None])
        h = torch.argmin(torch.where(near, cmnd, math.inf), dim=1)  # first of equal minima, as the numba loop
        dh, dg = cmnd.gather(1, h[:, None])[:, 0], cmnd.gather(1, g[:, None])[:, 0]
        g = torch.where(near.any(1) & (h < g) & (dh < loose) & (dh < dg + margin), h, g)
    return g


def yin_torch(frames: torch.Tensor, cfg: ModelConfig, track: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [N, win] -> (f0 Hz [N] float64, voiced [N] bool): one frame of each of N streams, each with its
    tracker state in ``track`` [N, TRACK] float64 (:func:`rtvc.frontend.new_track`), updated in place; the same
    decisions as :func:`rtvc.frontend.yin` (numba), vectorised over streams."""
    sr = cfg.sample_rate
    dec = max(1, sr // 12000)
    x = frames.double()
    m = x.shape[1] // dec
    x = x[:, : m * dec].reshape(x.shape[0], m, dec).mean(2)
    rate = sr / dec
    tau_min, tau_max = max(2, int(rate / cfg.f0_max)), min(m // 2, int(math.ceil(rate / cfg.f0_min)))
    wi = m - tau_max
    win = x.unfold(1, wi, 1)[:, : tau_max + 1]               # [N, tau_max+1, wi]: x[j + tau], j < wi
    diff = win[:, :1] - win                                   # x_j - x_{j+tau}
    d = (diff * diff).sum(-1)                                 # [N, tau_max+1]
    run = torch.cumsum(d[:, 1:], dim=1)
    taus = torch.arange(1, tau_max + 1, device=x.device, dtype=x.dtype)
    cmnd = torch.where(run > 0, d[:, 1:] * taus / torch.where(run > 0, run, 1.0), torch.ones_like(run))
    cmnd = torch.cat([torch.ones_like(cmnd[:, :1]), cmnd], dim=1)  # index = tau
    idx = torch.arange(tau_max + 1, device=x.device)
    search = (idx >= tau_min) & (idx < tau_max)
    # onset: YIN's rule, the first dip below the strict threshold, descended to its local minimum
    below = (cmnd < cfg.yin_threshold) & search
    found = below.any(1)
    first = torch.argmax(below.int(), dim=1)
    nxt = torch.cat([cmnd[:, 1:], torch.full_like(cmnd[:, :1], math.inf)], dim=1)
    stop = ((nxt >= cmnd) | (idx + 1 >= tau_max)) & (idx >= first[:, None])
    onset = torch.argmax(stop.int(), dim=1)
    # continuation: the local minimum below the loose threshold minimising depth + |ln(tau / tracked period)|
    prev, gap = track[:, 0], track[:, 1] + 1.0
    cont = (prev > 0) & (gap <= cfg.yin_hold_frames)
    prv = torch.cat([torch.full_like(cmnd[:, :1], -math.inf), cmnd[:, :-1]], dim=1)
    dip = search & (cmnd < cfg.yin_voicing_threshold) & (cmnd <= prv) & (cmnd < nxt)
    jump = torch.abs(torch.log(idx.clamp(min=1).double()[None] / torch.where(prev > 0, prev, 1.0)[:, None]))
    cost = torch.where(dip & (jump <= cfg.yin_max_jump), cmnd + jump, torch.full_like(cmnd, math.inf))
    best_c = torch.argmin(cost, dim=1)
    ok_c = torch.isfinite(cost.gather(1, best_c[:, None])[:, 0])
    # rough onsets: the global minimum below the loose threshold, once its period held for confirm frames
    g = torch.argmin(torch.where(search, cmnd, math.inf), dim=1)
    octave = cfg.yin_octave_margin
    if octave > 0:  # an onset's candidates at the shortest period whose dip is nearly as deep
        g = _shorter(cmnd, g, idx, tau_min, tau_max, cfg.yin_voicing_threshold, octave)
        onset = _shorter(cmnd, onset, idx, tau_min, tau_max, cfg.yin_voicing_threshold, octave)
    cand_ok = cmnd.gather(1, g[:, None])[:, 0] < cfg.yin_voicing_threshold
    gd = g.double()
    energy = (x * x).mean(1)
    cand_ok = cand_ok & (energy >= 1e-7)  # silence clears the candidate
    last = track[:, 2]
    same = (last > 0) & (torch.abs(torch.log(gd / torch.where(last > 0, last, 1.0))) <= cfg.yin_max_jump)
    count = torch.where(cand_ok, torch.where(same, track[:, 3] + 1.0, torch.ones_like(gd)), torch.zeros_like(gd))
    cand = torch.where(cand_ok, gd, torch.zeros_like(gd))
    confirmed = count >= cfg.yin_confirm_frames
    if cfg.yin_onset_range > 0:  # in the speaker's range: at the first frame
        near = torch.abs(torch.log(rate / gd) - track[:, 4]) <= cfg.yin_onset_range
        confirmed = confirmed | ((count >= 1) & (track[:, 5] >= ONSET_RANGE_AFTER) & near)
    periodic = torch.where(cont, ok_c, found | confirmed)
    best = torch.where(cont, best_c, torch.where(found, onset, g)).clamp(min=1, max=tau_max - 1)
    a, b, c = (cmnd.gather(1, (best + o)[:, None])[:, 0] for o in (-1, 0, 1))
    den = a - 2 * b + c
    shift = torch.where(den > 0, 0.5 * (a - c) / torch.where(den > 0, den, 1.0), torch.zeros_like(den))
    voiced = periodic & (energy >= 1e-7)
    period = best + shift
    seen = track[:, 5] + voiced.double()
    lf = torch.log(rate / period)
    mean = torch.where(voiced, track[:, 4] + (lf - track[:, 4]) / seen.clamp(min=1.0, max=RANGE_FRAMES), track[:, 4])
    track.copy_(torch.stack([torch.where(voiced, period, prev), torch.where(voiced, torch.zeros_like(gap), gap),
                             cand, count, mean, seen], 1))
    # release: the last tracked period sounds on for yin_release_frames unvoiced frames (state untouched)
    held = ~voiced & (prev > 0) & (gap <= cfg.yin_release_frames) & (energy >= 1e-7)
    f0 = torch.where(voiced, rate / period, torch.where(held, rate / torch.where(prev > 0, prev, 1.0), 0.0))
    return f0, voiced | held


class GraphStep:
    """Fixed-batch streaming step over ``slots`` sessions of one voice model (see module docstring)."""

    def __init__(self, model: VoiceModel, slots: int, device: str | torch.device, use_graph: bool | None = None,
                 tau_frames: float = 300.0) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        cfg = model.cfg.model
        self.cfg, self.slots, self.hop = cfg, slots, cfg.hop_length
        self.model.start_streaming(slots)
        dev, f64 = self.device, torch.float64
        self.inp = torch.zeros(slots, self.hop, device=dev)
        self.out = torch.zeros(slots, self.hop, device=dev)
        self.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.speaker = torch.zeros(slots, dtype=torch.long, device=dev)
        self.transpose = torch.zeros(slots, dtype=f64, device=dev)
        d = model.cfg.vqvae.code_dim
        self.shift = torch.zeros(slots, d, device=dev)  # source centring per slot (0: none), added before the VQ
        self.seen = torch.zeros(slots, d + 2, device=dev)  # per step: encoder output, frame level, voiced (learners)
        spk = model.speakers
        self.target_mean = torch.tensor([model.pitch.get(s, model.prior).mean for s in spk], dtype=f64, device=dev)
        self.target_std = torch.tensor([model.pitch.get(s, model.prior).std for s in spk], dtype=f64, device=dev)
        # per-slot pitch state: running source statistics and the held log-F0 feature
        src = model.source_prior
        self.p_mean = torch.full((slots,), src.mean, dtype=f64, device=dev)
        self.p_var = torch.full((slots,), src.std ** 2, dtype=f64, device=dev)
        self.p_weights = torch.tensor([PitchMapper.UNKNOWN] * slots, dtype=f64, device=dev)  # [S, 2] PitchMapper
        self.p_seen = torch.zeros(slots, dtype=f64, device=dev)
        self.held = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.track = torch.zeros(slots, TRACK, dtype=f64, device=dev)  # YIN tracker state (see yin_torch)
        self.alpha = 1.0 / tau_frames
        self.states = [t for m in self.model._streaming_children() if m._state is not None
                       for t in vars(m._state).values() if isinstance(t, torch.Tensor)] + \
            [self.p_mean, self.p_var, self.p_seen, self.held, self.track]
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def reset_slot(self, slot: int, source: PitchStats | None = None) -> None:
        """A new session in ``slot``: zero its layer states and restart its pitch statistics (from the speaker's
        measured ones, ``source``, if known)."""
        # scalar fills only (device kernels, no host->device copy that would wait for the queued GPU work)
        self.model.reset_streaming(slot)
        prior, known = self.model.pitch_prior(source)
        self.p_mean[slot] = prior.mean
        self.p_var[slot] = prior.std ** 2
        for j, w in enumerate(PitchMapper.KNOWN if known else PitchMapper.UNKNOWN):
            self.p_weights[slot, j] = w
        self.p_seen[slot] = 0.0
        self.held[slot] = 0.0
        self.shift[slot] = 0.0
        for j, v in enumerate(new_track(prior if known else None).tolist()):
            self.track[slot, j] = v

    @torch.inference_mode()
    def _step(self) -> None:
        m, cfg = self.model, self.cfg
        saved = [t.clone() for t in self.states]
        mel, frames = m.frontend(self.inp)                                   # [S, n_mels, 1], [S, 1, win]
        f0, voiced = yin_torch(frames[:, 0], cfg, self.track)
        # running source statistics -> target range (+ transpose), as in rtvc.frontend.PitchMapper
        lf = torch.log(torch.where(voiced, f0, torch.ones_like(f0)))
        seen = self.p_seen + voiced.double()
        am = torch.maximum(torch.full_like(seen, self.alpha), 1.0 / (seen + self.p_weights[:, 0]))
        av = torch.maximum(torch.full_like(seen, self.alpha), 1.0 / (seen + self.p_weights[:, 1]))
        mean = self.p_mean + am * (lf - self.p_mean)
        var = (1 - av) * (self.p_var + av * (lf - mean) ** 2)
        z = (lf - mean) / torch.sqrt(var.clamp(min=1e-4))
        lf_t = self.target_mean[self.speaker] + z * self.target_std[self.speaker] + self.transpose * math.log(2.0) / 12.0
        self.p_mean.copy_(torch.where(voiced, mean, self.p_mean))
        self.p_var.copy_(torch.where(voiced, var, self.p_var))
        self.p_seen.copy_(seen)
        held = torch.where(voiced, ((lf_t - LF0_MEAN) / LF0_STD).float(), self.held)
        self.held.copy_(held)
        pitch = torch.stack([held, voiced.float()], dim=1)[:, :, None]        # [S, 2, 1]
        v = m.vqvae
        zc = v.encoder(mel)
        self.seen.copy_(torch.cat([zc[:, :, 0], mel[:, :, 0].mean(1, keepdim=True), voiced.float()[:, None]], 1))
        mel_hat = v.render(zc + self.shift[:, :, None], v.speakers(self.speaker), pitch)
        y = m.student(mel_hat, pitch)[:, 0]
        act = self.active
        for t, old in zip(self.states, saved):  # idle slots keep their state
            t.copy_(torch.where(act.view(-1, *([1] * (t.dim() - 1))), t, old))
        self.out.copy_(torch.where(act[:, None], y, torch.zeros_like(y)))

    def step(self, hops: torch.Tensor | None = None, active: torch.Tensor | None = None) -> torch.Tensor:
        """Run one hop for every active slot (inputs copied into the static buffers if given); returns ``out``."""
        if hops is not None:
            self.inp.copy_(hops)
        if active is not None:
            self.active.copy_(active)
        if not self.use_graph:
            self._step()
            return self.out
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        # warm up on a side stream (allocator, cuBLAS handles), restore the state, then capture once
        snapshot = [t.clone() for t in self.states]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        for t, old in zip(self.states, snapshot):
            t.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for t, old in zip(self.states, snapshot):  # capturing ran nothing, but be explicit about the state
            t.copy_(old)


class GraphRunner(VoiceSlots):
    """The server's runner interface (see :class:`rtvc.batch.BatchedVoice`) on a :class:`GraphStep`: sessions take
    and release slots; a step fills the static buffers for the slots with a hop ready and replays the graph."""

    name = "voice model (batched, graph-captured)"

    def __init__(self, model: VoiceModel, slots: int, device: str | torch.device,
                 learner: Callable[[], ContentLearner | None] | None = None) -> None:
        """``learner``: makes each new session's :class:`rtvc.centring.ContentLearner` (source centring learned
        while they speak, as :class:`rtvc.batch.BatchedVoice` does)."""
        super().__init__(model, slots, learner)
        self.step_ = GraphStep(model, slots, device)
        self.device = self.step_.device
        self._shifts: dict[int, np.ndarray] = {}  # learned shifts to copy into the step's buffer before the next hop
        self._dirty = True
        # host staging buffers, page-locked on a GPU so the copies are asynchronous: a step is three copies, a replay
        # and one synchronisation, with no allocation and no pageable copy (each waits for the queued GPU work).
        # Each torch call also lets go of the GIL and must win it back from the event loop: with a 5 ms fixed-cost
        # step, 12 calls per step instead of 1 raised the round trip p99 at 32 clients from 38 to 44 ms on a
        # 2-core VM (`python bench/server_step_cost.py`, session 25; in one earlier run the 12-call server lost
        # real time at 32 clients).
        pin = self.device.type == "cuda"
        self._h_in = torch.zeros(slots, self.hop, pin_memory=pin)
        self._h_act = torch.zeros(slots, dtype=torch.bool, pin_memory=pin)
        self._h_out = torch.zeros(slots, self.hop, pin_memory=pin)
        self._h_seen = torch.zeros(self.step_.seen.shape, pin_memory=pin)
        self._n_in, self._n_act, self._n_out = self._h_in.numpy(), self._h_act.numpy(), self._h_out.numpy()

    def _changed(self, slot: int, voice: bool) -> None:
        self._dirty = True  # copied to the device buffers before the next replay

    def warmup(self) -> None:
        slot = self.acquire(self.voices[0])
        try:
            self.step([slot], torch.zeros(1, self.hop).numpy())
        finally:
            self.release(slot)

    def step(self, slots: list[int], hops: np.ndarray) -> np.ndarray:
        st = self.step_
        for s in self.pool.fresh():
            st.reset_slot(s)
            self._restart_learner(s)
            self._shifts.pop(s, None)
        for s, shift in self._shifts.items():  # rare (a learner's estimate): small host->device copies
            st.shift[s].copy_(torch.from_numpy(shift))
        self._shifts.clear()
        if self._dirty:  # voice / transpose changes: small host->device copies, outside the graph
            self._dirty = False
            st.speaker.copy_(torch.tensor(self._voice))
            st.transpose.copy_(torch.tensor(self._transpose, dtype=torch.float64))
        self._n_act[:] = False  # numpy writes into the staging buffers: no torch calls
        self._n_act[slots] = True
        self._n_in[:] = 0.0
        self._n_in[slots] = hops
        st.inp.copy_(self._h_in, non_blocking=True)
        st.active.copy_(self._h_act, non_blocking=True)
        self._h_out.copy_(st.step(), non_blocking=True)
        learning = [s for s in slots if self._learner[s] is not None]
        if learning:
            self._h_seen.copy_(st.seen, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if learning:
            seen, d = self._h_seen.numpy(), st.seen.shape[1] - 2
            for s in learning:
                shift = self._learn(s, seen[s, None, :d], seen[s, d:d + 1], seen[s, d + 1:] > 0.5)
                if shift is not None:
                    self._shifts[s] = shift
        return self._n_out[slots]  # a copy (fancy indexing): the buffer is overwritten next step
