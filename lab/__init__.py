"""KVM lab provisioner."""
