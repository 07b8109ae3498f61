"""The benchmark harness shared by bench/native_bench.py and bench/proxy_bench.py.

One job per module:

* ``tools``: install or locate nginx, wrk, Envoy and uvloop (Debian packages, PyPI) and
  read their versions;
* ``measure``: start and stop the processes under test, /proc CPU and RSS accounting,
  what they logged;
* ``targets``: what is measured: nginx, sigproxy in its default configuration, Envoy,
  the signing check, and the admin-port traffic a deployment has;
* ``upstream``: a small aiohttp upstream (own process): ``{"ok":true}``, slow chunks, 64 MiB;
* ``load``: the open-loop load generator and its HTTP/1.1 response reader;
* ``clients``: the other load: wrk, an aiohttp closed loop, time-to-first-byte GETs;
* ``results``: what the rounds measured, as measured;
* ``summary``: every figure (medians, ranges, per-round values, ratios) as JSON;
* ``verdicts``: the performance targets, met or missed;
* ``report``: the markdown report, rendered from the summary alone;
* ``native``: the rounds native_bench.py runs.

The package is imported with ``bench/`` on ``sys.path`` (the scripts there have it as
their directory); its child processes run as ``python -m harness.<module>`` with
``PYTHONPATH`` set by :func:`harness.measure.harness_env`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent


def log(msg: str) -> None:
    """Progress, on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
