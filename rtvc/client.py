"""Client side of protocol v1 (numpy + websockets only: no torch), used by clients/ and the profiler."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from . import protocol as P


@dataclass
class Received:
    """One server audio frame: the echoed client frame (seq, t), the samples and when they arrived."""

    seq: int
    t: float
    samples: np.ndarray
    arrival: float


@dataclass
class StreamClient:
    """``async with StreamClient(url, 48000) as c:`` then ``await c.send(x)``; iterate ``c.receive()``."""

    url: str
    sample_rate: int
    format: str = "f32"
    voice: str | None = None
    transpose: float = 0.0
    pace: str = "realtime"
    token: str | None = None
    ready: dict = field(default_factory=dict)
    end: dict | None = None
    controls: list = field(default_factory=list)
    seq: int = 0
    t0: float = 0.0
    ws: ClientConnection | None = None

    async def __aenter__(self) -> "StreamClient":
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.ws = await connect(self.url, additional_headers=headers, max_size=None, compression=None)
        start = {"type": P.START, "version": P.VERSION, "sample_rate": self.sample_rate, "format": self.format,
                 "transpose": self.transpose, "pace": self.pace}
        if self.voice:
            start["voice"] = self.voice
        await self.ws.send(P.dumps(start))
        msg = json.loads(await self.ws.recv())
        if msg.get("type") != P.READY:
            await self.ws.close()
            raise RuntimeError(f"server refused the stream: {msg}")
        self.ready = msg
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    @property
    def latency_ms(self) -> float:
        return float(self.ready["latency_ms"])

    async def send(self, samples: np.ndarray) -> None:
        await self.ws.send(P.encode_audio(self.seq, time.monotonic(), samples, self.format))
        self.seq += 1

    async def control(self, msg: dict) -> None:
        await self.ws.send(P.dumps(msg))

    async def stop(self) -> None:
        await self.control({"type": P.STOP})

    async def receive(self) -> AsyncIterator[Received]:
        """Audio frames until the server's "end" (kept in ``self.end``) or the connection closes."""
        try:
            async for m in self.ws:
                if isinstance(m, bytes):
                    seq, t, x = P.decode_audio(m, self.format, 1 << 30)
                    yield Received(seq, t, x, time.monotonic())
                    continue
                msg = json.loads(m)
                if msg.get("type") == P.END:
                    self.end = msg
                    return
                if msg.get("type") == P.ERROR:
                    raise RuntimeError(f"server error {msg.get('code')}: {msg.get('message')}")
                self.controls.append(msg)
        except ConnectionClosed:
            return


async def stream_array(url: str, x: np.ndarray, rate: int, block: int, *, realtime: bool = False, **kw
                       ) -> tuple[np.ndarray, list[Received], StreamClient]:
    """Send ``x`` [n] in blocks (at real-time pace or as fast as the server accepts), return the output [n],
    the received frames (for round-trip statistics) and the client (ready / end messages)."""
    frames: list[Received] = []
    async with StreamClient(url, rate, pace="realtime" if realtime else "fast", **kw) as c:
        async def reader() -> None:
            async for r in c.receive():
                frames.append(r)

        task = asyncio.create_task(reader())
        t0 = c.t0 = time.monotonic()  # the input timeline starts with the first send
        for pos in range(0, x.shape[0], block):
            await c.send(x[pos: pos + block])
            if realtime:  # hold the pace of a live source
                await asyncio.sleep(max(0.0, t0 + (pos + block) / rate - time.monotonic()))
        await c.stop()
        await asyncio.wait_for(task, 60)
    y = np.concatenate([f.samples for f in frames]) if frames else np.zeros(0, np.float32)
    return y, frames, c


def round_trips_ms(frames: list[Received]) -> np.ndarray:
    """arrival - echoed send time per frame, ms (the client's own clock: no sync needed)."""
    return np.array([1000.0 * (f.arrival - f.t) for f in frames if f.t > 0])
