"""BatchedVoice: a batched step over any subset of slots == each stream converted on its own."""

from __future__ import annotations

import numpy as np
import pytest

from rtvc.batch import BatchedVoice
from rtvc.config import load_config
from rtvc.voice import VoiceConverter, make_voice_model

from test_streaming import _centred_model, _speech_like

CFG = load_config()


@pytest.mark.parametrize("fused", [True, False])
def test_batched_slots_match_single_streams(fused):
    """fused: per-slot numba kernels (CPU default); not fused: one torch step over the gathered slots."""
    names = ["a", "b", "c"]
    bv = BatchedVoice(make_voice_model(CFG, names, seed=7), slots=4)
    bv.fused = fused
    hop = bv.hop
    xs = [_speech_like(0.6, bv.sample_rate, s) for s in range(3)]
    plans = [("a", 0.0), ("c", 2.0), ("b", -1.0)]
    slots = [bv.acquire(v, t) for v, t in plans]
    outs = [[] for _ in xs]
    n_hops = xs[0].shape[0] // hop
    for k in range(n_hops):
        active = [i for i in range(3) if (k + i) % 3 != 0]  # every stream idles now and then
        y = bv.step([slots[i] for i in active], np.stack([xs[i][k * hop:(k + 1) * hop] for i in active]))
        for j, i in enumerate(active):
            outs[i].append((k, y[j]))
    for i, (voice, tr) in enumerate(plans):
        single = VoiceConverter(make_voice_model(CFG, names, seed=7), voice, tr)
        ks = [k for k, _ in outs[i]]
        ref = np.concatenate([single.convert(xs[i][k * hop:(k + 1) * hop]) for k in ks])
        got = np.concatenate([y for _, y in outs[i]])
        assert np.abs(got - ref).max() <= 1e-5, f"stream {i}"
    bv.release(slots[1])
    assert bv.acquire("a") == slots[1]  # a freed slot is reused, with fresh state


def test_batched_slots_learn_source_centring_like_single_streams():
    """With a learner per session (the server's CPU runner), each slot learns its own source's content and centres
    on it exactly as a single VoiceConverter with a learner does; a new session in a slot starts unlearned."""
    from rtvc.centring import ContentLearner
    names = ["a", "b"]
    model = lambda: _centred_model(names, 7, 1)  # noqa: E731
    new = lambda: ContentLearner(CFG, window_s=1.0, every_s=0.3, min_voiced_s=0.1)  # noqa: E731
    bv = BatchedVoice(model(), slots=3, learner=new)
    hop = bv.hop
    xs = [_speech_like(1.0, bv.sample_rate, s + 3) for s in range(2)]
    slots = [bv.acquire("a"), bv.acquire("b")]
    n = xs[0].shape[0] // hop
    got = [[], []]
    for k in range(n):
        y = bv.step(slots, np.stack([x[k * hop:(k + 1) * hop] for x in xs]))
        for i in range(2):
            got[i].append(y[i])
    assert all(bv._learner[s].updates >= 2 for s in slots) and bv._shift[slots[0]] is not None
    for i, voice in enumerate(["a", "b"]):
        single = VoiceConverter(model(), voice, learner=new())
        ref = np.concatenate([single.convert(xs[i][k * hop:(k + 1) * hop]) for k in range(n)])
        assert single.learner.updates == bv._learner[slots[i]].updates
        assert np.abs(np.concatenate(got[i]) - ref).max() <= 1e-5, f"stream {i}"
    bv.release(slots[0])
    s = bv.acquire("a")
    bv.step([s], xs[0][None, :hop])
    assert s == slots[0] and bv._learner[s].updates == 0 and bv._shift[s] is None
