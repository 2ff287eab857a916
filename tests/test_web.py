"""The web client in headless Chromium: a fake microphone fed from a wav file streams through the page's
AudioWorklet to the server, and converted audio comes back (read from the page over the DevTools protocol)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request

import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from rtvc.batch import BatchedVoice
from rtvc.voice import make_voice_model

from conftest import make_tiny_config
from test_server import Running
from test_streaming import _speech_like

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def _evaluate(ws_url: str, expr: str):
    async with connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate",
                                  "params": {"expression": expr, "returnByValue": True}}))
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("id") == 1:
                return msg["result"]["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh --test installs it)")
def test_web_page_round_trip_in_headless_chromium(tmp_path):
    cfg = make_tiny_config(**{"server.port": 0, "server.max_sessions": 4})
    srv = Running(cfg, BatchedVoice(make_voice_model(cfg, ["alto", "bass"], seed=3), slots=4))
    wav = tmp_path / "mic.wav"
    sf.write(str(wav), _speech_like(3.0, 48000, 2), 48000, subtype="PCM_16")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        "--remote-debugging-port=0", f"http://127.0.0.1:{srv.port}/?autostart=1&voice=bass"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        page = None
        for _ in range(100):
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
            page = next((t for t in targets if t.get("type") == "page" and str(srv.port) in t.get("url", "")), None)
            if page:
                break
            time.sleep(0.1)
        assert page, "the page did not open"
        stats = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            stats = json.loads(asyncio.run(_evaluate(page["webSocketDebuggerUrl"],
                                                     "JSON.stringify(window.rtvcStats)")) or "null")
            if stats and stats["samplesOut"] >= 48000 and stats.get("server"):  # 1 s of audio back, a stats reply
                break
            time.sleep(0.5)
        assert stats and not stats["error"], stats
        assert stats["ready"]["voice"] == "bass" and stats["ready"]["sample_rate"] in (44100, 48000)
        assert stats["samplesOut"] >= 48000, stats
        assert stats["sumSq"] > 0, "only silence came back"
        assert stats["rtt"], "no round-trip measurements"
        assert stats["server"]["centring"] in ("off", "learning") or stats["server"]["centring"].startswith("learned")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        srv.stop()
