// Package controllers declares the one name Cilium takes from the MCS API controllers module.
package controllers

// DerivedServiceAnnotation is the ServiceImport annotation naming its derived Service (KEP-1645 implementation).
const DerivedServiceAnnotation = "multicluster.kubernetes.io/derived-service"
