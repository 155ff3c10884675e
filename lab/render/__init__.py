"""Rendered artifacts: pure functions of the Lab. What ``lab render`` writes is exactly what ``lab up`` applies."""
from __future__ import annotations

from lab.spec import Lab

KUBEADM_FILE = "kubeadm.yaml"
CILIUM_FILE = "cilium-values.yaml"
METALLB_FILE = "metallb.yaml"


def render_cluster(lab: Lab) -> dict[str, str]:
    """File name -> text of the cluster artifacts (empty when kubernetes.enabled is false)."""
    if not lab.kubernetes.enabled:
        return {}
    from lab.render.cilium import render_cilium_values
    from lab.render.kubeadm import kubeadm_patches, render_kubeadm
    from lab.render.metallb import render_metallb

    files = {KUBEADM_FILE: render_kubeadm(lab), CILIUM_FILE: render_cilium_values(lab),
             METALLB_FILE: render_metallb(lab)}
    files.update({f"kubeadm-patches/{name}": text for name, text in kubeadm_patches(lab).items()})
    return files
