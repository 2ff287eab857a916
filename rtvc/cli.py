"""The ``rtvc`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources

from .config import Config, ConfigError, load_config

EPILOG = """\
first steps:
  rtvc devices                          list microphones and speakers (works without a sound card)
  rtvc convert in.wav out.wav           convert a file through the streaming engine
  rtvc convert --sample out.wav         convert the bundled speech sample
  rtvc live                             microphone -> voice changer -> speakers (Ctrl-C to stop)
  rtvc live --input-device USB --output-device 3 --passthrough
  rtvc config                           print the resolved configuration

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
    v.add_argument("--voice", help="target voice name (from the voice model)")
    v.add_argument("--block-ms", type=float, default=10.0, help="streaming block size in ms (default 10)")

    lv = sub.add_parser("live", help="microphone -> voice changer -> speakers",
                        description="Live conversion with sounddevice. While running: p+Enter toggles passthrough, "
                                    "m+Enter toggles monitor (hearing the output), q+Enter quits.")
    lv.add_argument("--input-device", help="input device name substring or index (see `rtvc devices`)")
    lv.add_argument("--output-device", help="output device name substring or index")
    lv.add_argument("--host-api", help="prefer devices of this PortAudio host API (e.g. JACK, ALSA)")
    lv.add_argument("--rate", type=int, help="device sample rate (default: audio.sample_rate, 0 = device default)")
    lv.add_argument("--block-ms", type=float, help="callback block in ms (default: audio.block_ms)")
    lv.add_argument("--passthrough", action="store_true", help="start in passthrough (your own voice)")
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
    info = convert_file(cfg, src, a.output, voice=a.voice, block_ms=a.block_ms)
    print(f"wrote {info['output']}: {info['seconds']:.2f} s at {info['sample_rate']} Hz, converter "
          f"'{info['converter']}', streaming latency {info['latency_ms']:.1f} ms, "
          f"compute p50 {info['compute_ms_p50']:.3f} ms per 10 ms hop")
    return 0


def _cmd_live(cfg: Config, a: argparse.Namespace) -> int:
    from .convert import load_converter
    from .live import run_live
    report = run_live(cfg, load_converter(cfg), duration=a.duration, stats_json=a.stats_json)
    e = report.engine
    print(f"done: {report.callbacks} callbacks, underruns {e.underruns} samples, PortAudio underflows "
          f"{report.output_underflows}, dropped {e.dropped} samples", file=sys.stderr)
    return 0


COMMANDS = {"config": _cmd_config, "devices": _cmd_devices, "convert": _cmd_convert, "live": _cmd_live}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    from .devices import AudioUnavailable
    from .convert import NoVoiceModel
    try:
        overrides = list(a.overrides) + (_live_overrides(a) if a.command == "live" else [])
        cfg = load_config(a.config, overrides)
        return COMMANDS[a.command](cfg, a)
    except ConfigError as e:
        print(f"rtvc: config error: {e}", file=sys.stderr)
        return 2
    except (AudioUnavailable, NoVoiceModel, FileNotFoundError, ValueError) as e:
        print(f"rtvc: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
