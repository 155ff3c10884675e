"""`connect .../dns`, `.../dns-tcp` against a real DNS server (dnsmasq) and `.../http` against `serve --http`,
through Cilium's layout, healthy and with nftables dropping or rejecting DNS on the node (a policy stand-in)."""
import pytest

from topo import CIL_POD, build_cilium, capture, dnsmasq

NAME, ADDRESS = "kubernetes.default.svc.cluster.local", "10.96.0.1"
DNS_UDP, DNS_TCP, HTTP = CIL_POD[2] + ":53/dns", CIL_POD[2] + ":53/dns-tcp", CIL_POD[2] + ":8080/http"

RULES = {
    "drop": "udp dport 53 drop; tcp dport 53 drop",
    "reject": "udp dport 53 reject; tcp dport 53 reject with tcp reset",
    "reject_admin": "udp dport 53 reject with icmpx type admin-prohibited; "
                    "tcp dport 53 reject with icmpx type admin-prohibited",
}
EXPECTED = {  # scenario: (dns verdict, dns-tcp verdict); http is never touched by these rules
    "healthy": ("connected", "connected"),
    "drop": ("timeout", "timeout"),
    "reject": ("refused", "refused"),
    "reject_admin": ("unreachable", "unreachable"),
}


@pytest.fixture
def cluster(lab):
    c = build_cilium(lab)
    dnsmasq(lab, c.pod2, CIL_POD[2], {NAME: ADDRESS})
    lab.serve(c.pod2, http="8080", hostname="pod2")
    return c


@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_dns_and_http_verdicts(lab, cluster, scenario):
    if scenario != "healthy":
        lab.nft(cluster.node1, "table inet dnspol {\n chain forward { type filter hook forward priority 0; "
                               'iifname "lxc0" %s; }\n}\n' % RULES[scenario])
    results = lab.probe(cluster.pod1, "connect", "--to", DNS_UDP, "--to", DNS_TCP, "--to", HTTP,
                        "--timeout", "2", "--dns-name", NAME, slim=True)
    capture("connect_dns_http_%s" % scenario, results)
    dns, dns_tcp, http = results
    assert (dns["verdict"], dns_tcp["verdict"]) == EXPECTED[scenario]
    assert (http["verdict"], http["peer_host"], http["http"]["status"]) == ("connected", "pod2", 200)
    if scenario == "healthy":
        for r in (dns, dns_tcp):
            assert r["dns"] == {"name": NAME, "type": "A", "rcode": "NOERROR", "truncated": False,
                                "answers": [ADDRESS]}
    else:
        assert "dns" not in dns and "dns" not in dns_tcp
    if scenario == "drop":
        assert dns["tries"] == 3 and dns["errno"] == "ETIMEDOUT"


def test_dns_server_that_does_not_know_the_name_still_answers(lab, cluster):
    (r,) = lab.probe(cluster.pod1, "connect", "--to", DNS_UDP, "--dns-name", "nope.invalid", "--timeout", "2",
                     slim=True)
    assert r["verdict"] == "connected"  # the flow passed; what the server said is separate
    assert r["dns"]["rcode"] in ("NXDOMAIN", "REFUSED") and r["dns"]["answers"] == []


def test_dns_to_a_udp_port_without_a_server_is_refused(lab, cluster):
    (r,) = lab.probe(cluster.pod1, "connect", "--to", CIL_POD[2] + ":5353/dns", "--timeout", "2", slim=True)
    assert (r["verdict"], r["errno"]) == ("refused", "ECONNREFUSED")


def test_http_to_a_port_that_accepts_but_never_answers_times_out(lab, cluster):
    lab.serve(cluster.pod2, udp="9999", tcp="8443", hostname="pod2")  # a TCP greeter, not HTTP
    lab.nft(cluster.pod2, "table inet mute {\n chain output { type filter hook output priority 0; "
                          "tcp sport 8443 tcp flags & (syn | rst | fin) == 0 drop; }\n}\n")
    (r,) = lab.probe(cluster.pod1, "connect", "--to", CIL_POD[2] + ":8443/http", "--timeout", "2", slim=True)
    assert r["verdict"] == "timeout" and "no HTTP response" in r["error"]
