"""``rtvc::vq_nearest``: vector-quantizer nearest-code search fused (distance + argmin + gather).

    codes, q = torch.ops.rtvc.vq_nearest(z, codebook)     # z [N, D], codebook [K, D] -> [N] int64, [N, D]

CPU: a numba kernel (parallel over rows). CUDA: a numba.cuda kernel, one thread block per row, the K distances
reduced in shared memory, launched on PyTorch's current stream (no synchronisation). The same kernel source runs
under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how CI executes it without a GPU.
Reference (tests only): :func:`reference`. Ties break toward the lower index everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda, njit, prange

THREADS = 128  # CUDA block size: codes are strided over the block's threads


def reference(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = (z[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)
    idx = d.argmin(dim=1)
    return idx, codebook[idx]


@njit(parallel=True, cache=True)
def _vq_cpu(z, cb, idx, q):  # pragma: no cover - numba
    n, d = z.shape
    k = cb.shape[0]
    for i in prange(n):
        best, arg = np.inf, 0
        for j in range(k):
            s = 0.0
            for c in range(d):
                diff = z[i, c] - cb[j, c]
                s += diff * diff
            if s < best:
                best, arg = s, j
        idx[i] = arg
        q[i, :] = cb[arg, :]


@cuda.jit(cache=False)
def _vq_cuda(z, cb, idx, q):  # pragma: no cover - runs on the device / simulator
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    best_d = cuda.shared.array(THREADS, dtype=np.float32)
    best_j = cuda.shared.array(THREADS, dtype=np.int64)
    k, d = cb.shape[0], cb.shape[1]
    mine, arg = np.float32(math.inf), 0
    for j in range(tid, k, THREADS):
        s = np.float32(0.0)
        for c in range(d):
            diff = z[i, c] - cb[j, c]
            s += diff * diff
        if s < mine:
            mine, arg = s, j
    best_d[tid] = mine
    best_j[tid] = arg
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:  # tree reduction: smallest distance, lowest index on ties
        if tid < step:
            od, oj = best_d[tid + step], best_j[tid + step]
            if od < best_d[tid] or (od == best_d[tid] and oj < best_j[tid]):
                best_d[tid] = od
                best_j[tid] = oj
        cuda.syncthreads()
        step //= 2
    a = best_j[0]
    if tid == 0:
        idx[i] = a
    for c in range(tid, d, THREADS):
        q[i, c] = cb[a, c]


def launch_cuda(z, cb, idx, q, stream=0) -> None:
    """Launch the CUDA kernel on device arrays (or host arrays under the simulator)."""
    if z.shape[0]:
        _vq_cuda[z.shape[0], THREADS, stream](z, cb, idx, q)


@torch.library.custom_op("rtvc::vq_nearest", mutates_args=())
def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError(f"rtvc::vq_nearest has no kernel for device {z.device}")


@vq_nearest.register_kernel("cpu")
def _(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z, cb = z.contiguous().float(), codebook.contiguous().float()
    idx = torch.empty(z.shape[0], dtype=torch.int64)
    q = torch.empty_like(z)
    _vq_cpu(z.numpy(), cb.numpy(), idx.numpy(), q.numpy())
    return idx, q


@vq_nearest.register_kernel("cuda")
def _(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z, cb = z.contiguous().float(), codebook.contiguous().float()
    idx = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    q = torch.empty_like(z)
    stream = cuda.external_stream(torch.cuda.current_stream(z.device).cuda_stream)
    launch_cuda(cuda.as_cuda_array(z), cuda.as_cuda_array(cb), cuda.as_cuda_array(idx), cuda.as_cuda_array(q), stream)
    return idx, q


@vq_nearest.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z.new_empty(z.shape[0], dtype=torch.int64), torch.empty_like(z)
