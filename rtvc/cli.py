"""The ``rtvc`` command line."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from importlib import resources
from pathlib import Path

from .config import Config, ConfigError, load_config

EPILOG = """\
first steps:
  rtvc devices                          list microphones and speakers (works without a sound card)
  rtvc voices                           the voices of the configured model (paths.model)
  rtvc convert in.wav out.wav --voice slt --transpose 3
  rtvc convert --sample out.wav         convert the bundled speech sample
  rtvc live                             microphone -> voice changer -> speakers (Ctrl-C to stop)
  rtvc live --input-device USB --output-device 3 --voice awb
  rtvc config                           print the resolved configuration

train your own voices:
  rtvc data synth                       multi-speaker corpus from offline TTS (or bring VCTK/LibriTTS/folders)
  rtvc data prepare data/synth          resample, trim, split, cache features -> data/cache
  rtvc train vqvae && rtvc train teacher && rtvc train student    (resumable; torchrun for many GPUs/nodes)
  rtvc --set paths.model=checkpoints/model.pt convert in.wav out.wav --voice slt
  rtvc bench                            latency, per-stage compute and real-time factor on this CPU

every default is in config.toml; change any of it per run with --set section.key=value
(e.g. --set engine.max_backlog_ms=80) or with --config my.toml (only the keys you set).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtvc", description="rtvc: streaming real-time voice changer.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="user config file (TOML) applied over the defaults")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config value (repeatable); the value is TOML, bare words are strings")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("devices", help="list audio devices (says so clearly when there are none)")

    c = sub.add_parser("config", help="print the resolved configuration as TOML")
    c.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    v = sub.add_parser("convert", help="convert an audio file through the streaming engine",
                       description="Convert a file chunk by chunk through the same streaming engine as `live`; the "
                                   "output has the input's length and rate, with the latency removed.")
    v.add_argument("input", nargs="?", help="input audio file (wav/flac/ogg; stereo is mixed to mono)")
    v.add_argument("output", help="output wav file")
    v.add_argument("--sample", action="store_true", help="use the bundled speech sample as input")
    v.add_argument("--voice", help="target voice name (see `rtvc voices`; default: the model's first)")
    v.add_argument("--transpose", type=float, default=0.0, help="pitch shift in semitones (default 0)")
    v.add_argument("--model", help="voice model file (default: paths.model)")
    v.add_argument("--passthrough", action="store_true",
                   help="no voice model: your own voice through the same engine (same as --model passthrough)")
    v.add_argument("--block-ms", type=float, default=10.0, help="streaming block size in ms (default 10)")

    vo = sub.add_parser("voices", help="list the voices of the voice model")
    vo.add_argument("--model", help="voice model file (default: paths.model)")

    dt = sub.add_parser("data", help="build or prepare a training corpus")
    dsub = dt.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    sy = dsub.add_parser("synth", help="synthesise a multi-speaker corpus with flite / espeak-ng")
    sy.add_argument("--out", help="output folder (default: <paths.data_dir>/synth)")
    sy.add_argument("--sentences", type=int, default=200, help="sentences per voice (default 200)")
    sy.add_argument("--voices", help="comma-separated subset of: awb,rms,slt,kal,esf,esm")
    sy.add_argument("--jobs", type=int, default=2, help="parallel TTS processes")
    sy.add_argument("--seed", type=int, default=0, help="sentence generator seed")
    pr = dsub.add_parser("prepare", help="cache features of a corpus (VCTK, LibriTTS or folder-per-speaker)")
    pr.add_argument("corpus", help="corpus folder")
    pr.add_argument("--out", help="cache folder (default: <paths.data_dir>/cache)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="share of sentences held out for validation")
    pr.add_argument("--min-seconds", type=float, default=0.5, help="clips shorter than this (after trimming) are errors")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable / too-short / mismatched files, listing them")
    pr.add_argument("--band-hz", type=float, default=0.0,
                    help="keep nothing above this frequency (8000: wideband recordings added to the bundled voices, "
                         "which were trained on 16 kHz audio)")

    ts = dsub.add_parser("testset", help="held-out parallel test set for `rtvc eval` (new sentences, unseen source)")
    ts.add_argument("--out", help="output folder (default: <paths.data_dir>/testset)")
    ts.add_argument("--source", default="kal", help="source voice, never a target (default kal)")
    ts.add_argument("--targets", default="awb,rms,slt,esf,esm", help="comma-separated target voices")
    ts.add_argument("--sentences", type=int, default=20)
    ts.add_argument("--exclude", action="append", default=[],
                    help="prepared cache or test set whose sentences must not appear (repeatable; default "
                         "<paths.data_dir>/cache when it exists)")
    ts.add_argument("--seed", type=int, default=9999,
                    help="sentence generator seed (9999: the bundled model's test set; another seed, with that test "
                         "set excluded, gives a development set to tune on)")

    ev = sub.add_parser("eval", help="speaker similarity, MCD, log-F0 correlation, RTF vs baselines on a test set")
    ev.add_argument("--model", help="voice model file (default: paths.model)")
    ev.add_argument("--testset", help="folder with testset.json (default: <paths.data_dir>/testset)")
    ev.add_argument("--teacher", help="teacher checkpoint for the offline teacher-pipeline baseline")
    ev.add_argument("--out", default="eval", help="folder for eval.json, eval.md and spectrograms/")
    ev.add_argument("--max-items", type=int, help="evaluate only the first N sentences")

    tr = sub.add_parser("train", help="train a stage: vqvae, teacher, student (resumes from its checkpoint), or phones "
                                      "(a phone recogniser added to a voice model: --init MODEL --out FILE)")
    tr.add_argument("stage", choices=["vqvae", "teacher", "student", "phones"])
    tr.add_argument("--data", help="prepared cache folder (default: <paths.data_dir>/cache)")
    tr.add_argument("--steps", type=int, help="total steps for this stage (default: train.<stage>_steps)")
    tr.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    tr.add_argument("--finetune", action="store_true",
                    help="continue from the checkpoint even though [model] changed (e.g. pitch tracker settings) or the "
                         "corpus gained voices (new speaker rows; the checkpoint's mel normalisation is kept)")
    tr.add_argument("--init", metavar="MODEL",
                    help="start a stage that has no checkpoint yet from a voice-model file's weights (vqvae or "
                         "student; e.g. rtvc/models/default.pt to add your voices to the bundled ones), or a teacher "
                         "in its mel normalisation (a voice model holds no teacher); implies --finetune")

    tr.add_argument("--out", metavar="FILE", help="phones only: the voice-model file to write")
    tr.add_argument("--parallel", action="store_true",
                    help="vqvae only: train the decoder across voices on a parallel corpus (each voice rebuilt from "
                         "another voice's reading of the same text; train.parallel_self_fraction), encoder frozen")

    en = sub.add_parser("enrol", help="adapt a voice model to your voice: read prompts once, then train (~30 s of CPU per voice)")
    esub = en.add_subparsers(dest="enrol_command", metavar="ACTION", required=True)
    ep = esub.add_parser("prompts", help="write the sentences to read, DIR/prompt_NNN.txt (record each as .wav)")
    ep.add_argument("dir")
    ep.add_argument("--n", type=int, help="how many (default: enrol.prompts)")
    ep.add_argument("--testset", help="test set whose sentences to leave out (default: <paths.data_dir>/testset)")
    et = esub.add_parser("train", help="adapt the voice model's decoder to the readings in DIR (NAME.wav + NAME.txt)")
    et.add_argument("dir")
    et.add_argument("--out", required=True, help="the adapted voice model file to write")
    et.add_argument("--model", help="voice model to adapt (default: paths.model)")
    et.add_argument("--voices", help="comma-separated voices to adapt (default: every voice a TTS engine here reads)")

    ex = sub.add_parser("export", help="bundle vqvae.pt + student.pt into one voice model file")
    ex.add_argument("--out", help="output file (default: <paths.checkpoint_dir>/model.pt)")
    ex.add_argument("--setting", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a value the voice model file records instead of its checkpoints' (repeatable), e.g. "
                         "student.voice_bar_hz=300 for a student trained before that setting existed")
    ex.add_argument("--teacher", metavar="OUT",
                    help="instead, write teacher.pt without its optimiser and discriminator (a third of the size): "
                         "what `rtvc eval --teacher` and distillation read")

    sv = sub.add_parser("serve", help="websocket server for many concurrent streams (protocol v1)",
                        description="Serves ws://HOST:PORT/v1/stream, /healthz, /metrics, /v1/voices and the web client "
                                    "at /. Binds server.host (127.0.0.1 by default). SIGTERM flushes and closes every "
                                    "session with 1001.")
    sv.add_argument("--host", help="interface to bind (default server.host)")
    sv.add_argument("--port", type=int, help="port (default server.port)")
    sv.add_argument("--model", help="voice model file (default: paths.model)")

    pf = sub.add_parser("profile", help="measure latency end to end (local engine and/or a server), JSON + PNG",
                        description="Streams a chirp train through the local engine and/or a server on a real-time "
                                    "clock; reports algorithmic latency, per-stage compute, websocket round trips, the "
                                    "measured delay (cross-correlation) and how many concurrent clients stay real time.")
    pf.add_argument("--server", metavar="URL", help="profile this server (ws://HOST:PORT/v1/stream)")
    pf.add_argument("--serve", action="store_true", help="start a server in-process and profile it")
    pf.add_argument("--no-local", action="store_true", help="skip the local engine")
    pf.add_argument("--seconds", type=float, default=8.0)
    pf.add_argument("--rate", type=int, default=48000, help="client sample rate")
    pf.add_argument("--block-ms", type=float, default=10.0)
    pf.add_argument("--max-clients", type=int, default=64, help="load test up to this many concurrent clients")
    pf.add_argument("--token")
    pf.add_argument("--model", help="voice model file (default: paths.model)")
    pf.add_argument("--out", default="bench/results/profile", help="folder for profile.json and profile.png")

    be = sub.add_parser("bench", help="benchmark the streaming converter on this CPU (prints, saves JSON)")
    be.add_argument("--out", default="bench/results/pipeline_cpu.json", help="where to save the JSON")
    be.add_argument("--seconds", type=float, default=5.0, help="audio seconds streamed per measurement")

    lv = sub.add_parser("live", help="microphone -> voice changer -> speakers",
                        description="Live conversion with sounddevice. While running: p+Enter toggles passthrough, "
                                    "m+Enter toggles monitor (hearing the output), q+Enter quits.")
    lv.add_argument("--input-device", help="input device name substring or index (see `rtvc devices`)")
    lv.add_argument("--output-device", help="output device name substring or index")
    lv.add_argument("--host-api", help="prefer devices of this PortAudio host API (e.g. JACK, ALSA)")
    lv.add_argument("--rate", type=int, help="device sample rate (default: audio.sample_rate, 0 = device default)")
    lv.add_argument("--block-ms", type=float, help="callback block in ms (default: audio.block_ms)")
    lv.add_argument("--voice", help="target voice (see `rtvc voices`)")
    lv.add_argument("--transpose", type=float, default=0.0, help="pitch shift in semitones")
    lv.add_argument("--model", help="voice model file (default: paths.model)")
    lv.add_argument("--passthrough", action="store_true", help="start in passthrough (your own voice)")
    lv.add_argument("--calibrate", metavar="WAV",
                    help="a recording of the speaker (10 s or more of speech): their pitch range is measured first, "
                         "so the pitch mapping is right from the first word instead of after a few seconds; and their "
                         "mean content, which source centring (vqvae.source_centring) moves to the voices'")
    lv.add_argument("--no-monitor", action="store_true", help="start with the output muted")
    lv.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = run until stopped)")
    lv.add_argument("--stats-json", metavar="FILE", default="", help="write the run's counters as JSON at exit")
    return p


