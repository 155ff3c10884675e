"""Probe pod specs as the real cluster needs them."""
from __future__ import annotations


def test_privileged_host_pods_run_as_root_whatever_the_image_user():
    """The bundle's probe image runs as uid 65534; a privileged container as that user has no capabilities, and the
    facts pod's `chroot /host` failed on the real cluster ("Operation not permitted")."""
    from conformance import kube as k8s
    session = k8s.Session(kube=None, executor=None, probe_image="kvmlab.dev/netprobe:1")
    [container] = session.probe_pod_spec(host_network=True)["containers"]
    assert container["securityContext"] == {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    [plain] = session.probe_pod_spec()["containers"]
    assert plain["securityContext"]["runAsUser"] == 65534 and plain["securityContext"]["runAsNonRoot"] is True
