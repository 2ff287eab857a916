"""GraphStep (the fixed-batch, capture-ready streaming step): device YIN == the CPU tracker, and the batched
step with idle slots == each stream converted alone (CPU eagerly here; on a GPU with CUDA-graph replay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtvc.config import load_config
from rtvc.frontend import Frontend, PitchStats, new_track, yin
from rtvc.gpu_step import GraphStep, yin_torch
from rtvc.voice import VoiceConverter, make_voice_model

from test_streaming import _centred_model, _speech_like

CFG = load_config()


def test_yin_torch_matches_numba():
    """Four streams side by side, one frame per call (as GraphStep runs it), each row with its own tracker state,
    against the numba tracker run over each stream alone; noise makes rough frames, so every rule is exercised."""
    frames = []
    for seed in (0, 1, 2):
        x = torch.from_numpy(_speech_like(1.0, 24000, seed))
        x = x[: x.shape[0] // 240 * 240]
        x = x + (0.01 + 0.03 * seed) * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        frames.append(Frontend(CFG.model).frames(x[None])[0])
    # a clean tone, a pause and the tone in noise: a rough onset in the running range (model.yin_onset_range)
    t = np.arange(9600) / 24000
    tone = np.sin(2 * np.pi * 130 * t)
    rough = tone + 0.7 * np.random.default_rng(4).standard_normal(t.shape)
    x = torch.from_numpy(np.concatenate([tone, np.zeros(4800), rough]).astype(np.float32))
    frames.append(Frontend(CFG.model).frames(x[None])[0])
    frames = torch.stack(frames)                               # [4, N, win]
    known = [None, PitchStats(math.log(120.0), 0.2), None, None]  # row 1: a calibrated speaker (range from the start)
    track = torch.from_numpy(np.stack([new_track(k) for k in known]))
    f0_t, voiced_t = zip(*(yin_torch(frames[:, k], CFG.model, track) for k in range(frames.shape[1])))
    f0_t, voiced_t = torch.stack(f0_t, 1), torch.stack(voiced_t, 1)
    for i in range(4):
        f0, voiced = yin(frames[i].numpy(), CFG.model, new_track(known[i]))
        assert np.array_equal(voiced, voiced_t[i].numpy()) and voiced.sum() > 20
        np.testing.assert_allclose(f0_t[i].numpy(), f0, rtol=1e-5, atol=1e-3)


def _run(device: str, use_graph: bool) -> None:
    names = ["a", "b", "c"]
    step = GraphStep(make_voice_model(CFG, names, seed=5), slots=4, device=device, use_graph=use_graph)
    hop = step.hop
    plans = {0: ("a", 0.0), 2: ("c", 3.0), 3: ("b", -2.0)}  # slot 1 stays free
    xs = {s: _speech_like(0.5, 24000, 20 + s) for s in plans}
    known = {0: None, 2: PitchStats(math.log(130.0), 0.15), 3: None}  # slot 2: a calibrated speaker
    for s, (v, tr) in plans.items():
        step.reset_slot(s, known[s])
        step.speaker[s] = names.index(v)
        step.transpose[s] = tr
    got = {s: [] for s in plans}
    for k in range(xs[0].shape[0] // hop):
        active = torch.tensor([s in plans and (k + s) % 4 != 1 for s in range(4)], device=device)
        hops = torch.zeros(4, hop, device=device)
        for s in plans:
            hops[s] = torch.from_numpy(xs[s][k * hop:(k + 1) * hop])
        out = step.step(hops, active).cpu().numpy()
        for s in plans:
            if active[s]:
                got[s].append((k, out[s].copy()))
        assert not out[1].any()
    for s, (v, tr) in plans.items():
        single = VoiceConverter(make_voice_model(CFG, names, seed=5), v, tr, source=known[s])
        ref = np.concatenate([single.convert(xs[s][k * hop:(k + 1) * hop]) for k, _ in got[s]])
        mine = np.concatenate([y for _, y in got[s]])
        assert np.abs(mine - ref).max() <= 1e-4, (s, np.abs(mine - ref).max())


def test_graph_step_matches_single_streams_cpu():
    _run("cpu", use_graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_step_cuda_graph_matches_cpu_reference():
    _run("cuda", use_graph=True)


def test_graph_runner_serves_like_batched_voice():
    """The server's GPU runner, exercised on CPU: slots, deferred resets, voice changes."""
    from rtvc.batch import BatchedVoice
    from rtvc.gpu_step import GraphRunner
    names = ["a", "b"]
    gr = GraphRunner(make_voice_model(CFG, names, seed=8), 3, "cpu")
    bv = BatchedVoice(make_voice_model(CFG, names, seed=8), 3)
    x = _speech_like(0.3, 24000, 4)
    hop = gr.hop
    sg, sb = gr.acquire("b", 1.0), bv.acquire("b", 1.0)
    for k in range(x.shape[0] // hop):
        if k == 10:
            gr.set(sg, "a")
            bv.set(sb, "a")
        h = x[None, k * hop:(k + 1) * hop]
        # 3e-4: the envelope synthesis' noise FFT is float64 in numpy (BatchedVoice), float32 in torch (GraphRunner)
        np.testing.assert_allclose(gr.step([sg], h), bv.step([sb], h), atol=3e-4)
    assert gr.voice_of(sg) == "a"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_graph_runner_learns_source_centring_like_batched_voice(device):
    """Each session's learner in the GPU runner (on CPU eagerly; on a GPU with graph replay) sees what
    BatchedVoice's sees (encoder output, level, voicing from the device-side step) and the learned shift changes
    the codes from the next hop alike."""
    from rtvc.batch import BatchedVoice
    from rtvc.centring import ContentLearner
    from rtvc.gpu_step import GraphRunner
    names = ["a", "b"]
    model = lambda: _centred_model(names, 8, 2)  # noqa: E731
    new = lambda: ContentLearner(CFG, window_s=1.0, every_s=0.25, min_voiced_s=0.1)  # noqa: E731
    gr, bv = GraphRunner(model(), 2, device, learner=new), BatchedVoice(model(), 2, learner=new)
    x = _speech_like(1.0, 24000, 6)
    hop = gr.hop
    sg, sb = gr.acquire("b"), bv.acquire("b")
    for k in range(x.shape[0] // hop):
        h = x[None, k * hop:(k + 1) * hop]
        np.testing.assert_allclose(gr.step([sg], h), bv.step([sb], h), atol=3e-4)
    assert gr._learner[sg].updates == bv._learner[sb].updates >= 3
    latest = gr._shifts.get(sg, gr.step_.shift[sg].cpu().numpy())  # one learned at the last hop waits for the next
    np.testing.assert_allclose(latest, bv._shift[sb].numpy(), atol=1e-4)
    assert np.abs(bv._shift[sb].numpy()).max() > 0.1
