"""The suite's API client retries a busy API server's transient answers, through the REAL kubernetes client
against the API double, which answers as the TCG lab's API server did ("etcdserver: request timed out", 500).

A create whose write landed despite the 500 is read back instead of failing on its own retry's 409; a real
conflict, a 404 or a 403 is answered at once; a server that stays busy past the window is an ApiException (the
check reports it as not measured, never as a verdict).
"""
from __future__ import annotations

import logging

import pytest
from kubernetes.client.rest import ApiException

from conformance import kube as k8s
from lab.wait import is_transport_error


@pytest.fixture
def kube(kubeconfig, monkeypatch):
    monkeypatch.setattr(k8s.RetryingApiClient, "retry_seconds", 4.0)
    return k8s.connect(kubeconfig)


def pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "probe", "image": "netprobe"}]}}


def posts(double, plural: str) -> int:
    return sum(1 for method, path in double.requests if method == "POST" and path.endswith("/" + plural))


def test_a_create_answered_500_once_is_retried_and_succeeds(double, kube, caplog):
    double.fail("POST", "namespaces", times=1)
    session = k8s.Session(kube, k8s.StreamExecutor(kube))
    with caplog.at_level(logging.WARNING, logger="conformance"):
        name = session.namespace("retry")
    assert double.get("namespaces", "", name) is not None
    assert posts(double, "namespaces") == 2
    assert "answered 500 (etcdserver: request timed out); retrying, attempt 2" in caplog.text


def test_a_create_written_despite_its_500_is_read_back_not_a_409(double, kube, caplog):
    session = k8s.Session(kube, k8s.StreamExecutor(kube))
    ns = session.namespace("written")
    double.fail("POST", "pods", times=1, written=True)
    with caplog.at_level(logging.WARNING, logger="conformance"):
        created = kube.core.create_namespaced_pod(ns, pod("p1"))
    assert created.metadata.name == "p1" and created.metadata.uid
    assert [p["metadata"]["name"] for p in double.list("pods", ns)] == ["p1"]
    assert "found p1 already written; reading it back" in caplog.text


@pytest.mark.parametrize("code", [429, 503, 504])
def test_other_transient_answers_are_retried(double, kube, code):
    ns = k8s.Session(kube, k8s.StreamExecutor(kube)).namespace("codes")
    double.fail("POST", "pods", times=2, code=code, message="busy")
    kube.core.create_namespaced_pod(ns, pod("p1"))
    assert posts(double, "pods") == 3


def test_a_server_busy_past_the_window_is_a_transport_error_not_a_verdict(double, kube):
    ns = k8s.Session(kube, k8s.StreamExecutor(kube)).namespace("busy")
    double.fail("POST", "pods", times=1000)
    with pytest.raises(ApiException) as caught:
        kube.core.create_namespaced_pod(ns, pod("p1"))
    assert caught.value.status == 500 and "etcdserver: request timed out" in caught.value.body
    assert is_transport_error(caught.value)
    assert 3 <= posts(double, "pods") < 20  # retried with backoff for the 4 s window, not hammered


def test_a_real_conflict_is_answered_at_once(double, kube):
    ns = k8s.Session(kube, k8s.StreamExecutor(kube)).namespace("conflict")
    kube.core.create_namespaced_pod(ns, pod("p1"))
    with pytest.raises(ApiException) as caught:
        kube.core.create_namespaced_pod(ns, pod("p1"))
    assert caught.value.status == 409
    assert posts(double, "pods") == 2


def test_not_found_and_forbidden_are_not_retried(double, kube):
    with pytest.raises(ApiException) as caught:
        kube.core.create_namespaced_pod("no-such-namespace", pod("p1"))
    assert caught.value.status == 404
    double.deny("create", "configmaps")
    with pytest.raises(ApiException) as caught:
        kube.core.create_namespaced_config_map("default", {"metadata": {"name": "c"}})
    assert caught.value.status == 403
    assert posts(double, "pods") == 1 and posts(double, "configmaps") == 1
