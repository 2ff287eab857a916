"""How low can MCD go on the held-out test set? `rtvc eval` scores a conversion against the target's *parallel*
utterance: the same sentence read by the target voice. A perfect conversion keeps the source's rendering (its
timing, vowel qualities, coarticulation) and changes only the voice, so even it differs from that utterance by
whatever separates two renderings of one sentence. This measures that distance where it can: the same person read
by two different synthesisers (slt: flite vs festival's HTS voice; kal, the source: flite vs festival's diphone
voice), next to different people in the same engine, all scored exactly as `rtvc eval` scores MCD (WORLD
mel-cepstra at 16 kHz, c1..c24, DTW), and the converted pairs from the eval report for comparison.

    apt-get install festvox-us-slt-hts festvox-kallpc16k     # the second renderings (never training voices)
    python bench/mcd_floor.py [--testset data/testset] [--items 20] [--report docs/eval/eval.json]
    # table; bench/results/mcd_floor.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from rtvc.data.synth import TTSVoice, synthesize
from rtvc.evaluate import Metrics, _read, load_testset

# The same person as a test-set voice, rendered by another engine. Never training voices: kal is the held-out
# source, and slt's HTS voice is slt again.
OTHER_ENGINE = {"slt": TTSVoice("slt-hts", "festival", "cmu_us_slt_arctic_hts", "female", "festvox-us-slt-hts"),
                "kal": TTSVoice("kal-festival", "festival", "kal_diphone", "male", "festvox-kallpc16k")}
# Different people, one engine: the scale of a speaker change
SAME_ENGINE = [("awb", "rms"), ("awb", "slt"), ("rms", "slt"), ("esf", "esm")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testset", default="data/testset")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--report", default="docs/eval/eval.json", help="an `rtvc eval` report to compare with")
    ap.add_argument("--out", default="bench/results/mcd_floor.json")
    args = ap.parse_args()
    missing = [v.package for v in OTHER_ENGINE.values() if not v.installed]
    if missing:
        raise SystemExit(f"needs festival and the Debian packages {' '.join(missing)} (apt-get install ...)")
    rate = 24000
    source, targets, items = load_testset(args.testset)
    items = items[: args.items]
    m = Metrics()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, it in enumerate(items):
            wav = {source: _read(it.source_wav, rate), **{t: _read(it.refs[t], rate) for t in targets}}
            mc = {v: m.world(x, rate)[1] for v, x in wav.items()}
            for v, other in OTHER_ENGINE.items():
                if v not in mc:
                    continue
                path = Path(tmp) / f"{other.name}_{i}.wav"
                err = synthesize(other, it.text, path)
                if err is not None:
                    raise SystemExit(f"{other.name} could not say {it.text!r}: {err}")
                name = f"same person, other synthesiser: {v} ({other.engine} {other.voice} vs {v}'s test voice)"
                rows.setdefault(name, []).append(m.mcd(m.world(_read(path, rate), rate)[1], mc[v]))
            for a, b in SAME_ENGINE:
                if a in mc and b in mc:
                    rows.setdefault(f"different people, same engine: {a} vs {b}", []).append(m.mcd(mc[a], mc[b]))
    results = {k: {"mcd_db": float(np.mean(v)), "sem": float(np.std(v) / np.sqrt(len(v))), "n": len(v)}
               for k, v in rows.items()}
    report = Path(args.report)
    if report.is_file():
        data = json.loads(report.read_text())
        for system, s in data["summary"].items():
            for tgt, r in [*s["per_target"].items(), ("overall", s["overall"])]:
                pair = "overall" if tgt == "overall" else f"{source} → {tgt}"
                results[f"{system} (the report): {pair}"] = {"mcd_db": float(r["mcd_db"]), "n": None, "sem": None}
    print(f"{args.testset}: {len(items)} sentences; MCD as `rtvc eval` computes it")
    print("| pair | MCD dB |\n|---|---|")
    for k, r in results.items():
        sem = f" ± {r['sem']:.2f}" if r["sem"] is not None else ""
        print(f"| {k} | {r['mcd_db']:.2f}{sem} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"testset": args.testset, "items": len(items), "report": args.report,
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
