"""Fail if a test secret appears anywhere in a test run's log file.

Run by .ci/run after the suite: ``python tests/check_log_secrets.py test-logs/pytest.log``.
The log file holds every record of the run at DEBUG level, including the stderr of the
real sigproxy processes the tests start.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import SECRET_KEY, SESSION_TOKEN

# Values the tests send that must never be logged (query values, cookies, bearer tokens).
MARKERS = (SECRET_KEY, SESSION_TOKEN, "never-LOGGED", "hunter2-query-value", "cookie-value-abc")


def main(path: str) -> int:
    text = Path(path).read_text(errors="replace")
    if len(text) < 1000:
        print(f"{path}: only {len(text)} characters: was the suite run with its log file?")
        return 1
    found = [m for m in MARKERS if m in text]
    if found:
        for marker in found:
            line = next(ln for ln in text.splitlines() if marker in ln)
            print(f"{path}: test secret {marker[:12]}... logged: {line[:200]}")
        return 1
    print(f"{path}: {len(text.splitlines())} log lines, no test secret in them")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "test-logs/pytest.log"))
