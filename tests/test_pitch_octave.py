"""The tracker's octave check (``model.yin_octave_margin``): a period candidate moves to half its length when that
dip is below the loose threshold and nearly as deep (at a voiced stretch's onset); the numba and torch (GPU step)
versions agree on fresh data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtvc.frontend import _shorter
from rtvc.gpu_step import _shorter as shorter_torch


def _dips(n: int, at: dict[int, float]) -> np.ndarray:
    d = np.full(n, 0.9)
    for tau, depth in at.items():
        d[tau - 3:tau + 4] = np.minimum(d[tau - 3:tau + 4], depth + 0.02 * np.abs(np.arange(-3, 4)))
    return d


def test_octave_check_rules():
    d = _dips(241, {116: 0.229, 232: 0.182})      # the held-out source's case: the first strict dip at 2T
    assert _shorter(d, 232, 20, 240, 0.5, 0.1) == 116
    assert _shorter(d, 232, 20, 240, 0.5, 0.0) == 232   # margin 0: only a strictly deeper dip
    assert _shorter(d, 232, 20, 240, 0.2, 0.1) == 232   # the half dip must be below the loose threshold
    assert _shorter(_dips(241, {116: 0.4, 232: 0.182}), 232, 20, 240, 0.5, 0.1) == 232  # not nearly as deep
    assert _shorter(_dips(241, {58: 0.1, 116: 0.15, 232: 0.2}), 232, 20, 240, 0.5, 0.1) == 58  # twice: 4T -> T
    assert _shorter(_dips(241, {30: 0.1}), 30, 20, 240, 0.5, 0.1) == 30  # no half period in range


@pytest.mark.parametrize("seed", range(3))
def test_octave_check_torch_matches_numba(seed):
    rng = np.random.default_rng()
    n, tau_min, tau_max = 241, 20, 240
    d = np.clip(np.cumsum(rng.normal(0, 0.08, (64, n)), axis=1) % 1.0, 0, 1)
    g = rng.integers(tau_min, tau_max, 64)
    idx = torch.arange(n)
    for margin in (0.0, 0.1, 0.3):
        want = [_shorter(d[i], int(g[i]), tau_min, tau_max, 0.5, margin) for i in range(64)]
        got = shorter_torch(torch.from_numpy(d), torch.from_numpy(g), idx, tau_min, tau_max, 0.5, margin)
        assert got.tolist() == want
