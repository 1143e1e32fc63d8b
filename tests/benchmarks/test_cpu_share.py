"""`benchmarks.cpu_share`'s accounting: CPU seconds read from /proc, divided per request, summed per role."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.cpu_share import by_role, cpu_seconds, markdown, per_request_ms


def test_a_busy_process_gains_cpu_seconds_and_an_idle_one_does_not() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 10: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        time.sleep(0.3)
        busy0, idle0 = cpu_seconds(busy.pid), cpu_seconds(idle.pid)
        # On 2 cores busy with other tests the spinner may get a third of a core: wait for its 0.3 s, up to 8 s.
        deadline = time.monotonic() + 8.0
        while cpu_seconds(busy.pid) - busy0 <= 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cpu_seconds(busy.pid) - busy0 > 0.3
        assert cpu_seconds(idle.pid) - idle0 < 0.1
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()


def test_per_request_milliseconds_and_their_sums_per_role() -> None:
    before = {"s0": 1.0, "s0-sidecar": 2.0, "gateway": 0.5}
    after = {"s0": 3.0, "s0-sidecar": 2.5, "gateway": 0.75}
    shares = per_request_ms(before, after, 100)
    assert shares == pytest.approx({"s0": 20.0, "s0-sidecar": 5.0, "gateway": 2.5})
    roles = {"s0": "app", "s0-sidecar": "sidecar", "gateway": "gateway"}
    assert by_role(shares, roles) == pytest.approx({"app": 20.0, "sidecar": 5.0, "gateway": 2.5})
    table = "\n".join(markdown({"pipeline": "p", "concurrency": 1, "answered": 100, "requests_per_s": 10.0,
                                "failed": 0, "cpu_ms_per_request": shares, "roles": roles}))
    assert "| s0 | 20.00 | 73% |" in table and "| all | 27.50 | 100% |" in table
    with pytest.raises(ValueError, match="no request was answered"):
        per_request_ms(before, after, 0)
