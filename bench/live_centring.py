"""Source centring learned while they speak (engine.learn_content_*), against none and against a calibration,
on the product's live path: the test set's source sentences read as one session (0.5 s pauses), streamed hop by
hop through one converter per target (`pip install -e .[eval]`; a test set from `rtvc data testset`).

    python bench/live_centring.py                                  # -> bench/results/live_centring.json
    python bench/live_centring.py --set engine.learn_content_window_s=60

Per sentence and target: MCD against the parallel target utterance and similarity to the target (as `rtvc eval`),
for each of: no centring, learned centring, centring calibrated on all the session's sentences. Prints paired
differences (mean +- standard error over sentence x target) and when each learner's first estimate came.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtvc.centring import make_learner  # noqa: E402
from rtvc.config import load_config  # noqa: E402
from rtvc.evaluate import Metrics, _read, cosine, load_testset  # noqa: E402
from rtvc.voice import VoiceConverter, VoiceModel  # noqa: E402

SYSTEMS = ("none", "learned", "calibrated")


def paired(rows: list[dict], a: str, b: str, key: str) -> tuple[float, float, int]:
    by = {(r["i"], r["target"], r["system"]): r[key] for r in rows}
    d = [by[(i, t, a)] - by[(i, t, b)] for (i, t, s) in by if s == a]
    return float(np.mean(d)), float(np.std(d) / np.sqrt(len(d))), len(d)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="rtvc/models/default.pt")
    p.add_argument("--testset", default="data/testset")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. engine.learn_content_every_s=2")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "live_centring.json"))
    a = p.parse_args()
    cfg = load_config(overrides=a.set)
    model = VoiceModel.load(a.model)
    if make_learner(model, cfg.engine) is None:
        raise SystemExit("learning is off (engine.learn_content_every_s = 0) or the model has no voice content means")
    rate, hop = model.cfg.model.sample_rate, model.cfg.model.hop_length
    source, targets, items = load_testset(a.testset)
    xs = [_read(it.source_wav, rate) for it in items]
    xs = [np.pad(x, (0, (-len(x)) % hop)) for x in xs]
    pause = np.zeros(rate // 2, np.float32)
    spans, k = [], 0
    for x in xs:
        spans.append((k, k + len(x)))
        k += len(x) + len(pause)
    session = np.concatenate([y for x in xs for y in (x, pause)])
    calibrated = model.measure_content(np.concatenate(xs))
    metrics = Metrics()
    rows, first = [], {}
    for t in targets:
        ref_emb = np.mean([metrics.embed(_read(it.refs[t], rate), rate) for it in items], 0)
        outs = {}
        for name in SYSTEMS:
            learner = make_learner(model, cfg.engine) if name == "learned" else None
            vc = VoiceConverter(model, t, content=calibrated if name == "calibrated" else None, learner=learner)
            ys = []
            for i in range(0, len(session), hop):
                ys.append(vc.convert(session[i:i + hop]))
                if learner is not None and learner.updates and t not in first:
                    first[t] = (i + hop) / rate
            outs[name] = np.concatenate(ys)
            model.stop_streaming()
        for i, (it, (s0, s1)) in enumerate(zip(items, spans)):
            _, ref_mc = metrics.world(_read(it.refs[t], rate), rate)
            for name, y in outs.items():
                rows.append({"i": i, "target": t, "system": name, "start_s": s0 / rate,
                             "mcd_db": metrics.mcd(metrics.world(y[s0:s1], rate)[1], ref_mc),
                             "sim_target": cosine(metrics.embed(y[s0:s1], rate), ref_emb)})
        print(f"{t}: first learned estimate after {first.get(t, float('nan')):.1f} s", flush=True)
    summary = {f"{x} - {y}": {key: dict(zip(("mean", "se", "n"), paired(rows, x, y, key)))
                              for key in ("mcd_db", "sim_target")}
               for x, y in (("learned", "none"), ("calibrated", "none"), ("learned", "calibrated"))}
    for name, v in summary.items():
        print(f"{name:<22} MCD {v['mcd_db']['mean']:+.3f} +- {v['mcd_db']['se']:.3f} dB, similarity "
              f"{v['sim_target']['mean']:+.4f} +- {v['sim_target']['se']:.4f} (n={v['mcd_db']['n']})")
    means = {n: {k: float(np.mean([r[k] for r in rows if r["system"] == n])) for k in ("mcd_db", "sim_target")}
             for n in SYSTEMS}
    e = cfg.engine
    out = {"command": "python bench/live_centring.py " + " ".join(sys.argv[1:]), "model": a.model,
           "learn": {"every_s": e.learn_content_every_s, "window_s": e.learn_content_window_s,
                     "min_voiced_s": e.learn_content_min_voiced_s},
           "session_s": len(session) / rate, "first_estimate_s": first, "means": means, "paired": summary,
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
