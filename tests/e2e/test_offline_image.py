"""Boot the offline image once with plain qemu (TCG, direct kernel boot) and prove it is usable:
cloud-init finishes from a NoCloud seed on a virtio disk, and sshd answers with the seeded host key.

No libvirt here: this isolates the image from the provisioner. The guest NIC is qemu user-mode
networking with ``restrict=on`` (the guest reaches nothing) and one hostfwd on 127.0.0.1.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from lab.remote.host import new_client_key
from lab.virt.seed import build_seed_iso

pytestmark = pytest.mark.e2e
logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # refused connections while booting are expected

IMAGE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmlab/images/debian-12-offline"
MAC = "52:54:00:6b:76:01"
USER = "kvmlab"
BOOT_DEADLINE_S = float(os.environ.get("KVMLAB_BOOT_DEADLINE", "420"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _try_ssh(port: int, host_pub: str, client_key: paramiko.PKey) -> paramiko.SSHClient | None:
    keytype, b64 = host_pub.split()[:2]
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{port}", keytype,
                               paramiko.PKey.from_type_string(keytype, base64.b64decode(b64)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect("127.0.0.1", port=port, username=USER, pkey=client_key, timeout=10, banner_timeout=20,
                       auth_timeout=20, allow_agent=False, look_for_keys=False)
        return client
    except (OSError, paramiko.SSHException, EOFError):
        client.close()
        return None


def _run(client: paramiko.SSHClient, cmd: str, timeout: float = 120) -> tuple[int, str]:
    _, stdout, stderr = client.exec_command(cmd, timeout=timeout)
    out = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), out


@pytest.fixture(scope="module")
def image() -> dict:
    manifest = IMAGE_DIR / "manifest.json"
    if not manifest.is_file():
        pytest.fail(f"offline image not built: {manifest} is missing; run `make image` "
                    f"(bash images/offline/build.sh)")
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: apt-get install qemu-system-x86 qemu-utils")
    return json.loads(manifest.read_text())


def test_offline_image_boots_to_cloud_init_and_ssh(image: dict, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                    "-b", str(IMAGE_DIR / image["rootfs"]), str(overlay), "4G"], check=True)

    host_priv, host_pub = new_client_key()  # any ed25519 pair in OpenSSH form
    client_priv, client_pub = new_client_key()
    client_key = paramiko.Ed25519Key.from_private_key(io.StringIO(client_priv))
    user_data = "#cloud-config\n" + json.dumps({
        "users": [{"name": USER, "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL",
                   "ssh_authorized_keys": [client_pub]}],
        "ssh_deletekeys": True,  # with ssh_keys given, cc_ssh generates no others
        "ssh_keys": {"ed25519_private": host_priv, "ed25519_public": host_pub},
    }, indent=1) + "\n"
    network_config = json.dumps({"version": 2, "ethernets": {
        "lan0": {"match": {"macaddress": MAC}, "dhcp4": True}}}) + "\n"
    seed = tmp_path / "seed.iso"
    seed.write_bytes(build_seed_iso(user_data, "instance-id: offline-image-test\nlocal-hostname: offline-test\n",
                                    network_config))

    port = _free_port()
    console = tmp_path / "console.log"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "1024", "-smp", "2",
           "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
           "-serial", f"file:{console}",
           "-kernel", str(IMAGE_DIR / image["kernel"]), "-initrd", str(IMAGE_DIR / image["initrd"]),
           "-append", image["cmdline"],
           "-drive", f"file={overlay},if=virtio,format=qcow2",
           "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
           "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
           "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
           "-device", "virtio-rng-pci"]
    start = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = None
    try:
        deadline = start + BOOT_DEADLINE_S
        while client is None:
            if qemu.poll() is not None:
                pytest.fail(f"qemu exited with {qemu.returncode}: {qemu.stdout.read().decode()}\n"
                            f"console tail:\n{console.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no SSH with the seeded host key on 127.0.0.1:{port} within {BOOT_DEADLINE_S:.0f} s; "
                            f"console tail:\n{console.read_text(errors='replace')[-3000:]}")
            client = _try_ssh(port, host_pub, client_key)
            if client is None:
                time.sleep(2)
        ssh_s = time.monotonic() - start
        # The host key the server presented is exactly the seeded one (RejectPolicy already refused others).
        served = client.get_transport().get_remote_server_key()
        assert f"{served.get_name()} {served.get_base64()}" == " ".join(host_pub.split()[:2])

        rc, status = _run(client, "cloud-init status --wait --long", timeout=BOOT_DEADLINE_S)
        ci_s = time.monotonic() - start
        assert rc == 0 and "status: done" in status, status
        facts = {}
        for key, c in {"kernel": "uname -r", "cloud_init": "cloud-init --version",
                       "links": "ip -br link", "addr": "ip -br -4 addr",
                       "networkd": "cat /etc/systemd/network/*.network",
                       "hostkeys": "ls /etc/ssh/ | grep host_",
                       "password_auth": "sudo sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication)'",
                       "boot": "systemd-analyze || true",
                       "slowest_units": "systemd-analyze blame --no-pager | head -n 8",
                       "cloud_init_problems": "sudo grep -E 'WARNING|ERROR|Traceback' /var/log/cloud-init.log || true", "sudo": "sudo -n id -u"}.items():
            rc, out = _run(client, c)
            assert rc == 0, f"{c}: rc {rc}: {out}"
            facts[key] = out.strip()
        assert facts["sudo"] == "0"
        assert "passwordauthentication no" in facts["password_auth"].lower()
        assert facts["hostkeys"].split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"], facts["hostkeys"]
        # network-config matched the NIC by MAC and the networkd renderer configured it (DHCP from qemu's slirp).
        assert "10.0.2.15/24" in facts["addr"], facts["addr"]
        assert f"MACAddress={MAC}" in facts["networkd"], facts["networkd"]
        assert facts["cloud_init_problems"] == "", facts["cloud_init_problems"]
        print(f"\nboot to SSH (seeded host key): {ssh_s:.1f} s; to cloud-init done: {ci_s:.1f} s under TCG")
        for key, value in facts.items():
            print(f"{key}: {value}")
        (tmp_path / "timings.json").write_text(json.dumps({"ssh_s": ssh_s, "cloud_init_s": ci_s, **facts}))
    finally:
        if client is not None:
            client.close()
        qemu.terminate()
        try:
            qemu.wait(timeout=15)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
        qemu.stdout.close()
