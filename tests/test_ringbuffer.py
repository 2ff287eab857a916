"""SPSC ring buffer: exactness under real threads, wrap-around, and honest overrun/underrun counters."""

import threading
import time

import numpy as np
import pytest

from rtvc.ringbuffer import RingBuffer


@pytest.mark.parametrize("seed", [0, 1])
def test_threads_move_10s_of_audio_once_in_order(seed):
    """A producer and a consumer thread move 12 s at 48 kHz in random block sizes through a small ring."""
    total = 48000 * 12
    ring = RingBuffer(4096)  # small: forces thousands of wrap-arounds and full/empty moments
    src = np.arange(1, total + 1, dtype=np.float32)  # exact in float32 (< 2**24)
    dst = np.zeros(total, dtype=np.float32)
    errors: list[BaseException] = []

    def producer() -> None:
        rng = np.random.default_rng(seed)
        pos = 0
        while pos < total:
            n = int(rng.integers(1, 1500))
            pos += ring.write(src[pos: pos + n])  # writes what fits; retries the rest
            if ring.free() == 0:
                time.sleep(0)

    def consumer() -> None:
        rng = np.random.default_rng(seed + 100)
        buf = np.zeros(1500, dtype=np.float32)
        pos = 0
        try:
            while pos < total:
                n = ring.read_into(buf[: int(rng.integers(1, 1500))], fill_silence=False)
                dst[pos: pos + n] = buf[:n]
                pos += n
                if n == 0:
                    time.sleep(0)
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    np.testing.assert_array_equal(dst, src)  # every sample once, in order
    assert ring.available() == 0 and ring.written == ring.read == total
    assert ring.underruns == 0  # fill_silence=False never counts


def test_wraparound_strided_and_counters():
    ring = RingBuffer(10)
    assert ring.write(np.arange(7, dtype=np.float32)) == 7
    out = np.zeros(5, np.float32)
    assert ring.read_into(out) == 5
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 4])
    stereo = np.arange(20, dtype=np.float32).reshape(10, 2)  # a callback's indata: take one channel (strided)
    assert ring.write(stereo[:, 1]) == 8  # 2 left + 8 free
    assert ring.overruns == 2 and ring.available() == 10 and ring.fill() == 1.0
    out = np.zeros(12, np.float32)
    assert ring.read_into(out) == 10
    np.testing.assert_array_equal(out, [5, 6, 1, 3, 5, 7, 9, 11, 13, 15, 0, 0])
    assert ring.underruns == 2
    assert ring.write_zeros(4) == 4 and ring.discard(3) == 3 and ring.available() == 1
    assert ring.write(np.ones(3, dtype=np.float64)) == 3  # other dtypes are converted
    out = np.full(4, 9, np.float32)
    assert ring.read_into(out, fill_silence=False) == 4
    np.testing.assert_array_equal(out, [0, 1, 1, 1])
    assert ring.underruns == 2


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        RingBuffer(0)
