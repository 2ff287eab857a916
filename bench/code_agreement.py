"""How source-invariant are a model's codes? For every two voices of the held-out test set reading the same
sentence, the share of speech frames on which the encoder picks the same code once the readings are aligned (DTW on
the encoder's unit-norm content, as cross-voice training aligns them: :func:`rtvc.data.dataset.dtw_warp`).

Why: a conversion keeps the source's code sequence and renders it in the target's voice; the decoder learned each
voice from that voice's own codes, so the further a source's codes are from a target's for the same words, the more
foreign the sequence it is asked to render. Measured on the bundled models (20 sentences; session 16): the held-out
source (kal) agrees with the five target voices on 16% of frames where the training voices agree with each other
on 25-41%, and the phone loss that took MCD from 6.80 to 6.55 dB raised kal's agreement from 11% to 16%.

    python bench/code_agreement.py [--model rtvc/models/default.pt] [--testset data/testset] [--items 20]
    # matrix; bench/results/code_agreement.json
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rtvc.data.dataset import dtw_warp
from rtvc.evaluate import _read, load_testset
from rtvc.voice import VoiceModel


def codes(model: VoiceModel, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A recording -> (unit-norm content [D, T], code indices [T], speech mask [T]: frames whose mean log-mel is
    above the utterance's 30th percentile, so that pauses, which every voice codes alike, do not count)."""
    hop = model.cfg.model.hop_length
    x = _read(path, model.cfg.model.sample_rate)
    x = np.pad(x, (0, (-len(x)) % hop)).astype(np.float32)
    with torch.no_grad():
        mel, _ = model.frontend(torch.from_numpy(x)[None])
        z = model.vqvae.encoder(mel)[0]
        idx = model.vqvae.vq.nearest(z.t()).numpy()
    level = mel[0].mean(0).numpy()
    return F.normalize(z, dim=0).numpy(), idx, level > np.percentile(level, 30)


def agreement(a: tuple, b: tuple) -> float:
    """Share of B's speech frames whose code is the code of A's frame aligned to it."""
    (za, ca, _), (zb, cb, speech) = a, b
    return float((ca[dtw_warp(za, zb)] == cb)[speech].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rtvc/models/default.pt")
    ap.add_argument("--testset", default="data/testset")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--out", default="bench/results/code_agreement.json")
    args = ap.parse_args()
    model = VoiceModel.load(args.model)
    source, targets, items = load_testset(args.testset)
    items = items[: args.items]
    voices = [source, *targets]
    per: dict[tuple[str, str], list[float]] = {pair: [] for pair in combinations(voices, 2)}
    for it in items:
        c = {v: codes(model, it.source_wav if v == source else it.refs[v]) for v in voices}
        for a, b in per:  # both directions: each side's speech frames
            per[a, b].append(0.5 * (agreement(c[a], c[b]) + agreement(c[b], c[a])))
    mean = {pair: float(np.mean(v)) for pair, v in per.items()}
    print(f"code agreement of aligned speech frames ({args.model}, {len(items)} sentences)")
    print("       " + "".join(f"{v:>7s}" for v in voices))
    for a in voices:
        row = [mean.get((a, b), mean.get((b, a), np.nan)) if a != b else np.nan for b in voices]
        print(f"{a:>7s}" + "".join("      -" if np.isnan(x) else f"{x:7.3f}" for x in row))
    src = float(np.mean([mean[p] for p in mean if source in p]))
    rest = float(np.mean([mean[p] for p in mean if source not in p]))
    print(f"held-out source ({source}) with the targets: {src:.3f}; the targets with each other: {rest:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "items": len(items), "source": source,
                               "source_with_targets": src, "targets_with_each_other": rest,
                               "pairs": {f"{a}-{b}": v for (a, b), v in mean.items()}}, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
