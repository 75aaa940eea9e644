"""``make demo-https`` as shipped (smaller): curl or Python's ssl through the TLS
listener to the workers, exit 0 and its OK line."""

from __future__ import annotations

import sys

import trio

from tests.daemon_harness import REPO


async def test_demo_https_runs_end_to_end() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "examples.https.demo", "--workers", "2", "--requests", "8"],
        cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()[-3000:]
    assert "requests     8: 8 answered by a worker, 0 failed" in out
    assert "demo-https   OK" in out
