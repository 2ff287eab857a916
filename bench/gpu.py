"""GPU benchmarks of the custom ops and the captured streaming step (run on the device machine).

    python bench/gpu.py                      # on a CUDA machine: bench/results/gpu/gpu_<device>.json
    python bench/gpu.py --device cpu --quick # smoke run of the same code on CPU (small sizes)

Measures: each custom op against its torch-eager composite; the streaming step (GraphStep) at batch 1, 8, 64, 256,
1024 with and without CUDA-graph capture; the number of concurrent real-time streams whose step p99 stays
<= 5 ms; the server's runner as the server calls it (numpy in and out, 1..128 of 128 slots active, with source
centring learners); the student vocoder's offline throughput against a paper-sized Parallel WaveGAN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.student_layer  # noqa: E402,F401
import kernels.vq  # noqa: E402,F401
from kernels.student_layer import reference as layer_reference  # noqa: E402
from kernels.vq import reference as vq_reference  # noqa: E402
from rtvc.bench import cpu_name  # noqa: E402
from rtvc.config import load_config  # noqa: E402
from rtvc.gpu_step import GraphStep  # noqa: E402
from rtvc.vocoder import Student, Teacher  # noqa: E402
from rtvc.voice import make_voice_model  # noqa: E402


def timed(fn, device: torch.device, reps: int) -> np.ndarray:
    """Per-call milliseconds (each call synchronised, so p99 is the real per-step latency)."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t0))
    return np.array(out)


