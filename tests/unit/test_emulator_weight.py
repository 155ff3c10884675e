"""A TCG worker's qemu gets a lower autogroup weight than the control plane's (the kernel splits CPU equally between
autogroups, so a 2-vCPU control plane got one host core, like a 1-vCPU worker)."""
from __future__ import annotations

from lab.virt.accel import TCG_WORKER_AUTOGROUP_NICE, weight_emulated_worker


def test_writes_the_workers_autogroup_nice(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/lab-w1.pid").write_text("4242\n")
    (tmp_path / "proc/4242").mkdir(parents=True)
    (tmp_path / "proc/4242/autogroup").write_text("/autogroup-75 nice 0\n")
    assert weight_emulated_worker("qemu:///system", "lab-w1", pid_dir=str(tmp_path / "run"),
                                  proc=str(tmp_path / "proc")) is None
    assert (tmp_path / "proc/4242/autogroup").read_text() == f"{TCG_WORKER_AUTOGROUP_NICE}\n"


def test_a_missing_pid_file_is_a_warning_naming_the_domain(tmp_path):
    problem = weight_emulated_worker("qemu:///system", "lab-w1", pid_dir=str(tmp_path), proc=str(tmp_path))
    assert problem and "lab-w1" in problem and "starved" in problem


def test_remote_hosts_and_the_test_driver_are_left_alone(tmp_path):
    assert "not local" in weight_emulated_worker("qemu+ssh://kvm1/system", "lab-w1", pid_dir=str(tmp_path))
    assert weight_emulated_worker("test:///default", "lab-w1", pid_dir=str(tmp_path)) is None
