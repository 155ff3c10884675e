"""The offline bundle: Kubernetes, etcd, CoreDNS, pause, Helm, Cilium, MetalLB and the probe image as binaries,
OCI archives, charts and manifests, cached by recipe hash and side-loaded into lab nodes (nothing is pulled)."""
