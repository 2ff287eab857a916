"""Custom ops in kernels/: CPU implementations and the CUDA kernel code (under numba's CUDA simulator, in a
subprocess, so CI executes it without a GPU) against plain-torch references on fresh random inputs; on a GPU the
real kernels too (float32 tolerance stated per op)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels.vq  # noqa: F401  (registers torch.ops.rtvc.vq_nearest)
from kernels.vq import reference as vq_reference

GPU = torch.cuda.is_available()


def _simulate(code: str) -> None:
    """Run ``code`` with NUMBA_ENABLE_CUDASIM=1 (the CUDA kernels execute on the CPU) in a fresh interpreter."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("n, k, d", [(1, 128, 64), (37, 16, 8), (200, 256, 32), (5, 3, 1)])
def test_vq_nearest_cpu(n, k, d):
    g = torch.Generator().manual_seed(n * 1000 + k)
    z, cb = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx, q = torch.ops.rtvc.vq_nearest(z, cb)
    ref_idx, ref_q = vq_reference(z, cb)
    assert torch.equal(idx, ref_idx) and torch.equal(q, ref_q)


def test_vq_nearest_ties_pick_lowest_index():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    idx, _ = torch.ops.rtvc.vq_nearest(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), cb)
    assert idx.tolist() == [0, 0]


def test_vq_nearest_cuda_kernel_in_simulator():
    _simulate("""
        import numpy as np, torch
        from kernels.vq import launch_cuda, reference
        rng = np.random.default_rng(0)
        for n, k, d in [(3, 16, 8), (2, 130, 4), (1, 5, 3)]:
            z = rng.standard_normal((n, d)).astype(np.float32)
            cb = rng.standard_normal((k, d)).astype(np.float32)
            idx, q = np.zeros(n, np.int64), np.zeros((n, d), np.float32)
            launch_cuda(z, cb, idx, q)
            ri, rq = reference(torch.from_numpy(z), torch.from_numpy(cb))
            assert (idx == ri.numpy()).all(), (n, k, d, idx, ri)
            assert np.array_equal(q, rq.numpy())
    """)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_vq_nearest_gpu():
    for n, k, d in [(1, 128, 64), (1000, 256, 64), (4096, 128, 64)]:
        z, cb = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
        idx, q = torch.ops.rtvc.vq_nearest(z, cb)
        ref_idx, ref_q = vq_reference(z.double(), cb.double())
        # float32 sums may flip near-ties: require the chosen code to be as near as the reference's within 1e-4
        dist = lambda i: ((z.double() - cb.double()[i]) ** 2).sum(1)  # noqa: E731
        assert torch.all(dist(idx) <= dist(ref_idx) + 1e-4)


# ------------------------------------------------------------------------------------------ student layer

import kernels.student_layer  # noqa: E402,F401  (registers torch.ops.rtvc.student_layer)
from kernels.student_layer import reference as layer_reference  # noqa: E402


def _layer_inputs(B, C, A, T, K, d, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3)  # noqa: E731
    return (r(B, C, T), r(B, A, T), r(B, C, (K - 1) * d), r(2 * C, K * C + A), r(2 * C), r(C, C), r(C), r(C, C),
            r(B, C, T))


@pytest.mark.parametrize("B, C, A, T, K, d", [(1, 40, 32, 60, 3, 4), (3, 8, 5, 7, 3, 1), (2, 16, 8, 3, 2, 8),
                                               (1, 4, 2, 1, 3, 2)])
def test_student_layer_cpu_with_state_across_calls(B, C, A, T, K, d):
    x, c, past, w, b, wr, br, ws, skips = _layer_inputs(B, C, A, T, K, d, seed=B * 100 + C + T)
    p_op, s_op = past.clone(), skips.clone()
    p_ref, s_ref = past.clone(), skips.clone()
    for step in range(3):  # streaming: the history written by one call is read by the next
        xs = x * (step + 1)
        out = torch.ops.rtvc.student_layer(xs, c, p_op, w, b, wr, br, ws, s_op, d)
        ref, p_ref, s_ref = layer_reference(xs, c, p_ref, w, b, wr, br, ws, s_ref, d)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p_op, p_ref, rtol=0, atol=0)
        torch.testing.assert_close(s_op, s_ref, rtol=1e-5, atol=1e-5)