def stats(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def bench_ops(device: torch.device, reps: int, quick: bool) -> list[dict]:
    rows = []
    for n in ([64] if quick else [1, 1024, 65536]):
        z, cb = torch.randn(n, 64, device=device), torch.randn(128, 64, device=device)
        fused = stats(timed(lambda: torch.ops.rtvc.vq_nearest(z, cb), device, reps))
        eager = stats(timed(lambda: vq_reference(z, cb), device, reps))
        rows.append({"op": "vq_nearest", "shape": f"N={n}, K=128, D=64", "fused": fused, "eager": eager,
                     "speedup_p50": eager["p50_ms"] / fused["p50_ms"]})
    for b in ([2] if quick else [1, 64, 1024]):
        C, A, T, K, d = 40, 32, 60, 3, 4
        args = [torch.randn(*s, device=device) * 0.3 for s in
                [(b, C, T), (b, A, T), (b, C, (K - 1) * d), (2 * C, K * C + A), (2 * C,), (C, C), (C,), (C, C), (b, C, T)]]
        fused = stats(timed(lambda: torch.ops.rtvc.student_layer(*args, d), device, reps))
        eager = stats(timed(lambda: layer_reference(*args, d), device, reps))
        rows.append({"op": "student_layer", "shape": f"B={b}, C={C}, A={A}, T={T}, K={K}, d={d}", "fused": fused,
                     "eager": eager, "speedup_p50": eager["p50_ms"] / fused["p50_ms"]})
    return rows


def bench_step(device: torch.device, reps: int, quick: bool) -> tuple[list[dict], int]:
    cfg = load_config()
    rows, capacity = [], 0
    batches = [1, 2] if quick else [1, 8, 64, 256, 1024, 2048]
    graphs = [False, True] if device.type == "cuda" else [False]
    for b in batches:
        for g in graphs:
            step = GraphStep(make_voice_model(cfg, ["a", "b", "c", "d"]), slots=b, device=device, use_graph=g)
            hops = torch.randn(b, step.hop, device=device) * 0.1
            act = torch.ones(b, dtype=torch.bool, device=device)
            s = stats(timed(lambda: step.step(hops, act), device, reps))
            rows.append({"batch": b, "cuda_graph": g, **s})
            print(f"step batch {b:5d} graph {g!s:5}: p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms", flush=True)
            if s["p99_ms"] <= 5.0 and (g or device.type != "cuda"):
                capacity = max(capacity, b)
            step = None  # free its buffers and graph before the next size
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, capacity


def bench_runner(device: torch.device, reps: int, quick: bool) -> list[dict]:
    """The server's runner (GraphRunner on CUDA, BatchedVoice elsewhere) as the server calls it: numpy hops for
    some active sessions of a fixed set of slots in, numpy out, host staging and synchronisation included."""
    from rtvc.batch import BatchedVoice
    from rtvc.centring import make_learner
    from rtvc.gpu_step import GraphRunner
    cfg = load_config()
    slots = 4 if quick else 128
    model = make_voice_model(cfg, ["a", "b", "c", "d"])
    model.content = {v: np.zeros(cfg.vqvae.code_dim, np.float32) for v in model.speakers}  # learners on
    learner = lambda: make_learner(model, cfg.engine)  # noqa: E731
    runner = (GraphRunner(model, slots, device, learner=learner) if device.type == "cuda"
              else BatchedVoice(model, slots, learner=learner))
    runner.warmup()
    sessions = [runner.acquire("a") for _ in range(slots)]
    rows = []
    for n in ([1, 2] if quick else [1, 8, 32, 64, 128]):
        hops = (np.random.default_rng(n).standard_normal((n, runner.hop)) * 0.1).astype(np.float32)
        s = stats(timed(lambda: runner.step(sessions[:n], hops), torch.device("cpu"), reps))
        rows.append({"runner": type(runner).__name__, "slots": slots, "active": n, **s})
        print(f"runner {type(runner).__name__} {n:4d}/{slots} active: p50 {s['p50_ms']:.3f} ms  "
              f"p99 {s['p99_ms']:.3f} ms", flush=True)
    return rows


def bench_vocoders(device: torch.device, quick: bool) -> dict:
    cfg = load_config()
    frames = 100 if quick else 1000  # 1 s / 10 s of audio
    mel = torch.randn(1, cfg.model.n_mels, frames, device=device)
    pitch = torch.stack([0.3 * torch.randn(1, frames, device=device), torch.ones(1, frames, device=device)], 1)
    out = {}
    for name, model, args in (("student", Student(cfg.model, cfg.student), (mel, pitch)),
                              ("pwg_paper_size_teacher", Teacher.build(cfg), (mel, pitch))):
        model = model.to(device).eval()
        with torch.inference_mode():
            ms = timed(lambda: model(*args), device, 3 if quick else 10)
        sec = frames * cfg.model.hop_length / cfg.model.sample_rate
        out[name] = {"params": sum(p.numel() for p in model.parameters()), "audio_seconds": sec,
                     "p50_ms": float(np.median(ms)), "x_realtime": sec / (float(np.median(ms)) / 1000)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the same code")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", help="JSON path (default bench/results/gpu/gpu_<device>.json)")
    a = p.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    reps = 20 if a.quick else a.reps
    result = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "device": name, "torch": torch.__version__,
              "ops": bench_ops(device, reps, a.quick)}
    for r in result["ops"]:
        print(f"{r['op']:<14} {r['shape']:<38} fused p50 {r['fused']['p50_ms']:.4f} ms, eager p50 "
              f"{r['eager']['p50_ms']:.4f} ms -> {r['speedup_p50']:.2f}x", flush=True)
    result["step"], result["realtime_streams_p99_le_5ms"] = bench_step(device, reps, a.quick)
    result["runner"] = bench_runner(device, reps, a.quick)
    result["vocoders"] = bench_vocoders(device, a.quick)
    print(f"largest batch with step p99 <= 5 ms: {result['realtime_streams_p99_le_5ms']} streams")
    for k, v in result["vocoders"].items():
        print(f"{k:<24} {v['params'] / 1e6:.2f}M params: {v['x_realtime']:.1f}x real time offline")
    path = Path(a.out or Path(__file__).parent / "results" / "gpu" / f"gpu_{name.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
