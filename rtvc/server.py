"""``rtvc serve``: many concurrent voice-conversion streams over websockets (protocol v1, docs/protocol.md).

Threads: the asyncio event loop does I/O only (decode frames into each session's engine, send what the engine has
ready); one worker thread runs a *batched* streaming step for every session with a hop ready (BatchedVoice), so
sessions joining, leaving or idling never disturb the others. Every queue is bounded: input beyond the engine's
backlog bound is dropped oldest-first and counted, and the websocket's own queues are capped.
HTTP on the same port: ``/healthz``, ``/metrics`` (Prometheus), ``/v1/voices``, and ``/`` (the web client).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as P
from .batch import BatchedVoice, NoFreeSlot, SlotPool
from .config import Config
from .engine import StreamEngine, WarmedThread, settle_heap

WEB_DIR = Path(__file__).resolve().parent / "web"


class PassthroughBatch:
    """BatchedVoice's interface without a model: output = input (labelled passthrough)."""

    voices = ["passthrough"]
    name = "passthrough (no voice model)"
    device = "cpu"

    def __init__(self, cfg: Config, slots: int) -> None:
        self.hop, self.sample_rate, self.latency, self.capacity = cfg.model.hop_length, cfg.model.sample_rate, 0, slots
        self.pool = SlotPool(slots)

    def acquire(self, voice: str, transpose: float = 0.0) -> int:
        return self.pool.take()

    def release(self, slot: int) -> None:
        self.pool.give(slot)

    def set(self, slot: int, voice: str | None = None, transpose: float | None = None) -> None:
        pass

    def voice_of(self, slot: int) -> str:
        return "passthrough"

    def centring_of(self, slot: int) -> str:
        return "off"

    def step(self, slots: list[int], hops: np.ndarray) -> np.ndarray:
        return hops.copy()


@dataclass
class Session:
    id: str
    ws: ServerConnection
    start: P.Start
    engine: StreamEngine
    slot: int
    frames_in: int = 0
    frames_out: int = 0
    samples_in: int = 0
    samples_out: int = 0
    marks: deque = field(default_factory=deque)  # (input sample end index, seq, t) of each client frame
    last_mark: tuple[int, float] = (0, 0.0)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    sender: asyncio.Task | None = None

    def stats(self) -> dict:
        e = self.engine.stats()
        return {"type": P.STATS_REPLY, "session": self.id, "frames_in": self.frames_in, "frames_out": self.frames_out,
                "samples_in": self.samples_in, "samples_out": self.samples_out, "dropped_samples": e.dropped + e.overrun_in,
                "gap_samples": e.gap_filled, "hops": e.hops, "latency_ms": self.engine.latency_ms,
                "compute_ms": {"p50": e.compute_ms_p50, "p99": e.compute_ms_p99}}