def _live_overrides(a: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("input_device", "audio.input_device"), ("output_device", "audio.output_device"),
                      ("host_api", "audio.host_api")):
        val = getattr(a, flag)
        if val is not None:
            out.append(f"{key}={val}" if val.strip().isdigit() else f"{key}={json.dumps(val)}")
    if a.rate is not None:
        out.append(f"audio.sample_rate={a.rate}")
    if a.block_ms is not None:
        out.append(f"audio.block_ms={a.block_ms}")
    if a.passthrough:
        out.append("audio.passthrough=true")
    if a.no_monitor:
        out.append("audio.monitor=false")
    return out


def _cmd_config(cfg: Config, a: argparse.Namespace) -> int:
    if a.json:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        import tomli_w
        print(tomli_w.dumps(cfg.to_dict()), end="")
    return 0


def _cmd_devices(cfg: Config, a: argparse.Namespace) -> int:
    from .devices import describe_devices
    print(describe_devices())
    return 0


def _cmd_convert(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import convert_file
    if a.sample == bool(a.input):
        raise SystemExit("rtvc convert: give an input file or --sample (not both)")
    src = str(resources.files("rtvc").joinpath("samples/speech.wav")) if a.sample else a.input
    info = convert_file(cfg, src, a.output, voice=a.voice, transpose=a.transpose, block_ms=a.block_ms)
    print(f"wrote {info['output']}: {info['seconds']:.2f} s at {info['sample_rate']} Hz, converter "
          f"'{info['converter']}', streaming latency {info['latency_ms']:.1f} ms, "
          f"compute p50 {info['compute_ms_p50']:.3f} ms per 10 ms hop")
    return 0


def _cmd_live(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import PASSTHROUGH, calibrate, load_converter, read_mono
    from .live import run_live
    conv = load_converter(cfg, a.voice, a.transpose)
    if a.calibrate:
        if not calibrate(conv, *read_mono(a.calibrate)):
            raise ValueError(f"--calibrate {a.calibrate}: " + ("no voice model to calibrate (passthrough)" if
                             conv.name == PASSTHROUGH else "too little voiced speech to measure a pitch range"))
        st = conv.source  # type: ignore[attr-defined]
        print(f"calibrated on {a.calibrate}: median F0 {math.exp(st.mean):.0f} Hz, spread {st.std:.2f} (ln F0)",
              file=sys.stderr)
    report = run_live(cfg, conv, duration=a.duration, stats_json=a.stats_json)
    e = report.engine
    print(f"done: {report.callbacks} callbacks, underruns {e.underruns} samples, PortAudio underflows "
          f"{report.output_underflows}, dropped {e.dropped} samples", file=sys.stderr)
    return 0


def _cmd_voices(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import NoVoiceModel
    if not cfg.paths.model:
        raise NoVoiceModel("no voice model configured (paths.model is empty): train one or pass --model FILE")
    from .voice import VoiceModel
    m = VoiceModel.load(cfg.paths.model)
    for name in m.speakers:
        st = m.pitch.get(name)
        print(f"{name:<12} median F0 {math.exp(st.mean):6.1f} Hz" if st else name)
    return 0


def _data_dir(cfg: Config, given: str | None, sub: str) -> Path:
    return Path(given) if given else Path(cfg.paths.data_dir) / sub


def _cmd_data(cfg: Config, a: argparse.Namespace) -> int:
    if a.data_command == "synth":
        from .data.synth import synth_corpus
        out = _data_dir(cfg, a.out, "synth")
        counts = synth_corpus(out, a.sentences, a.voices.split(",") if a.voices else None, a.seed, a.jobs)
        print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " utterances")
        return 0
    if a.data_command == "testset":
        from .data.synth import build_testset, known_texts
        cache = Path(cfg.paths.data_dir) / "cache"
        texts = set().union(*(known_texts(p) for p in a.exclude)) if a.exclude else \
            known_texts(cache) if (cache / "manifest.json").is_file() else set()
        out = _data_dir(cfg, a.out, "testset")
        man = build_testset(out, a.source, a.targets.split(","), a.sentences, texts, seed=a.seed)
        print(f"{out}: {len(man['items'])} sentences (none of the {len(texts)} excluded sentences), source "
              f"{man['source']}, targets {', '.join(man['targets'])}")
        return 0
    from .data.prepare import prepare_corpus
    out = _data_dir(cfg, a.out, "cache")
    man = prepare_corpus(cfg, a.corpus, out, a.val_fraction, a.min_seconds, a.skip_bad, band_hz=a.band_hz)
    n_val = sum(u["split"] == "val" for u in man["utterances"])
    print(f"{out}: {man['layout']} layout, {len(man['speakers'])} speakers, {len(man['utterances'])} utterances "
          f"({n_val} validation), {len(man['skipped'])} skipped")
    for s in man["skipped"]:
        print(f"  skipped: {s}")
    return 0


def _cmd_train(cfg: Config, a: argparse.Namespace) -> int:
    from .train import TRAINERS, teardown_distributed
    ckpt = Path(cfg.paths.checkpoint_dir)
    if a.restart:  # under torchrun every rank gets here: the first one removes it
        (ckpt / f"{a.stage}.pt").unlink(missing_ok=True)
    if a.parallel and a.stage != "vqvae":
        raise SystemExit("rtvc train: --parallel trains the VQ-VAE's decoder: use it with `rtvc train vqvae`")
    if a.stage == "phones":
        from .train_phones import train_phones
        if not (a.init and a.out):
            raise SystemExit("rtvc train phones: name the voice model to add phones to (--init MODEL) and the file to "
                             "write (--out FILE)")
        steps = (a.steps, a.steps) if a.steps else None
        out = train_phones(cfg, _data_dir(cfg, a.data, "cache"), ckpt, a.init, a.out, steps)
        print(f"voice model: {out} (use it with --set paths.model={out})")
        return 0
    extra = {"parallel": True} if a.parallel else {}
    path = TRAINERS[a.stage](cfg, _data_dir(cfg, a.data, "cache"), ckpt, a.steps, finetune=a.finetune, init=a.init,
                             **extra)
    teardown_distributed()
    print(f"checkpoint: {path}")
    if a.stage == "student":
        print(f"voice model: {ckpt / 'model.pt'} (use it with --set paths.model={ckpt / 'model.pt'})")
    return 0


def _cmd_enrol(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import NoVoiceModel
    from .enrol import enrol, testset_texts, write_prompts
    if a.enrol_command == "prompts":
        paths = write_prompts(a.dir, a.n or cfg.enrol.prompts,
                              testset_texts(a.testset or Path(cfg.paths.data_dir) / "testset"))
        print(f"{a.dir}: {len(paths)} prompts; read each aloud and save it next to its text as the same name with "
              f".wav (e.g. {paths[0].with_suffix('.wav').name}), then `rtvc enrol train {a.dir} --out mine.pt`")
        return 0
    if not cfg.paths.model:
        raise NoVoiceModel("no voice model to adapt: pass --model FILE or set paths.model")
    r = enrol(cfg, cfg.paths.model, a.dir, a.out, a.voices.split(",") if a.voices else None)
    print(f"{r['out']}: {r['recordings']} readings, {len(r['voices'])} voices ({', '.join(r['voices'])}), "
          f"{r['steps']} steps in {r['seconds']:.0f} s, pair loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}; "
          f"use it with --model {r['out']}")
    return 0


def _cmd_export(cfg: Config, a: argparse.Namespace) -> int:
    from .train import export_teacher, export_voice_model
    ckpt = Path(cfg.paths.checkpoint_dir)
    if a.teacher:
        print(f"teacher: {export_teacher(ckpt, a.teacher)}")
        return 0
    print(f"voice model: {export_voice_model(ckpt, a.out or ckpt / 'model.pt', a.setting)}")
    return 0


def _cmd_serve(cfg: Config, a: argparse.Namespace) -> int:
    from .server import serve_forever
    serve_forever(cfg)
    return 0


def _cmd_profile(cfg: Config, a: argparse.Namespace) -> int:
    from .profile import describe, run_profile
    res = run_profile(cfg, a.out, local=not a.no_local, server_url=a.server, serve=a.serve, seconds=a.seconds,
                      rate=a.rate, block_ms=a.block_ms, max_clients=a.max_clients, token=a.token)
    print(describe(res))
    print(f"saved {Path(a.out) / 'profile.json'} and {Path(a.out) / 'profile.png'}")
    return 0


def _cmd_eval(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import NoVoiceModel
    from .evaluate import evaluate, markdown
    if not cfg.paths.model:
        raise NoVoiceModel("no voice model to evaluate: pass --model FILE or set paths.model")
    res = evaluate(cfg.paths.model, a.testset or Path(cfg.paths.data_dir) / "testset", a.out, a.teacher, a.max_items,
                   command="rtvc " + shlex.join(a.argv))
    print(markdown(res))
    print(f"saved {Path(a.out) / 'eval.json'}, {Path(a.out) / 'eval.md'} and {Path(a.out) / 'spectrograms'}/")
    return 0


def _cmd_bench(cfg: Config, a: argparse.Namespace) -> int:
    from .bench import run_bench
    run_bench(cfg, a.out, a.seconds)
    return 0


COMMANDS = {"config": _cmd_config, "devices": _cmd_devices, "convert": _cmd_convert, "live": _cmd_live,
            "voices": _cmd_voices, "data": _cmd_data, "train": _cmd_train, "export": _cmd_export, "bench": _cmd_bench,
            "serve": _cmd_serve, "profile": _cmd_profile, "eval": _cmd_eval, "enrol": _cmd_enrol}


def resolve_model(cfg: Config) -> Config:
    """``paths.model``: "" -> the bundled default voices when this build has them; "passthrough" -> none (the
    labelled passthrough, which everything downstream selects with an empty ``paths.model``)."""
    default = resources.files("rtvc").joinpath("models/default.pt")
    if cfg.paths.model == "passthrough" or (not cfg.paths.model and not default.is_file()):
        return cfg.replace(**{"paths.model": ""})
    return cfg if cfg.paths.model else cfg.replace(**{"paths.model": str(default)})


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # the invocation, for reports that record it
    if a.command is None:
        parser.print_help()
        return 0
    from .checkpoint import CheckpointError
    from .convert import NoVoiceModel
    from .data.prepare import CorpusError
    from .devices import AudioUnavailable
    try:
        overrides = list(a.overrides) + (_live_overrides(a) if a.command == "live" else [])
        if a.command == "serve":
            overrides += [f"server.host={json.dumps(a.host)}"] if a.host else []
            overrides += [f"server.port={a.port}"] if a.port is not None else []
        if getattr(a, "model", None):
            overrides.append(f"paths.model={json.dumps(a.model)}")
        if a.command == "convert" and a.passthrough:
            overrides.append('paths.model="passthrough"')
        cfg = resolve_model(load_config(a.config, overrides))
        return COMMANDS[a.command](cfg, a)
    except ConfigError as e:
        print(f"rtvc: config error: {e}", file=sys.stderr)
        return 2
    except (AudioUnavailable, NoVoiceModel, CheckpointError, CorpusError, FileNotFoundError, ValueError,
            RuntimeError, KeyError) as e:
        print(f"rtvc: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
