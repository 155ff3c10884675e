"""The one place that talks to libvirt.

Conventions: lookups return None when the object is absent; ``ensure_*`` looks up first and creates only what
is missing, returning ``(object, created)``; every other libvirt failure becomes a :class:`VirtError` naming the
object and the next command to run. Methods taking an object also accept its name.

The in-process ``test:///default`` driver (``simulated``) lacks some calls; what we do about each:
volume upload (no data is stored: warned, see :meth:`Hypervisor.upload`); DHCP leases (skipped, next source);
domain capabilities (kvm offer read from the capabilities' guest list); undefine flags NVRAM/CHECKPOINTS
(retried with the flags it knows); ``VIR_NETWORK_XML_INACTIVE`` (it keeps one definition per network, so the
current XML stands in). Its ``interfaceAddresses`` fabricates addresses for any running domain. Ownership
metadata goes into the XML at define time: ``virNetworkSetMetadata`` is newer (9.7) than Debian 12's libvirt.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

from lab.errors import VirtError
from lab.virt.accel import AccelFacts, cpuinfo_flags, open_kvm_device, decide_accel, is_local_uri
from lab.virt.xml import dhcp_host_xml, parse_owner

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions; no stderr noise

CHUNK = 4 * 2**20
NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_STORAGE_POOL,
             libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_INTERFACE}
#: Errors meaning "this address source has no answer (yet)": try the next one. Agent not connected is
#: AGENT_UNRESPONSIVE; leases on a driver without them NO_SUPPORT; a domain that stopped OPERATION_INVALID.
NO_ANSWER = {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
             libvirt.VIR_ERR_AGENT_UNSYNCED, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
             libvirt.VIR_ERR_OPERATION_UNSUPPORTED} | {
    getattr(libvirt, name) for name in ("VIR_ERR_AGENT_COMMAND_FAILED", "VIR_ERR_AGENT_COMMAND_TIMEOUT")
    if hasattr(libvirt, name)}
ADDRESS_SOURCES = (("lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
                   ("agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
                   ("arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP))
UNDEFINE_ALL = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
UNDEFINE_BASIC = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
DOMAIN_STATES = {libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
                 libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
                 libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
                 libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended"}


# ---------------------------------------------------------------------------------------------- hypervisor


def _code(exc: libvirt.libvirtError) -> int:
    return exc.get_error_code()


def _name_of(xml: str) -> str:
    name = ET.fromstring(xml).findtext("name")
    if not name:
        raise VirtError("XML without <name>", hint="this is a bug in lab.virt.xml; report it")
    return name


class Hypervisor:
    """A libvirt connection with idempotent operations. ``warn`` receives warnings (default: logging)."""

    def __init__(self, uri: str, *, warn: Callable[[str], None] | None = None):
        self.address_errors: dict[str, str] = {}  # address source -> its last error (see addresses())
        self.uri = uri
        self._warn = warn or logging.getLogger("lab.virt").warning
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
                            hint=self._connect_hint()) from None
        self.simulated = self.conn.getType() == "TEST"

    def _connect_hint(self) -> str:
        check = f"then check `virsh -c {self.uri} version`"
        if not is_local_uri(self.uri):
            return f"make sure SSH/TLS access works and libvirtd runs on the remote host; {check}"
        if self.uri.startswith("qemu") and "session" not in self.uri:
            return f"start the daemon: `sudo systemctl start libvirtd` (or virtqemud.socket); {check}"
        return check

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def __enter__(self) -> "Hypervisor":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # ---- error handling and lookups

    @contextmanager
    def _op(self, what: str, hint: str | None = None) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as exc:
            raise VirtError(f"{what} failed on {self.uri}: {exc.get_error_message()}",
                            hint=hint or f"inspect with `virsh -c {self.uri}`; then rerun `lab up`") from None

    def _lookup(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise VirtError(f"looking up {what} failed on {self.uri}: {exc.get_error_message()}",
                            hint=f"check `virsh -c {self.uri} version`") from None

    def network(self, name: str) -> libvirt.virNetwork | None:
        return self._lookup(f"network {name}", self.conn.networkLookupByName, name)

    def pool(self, name: str) -> libvirt.virStoragePool | None:
        return self._lookup(f"pool {name}", self.conn.storagePoolLookupByName, name)

    def volume(self, pool: libvirt.virStoragePool | str, name: str) -> libvirt.virStorageVol | None:
        pool = self._need(pool, self.pool, "pool")
        return self._lookup(f"volume {name}", pool.storageVolLookupByName, name)

    def domain(self, name: str) -> libvirt.virDomain | None:
        return self._lookup(f"domain {name}", self.conn.lookupByName, name)

    def _need(self, obj, lookup: Callable, kind: str):
        if not isinstance(obj, str):
            return obj
        found = lookup(obj)
        if found is None:
            raise VirtError(f"{kind} {obj} does not exist on {self.uri}", hint="run `lab up` to create it")
        return found

    def host_interface(self, name: str) -> bool | None:
        """Whether the hypervisor host has interface ``name`` (a bridge for bridge mode); None if unknowable."""
        try:
            self.conn.interfaceLookupByName(name)
            return True
        except libvirt.libvirtError as exc:
            if _code(exc) in NOT_FOUND:
                return False
            if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                return None
            raise VirtError(f"looking up host interface {name} failed: {exc.get_error_message()}") from None

    # ---- network

    def _check_owner(self, kind: str, name: str, existing_xml: str, wanted_xml: str) -> None:
        have, want = parse_owner(existing_xml), parse_owner(wanted_xml)
        if want is not None and have != want:
            owner = f"lab {have[0]}" if have else "nobody we know (no lab metadata)"
            raise VirtError(f"{kind} {name} already exists on {self.uri} and belongs to {owner}, not lab {want[0]}",
                            hint=f"rename the lab, or remove that {kind} yourself if it is stale")

    def ensure_network(self, xml: str) -> tuple[libvirt.virNetwork, bool]:
        """Define (if missing), start (if inactive) and autostart the network."""
        name = _name_of(xml)
        net, created = self.network(name), False
        if net is None:
            with self._op(f"defining network {name}"):
                net = self.conn.networkDefineXML(xml)
            created = True
        else:
            self._check_owner("network", name, _network_config_xml(net), xml)
        if not net.isActive():
            with self._op(f"starting network {name}", hint="another network may use the same bridge or subnet: "
                                                          "`virsh net-list --all`; see the libvirtd journal"):
                net.create()
        if not net.autostart():
            with self._op(f"setting autostart on network {name}"):
                net.setAutostart(1)
        return net, created

    def ensure_dhcp_host(self, net: libvirt.virNetwork | str, mac: str, ip: str, name: str) -> bool:
        """Reserve ``ip`` for ``mac`` in the running network AND its config, without restarting it.

        Returns whether anything changed. Another MAC holding the IP or the name is an error, never overwritten.
        """
        net = self._need(net, self.network, "network")
        mac = mac.lower()
        wanted = dhcp_host_xml(mac, ip, name)
        changed = False
        scopes = [(_network_config_xml, libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG, "config")]
        if net.isActive():
            scopes.append((lambda n: n.XMLDesc(0), libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE, "live"))
        for read, affect, scope in scopes:
            with self._op(f"reading network {net.name()} ({scope})"):
                hosts = ET.fromstring(read(net)).findall("ip/dhcp/host")
            for host in hosts:
                other = (host.get("mac") or "").lower()
                if other != mac and (host.get("ip") == ip or host.get("name") == name):
                    raise VirtError(f"network {net.name()} ({scope}) already reserves {host.get('ip')} / "
                                    f"{host.get('name')} for MAC {other}, wanted for {mac}",
                                    hint=f"virsh -c {self.uri} net-update {net.name()} delete ip-dhcp-host "
                                         f"\"<host mac='{other}'/>\" --live --config")
            mine = next((h for h in hosts if (h.get("mac") or "").lower() == mac), None)
            if mine is not None and (mine.get("ip"), mine.get("name")) == (ip, name):
                continue
            command = (libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST if mine is None
                       else libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY)
            with self._op(f"reserving {ip} for {mac} in network {net.name()} ({scope})"):
                net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, wanted, affect)
            changed = True
        return changed

    def remove_network(self, name: str) -> bool:
        net = self.network(name)
        if net is None:
            return False
        with self._op(f"removing network {name}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()
        return True

    def owned_networks(self, lab_name: str) -> list[str]:
        """Names of the networks whose ownership metadata names ``lab_name``."""
        with self._op("listing networks"):
            nets = self.conn.listAllNetworks(0)
        owned = []
        for net in nets:
            try:
                owner = parse_owner(net.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # vanished while we looked
            if owner is not None and owner[0] == lab_name:
                owned.append(net.name())
        return sorted(owned)

    # ---- storage

    def ensure_pool(self, xml: str) -> tuple[libvirt.virStoragePool, bool]:
        """Define (if missing), build its directory and start (if inactive), autostart, refresh."""
        name = _name_of(xml)
        want_path = ET.fromstring(xml).findtext("target/path")
        pool, created = self.pool(name), False
        if pool is None:
            with self._op(f"defining pool {name}"):
                pool = self.conn.storagePoolDefineXML(xml, 0)
            created = True
        else:
            have_path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
            if want_path and have_path != want_path:
                raise VirtError(f"pool {name} exists at {have_path}, not {want_path}",
                                hint="run `lab down` then `lab up`, or set libvirt.poolPath back")
        hint = f"check that {want_path} can be created and is not on a full filesystem"
        if not pool.isActive():
            with self._op(f"building pool {name} at {want_path}", hint=hint):
                pool.build(0)
            with self._op(f"starting pool {name}", hint=hint):
                pool.create(0)
        else:
            with self._op(f"refreshing pool {name}"):
                pool.refresh(0)
        if not pool.autostart():
            with self._op(f"setting autostart on pool {name}"):
                pool.setAutostart(1)
        return pool, created

    def ensure_volume(self, pool: libvirt.virStoragePool | str, xml: str) -> tuple[libvirt.virStorageVol, bool]:
        pool = self._need(pool, self.pool, "pool")
        name = _name_of(xml)
        vol = self.volume(pool, name)
        if vol is not None:
            return vol, False
        with self._op(f"creating volume {name} in pool {pool.name()}",
                      hint="a backing file must exist in the pool and the disk must have room"):
            vol = pool.createXML(xml, 0)
        return vol, True

    def upload(self, vol: libvirt.virStorageVol, content: Path | str | bytes) -> bool:
        """Write a file's (or bytes') content into ``vol`` through a libvirt stream (works over qemu+ssh).

        Returns True when uploaded. On the simulated test driver (no virStorageVolUpload) it warns that the
        volume holds no data and returns False; everywhere else a failure raises VirtError.
        """
        data = content if isinstance(content, bytes) else None
        path = None if data is not None else Path(content)
        what = f"{len(data)} bytes" if data is not None else str(path)
        try:
            size = len(data) if data is not None else path.stat().st_size
        except OSError as exc:
            raise VirtError(f"cannot upload {path} into volume {vol.name()}: {exc.strerror}",
                            hint="rebuild or re-download the image (make image)") from None
        stream = self.conn.newStream(0)
        try:
            vol.upload(stream, 0, size, 0)
        except libvirt.libvirtError as exc:
            _abort(stream)
            if self.simulated and _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                self._warn(f"{self.uri} is libvirt's simulated test driver: it cannot store volume data, so "
                           f"volume {vol.name()} stays EMPTY ({what} not uploaded)")
                return False
            raise VirtError(f"uploading {what} into volume {vol.name()} failed: {exc.get_error_message()}",
                            hint=f"check free space in the pool on the hypervisor host (virsh -c {self.uri} "
                                 "pool-info); then rerun `lab up`") from None
        sent = 0
        try:
            chunks = _chunks(data) if data is not None else _file_chunks(path)
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = stream.send(bytes(view))
                    if n < 0:
                        raise VirtError(f"stream to volume {vol.name()} refused data (send returned {n})")
                    view, sent = view[n:], sent + n
            stream.finish()
        except libvirt.libvirtError as exc:
            _abort(stream)
            raise VirtError(f"uploading {what} into volume {vol.name()} failed after {sent} of {size} bytes: "
                            f"{exc.get_error_message()}",
                            hint="the volume is incomplete: delete it (lab down) and rerun `lab up`") from None
        except BaseException:
            _abort(stream)
            raise
        return True

    def remove_pool(self, name: str) -> bool:
        """Delete every volume, stop the pool, delete its directory, undefine it."""
        pool = self.pool(name)
        if pool is None:
            return False
        with self._op(f"removing pool {name}"):
            if not pool.isActive():  # volumes can only be listed and deleted in an active pool
                pool.build(0)  # recreates a directory removed behind libvirt's back, so create() works
                pool.create(0)
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
            pool.delete(0)
            pool.undefine()
        return True

    # ---- domains

    def define_domain(self, xml: str) -> libvirt.virDomain:
        """Define the domain if missing; an existing one (ours) is returned unchanged."""
        name = _name_of(xml)
        dom = self.domain(name)
        if dom is not None:
            self._check_owner("domain", name, dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), xml)
            return dom
        with self._op(f"defining domain {name}"):
            return self.conn.defineXML(xml)

    def start(self, dom: libvirt.virDomain | str) -> bool:
        """Start the domain unless it runs; returns whether it was started."""
        dom = self._need(dom, self.domain, "domain")
        if dom.isActive():
            return False
        with self._op(f"starting domain {dom.name()}",
                      hint=f"read /var/log/libvirt/qemu/{dom.name()}.log on the hypervisor host; qemu must be "
                           "able to read every file up the pool path"):
            dom.create()
        return True

    def unapplied_cpu_shares(self, dom: libvirt.virDomain) -> str | None:
        """Why the CPU shares in the domain's ``<cputune>`` are not in force (None when they are, or none are set).
        libvirt keeps them in the XML without saying so when it has no cgroup CPU controller to write them to
        (seen: libvirtd without systemd on a hybrid cgroup host, "cgroup CPU controller is not mounted")."""
        found = ET.fromstring(dom.XMLDesc(0)).find("cputune/shares")
        if found is None or not (found.text or "").strip().isdigit():
            return None
        want = int(found.text.strip())
        try:
            params = dom.schedulerParameters()
        except libvirt.libvirtError as exc:
            return f"libvirt cannot apply cpu shares {want}: {exc.get_error_message()}"
        have = params.get("cpu_shares")
        if have != want:
            return f"libvirt reports cpu_shares {have!r} (parameters {sorted(params)}), want {want}"
        return None

    def domain_state(self, name: str) -> str | None:
        dom = self.domain(name)
        if dom is None:
            return None
        try:
            state, _reason = dom.state(0)
        except libvirt.libvirtError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise VirtError(f"reading the state of domain {name} failed: {exc.get_error_message()}") from None
        return DOMAIN_STATES.get(state, "nostate")

    def remove_domain(self, name: str) -> bool:
        """Destroy (if running) and undefine with managed save, snapshot/checkpoint metadata and NVRAM."""
        dom = self.domain(name)
        if dom is None:
            return False
        with self._op(f"removing domain {name}"):
            try:
                if dom.isActive():
                    dom.destroy()
                _undefine(dom)
            except libvirt.libvirtError as exc:
                if _code(exc) not in NOT_FOUND:  # gone meanwhile (a transient domain vanishes on destroy)
                    raise
        return True

    def owned_domains(self, lab_name: str) -> dict[str, str | None]:
        """{domain name: node name} for the domains whose ownership metadata names ``lab_name``."""
        with self._op("listing domains"):
            doms = self.conn.listAllDomains(0)
        owned = {}
        for dom in doms:
            try:  # not virDomainGetMetadata: it returns the element stripped of its namespace
                owner = parse_owner(dom.XMLDesc(0))
            except libvirt.libvirtError as exc:
                if _code(exc) in NOT_FOUND:
                    continue  # vanished while we looked
                raise VirtError(f"reading domain {dom.name()} failed: {exc.get_error_message()}") from None
            if owner is not None and owner[0] == lab_name:
                owned[dom.name()] = owner[1]
        return dict(sorted(owned.items()))

    def addresses(self, dom: libvirt.virDomain | str, mac: str) -> list[tuple[str, str]]:
        """IPv4 addresses of the NIC with ``mac``: [(source, ip)] from the first source that knows any, trying
        DHCP leases, then the guest agent, then the ARP table. [] while nothing is known (or the domain is off).

        A source that fails (e.g. libvirt's ARP reader on a kernel whose netlink it does not parse: "wrong nlmsg
        len") does not end the wait: the others may still answer. Its error is kept in ``address_errors`` so the
        caller's timeout message can name it."""
        dom = self._need(dom, self.domain, "domain")
        mac = mac.lower()
        for source, flag in ADDRESS_SOURCES:
            try:
                if not dom.isActive():
                    return []
                ifaces = dom.interfaceAddresses(flag, 0) or {}
            except libvirt.libvirtError as exc:
                if _code(exc) not in NO_ANSWER:
                    self.address_errors[source] = exc.get_error_message()
                continue
            found = [(source, a["addr"]) for iface in ifaces.values() if (iface.get("hwaddr") or "").lower() == mac
                     for a in iface.get("addrs") or [] if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4]
            if found:
                return found
        return []

    # ---- accelerator

    def accel_facts(self) -> AccelFacts:
        local = is_local_uri(self.uri)
        with self._op("reading the hypervisor capabilities"):
            caps = ET.fromstring(self.conn.getCapabilities())
        flags = {f.get("name") for f in caps.findall("host/cpu/feature")}
        if local:
            flags |= cpuinfo_flags()
        arch = caps.findtext("host/cpu/arch") or "x86_64"
        return AccelFacts(uri=self.uri, local=local, cpu_flags=frozenset(flags),
                          kvm_device=open_kvm_device() if local else None,
                          kvm_offered=self._kvm_offered(caps, arch))

    def _kvm_offered(self, caps: ET.Element, arch: str) -> str | None:
        # The capabilities' guest list first: libvirt 11's test driver answers domain capabilities for any virt
        # type it is asked about, so only a guest entry of type kvm for this arch counts as an offer.
        types = {d.get("type") for d in caps.findall("guest/arch/domain")}
        if "kvm" not in types:
            return f"its guest domain types are {', '.join(sorted(t for t in types if t)) or 'none'}"
        try:
            domcaps = ET.fromstring(self.conn.getDomainCapabilities(None, arch, None, "kvm", 0))
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_SUPPORT:
                return exc.get_error_message()
            return None  # a driver without domain capabilities: the guest list above is its whole answer
        return None if domcaps.findtext("domain") == "kvm" else "domain capabilities do not list kvm"

    def qemu_version(self) -> tuple[int, int, int] | None:
        """The QEMU that libvirt runs guests with (virConnectGetVersion), or None for a driver that runs none."""
        if self.simulated:
            return None
        with self._op("reading the hypervisor version"):
            number = self.conn.getVersion()
        return number // 1_000_000, number // 1000 % 1000, number % 1000

    def detect_accel(self, requested: str = "auto") -> tuple[str, str | None]:
        """'kvm' where the CPU has vmx/svm, /dev/kvm opens (local URIs) and libvirt offers kvm; else 'qemu' (TCG)
        with a warning saying why. Raises VirtError if 'kvm' is requested but unusable."""
        return decide_accel(requested, self.accel_facts())


# ---------------------------------------------------------------------------------------------- helpers


def _network_config_xml(net: libvirt.virNetwork) -> str:
    """The persistent definition. The test driver refuses VIR_NETWORK_XML_INACTIVE (and keeps a single
    definition anyway): there, and only on that refusal, the current XML stands in for it."""
    try:
        return net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        if _code(exc) not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        return net.XMLDesc(0)


def _undefine(dom: libvirt.virDomain) -> None:
    for flags in (UNDEFINE_ALL, UNDEFINE_BASIC):
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:  # the test driver refuses NVRAM/CHECKPOINTS flags
            if _code(exc) not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                raise
    dom.undefine()


def _abort(stream: libvirt.virStream) -> None:
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass  # the stream is already dead; the original error is what matters


def _chunks(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk
