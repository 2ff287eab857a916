"""BatchedVoice: many streams of one voice model in one batched streaming step (the server's worker).

The model's modules hold state for ``slots`` streams (``model.streaming(slots)``). A session takes a free slot
(its state zeroed) and gives it back when it leaves; a step runs only the slots that have a hop ready, via
``model.slots(idx)`` (gather their states, run, scatter back), so sessions joining, leaving or idling never
disturb the others. Per-slot pitch mapping (numpy) and target voice / transpose are kept here.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

from .centring import ContentLearner
from .frontend import SourcePitch
from .voice import VoiceModel, fused_args, fused_step


class NoFreeSlot(RuntimeError):
    pass


class SlotPool:
    """Batch slots that sessions take and give back. ``take`` (event loop) only marks the slot for a state reset;
    the worker applies :meth:`fresh` between steps, because during a step only it may touch slot states."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._reset: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if not self._free:
                raise NoFreeSlot(f"all {self.capacity} stream slots are in use")
            slot = self._free.pop()
            self._reset.add(slot)
            return slot

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def fresh(self) -> list[int]:
        """Slots taken since the last call (to be reset by the caller, on the worker thread)."""
        with self._lock:
            out, self._reset = sorted(self._reset), set()
        return out


class VoiceSlots:
    """What every model-backed server runner shares: a :class:`SlotPool`, each slot's voice id and transpose (set
    by sessions on the event loop, read by the worker at the next step), and the acquire/release/set interface."""

    def __init__(self, model: VoiceModel, slots: int,
                 learner: Callable[[], ContentLearner | None] | None = None) -> None:
        """``learner``: makes each new session's :class:`rtvc.centring.ContentLearner` (source centring learned
        while they speak); the subclass feeds it."""
        self.model, self.capacity, self.voices = model, slots, list(model.speakers)
        self.hop, self.sample_rate, self.latency = model.cfg.model.hop_length, model.cfg.model.sample_rate, 0
        self.pool = SlotPool(slots)
        self._voice = np.zeros(slots, np.int64)
        self._transpose = np.zeros(slots)
        self._new_learner = learner
        self._learner: list[ContentLearner | None] = [None] * slots

    def centring_of(self, slot: int) -> str:
        """``slot``'s source centring, for its session's stats: off, learning (no estimate yet), learned xN."""
        learner = self._learner[slot]
        return "off" if learner is None else learner.state

    def _restart_learner(self, slot: int) -> None:
        """A new session in ``slot`` learns its own speaker from scratch."""
        self._learner[slot] = self._new_learner() if self._new_learner else None

    def _learn(self, slot: int, z: np.ndarray, level: np.ndarray, voiced: np.ndarray) -> np.ndarray | None:
        """Feed ``slot``'s learner one step's frames (:meth:`rtvc.centring.ContentLearner.push`); returns the new
        source-centring shift [code_dim] when an estimate arrives, else None (also without a learner)."""
        learner = self._learner[slot]
        content = learner.push(z, level, voiced) if learner is not None else None
        return None if content is None else self.model.content_shift(content)

    def acquire(self, voice: str, transpose: float = 0.0) -> int:
        slot = self.pool.take()  # its state is reset by the worker, between steps
        self.set(slot, voice, transpose)
        return slot

    def release(self, slot: int) -> None:
        self.pool.give(slot)

    def set(self, slot: int, voice: str | None = None, transpose: float | None = None) -> None:
        """Voice changes take effect at the next hop (the decoder's causal context smooths the change)."""
        if voice is not None:
            self._voice[slot] = self.model.speaker_id(voice)
        if transpose is not None:
            self._transpose[slot] = float(transpose)
        self._changed(slot, voice is not None)

    def _changed(self, slot: int, voice: bool) -> None:
        """Hook: ``slot``'s voice (``voice`` True) and/or transpose changed."""

    def voice_of(self, slot: int) -> str:
        return self.model.speakers[int(self._voice[slot])]


