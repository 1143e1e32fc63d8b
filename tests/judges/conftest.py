"""The judges' fixtures: a real kube-apiserver with Istio's CRDs installed, one per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.judges import istio
from tests.judges.apiserver import ApiServer, missing_tools, running_apiserver


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """etcd + kube-apiserver on loopback with the pinned Istio CRDs Established."""
    reason = missing_tools()  # where Go is missing, the test modules skip themselves, in one line
    if reason:
        pytest.fail(reason, pytrace=False)
    with running_apiserver(tmp_path_factory.mktemp("apiserver")) as server:
        server.install_crds(istio.crd_file())
        yield server
