"""``rtvc bench``: what the streaming converter costs on this CPU, per 10 ms chunk, per stage.

Prints and saves JSON: parameters per stage, algorithmic latency (model and engine at 48 kHz), compute per
chunk (median, p99) per stage and in total at 1 and 2 torch threads, and the real-time factor (total / hop);
back to back, and paced (one chunk per hop duration, as live audio arrives: what a live stream sees).
Uses ``paths.model`` when set, else a randomly initialised model of the configured size (cost does not depend
on the weights).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .converter import DelayConverter
from .engine import StreamEngine
from .voice import STAGES, VoiceConverter, VoiceModel, make_voice_model


def _model(cfg: Config) -> tuple[VoiceModel, str]:
    if cfg.paths.model:
        return VoiceModel.load(cfg.paths.model), cfg.paths.model
    return make_voice_model(cfg, ["a", "b", "c", "d"]), "random init (no paths.model)"


def _speech_like(n: int, rate: int) -> np.ndarray:
    """Voiced harmonic signal with a gliding pitch and pauses (exercises the pitch tracker realistically)."""
    t = np.arange(n) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (np.sin(2 * np.pi * 1.5 * t) > -0.5)
    return (0.2 * x).astype(np.float32)


def measure(model: VoiceModel, seconds: float, threads: int, fused: bool = True, paced: bool = False) -> dict:
    """Per-hop compute over ``seconds`` of a speech-like signal. ``paced``: one hop per hop duration, as live
    audio arrives, instead of back to back. On a shared VM the paced figure is the one a live stream sees: in
    the idle time between hops other tenants evict the model's ~4 MB of weights from the shared cache (session
    22's VM: 0.89 ms back to back, 1.05 / 1.30 / 1.78 ms with 1 / 4 / 8 ms of busy-waiting between hops)."""
    torch.set_num_threads(threads)
    vc = VoiceConverter(model, profile=True, fused=fused)
    hop, rate = vc.hop, vc.sample_rate
    x = _speech_like(int(seconds * rate) // hop * hop, rate)
    for i in range(50):  # warm-up: first-call allocations, numba dispatch
        vc.convert(x[i * hop:(i + 1) * hop])
    vc.reset()
    vc.times.samples = {k: [] for k in STAGES}
    total = []
    start = time.perf_counter()
    for i in range(x.shape[0] // hop):
        if paced:
            time.sleep(max(0.0, start + i * hop / rate - time.perf_counter()))
        t0 = time.perf_counter()
        vc.convert(x[i * hop:(i + 1) * hop])
        total.append(time.perf_counter() - t0)
    hop_ms = 1000 * hop / rate
    stages = {k: {"median_ms": 1000 * float(np.median(v)), "p99_ms": 1000 * float(np.percentile(v, 99))}
              for k, v in vc.times.samples.items() if v}
    tot = {"median_ms": 1000 * float(np.median(total)), "p99_ms": 1000 * float(np.percentile(total, 99))}
    return {"threads": threads, "fused_cpu_kernel": fused, "paced": paced, "chunks": len(total), "stages": stages,
            "total": tot,
            "rtf_median": tot["median_ms"] / hop_ms, "rtf_p99": tot["p99_ms"] / hop_ms}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo) and core count, for results files: VMs of one kind differ."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def run_bench(cfg: Config, out: str | Path, seconds: float = 5.0) -> dict:
    model, source = _model(cfg)
    params = {"encoder": model.vqvae.encoder, "vq": model.vqvae.vq, "decoder": model.vqvae.decoder,
              "speakers": model.vqvae.speakers, "vocoder (student)": model.student,
              **({"phone recogniser": model.vqvae.phones} if model.vqvae.phones is not None else {})}
    n_params = {k: sum(p.numel() for p in m.parameters()) + (m.codebook.numel() if k == "vq" else 0)
                for k, m in params.items()}
    vc = VoiceConverter(model)
    engine48 = StreamEngine(DelayConverter(vc.sample_rate, vc.hop, vc.latency), 48000, cfg.engine)
    hop_ms = 1000 * vc.hop / vc.sample_rate
    result = {
        "command": "rtvc bench", "model": source, "machine": cpu_name(),
        "torch": torch.__version__, "params": n_params, "params_total": sum(n_params.values()),
        "hop_ms": hop_ms,
        "algorithmic_latency_ms": {"model": hop_ms + 1000 * vc.latency / vc.sample_rate,
                                   "engine_at_model_rate": StreamEngine(vc, vc.sample_rate, cfg.engine).algorithmic_latency_ms,
                                   "engine_at_48k": engine48.algorithmic_latency_ms},
        "runs": [measure(model, seconds, 1, True, paced=True)] +
                [measure(model, seconds, th, fused) for fused in (True, False) for th in (1, 2)],
    }
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"model: {source}\nmachine: {result['machine']}")
    print("parameters: " + ", ".join(f"{k} {v / 1e3:.1f}k" for k, v in n_params.items()) +
          f" (total {result['params_total'] / 1e6:.2f}M)")
    lat = result["algorithmic_latency_ms"]
    print(f"algorithmic latency: model {lat['model']:.2f} ms, engine {lat['engine_at_model_rate']:.2f} ms at "
          f"{vc.sample_rate} Hz, {lat['engine_at_48k']:.2f} ms at 48 kHz (+resampling)")
    for run in result["runs"]:
        path = "fused CPU kernel" if run["fused_cpu_kernel"] else "plain torch"
        pace = "one per hop duration, as live" if run["paced"] else "back to back"
        print(f"-- {run['threads']} thread(s), {path}, {run['chunks']} chunks of {hop_ms:.0f} ms {pace}: "
              "median / p99 ms")
        for k, v in run["stages"].items():
            print(f"   {k:<27} {v['median_ms']:7.3f} {v['p99_ms']:7.3f}")
        print(f"   {'total':<27} {run['total']['median_ms']:7.3f} {run['total']['p99_ms']:7.3f}   "
              f"RTF {run['rtf_median']:.3f} (p99 {run['rtf_p99']:.3f})")
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    print(f"saved {p}")
    return result
