"""The benchmark suite in its smoke mode: small N, one repetition, nothing installed.

It keeps the suite from rotting; the figures themselves come from full runs.
"""

import subprocess
import sys

from cluster import REPO_ROOT


def test_bench_smoke_writes_report(tmp_path):
    output = tmp_path / "benchmarks.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = output.read_text()
    assert "<!-- bench:peers:start -->" in report
    assert "<!-- bench:peers:end -->" in report
    assert "| gdpm | the API reports 20 running |" in report
    assert "GET /api/v1/nodes" in report
