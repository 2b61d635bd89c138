"""etcd over TLS: https:// endpoints, the CA to trust, and a client certificate for a cluster
that asks for one (etcd's --client-cert-auth), as etcdctl's --cacert, --cert and --key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from interknit.config import ConfigError, parse_config
from interknit.registry.etcd_client import EtcdClient, EtcdTls, EtcdUnavailable
from tests.etcd.cluster import Certificates, EtcdCluster
from tests.nodeproc import NodeProcess


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_etcd(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), 1, tls=certs).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_node_registers_through_etcd_over_tls(
    tmp_path: Path, certs: Certificates, secure_etcd: EtcdCluster
) -> None:
    (endpoint,) = secure_etcd.endpoints
    assert endpoint.startswith("https://")
    node = NodeProcess(
        tmp_path,
        registry_config=(
            f'backend = "etcd"\netcd = ["{endpoint}"]\netcd_prefix = "/tls-test/"\n'
            f'etcd_tls = {{ ca = "{certs.ca}", cert = "{certs.client}", '
            f'key = "{certs.client_key}" }}'
        ),
    ).start()
    try:
        r = node.register("secure", "a", address="10.0.0.1", port=80)
        assert r.status_code == 200, r.text
        listed = node.client.get("/v1/services/secure").json()
        assert [i["id"] for i in listed["instances"]] == ["a"]
        assert listed["stale"] is False
    finally:
        node.stop()


async def test_etcd_refuses_a_client_without_its_certificate_or_trust(
    certs: Certificates, secure_etcd: EtcdCluster
) -> None:
    (endpoint,) = secure_etcd.endpoints
    good = EtcdClient(
        [endpoint],
        timeout=2,
        tls=EtcdTls(
            ca=certs.ca.read_bytes(),
            cert=certs.client.read_bytes(),
            key=certs.client_key.read_bytes(),
        ),
    )
    await good.put(b"/tls-check/k", b"v")
    assert (await good.get(b"/tls-check/k")) is not None
    await good.close()
    # No client certificate: the member ends the handshake.
    anonymous = EtcdClient([endpoint], timeout=1, tls=EtcdTls(ca=certs.ca.read_bytes()))
    with pytest.raises(EtcdUnavailable):
        await anonymous.get(b"/tls-check/k")
    await anonymous.close()
    # Not trusting the member's CA (the system's roots): this client ends it.
    untrusting = EtcdClient(
        [endpoint],
        timeout=1,
        tls=EtcdTls(cert=certs.client.read_bytes(), key=certs.client_key.read_bytes()),
    )
    with pytest.raises(EtcdUnavailable):
        await untrusting.get(b"/tls-check/k")
    await untrusting.close()


def test_tls_settings_are_checked_and_name_the_key(tmp_path: Path, certs: Certificates) -> None:
    def registry(**section: object) -> None:
        parse_config(
            {"registry": {"backend": "etcd", "etcd": ["https://127.0.0.1:2379"], **section}}
        )

    registry(etcd_tls={"ca": str(certs.ca)})
    with pytest.raises(ConfigError, match=r"registry\.etcd_tls\.ca.*cannot read"):
        registry(etcd_tls={"ca": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=r"registry\.etcd_tls.*cert and key go together"):
        registry(etcd_tls={"cert": str(certs.client)})
    with pytest.raises(ConfigError, match=r"registry\.etcd_tls\.bogus"):
        registry(etcd_tls={"bogus": "x"})
    with pytest.raises(ValueError, match="mix http:// and https://"):
        EtcdClient(["http://127.0.0.1:2379", "https://127.0.0.1:2380"])
    with pytest.raises(ValueError, match="need https://"):
        EtcdClient(["http://127.0.0.1:2379"], tls=EtcdTls(ca=b"x"))
