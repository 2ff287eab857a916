"""Sound devices through PortAudio (sounddevice): import with a clear message, list, resolve by name or index."""

from __future__ import annotations

from types import ModuleType
from typing import Literal


class AudioUnavailable(RuntimeError):
    """No PortAudio, or no usable device: the message says what to do."""


def import_sounddevice() -> ModuleType:
    try:
        import sounddevice
    except OSError as e:  # the Python package is there but the PortAudio C library is not
        raise AudioUnavailable(
            f"PortAudio is missing ({e}). Install it: Debian/Ubuntu `sudo apt-get install libportaudio2`, "
            "Fedora `sudo dnf install portaudio`, macOS `brew install portaudio`.") from None
    return sounddevice


def describe_devices() -> str:
    """Human-readable device table, or a clear sentence when there are none."""
    sd = import_sounddevice()
    devices = sd.query_devices()
    apis = sd.query_hostapis()
    if len(devices) == 0:
        names = ", ".join(a["name"] for a in apis) or "none"
        return (f"No audio devices found ({sd.get_portaudio_version()[1].split(',')[0]}; host APIs: {names}).\n"
                "There is no sound card, or none this user may open. `rtvc convert` works "
                "without one; for `rtvc live` connect a device (or start JACK/PulseAudio) and run this again.")
    d_in, d_out = sd.default.device
    lines = [f"{'idx':>3}  {'in':>3} {'out':>3}  {'rate':>6}  {'host API':<26} name"]
    for i, d in enumerate(devices):
        mark = ("<" if i == d_in else " ") + (">" if i == d_out else " ")
        lines.append(f"{i:>3}{mark} {d['max_input_channels']:>3} {d['max_output_channels']:>3}  "
                     f"{int(d['default_samplerate']):>6}  {apis[d['hostapi']]['name'][:26]:<26} {d['name']}")
    lines.append("'<' default input, '>' default output. Select with --input-device/--output-device NAME|INDEX.")
    return "\n".join(lines)


def resolve_device(spec: str | int, kind: Literal["input", "output"], host_api: str = "") -> int:
    """Device index for ``spec``: "" = default, an index, or a case-insensitive name substring."""
    sd = import_sounddevice()
    devices = sd.query_devices()
    chans = "max_input_channels" if kind == "input" else "max_output_channels"
    apis = sd.query_hostapis()
    usable = [i for i, d in enumerate(devices) if d[chans] > 0
              and (not host_api or host_api.lower() in apis[d["hostapi"]]["name"].lower())]
    if not usable:
        where = f" on host API '{host_api}'" if host_api else ""
        raise AudioUnavailable(f"no audio {kind} device found{where}. Run `rtvc devices` to see what PortAudio sees.")
    if spec == "" or spec is None:
        default = sd.default.device[0 if kind == "input" else 1]
        return default if default in usable else usable[0]
    if isinstance(spec, int) or str(spec).strip().isdigit():
        idx = int(spec)
        if idx not in usable:
            raise AudioUnavailable(f"device {idx} is not a usable {kind} device; usable: {usable} (see `rtvc devices`)")
        return idx
    matches = [i for i in usable if str(spec).lower() in devices[i]["name"].lower()]
    exact = [i for i in matches if devices[i]["name"].lower() == str(spec).lower()]
    if not matches:
        names = "; ".join(f"{i}: {devices[i]['name']}" for i in usable)
        raise AudioUnavailable(f"no {kind} device matches '{spec}'. Usable {kind} devices: {names}")
    return (exact or matches)[0]