def test_student_layer_cuda_kernel_in_simulator():
    _simulate("""
        import numpy as np, torch
        from kernels.student_layer import launch_cuda, reference
        rng = np.random.default_rng(1)
        for B, C, A, T, K, d in [(2, 4, 3, 5, 3, 1), (1, 3, 2, 2, 2, 3)]:
            f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
            x, c, past, w, b = f(B, C, T), f(B, A, T), f(B, C, (K - 1) * d), f(2 * C, K * C + A), f(2 * C)
            wr, br, ws, skips = f(C, C), f(C), f(C, C), f(B, C, T)
            t = lambda a: torch.from_numpy(a.copy())
            for step in range(2):
                ref, rp, rs = reference(*(t(a) for a in (x, c, past, w, b, wr, br, ws, skips)), d)
                out = np.zeros_like(x)
                launch_cuda(x, c, past, w, b, wr, br, ws, skips, out, d)
                assert np.allclose(out, ref.numpy(), atol=1e-5), (B, C, step)
                assert np.array_equal(past, rp.numpy()) and np.allclose(skips, rs.numpy(), atol=1e-5)
                x = x * 1.5
    """)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_student_layer_gpu():
    for B, C, A, T, K, d in [(1, 40, 32, 60, 3, 4), (256, 40, 32, 60, 3, 8), (8, 64, 32, 240, 3, 1)]:
        args = [a.cuda() for a in _layer_inputs(B, C, A, T, K, d, seed=7)]
        ref, rp, rs = layer_reference(*args, d)
        out = torch.ops.rtvc.student_layer(*args, d)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(args[2], rp, rtol=0, atol=0)
        torch.testing.assert_close(args[8], rs, rtol=1e-4, atol=1e-4)


def test_gpu_benchmark_script_runs_quick_on_cpu(tmp_path):
    """bench/gpu.py is a script for the device machine; its code path is exercised here on CPU (small sizes)."""
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    res = json.loads(out.read_text())
    assert {o["op"] for o in res["ops"]} == {"vq_nearest", "student_layer"} and res["step"] and res["vocoders"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_envelope_synth_cpu_matches_torch(seed):
    """kernels.envelope (numba harmonics by recurrence + numpy FFT noise) == rtvc.envelope.EnvelopeSynth (torch),
    chunk by chunk on the same streaming state, on random mels and voiced/unvoiced pitch; 1e-4 (float32 vs
    float64 FFTs, amplitude sums of ~1)."""
    import numpy as np

    from kernels.envelope import envelope_args, envelope_synth
    from rtvc.config import load_config
    from rtvc.envelope import EnvelopeSynth
    cfg = load_config()
    g = torch.Generator().manual_seed(seed)
    ref, mine = EnvelopeSynth(cfg.model, cfg.student), EnvelopeSynth(cfg.model, cfg.student)
    for m in (ref, mine):
        m.mel_mean.fill_(-4.0)
        m.start_streaming(1)
    args = envelope_args(mine)
    for n in (1, 3, 2, 5):
        mel = torch.randn(1, cfg.model.n_mels, n, generator=g)
        pitch = torch.stack([0.5 * torch.randn(1, n, generator=g), (torch.rand(1, n, generator=g) > 0.3).float()], 1)
        want = ref(mel, pitch)[0, 0].numpy()
        got = envelope_synth(mel[0].numpy(), pitch[0].numpy(), args)
        assert np.abs(want).max() > 0.01
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_student_step_cpu_matches_torch_with_the_voice_bar(seed):
    """kernels.student_step (numba network + envelope synthesis) == rtvc.vocoder.Student (torch streaming), chunk
    by chunk, on fresh random mels whose low band voices some tracker-unvoiced frames ([student] voice_bar_*, which
    both apply before synthesis and excitation); a trained-looking head, so the network's part is compared too."""
    import numpy as np

    from kernels.student_step import student_args, student_step
    from rtvc.config import load_config
    from rtvc.vocoder import Student
    cfg = load_config()
    torch.manual_seed(seed)
    ref = Student(cfg.model, cfg.student).eval()
    torch.nn.init.normal_(ref.head2.weight, std=0.1)
    mine = Student(cfg.model, cfg.student).eval()
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        m.synth.mel_mean.fill_(-4.0)
        m.start_streaming(1)
    args = student_args(mine)
    g, fired = torch.Generator().manual_seed(seed), 0
    for n in (1, 3, 2, 5, 4):
        mel = torch.randn(1, cfg.model.n_mels, n, generator=g)
        pitch = torch.stack([0.5 * torch.randn(1, n, generator=g), (torch.rand(1, n, generator=g) > 0.5).float()], 1)
        fired += int((ref.synth.voiced(mel, pitch) != pitch).sum())
        with torch.no_grad():
            want = ref(mel, pitch)[0, 0].numpy()
        got = student_step(mel[0].numpy(), pitch[0].numpy(), *args)
        assert np.abs(want).max() > 0.01
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert fired > 0
