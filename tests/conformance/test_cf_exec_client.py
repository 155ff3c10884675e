"""Exec never borrows the shared ApiClient: ``kubernetes.stream.stream`` swaps the request method of the client it
is given while the exec runs, and on the real CI cluster every other thread's plain call in that window
(list_namespaced_pod) went out as a websocket handshake and failed with "Handshake status 200 OK"."""
from __future__ import annotations

import threading
import types

from kubernetes import client
from kubernetes.stream import stream as real_stream

from conformance.kube import Kube, StreamExecutor


def test_each_thread_execs_through_its_own_client():
    kube = Kube(client.ApiClient(client.Configuration()))
    executor = StreamExecutor(kube)
    mine = executor.exec_api()
    assert executor.exec_api() is mine  # one per thread, reused
    assert mine.api_client is not kube.api and mine.api_client.configuration is kube.api.configuration
    seen = []
    worker = threading.Thread(target=lambda: seen.append(executor.exec_api()))
    worker.start()
    worker.join(10)
    assert seen and seen[0].api_client is not mine.api_client and seen[0].api_client is not kube.api


def test_the_shared_client_is_untouched_while_an_exec_is_in_flight():
    """The real stream() patches the client behind the exec method; with our executor that is never kube.api."""
    kube = Kube(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    executor = StreamExecutor(kube)
    shared_call = kube.api.call_api
    api = executor.exec_api()
    own_call = api.api_client.call_api
    observed = {}

    def fake_exec(self, *args, **kwargs):  # connect_get_namespaced_pod_exec, inside stream()'s patch window
        observed["shared_client_untouched"] = kube.api.call_api == shared_call
        observed["exec_client_patched"] = self.api_client.call_api != own_call
        raise RuntimeError("stop here: no server")

    try:
        real_stream(types.MethodType(fake_exec, api), "pod", "ns", command=["true"])
    except RuntimeError:
        pass
    assert observed == {"shared_client_untouched": True, "exec_client_patched": True}
