"""NetworkPolicy manifests the default-deny check applies (the oracle and the cluster see the same dicts)."""
from __future__ import annotations

NAME_LABEL = "kubernetes.io/metadata.name"


def default_deny(namespace: str, types: tuple[str, ...] = ("Ingress", "Egress")) -> dict:
    """Deny all ingress and egress (``types``: only those directions) for every pod of ``namespace``."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": list(types)}}


def allow_ingress_from_cidr(namespace: str, name: str, cidr: str, port: int, proto: str = "TCP") -> dict:
    """Allow every pod of ``namespace`` to be reached on ``port`` from addresses in ``cidr`` (an ipBlock)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}],
                                  "ports": [{"protocol": proto, "port": port}]}]}}


def replace_policies(kube, namespaces: list[str], manifests: list[dict]) -> int:
    """Delete every NetworkPolicy in ``namespaces``, create ``manifests``; returns how many objects were deleted
    or created (what the enforcement barrier waits for)."""
    changes = 0
    for ns in namespaces:
        changes += len(kube.net.list_namespaced_network_policy(ns).items)
        kube.net.delete_collection_namespaced_network_policy(ns)
    for m in manifests:
        kube.net.create_namespaced_network_policy(m["metadata"]["namespace"], m)
        changes += 1
    return changes


def allow_dns(namespace: str, dns_namespace: str = "kube-system", dns_labels: dict | None = None) -> dict:
    """Allow every pod of ``namespace`` to reach kube-dns on 53/UDP and 53/TCP."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-dns", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: dns_namespace}},
                                         "podSelector": {"matchLabels": dns_labels or {"k8s-app": "kube-dns"}}}],
                                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}}


def allow_egress_to(namespace: str, name: str, from_labels: dict, to_namespace: str, to_labels: dict,
                    port: int, proto: str = "TCP") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": dict(from_labels)}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: to_namespace}},
                                         "podSelector": {"matchLabels": dict(to_labels)}}],
                                 "ports": [{"protocol": proto, "port": port}]}]}}


def allow_ingress_from(namespace: str, name: str, to_labels: dict, from_namespace: str, from_labels: dict,
                       port: int | str, proto: str = "TCP") -> dict:
    """``port`` may be a number or the name of a container port of the selected pods (``http``)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": dict(to_labels)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {NAME_LABEL: from_namespace}},
                                            "podSelector": {"matchLabels": dict(from_labels)}}],
                                  "ports": [{"protocol": proto, "port": port}]}]}}


def allow_egress_cidr(namespace: str, name: str, cidr: str, except_: list[str] = ()) -> dict:
    """Egress allow-list for every pod of ``namespace``: ``cidr`` minus ``except_`` (an ipBlock), every port."""
    block = {"cidr": cidr, **({"except": list(except_)} if except_ else {})}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": block}]}]}}