class BatchedVoice(VoiceSlots):
    def __init__(self, model: VoiceModel, slots: int, device: str | torch.device = "cpu",
                 learner: Callable[[], ContentLearner | None] | None = None) -> None:
        """``learner``: as :class:`VoiceSlots` (the fused CPU path learns; the torch path does not)."""
        device = torch.device(device)
        super().__init__(model.to(device).eval(), slots, learner if device.type == "cpu" else None)
        self.device = torch.device(device)
        self.cfg = model.cfg
        self.name = "voice model (batched)"
        self.model.start_streaming(slots)
        self._pitch = [SourcePitch(model.cfg.model, model.source_prior) for _ in range(slots)]
        # CPU: per-slot fused numba kernels on views of each slot's state beat a batched torch step, whose cost
        # at these sizes is op dispatch (the GPU issue batches with custom kernels instead)
        self.fused = self.device.type == "cpu"
        self._args: list[tuple | None] = [None] * slots
        self._shift: list[torch.Tensor | None] = [None] * slots  # each session's source-centring shift

    def warmup(self) -> None:
        """Run a few hops on a scratch slot so no session pays first-call costs (JIT cache loads, allocations, the
        thread's BLAS set-up): call it on the thread that will step (the server's worker does)."""
        slot = self.acquire(self.voices[0])
        try:
            for _ in range(3):
                self.step([slot], np.zeros((1, self.hop), np.float32))
        finally:
            self.release(slot)

    def _changed(self, slot: int, voice: bool) -> None:
        if voice:
            self._args[slot] = None  # the decoder's speaker biases changed: rebuild that slot's kernel arguments

    @torch.inference_mode()
    def step(self, slots: list[int], hops: np.ndarray) -> np.ndarray:
        """One hop for each of ``slots``: hops [n, hop] float32 (model rate) -> [n, hop]."""
        m = self.model
        fresh = self.pool.fresh()
        if fresh:
            m.reset_streaming(fresh)
            for s in fresh:
                self._pitch[s].reset()
                self._restart_learner(s)
                if self._shift[s] is not None:
                    self._shift[s], self._args[s] = None, None
        if self.fused:
            return self._step_fused(slots, np.ascontiguousarray(hops, dtype=np.float32))
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        wav = torch.from_numpy(np.ascontiguousarray(hops, dtype=np.float32)).to(self.device)
        with m.frontend.slots(idx):
            mel, frames = m.frontend(wav)
        fr = frames.float().cpu().numpy()  # [n, 1, win]
        pitch = np.zeros((len(slots), 2, fr.shape[1]), np.float32)
        for i, s in enumerate(slots):
            pitch[i] = self._pitch_of(s, fr[i])
        with m.slots(idx):
            z = m.vqvae.encoder(mel)
            if any(self._shift[s] is not None for s in slots):  # source centring, as the fused path applies it
                zero = torch.zeros(z.shape[1])
                z = z + torch.stack([zero if self._shift[s] is None else self._shift[s].cpu() for s in slots]
                                    ).to(z.device)[:, :, None]
            spk = m.vqvae.speakers(torch.as_tensor(self._voice[slots], device=self.device))
            pitch_t = torch.from_numpy(pitch).to(self.device)
            mel_hat = m.vqvae.render(z, spk, pitch_t)
            return m.student(mel_hat, pitch_t)[:, 0].float().cpu().numpy()

    def _pitch_of(self, slot: int, frames: np.ndarray) -> np.ndarray:
        """frames [N, win] of ``slot`` -> its mapped pitch [2, N] (its own tracker, voice and transpose)."""
        m = self.model
        return self._pitch[slot](frames, m.pitch.get(self.voice_of(slot), m.prior), float(self._transpose[slot]))

    def _step_fused(self, slots: list[int], hops: np.ndarray) -> np.ndarray:
        """Each slot's :func:`rtvc.voice.fused_step` on views of its own state: hops [n, N*hop] -> [n, N*hop]."""
        out = np.empty_like(hops)
        for i, s in enumerate(slots):
            if self._args[s] is None:
                v = int(self._voice[s])
                self._args[s] = fused_args(self.model, self.model.vqvae.speakers.weight[v:v + 1].detach(), s,
                                           self._shift[s])
            out[i], mel, z = fused_step(hops[i], self._args[s], lambda fr, s=s: self._pitch_of(s, fr), _no_tick)
            shift = self._learn(s, z.T, mel.mean(0), self._pitch[s].last_voiced)  # as VoiceConverter.convert does
            if shift is not None:
                self._shift[s] = torch.from_numpy(shift)
                self._args[s] = None  # the code norms carry the shift
        return out


def _no_tick(stage: str, t0: float) -> float:
    return t0
