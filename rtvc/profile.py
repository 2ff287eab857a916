"""``rtvc profile``: how much delay a user gets, and where it goes.

Local engine: a chirp train streams through StreamEngine + the converter on a real-time clock (worker thread,
paced push/pull like a sound card); the delay is *measured* by cross-correlating the output's energy envelope
with the input's, and compared with the algorithmic latency; per-stage compute comes from the converter.
Server (``--server URL``, or ``--serve`` to start one in-process): the same signal at real-time pace over protocol
v1; output placed on a playback timeline by arrival time gives the measured end-to-end delay; echoed frame
times give round trips; ``--max-clients N`` loads 1, 2, 4, ... concurrent simulated clients and reports the
largest count that stays real time (no drops, round-trip p99 within the backlog bound).
Writes JSON and a PNG (round-trip histogram + timeline, stage compute, the delay correlation).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np

from .client import Received, round_trips_ms, stream_array
from .config import Config
from .convert import load_converter
from .engine import StreamEngine, WarmedThread, settle_heap, warm_up


def chirp_train(seconds: float, rate: int, period: float = 0.25, length: float = 0.02) -> np.ndarray:
    """Short rising chirps (300 Hz -> 3 kHz) every ``period`` s with slightly jittered spacing (no aliasing of
    the delay estimate to a multiple of the period)."""
    x = np.zeros(int(seconds * rate), np.float32)
    n = int(length * rate)
    t = np.arange(n) / rate
    c = np.sin(2 * np.pi * (300 * t + 0.5 * (3000 - 300) / length * t * t)) * np.hanning(n)
    rng = np.random.default_rng(0)
    pos = int(0.1 * rate)
    while pos + n < x.shape[0]:
        x[pos: pos + n] = 0.5 * c
        pos += int((period + rng.uniform(-0.05, 0.05)) * rate)
    return x


def envelope(x: np.ndarray, rate: int) -> np.ndarray:
    k = max(1, int(0.002 * rate))
    e = np.convolve(np.abs(x), np.ones(k) / k, mode="same")
    return e - e.mean()


def measured_delay(x: np.ndarray, y: np.ndarray, rate: int, max_ms: float = 500.0
                   ) -> tuple[float | None, np.ndarray]:
    """Lag (ms) maximising the correlation of the output envelope with the input's (None when the best
    normalised correlation is below 0.3: the output does not follow the input, e.g. an untrained model), and
    the normalised correlation curve."""
    n = min(x.shape[0], y.shape[0])
    ex, ey = envelope(x[:n], rate), envelope(y[:n], rate)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(ey, size) * np.conj(np.fft.rfft(ex, size)), size)[: int(max_ms * rate / 1000)]
    xc = xc / (np.linalg.norm(ex) * np.linalg.norm(ey) + 1e-12)
    best = int(np.argmax(xc))
    return (1000.0 * best / rate if xc[best] >= 0.3 else None), xc


def profile_local(cfg: Config, seconds: float, rate: int, block_ms: float) -> dict:
    conv = load_converter(cfg)
    if hasattr(conv, "profile"):
        conv.profile = True
    block = round(rate * block_ms / 1000)
    engine = StreamEngine(conv, rate, cfg.engine, extra_latency=block + round(rate * cfg.engine.safety_ms / 1000))
    x = chirp_train(seconds, rate)
    y = np.zeros_like(x)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            if engine.step() == 0:
                time.sleep(0.001)

    settle_heap()  # as `rtvc live` does, before the warm-up (see there)
    w = WarmedThread(lambda: warm_up(conv, 5), work, name="rtvc-profile-worker")
    w.start_warmed()  # warmed on the converting thread, before the clock starts (as `rtvc live` does)
    if hasattr(conv, "times"):
        conv.times.samples = {k: [] for k in conv.times.samples}
    t0 = time.perf_counter()
    for k in range(x.shape[0] // block):  # the "sound card": a block in, a block out, on the clock
        time.sleep(max(0.0, t0 + (k + 1) * block / rate - time.perf_counter()))
        engine.push(x[k * block:(k + 1) * block])
        engine.pull(y[k * block:(k + 1) * block])
    stop.set()
    w.join()
    delay, xc = measured_delay(x, y, rate)
    st = engine.stats()
    stages = {}
    if hasattr(conv, "times"):
        stages = {k: {"p50_ms": 1000 * float(np.median(v)), "p99_ms": 1000 * float(np.percentile(v, 99))}
                  for k, v in conv.times.samples.items() if v}
    return {"converter": conv.name, "sample_rate": rate, "block_ms": block_ms,
            "algorithmic_latency_ms": engine.algorithmic_latency_ms, "nominal_latency_ms": engine.latency_ms,
            "measured_delay_ms": delay, "stages": stages,
            "compute_ms": {"p50": st.compute_ms_p50, "p99": st.compute_ms_p99},
            "rtf": st.compute_ms_p50 / (1000 * engine.hop / engine.model_rate),
            "underruns": st.underruns, "dropped": st.dropped, "_xcorr": xc}


def playback_timeline(frames: list[Received], t0: float, rate: int, n: int) -> np.ndarray:
    """Place received audio as a player that starts each frame on arrival (never earlier than the previous end)."""
    y = np.zeros(n + rate, np.float32)
    cursor = 0
    for f in frames:
        start = max(cursor, int((f.arrival - t0) * rate))
        m = min(f.samples.shape[0], y.shape[0] - start)
        if m > 0:
            y[start: start + m] = f.samples[:m]
        cursor = start + max(m, 0)
    return y[:n]


async def _one_client(url: str, x: np.ndarray, rate: int, block: int, token: str | None) -> dict:
    y, frames, c = await stream_array(url, x, rate, block, realtime=True, token=token)
    rtt = round_trips_ms(frames)
    return {"x": x, "frames": frames, "t0": c.t0, "rtt": rtt, "end": c.end or {}, "latency_ms": c.latency_ms}


def profile_server(url: str, seconds: float, rate: int, block_ms: float, token: str | None, max_clients: int,
                   backlog_ms: float) -> dict:
    block = round(rate * block_ms / 1000)
    x = chirp_train(seconds, rate)
    one = asyncio.run(_one_client(url, x, rate, block, token))
    y = playback_timeline(one["frames"], one["t0"], rate, x.shape[0])
    delay, xc = measured_delay(x, y, rate)
    rtt = one["rtt"]
    out = {"url": url, "sample_rate": rate, "block_ms": block_ms, "algorithmic_latency_ms": one["latency_ms"],
           "measured_delay_ms": delay,
           "round_trip_ms": {q: float(np.percentile(rtt, int(q[1:]))) for q in ("p50", "p95", "p99")},
           "dropped_samples": one["end"].get("dropped_samples"), "_rtt": rtt, "_xcorr": xc, "capacity": []}
    n = 1
    while n <= max_clients:  # load: n concurrent real-time clients, short runs
        async def load(k: int) -> list[dict]:
            xs = chirp_train(min(seconds, 4.0), rate)
            return await asyncio.gather(*(_one_client(url, xs, rate, block, token) for _ in range(k)))
        runs = asyncio.run(load(n))
        drops = sum(r["end"].get("dropped_samples", 0) or 0 for r in runs)
        p99 = float(np.percentile(np.concatenate([r["rtt"] for r in runs]), 99))
        ok = drops == 0 and p99 <= one["latency_ms"] + backlog_ms + 2 * block_ms
        # the batched step's time as the sessions saw it (the server's own measure): tells a slow step from
        # a slow event loop or client when capacity runs out
        steps = [r["end"].get("compute_ms") or {} for r in runs]
        p50s, p99s = [c["p50"] for c in steps if "p50" in c], [c["p99"] for c in steps if "p99" in c]
        out["capacity"].append({"clients": n, "dropped_samples": int(drops), "round_trip_p99_ms": p99, "real_time": ok,
                                "server_step_ms_p50": float(np.median(p50s)) if p50s else None,
                                "server_step_ms_p99": float(max(p99s)) if p99s else None})
        if not ok:
            break
        n *= 2
    good = [c["clients"] for c in out["capacity"] if c["real_time"]]
    out["max_realtime_clients"] = max(good) if good else 0
    return out


def _plot(path: Path, local: dict | None, server: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    if server:
        rtt = server["_rtt"]
        ax[0, 0].hist(rtt, bins=50)
        ax[0, 0].set_title(f"round trip (ms): p50 {np.percentile(rtt, 50):.1f}, p99 {np.percentile(rtt, 99):.1f}")
        ax[0, 1].plot(rtt, lw=0.7)
        ax[0, 1].set_title("round trip per frame (ms)")
        ax[0, 1].set_xlabel("frame")
    if local and local["stages"]:
        names = list(local["stages"])
        ax[1, 0].barh(names, [local["stages"][k]["p50_ms"] for k in names], label="p50")
        ax[1, 0].barh(names, [local["stages"][k]["p99_ms"] - local["stages"][k]["p50_ms"] for k in names],
                      left=[local["stages"][k]["p50_ms"] for k in names], alpha=0.4, label="p99")
        ax[1, 0].set_title("compute per 10 ms hop (ms)")
        ax[1, 0].legend()
    elif server and server["capacity"]:
        cap = server["capacity"]
        ax[1, 0].plot([c["clients"] for c in cap], [c["round_trip_p99_ms"] for c in cap], "o-")
        ax[1, 0].set_xscale("log", base=2)
        ax[1, 0].set_title(f"round trip p99 vs concurrent clients (real time up to {server['max_realtime_clients']})")
        ax[1, 0].set_xlabel("clients")
    for res, style, label in ((local, "-", "local engine"), (server, "--", "server")):
        if res:
            xc = res["_xcorr"]
            t = 1000 * np.arange(xc.shape[0]) / res["sample_rate"]
            d = res["measured_delay_ms"]
            ax[1, 1].plot(t, xc, style, label=f"{label}: " + (f"measured {d:.1f} ms" if d is not None else
                                                              "not measurable (output does not follow input)"))
    ax[1, 1].set_title("output/input envelope correlation (normalised) vs delay")
    ax[1, 1].set_xlabel("delay (ms)")
    ax[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_profile(cfg: Config, out_dir: str | Path, *, local: bool, server_url: str | None, serve: bool,
                seconds: float, rate: int, block_ms: float, max_clients: int, token: str | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_local = profile_local(cfg, seconds, rate, block_ms) if local else None
    res_server, running = None, None
    if serve and not server_url:
        from .server import Server, make_runner
        server = Server(cfg.replace(**{"server.port": 0}), make_runner(cfg))
        loop = asyncio.new_event_loop()
        ready = loop.create_future()
        running = threading.Thread(target=lambda: loop.run_until_complete(server.run(ready)), daemon=True)
        running.start()
        while not ready.done():
            time.sleep(0.01)
        server_url = f"ws://127.0.0.1:{ready.result()}/v1/stream"
    try:
        if server_url:
            res_server = profile_server(server_url, seconds, rate, block_ms, token or cfg.server.token or None,
                                        max_clients, cfg.engine.max_backlog_ms)
    finally:
        if running is not None:
            server.request_stop()
            running.join(timeout=20)
    _plot(out / "profile.png", res_local, res_server)
    clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v
             for k, v in {"local": res_local, "server": res_server}.items() if v is not None}
    (out / "profile.json").write_text(json.dumps(clean, indent=2))
    return clean


def _ms(v: float | None) -> str:
    return f"{v:.2f} ms" if v is not None else "not measurable (output does not follow the input: untrained model?)"


def describe(result: dict) -> str:
    lines = []
    if "local" in result:
        r = result["local"]
        lines.append(f"local engine ({r['converter']}, {r['sample_rate']} Hz, {r['block_ms']:g} ms blocks): "
                     f"algorithmic {r['algorithmic_latency_ms']:.2f} ms, nominal {r['nominal_latency_ms']:.2f} ms, "
                     f"measured {_ms(r['measured_delay_ms'])}; compute p50 {r['compute_ms']['p50']:.3f} ms "
                     f"p99 {r['compute_ms']['p99']:.3f} ms per hop (RTF {r['rtf']:.3f}); underruns {r['underruns']}, "
                     f"dropped {r['dropped']}")
        for k, v in r["stages"].items():
            lines.append(f"  {k:<28} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
    if "server" in result:
        r = result["server"]
        q = r["round_trip_ms"]
        lines.append(f"server {r['url']}: algorithmic {r['algorithmic_latency_ms']:.2f} ms, measured end-to-end "
                     f"{_ms(r['measured_delay_ms'])}, round trip p50 {q['p50']:.2f} p95 {q['p95']:.2f} "
                     f"p99 {q['p99']:.2f} ms, dropped {r['dropped_samples']}")
        for c in r["capacity"]:
            step = (f", server step p50 {c['server_step_ms_p50']:.2f} p99 {c['server_step_ms_p99']:.2f} ms"
                    if c.get("server_step_ms_p50") is not None else "")
            lines.append(f"  {c['clients']:>4} clients: round trip p99 {c['round_trip_p99_ms']:.1f} ms, dropped "
                         f"{c['dropped_samples']}{step} -> {'real time' if c['real_time'] else 'NOT real time'}")
        lines.append(f"  largest real-time client count tried: {r['max_realtime_clients']}")
    return "\n".join(lines)
