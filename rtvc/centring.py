"""Source centring for a speaker nobody measured: their mean content, learned while they speak.

Source centring (``vqvae.source_centring``) needs the source's mean content over speech frames. A file being
converted is its own measurement and ``rtvc live --calibrate`` takes one beforehand; a live speaker who did
neither gets it from what they have said so far. The converter hands :class:`ContentLearner` what it computes
anyway for every hop: the encoder's output (before any shift), the frame's level (mean normalised log-mel) and
whether its pitch tracker found the frame voiced. The learner keeps the last ``window_s`` of them and, every
``every_s`` once that window holds ``min_voiced_s`` of voiced frames, returns the window's mean content by the
calibration's rule (:func:`rtvc.vqvae.content_mean`: the mean over frames above the window's 30th level
percentile). Nothing is computed twice and no thread runs: a first version measured on a worker thread, and
hops waiting for the GIL behind it doubled the slow hops of a paced one-thread run (session 25).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import Config, EngineConfig
from .vqvae import speech_level_mask

if TYPE_CHECKING:
    from .voice import VoiceModel


class ContentLearner:
    """Rings over the last window of one stream: encoder output [H, code_dim], frame level [H], voicing [H]."""

    def __init__(self, cfg: Config, window_s: float, every_s: float, min_voiced_s: float) -> None:
        if window_s <= 0 or every_s <= 0 or min_voiced_s < 0 or min_voiced_s > window_s:
            raise ValueError(f"ContentLearner: need window_s > 0, every_s > 0 and 0 <= min_voiced_s <= window_s "
                             f"(got {window_s}, {every_s}, {min_voiced_s})")
        frames_per_s = cfg.model.sample_rate / cfg.model.hop_length
        size = max(1, round(window_s * frames_per_s))
        self.z = np.zeros((size, cfg.vqvae.code_dim), np.float32)
        self.level, self.voiced = np.zeros(size, np.float32), np.zeros(size, bool)
        self.every = max(1, round(every_s * frames_per_s))
        self.min_voiced = max(1, round(min_voiced_s * frames_per_s))
        self.pos, self.filled, self.since = 0, 0, 0  # in frames
        self.updates = 0  # estimates handed out so far (status lines, tests)

    def push(self, z: np.ndarray, level: np.ndarray, voiced: np.ndarray) -> np.ndarray | None:
        """The stream's next frames: encoder output z [k, code_dim], level [k], voiced [k] bool. Returns a new mean
        content [code_dim] every ``every_s`` once the window holds enough voiced frames, else None."""
        k, size = level.shape[0], self.level.shape[0]
        if z.shape != (k, self.z.shape[1]) or voiced.shape != (k,):
            raise ValueError(f"ContentLearner.push: z {z.shape}, level {level.shape}, voiced {voiced.shape} do not "
                             f"describe the same {k} frames of {self.z.shape[1]} dims")
        rows = (self.pos + np.arange(max(0, k - size), k)) % size  # a push longer than the window: its end
        self.z[rows], self.level[rows], self.voiced[rows] = z[-size:], level[-size:], voiced[-size:]
        self.pos = (self.pos + k) % size
        self.filled = min(size, self.filled + k)
        self.since += k
        if self.since < self.every or self.voiced[:self.filled].sum() < self.min_voiced:
            return None
        self.since = 0
        c = self.content()
        self.updates += c is not None
        return c

    @property
    def state(self) -> str:
        """For status lines and session stats: learning (no estimate yet) or learned xN."""
        return f"learned x{self.updates}" if self.updates else "learning"

    def content(self) -> np.ndarray | None:
        """Mean content [code_dim] over the window's speech frames (their order does not matter); None if none."""
        if not self.filled:
            return None
        z, level = self.z[:self.filled], self.level[:self.filled]
        speech = speech_level_mask(torch.from_numpy(level)).numpy()
        return z[speech].mean(0) if speech.any() else None


def make_learner(model: "VoiceModel", engine: EngineConfig) -> ContentLearner | None:
    """A learner for one stream of ``model`` by the ``engine.learn_content_*`` settings; None when they are off
    or source centring does not apply to the model (off, or its file records no voice content means)."""
    if engine.learn_content_every_s <= 0 or not model.centres:
        return None
    return ContentLearner(model.cfg, engine.learn_content_window_s, engine.learn_content_every_s,
                          engine.learn_content_min_voiced_s)
