"""How good is the causal YIN tracker? Frame by frame against WORLD harvest (offline, the eval's F0 reference) on a
test set (`rtvc data testset`): voicing recall, gross pitch errors (|ln ratio| > 0.3 where both are voiced),
false voicing, and the log-F0 correlation on frames voiced by both, for the tracker at the config and for
ablations of its rules.

    python bench/pitch_tracker.py [--testset data/testset] [--items 5]   # table; bench/results/pitch_tracker.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from rtvc.config import ModelConfig, load_config
from rtvc.evaluate import Metrics, _read, load_testset
from rtvc.frontend import Frontend, yin

GROSS = 0.3  # |ln F0 ratio|: ~5 semitones, far beyond tracking jitter


def variants(m: ModelConfig) -> dict[str, ModelConfig]:
    """The tracker at the config, and what each of its rules buys."""
    never = 10 ** 6
    return {
        "tracker (config)": m,
        "no release": dataclasses.replace(m, yin_release_frames=0),
        "no rough onsets": dataclasses.replace(m, yin_confirm_frames=never),
        "strict YIN only": dataclasses.replace(m, yin_voicing_threshold=m.yin_threshold, yin_confirm_frames=never),
        "loose, no tracking": dataclasses.replace(m, yin_hold_frames=1, yin_max_jump=1.0, yin_confirm_frames=1,
                                                  yin_release_frames=0),
    }


def score(lf0: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """[both voiced, ref voiced, gross, false voiced, sum a, sum b, sum aa, sum bb, sum ab] over frames."""
    n = min(lf0.shape[0], ref.shape[0])
    a, b = lf0[:n], ref[:n]
    both = ~np.isnan(a) & ~np.isnan(b)
    x, y = a[both], b[both]
    return np.array([both.sum(), (~np.isnan(b)).sum(), (np.abs(x - y) > GROSS).sum(), (np.isnan(b) & ~np.isnan(a)).sum(),
                     x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testset", default="data/testset")
    ap.add_argument("--items", type=int, default=5)
    ap.add_argument("--out", default="bench/results/pitch_tracker.json")
    args = ap.parse_args()
    cfg = load_config().model
    rate, hop = cfg.sample_rate, cfg.hop_length
    source, targets, items = load_testset(args.testset)
    fe = Frontend(cfg)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for spk in [source, *targets]:
        acc = {name: np.zeros(9) for name in variants(cfg)}
        for it in items[: args.items]:
            x = _read(it.source_wav if spk == source else it.refs[spk], rate)
            x = np.pad(x, (0, (-x.shape[0]) % hop))
            ref = Metrics.world(x, rate)[0][:: round(cfg.hop_ms / 5.0)]  # harvest at 5 ms -> our frame rate
            with torch.no_grad():
                frames = fe.frames(torch.from_numpy(x[None]))[0].numpy()
            for name, m in variants(cfg).items():
                f0, v = yin(frames, m)
                acc[name] += score(np.where(v, np.log(np.maximum(f0, 1e-3)), np.nan), ref)
        for name, (both, ref_v, gross, false, sa, sb, saa, sbb, sab) in acc.items():
            cov = sab / both - sa * sb / both ** 2
            corr = cov / np.sqrt((saa / both - (sa / both) ** 2) * (sbb / both - (sb / both) ** 2))
            results.setdefault(name, {})[spk] = {"recall": both / ref_v, "gross": gross / both,
                                                 "false": false / ref_v, "lf0_corr": float(corr)}
    speakers = [source, *targets]
    print(f"recall / gross / false voicing / log-F0 corr vs WORLD harvest, {args.items} utterances per voice "
          f"(source: {source})")
    print("| rules | " + " | ".join(speakers) + " |")
    print("|---|" + "---|" * len(speakers))
    for name, per in results.items():
        cells = [f"{r['recall']:.2f} / {r['gross']:.3f} / {r['false']:.3f} / {r['lf0_corr']:.2f}"
                 for r in (per[s] for s in speakers)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"testset": args.testset, "items": args.items, "results": results}, indent=1))


if __name__ == "__main__":
    main()
