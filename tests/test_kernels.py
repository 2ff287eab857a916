"""Custom ops in kernels/: CPU implementations and the CUDA kernel code (under numba's CUDA simulator, in a
subprocess, so CI executes it without a GPU) against plain-torch references on fresh random inputs; on a GPU the
real kernels too (float32 tolerance stated per op)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
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
