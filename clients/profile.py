#!/usr/bin/env python3
"""Latency profiler for a running rtvc server (no torch needed for --server): round trips, measured end-to-end
delay, capacity. Same as `rtvc profile --no-local --server URL`; see `rtvc profile --help` for every option.

    python clients/profile.py ws://127.0.0.1:8765/v1/stream --max-clients 32 --out profile_out
"""

from __future__ import annotations

import sys

from rtvc.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["profile", "--no-local", "--server", args[0], *args[1:]]))
