"""rtvc streaming protocol v1: message kinds, audio frame codec, error codes (see docs/protocol.md).

Shared by the server and every client; imports only the standard library and numpy (clients need no torch).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

VERSION = 1
PATH = "/v1/stream"
HEADER = struct.Struct("<Id")  # uint32 seq, float64 t: 12 bytes, little-endian
FORMATS = {"f32": np.dtype("<f4"), "s16": np.dtype("<i2")}

# client -> server
START, SET, STATS, STOP = "start", "set", "stats", "stop"
# server -> client
READY, ACK, STATS_REPLY, END, ERROR = "ready", "ack", "stats", "end", "error"

# close codes
CLOSE_NORMAL, CLOSE_GOING_AWAY = 1000, 1001
CLOSE_UNSUPPORTED, CLOSE_POLICY = 1003, 1008
CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_TRY_AGAIN = 1009, 1011, 1013
CLOSE_UNAUTHORIZED = 4401


class ProtocolError(Exception):
    """A client mistake: ``code`` is the error code string, ``close`` the websocket close code."""

    def __init__(self, code: str, message: str, close: int = CLOSE_POLICY) -> None:
        super().__init__(message)
        self.code, self.message, self.close = code, message, close

    def to_message(self) -> str:
        return dumps({"type": ERROR, "code": self.code, "message": self.message})


def dumps(msg: dict[str, Any]) -> str:
    return json.dumps(msg, separators=(",", ":"), allow_nan=False)


def parse_control(text: str) -> dict[str, Any]:
    """Decode a client's text frame; anything that is not a JSON object with a string ``type`` is an error."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("bad_json", "text frames must be JSON objects") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", 'a message must be a JSON object with a string "type"')
    return msg


PACES = ("realtime", "fast")


@dataclass(frozen=True)
class Start:
    sample_rate: int
    format: str
    voice: str | None
    transpose: float
    pace: str  # "realtime": queued input beyond the bound is dropped; "fast": the server applies backpressure


def parse_start(msg: dict[str, Any], max_rate: int = 192000) -> Start:
    if msg.get("type") != START:
        raise ProtocolError("bad_order", f'the first message must be "start", got "{msg.get("type")}"')
    if msg.get("version") != VERSION:
        raise ProtocolError("bad_version", f"unsupported protocol version {msg.get('version')!r}; this server speaks {VERSION}")
    rate = msg.get("sample_rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= max_rate:
        raise ProtocolError("bad_sample_rate", f"sample_rate must be an integer in 8000..{max_rate}")
    fmt = msg.get("format", "f32")
    if fmt not in FORMATS:
        raise ProtocolError("bad_format", f'format must be one of {sorted(FORMATS)}')
    voice = msg.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise ProtocolError("bad_voice", "voice must be a string")
    pace = msg.get("pace", "realtime")
    if pace not in PACES:
        raise ProtocolError("bad_pace", f"pace must be one of {list(PACES)}")
    return Start(rate, fmt, voice, parse_transpose(msg.get("transpose", 0)), pace)


def parse_transpose(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -24 <= value <= 24:
        raise ProtocolError("bad_transpose", "transpose must be a number of semitones in -24..24")
    return float(value)


def encode_audio(seq: int, t: float, samples: np.ndarray, fmt: str) -> bytes:
    """Binary frame: header + mono PCM. ``samples`` float32 in [-1, 1] (s16 is clipped and scaled)."""
    if fmt == "s16":
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    else:
        pcm = samples.astype("<f4", copy=False)
    return HEADER.pack(seq & 0xFFFFFFFF, t) + pcm.tobytes()


def decode_audio(data: bytes, fmt: str, max_samples: int) -> tuple[int, float, np.ndarray]:
    """Binary frame -> (seq, t, float32 samples). Raises ProtocolError for malformed frames."""
    if len(data) < HEADER.size:
        raise ProtocolError("bad_frame", f"audio frames start with a {HEADER.size}-byte header")
    seq, t = HEADER.unpack_from(data)
    body = memoryview(data)[HEADER.size:]
    dt = FORMATS[fmt]
    if len(body) % dt.itemsize:
        raise ProtocolError("bad_frame", f"{len(body)} payload bytes is not a whole number of {fmt} samples")
    n = len(body) // dt.itemsize
    if n > max_samples:
        raise ProtocolError("frame_too_large", f"{n} samples in one frame; the maximum is {max_samples}", 1009)
    x = np.frombuffer(body, dtype=dt)
    if fmt == "s16":
        return seq, t, x.astype(np.float32) / 32768.0
    if not np.isfinite(x).all():
        raise ProtocolError("bad_samples", "audio contains NaN or Inf", CLOSE_UNSUPPORTED)
    return seq, t, x.astype(np.float32)
