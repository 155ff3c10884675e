"""Fixtures for the conformance orchestration tests: the API double (tests/apidouble) and its scripted kubelet."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> import apidouble

from apidouble.kubelet import NODES, Kubelet  # noqa: E402
from apidouble.server import ApiDouble  # noqa: E402


@pytest.fixture
def double():
    api = ApiDouble().start()
    for name, ip in NODES.items():
        api.add_node(name, ip)
    yield api
    api.stop()


@pytest.fixture
def kubelet(double):
    return Kubelet(double)


@pytest.fixture
def kubeconfig(double, tmp_path):
    return double.kubeconfig(tmp_path / "kubeconfig")