class Server:
    def __init__(self, cfg: Config, runner: BatchedVoice | PassthroughBatch) -> None:
        self.cfg, self.runner = cfg, runner
        self.sessions: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker = WarmedThread(getattr(runner, "warmup", lambda: None), self._work, name="rtvc-batch-worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_ms: deque[float] = deque(maxlen=4096)
        self.totals = {"sessions_total": 0, "frames_in": 0, "frames_out": 0, "dropped_samples": 0, "errors": 0}

    # ------------------------------------------------------------------------------------------ worker
    def _work(self) -> None:
        runner = self.runner
        while not self._stop.is_set():
            ready: list[tuple[Session, np.ndarray]] = []
            for s in list(self.sessions.values()):
                x = s.engine.next_hop()
                if x is not None:
                    ready.append((s, x.copy()))
            if not ready:
                # sleep until audio arrives (the event loop sets the flag after each push), not a busy poll
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                ys = runner.step([s.slot for s, _ in ready], np.stack([x for _, x in ready]))
            except Exception:  # a model failure must not kill the worker; sessions see silence and stats
                ys = np.zeros((len(ready), runner.hop), np.float32)
                self.totals["errors"] += 1
            dt = time.perf_counter() - t0
            self._step_ms.append(1000 * dt)
            for (s, _), y in zip(ready, ys):
                s.engine.put_hop(y, dt)
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(s.ready.set)

    def _stats(self, s: Session) -> dict:
        """A session's stats reply: its counters plus its source centring (learned while its speaker talks)."""
        return {**s.stats(), "centring": self.runner.centring_of(s.slot)}

    # -------------------------------------------------------------------------------------------- http
    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        origins = self.cfg.server.allowed_origins
        origin = request.headers.get("Origin")
        if origins and origin is not None and origin not in origins:
            return conn.respond(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        if path == P.PATH:
            return None  # websocket upgrade
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            return self._response(HTTPStatus.OK, self.metrics(), "text/plain; version=0.0.4")
        if path == "/v1/voices":
            return self._response(HTTPStatus.OK, json.dumps({"voices": self.runner.voices}), "application/json")
        if path in ("/", "/index.html") or (path.count("/") == 1 and (WEB_DIR / path[1:]).is_file()):
            f = WEB_DIR / ("index.html" if path in ("/", "/index.html") else path[1:])
            kind = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}.get(f.suffix, "text/plain")
            return self._response(HTTPStatus.OK, f.read_text(encoding="utf-8"), kind + "; charset=utf-8")
        return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")

    @staticmethod
    def _response(status: HTTPStatus, body: str, kind: str) -> Response:
        data = body.encode()
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
        return Response(status.value, status.phrase, headers, data)

    def metrics(self) -> str:
        steps = np.array(self._step_ms) if self._step_ms else np.zeros(1)
        live = list(self.sessions.values())
        lines = [
            "# HELP rtvc_sessions Active streaming sessions.", "# TYPE rtvc_sessions gauge",
            f"rtvc_sessions {len(live)}",
            "# TYPE rtvc_sessions_total counter", f"rtvc_sessions_total {self.totals['sessions_total']}",
            "# TYPE rtvc_frames_in_total counter",
            f"rtvc_frames_in_total {self.totals['frames_in'] + sum(s.frames_in for s in live)}",
            "# TYPE rtvc_frames_out_total counter",
            f"rtvc_frames_out_total {self.totals['frames_out'] + sum(s.frames_out for s in live)}",
            "# TYPE rtvc_dropped_samples_total counter",
            f"rtvc_dropped_samples_total {self.totals['dropped_samples'] + sum(s.engine.stats().dropped for s in live)}",
            "# HELP rtvc_step_ms Batched streaming step compute time.", "# TYPE rtvc_step_ms summary",
            *(f'rtvc_step_ms{{quantile="{q}"}} {np.percentile(steps, 100 * q):.4f}' for q in (0.5, 0.9, 0.99)),
            "# TYPE rtvc_worker_errors_total counter", f"rtvc_worker_errors_total {self.totals['errors']}",
        ]
        return "\n".join(lines) + "\n"

    # --------------------------------------------------------------------------------------- websocket
    def _authorized(self, ws: ServerConnection) -> bool:
        token = self.cfg.server.token
        if not token:
            return True
        auth = ws.request.headers.get("Authorization", "")
        q = parse_qs(urlsplit(ws.request.path).query).get("token", [""])[0]
        return auth == f"Bearer {token}" or q == token

    async def handler(self, ws: ServerConnection) -> None:
        session: Session | None = None
        try:
            if not self._authorized(ws):
                raise P.ProtocolError("unauthorized", "missing or wrong bearer token", P.CLOSE_UNAUTHORIZED)
            if len(self.sessions) >= self.cfg.server.max_sessions:
                raise P.ProtocolError("server_full", "the server is at its session limit; try again later",
                                      P.CLOSE_TRY_AGAIN)
            first = await ws.recv()
            if not isinstance(first, str):
                raise P.ProtocolError("bad_order", 'the first message must be the text "start" message')
            session, ready = self._open(ws, P.parse_start(P.parse_control(first)))
            await ws.send(P.dumps(ready))
            session.sender = asyncio.create_task(self._sender(session))
            try:
                await self._receive(session)
            finally:
                session.sender.cancel()
        except P.ProtocolError as e:
            await self._fail(ws, e)
        except ConnectionClosed:
            pass
        finally:
            if session is not None:
                self._close(session)

    def _open(self, ws: ServerConnection, start: P.Start) -> tuple[Session, dict]:
        voices = self.runner.voices
        voice = start.voice or voices[0]
        if voice not in voices:
            raise P.ProtocolError("unknown_voice", f"unknown voice {voice!r}; available: {voices}")
        try:
            slot = self.runner.acquire(voice, start.transpose)
        except NoFreeSlot as e:
            raise P.ProtocolError("server_full", str(e), P.CLOSE_TRY_AGAIN) from None
        engine = StreamEngine(self.runner, start.sample_rate, self.cfg.engine)  # runner: rate/hop/latency only
        s = Session(f"s{next(self._ids)}", ws, start, engine, slot)
        self.sessions[s.id] = s
        self.totals["sessions_total"] += 1
        return s, {"type": P.READY, "session": s.id, "sample_rate": start.sample_rate,
                   "hop": round(self.runner.hop * start.sample_rate / self.runner.sample_rate),
                   "latency_ms": engine.latency_ms, "voices": voices, "voice": voice, "transpose": start.transpose,
                   "max_frame_samples": self.cfg.server.max_frame_samples}

    async def _receive(self, s: Session) -> None:
        limit = self.cfg.server.max_frame_samples
        async for msg in s.ws:
            if s.closing:
                continue  # shutting down: the flush has started, later audio is not part of the session
            if isinstance(msg, bytes):
                seq, t, x = P.decode_audio(msg, s.start.format, limit)
                if s.start.pace == "fast":  # backpressure instead of drops: wait for the worker to catch up
                    while s.engine.queued() > s.engine.max_backlog // 2:
                        await asyncio.sleep(0.001)
                s.engine.push(x)
                self._wake.set()
                s.frames_in += 1
                s.samples_in += x.shape[0]
                s.marks.append((s.samples_in, seq, t))
                continue
            m = P.parse_control(msg)
            kind = m["type"]
            if kind == P.SET:
                voice, tr = m.get("voice"), m.get("transpose")
                if voice is not None and voice not in self.runner.voices:
                    raise P.ProtocolError("unknown_voice", f"unknown voice {voice!r}; available: {self.runner.voices}")
                tr = None if tr is None else P.parse_transpose(tr)
                self.runner.set(s.slot, voice, tr)
                await s.ws.send(P.dumps({"type": P.ACK, "voice": self.runner.voice_of(s.slot),
                                         "transpose": tr if tr is not None else None}))
            elif kind == P.STATS:
                await s.ws.send(P.dumps(self._stats(s)))
            elif kind == P.STOP:
                await self._finish(s, P.CLOSE_NORMAL, "stop")
                return
            elif kind == P.START:
                raise P.ProtocolError("bad_order", '"start" was already received')
            else:
                raise P.ProtocolError("unknown_type", f"unknown message type {kind!r}")

    async def _sender(self, s: Session) -> None:
        """The only task that sends audio (so frames leave in order); returns once a flush is complete."""
        while True:
            await s.ready.wait()
            s.ready.clear()
            await self._send_ready(s)
            if s.closing and s.samples_out >= s.samples_in:
                return

    async def _send_ready(self, s: Session) -> None:
        # never ahead of the input: output j is the conversion of input j - latency, so output count == input
        # count over the session (the latency's worth of prefilled silence leads the stream)
        n = min(s.engine.available(), s.samples_in - s.samples_out)
        if n <= 0:
            return
        out = np.empty(n, np.float32)
        s.engine.pull(out)
        s.samples_out += n
        # echo the newest client frame whose samples this output completes (output j <-> input j - latency)
        done = s.samples_out - s.engine.latency_samples
        while s.marks and s.marks[0][0] <= done:
            _, seq, t = s.marks.popleft()
            s.last_mark = (seq, t)
        s.frames_out += 1
        await s.ws.send(P.encode_audio(s.last_mark[0], s.last_mark[1], out, s.start.format))

    async def _finish(self, s: Session, code: int, reason: str) -> None:
        """Flush: push the latency's worth of silence so every input sample's conversion comes out, send
        exactly ``samples_in`` samples in all, then "end" and close."""
        s.closing = True
        s.engine.push(np.zeros(s.engine.latency_samples + 8 * s.engine.hop, np.float32))
        self._wake.set()
        s.ready.set()
        if s.sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(s.sender), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                s.sender.cancel()
        await s.ws.send(P.dumps({**self._stats(s), "type": P.END}))
        await s.ws.close(code, reason)

    async def _fail(self, ws: ServerConnection, e: P.ProtocolError) -> None:
        try:
            await ws.send(e.to_message())
            await ws.close(e.close, e.code)
        except ConnectionClosed:
            pass

    def _close(self, s: Session) -> None:
        if self.sessions.pop(s.id, None) is None:
            return
        self.runner.release(s.slot)
        self.totals["frames_in"] += s.frames_in
        self.totals["frames_out"] += s.frames_out
        self.totals["dropped_samples"] += s.engine.stats().dropped

    # ------------------------------------------------------------------------------------------ run
    async def run(self, ready: asyncio.Future | None = None) -> None:
        c = self.cfg.server
        self._loop = asyncio.get_running_loop()
        settle_heap()  # before the warm-up, as `rtvc live` does
        await asyncio.to_thread(self._worker.start_warmed)  # the worker warms the runner on itself first
        frame_bytes = P.HEADER.size + c.max_frame_samples * 4
        stop = self._loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or Windows
                pass
        # max_size: twice the largest legal frame, so an oversized frame is still read and answered with our
        # error message; beyond that the websocket layer itself closes with 1009.
        async with serve(self.handler, c.host, c.port, process_request=self.process_request,
                         max_size=2 * frame_bytes, max_queue=64, compression=None, ping_interval=20,
                         ping_timeout=20, close_timeout=5) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set_result(self.port)
            self.stop_future = stop
            await stop
            # graceful: flush every session, close with 1001 "going away"
            await asyncio.gather(*(self._finish(s, P.CLOSE_GOING_AWAY, "server shutdown")
                                   for s in list(self.sessions.values())), return_exceptions=True)
        # Join the worker before returning: a process that exits while the daemon thread is inside a native step
        # (numba / torch) aborts ("terminate called without an active exception", exit -6).
        self._stop.set()
        self._wake.set()
        if self._worker.is_alive():
            await asyncio.to_thread(self._worker.join)

    def request_stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self.stop_future.done() or self.stop_future.set_result(None))


def make_runner(cfg: Config):
    """Passthrough without a model; on a GPU the graph-captured batched step; on CPU per-slot fused kernels."""
    if not cfg.paths.model:
        return PassthroughBatch(cfg, cfg.server.max_sessions)
    import torch
    device = cfg.server.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from .centring import make_learner
    from .voice import VoiceModel
    model = VoiceModel.load(cfg.paths.model)
    learner = lambda: make_learner(model, cfg.engine)  # noqa: E731  (each session learns its speaker's content)
    if device.startswith("cuda"):
        from .gpu_step import GraphRunner
        return GraphRunner(model, cfg.server.max_sessions, device, learner=learner)
    return BatchedVoice(model, cfg.server.max_sessions, device, learner=learner)


def serve_forever(cfg: Config) -> None:
    runner = make_runner(cfg)
    print(f"rtvc serve: ws://{cfg.server.host}:{cfg.server.port}{P.PATH}  (voices: {', '.join(runner.voices)}; "
          f"{'PASSTHROUGH: no voice model configured' if isinstance(runner, PassthroughBatch) else 'model ' + cfg.paths.model}; "
          f"{type(runner).__name__} on {runner.device}, {cfg.server.max_sessions} slots)")
    asyncio.run(Server(cfg, runner).run())
