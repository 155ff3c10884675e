// A stand-in for sigs.k8s.io/mcs-api/controllers v0.5.2, which Cilium v1.20.2 requires but the Go module proxy does
// not serve (the nested module's tag is refused). Cilium uses only its DerivedServiceAnnotation key, for
// multi-cluster services (ClusterMesh), which a lab never enables.
module sigs.k8s.io/mcs-api/controllers

go 1.24
