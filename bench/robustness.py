"""How well does a voice model hold up when the input is a microphone in a room? The held-out test set's source
converted clean, behind noise, and through simulated rooms (pyroomacoustics image-source rooms: a different room
model from the training augmentation's exponential tails), scored as `rtvc eval` scores it: speaker similarity to
the target and to the source, MCD against the target's parallel (clean) utterance, log-F0 correlation with the
clean source's contour.

    pip install pyroomacoustics          # the `bench` extra
    python bench/robustness.py --model rtvc/models/default.pt [--items 6]   # table; bench/results/robustness.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.signal import lfilter

from rtvc.evaluate import FRAME_MS, Metrics, _read, contour_delay, cosine, load_testset
from rtvc.frontend import measure_pitch
from rtvc.voice import VoiceConverter, VoiceModel


def room_ir(rate: int, dims: list[float], rt60: float, src: list[float], mic: list[float]) -> np.ndarray:
    """Room impulse response [n] of a shoebox room with the given RT60 (Sabine), by the image-source method."""
    import pyroomacoustics as pra
    absorption, order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=rate, materials=pra.Material(absorption), max_order=order)
    room.add_source(src)
    room.add_microphone(mic)
    room.compute_rir()
    return np.asarray(room.rir[0][0], np.float64)


def conditions(rate: int, seed: int = 0) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    rng = np.random.default_rng(seed)

    def noise(snr_db: float, brown: bool = False) -> Callable[[np.ndarray], np.ndarray]:
        def add(x: np.ndarray) -> np.ndarray:
            n = rng.standard_normal(x.size)
            if brown:  # -6 dB / octave (a leaky integrator, so it stays centred): rumble, fans, traffic
                n = lfilter([1.0], [1.0, -0.98], n)
            n = n / np.sqrt((n ** 2).mean()) * np.sqrt((x ** 2).mean() / 10 ** (snr_db / 10))
            return (x + n).astype(np.float32)
        return add

    def room(ir: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        def conv(x: np.ndarray) -> np.ndarray:
            y = np.convolve(x, ir)[: x.size]
            return (y * np.abs(x).max() / np.abs(y).max()).astype(np.float32)
        return conv

    small = room_ir(rate, [4.0, 3.5, 2.7], 0.3, [1.0, 1.5, 1.5], [2.0, 1.8, 1.4])     # ~1 m away
    large = room_ir(rate, [8.0, 6.0, 3.5], 0.7, [2.0, 2.0, 1.6], [4.0, 3.5, 1.4])     # ~2.5 m away
    n20 = noise(20.0)
    return {"clean": lambda x: x, "white noise 20 dB": n20, "brown noise 10 dB": noise(10.0, brown=True),
            "room RT60 0.3 s, 1 m": room(small), "room RT60 0.7 s, 2.5 m": room(large),
            "room 0.3 s + noise 20 dB": lambda x: n20(room(small)(x))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rtvc/models/default.pt")
    ap.add_argument("--testset", default="data/testset")
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--out", default="bench/results/robustness.json")
    args = ap.parse_args()
    model = VoiceModel.load(args.model)
    rate = model.cfg.model.sample_rate
    source, targets, items = load_testset(args.testset)
    items = items[: args.items]
    m = Metrics()
    lag = None  # the model's contour delay: measured on the clean input, then held for every condition
    clean = [_read(it.source_wav, rate) for it in items]
    clean = [x[: x.size // model.cfg.model.hop_length * model.cfg.model.hop_length] for x in clean]
    src_lf0 = [m.contour(x, rate) for x in clean]
    ref_emb = {t: np.mean([m.embed(_read(it.refs[t], rate), rate) for it in items], 0) for t in targets}
    ref_mc = {(t, i): m.world(_read(it.refs[t], rate), rate)[1] for t in targets for i, it in enumerate(items)}
    src_emb = np.mean([m.embed(x, rate) for x in clean], 0)
    results: dict[str, dict[str, float]] = {}
    print(f"{args.model}: {len(items)} sentences x {len(targets)} targets, source {source}")
    print("| input | sim → target ↑ | sim → source ↓ | MCD dB ↓ | log-F0 corr ↑ |\n|---|---|---|---|---|")
    for name, f in conditions(rate).items():
        xs = [f(x) for x in clean]
        stats = measure_pitch(np.concatenate(xs), model.cfg.model)  # the user calibrates in their own room
        rows, pairs = [], []
        for tgt in targets:
            for i, x in enumerate(xs):
                y = VoiceConverter(model, tgt, source=stats).convert(x)
                e = m.embed(y, rate)
                rows.append([cosine(e, ref_emb[tgt]), cosine(e, src_emb), m.mcd(m.world(y, rate)[1], ref_mc[tgt, i])])
                pairs.append((m.contour(y, rate), src_lf0[i]))
        if lag is None:
            lag = contour_delay(pairs)[0]
            print(f"contour delay {lag * FRAME_MS:g} ms")
        for row, (a, b) in zip(rows, pairs):
            row.append(m.lf0_corr(a, b, lag))
        r = np.nanmean(np.array(rows), axis=0)
        results[name] = dict(zip(("sim_target", "sim_source", "mcd_db", "lf0_corr"), map(float, r)))
        print(f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.2f} | {r[3]:.3f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "testset": args.testset, "items": len(items),
                                          "lf0_lag_ms": lag * FRAME_MS, "results": results}, indent=1))


if __name__ == "__main__":
    main()
