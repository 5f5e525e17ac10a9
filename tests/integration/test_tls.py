"""TLS between agents and PostgreSQL, against a real server that admits peers only with
`hostssl` + scram-sha-256; and the sender's own rate limit under a flood."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgvpn_agent import config, db
from pgvpn_agent.lab import Lab
from tests.integration.stream import eventually

pytestmark = pytest.mark.integration

PASSWORD = "correct-horse-battery"


class Pki:
    """A throwaway CA and certificates signed by it, as PEM files."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(subject, subject, self.key.public_key(), self.key, ca=True)
        self.ca_file = self._write(f"{name}.crt", self.cert.public_bytes(
            serialization.Encoding.PEM))

    def issue(self, name: str, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A certificate for `name` with those SANs; returns (cert file, key file 0600)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = self._build(subject, self.cert.subject, key.public_key(), self.key, ca=False,
                           sans=sans)
        cert_file = self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        key_file = self._write(f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_file, key_file

    @staticmethod
    def _build(subject: x509.Name, issuer: x509.Name, public_key: Any, signer: Any, ca: bool,
               sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def tls_lab(make_lab, tmp_path: Path) -> dict[str, Any]:
    """The lab's cluster, now also on 127.0.0.1 with TLS: peers only over hostssl."""
    lab: Lab = make_lab(peers=2, agents=False)
    ca = Pki(tmp_path, "pgvpn-test-ca")
    server_cert, server_key = ca.issue("db", dns=("db.pgvpn.test",), ips=("127.0.0.1",))
    for f in (server_cert, server_key, ca.ca_file):
        target = lab.pgdir / f.name
        shutil.copy(f, target)
        shutil.chown(target, "postgres", "postgres")
    port = free_port()
    with open(lab.datadir / "postgresql.conf", "a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nssl = on\n"
                   f"ssl_cert_file = '{lab.pgdir / server_cert.name}'\n"
                   f"ssl_key_file = '{lab.pgdir / server_key.name}'\n"
                   f"ssl_ca_file = '{lab.pgdir / ca.ca_file.name}'\n")
    (lab.datadir / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl pgvpn pgvpn_peer1 127.0.0.1/32 scram-sha-256\n"
        "hostssl pgvpn pgvpn_peer2 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n")
    lab.port = port
    lab.save()
    lab.restart_postgres()
    for peer in ("peer1", "peer2"):
        lab.psql(f"ALTER ROLE pgvpn_{peer} PASSWORD '{PASSWORD}'")
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    return {"lab": lab, "port": port, "ca": ca, "password": password, "tmp": tmp_path}


def database(env: dict[str, Any], user: str = "pgvpn_peer1", host: str = "host=127.0.0.1",
             **tls: Any) -> config.Database:
    """[database] as an agent's config would have it, validated by the real parser."""
    raw = {"peer": "a", "peers": [{"name": "a", "addresses": ["10.1.0.1/24"]},
                                  {"name": "b", "addresses": ["10.1.0.2/24"]}],
           "database": {"dsn": f"{host} port={env['port']} dbname=pgvpn user={user}",
                        "password_file": str(env["password"]),
                        "sslrootcert": str(env["ca"].ca_file), **tls}}
    return config.parse(raw).database


def encrypted(conn: db.Conn) -> bool:
    """libpq's view of the session (pg_stat_ssl is not a peer's to read: schema v11)."""
    return bool(conn.pgconn.ssl_in_use)


def test_verify_full_with_the_right_ca(tls_lab):
    with db.connect(database(tls_lab), "test") as conn:
        assert encrypted(conn)
        assert conn.execute("SELECT current_user").fetchone() == ("pgvpn_peer1",)


def test_a_wrong_ca_is_refused_with_the_key_named(tls_lab):
    other = Pki(tls_lab["tmp"], "someone-else")
    with pytest.raises(psycopg.OperationalError) as info:
        db.connect(database(tls_lab, sslrootcert=str(other.ca_file)), "test")
    message = str(info.value)
    assert "certificate verify failed" in message
    assert f"database.sslrootcert: the server's certificate is not signed by the CA in " \
           f"{other.ca_file}" in message


def test_a_name_the_certificate_does_not_list_is_refused(tls_lab):
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        db.connect(database(tls_lab, host="host=elsewhere.pgvpn.test hostaddr=127.0.0.1"),
                   "test")
    with db.connect(database(tls_lab, host="host=db.pgvpn.test hostaddr=127.0.0.1"),
                    "test") as conn:
        assert encrypted(conn)


def test_plaintext_is_refused_by_the_server(tls_lab):
    db_plain = database(tls_lab, sslmode="disable", allow_plaintext=True)
    assert db_plain.insecure
    with pytest.raises(psycopg.OperationalError) as info:
        db.connect(db_plain, "test")
    assert "no encryption" in str(info.value)
    assert 'set database.sslmode = "verify-full"' in str(info.value)


def test_a_wrong_password_is_refused(tls_lab):
    tls_lab["password"].write_text("wrong\n")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        db.connect(database(tls_lab), "test")


def test_client_certificate_where_the_server_asks_for_one(tls_lab):
    ca: Pki = tls_lab["ca"]
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        db.connect(database(tls_lab, user="pgvpn_peer2"), "test")
    cert, key = ca.issue("pgvpn_peer2")
    with db.connect(database(tls_lab, user="pgvpn_peer2", sslcert=str(cert),
                             sslkey=str(key)), "test") as conn:
        assert encrypted(conn)


def test_a_flood_above_the_rate_limit_is_dropped_and_counted(make_lab):
    rate = 200
    lab = make_lab(peers=2, transport={"rate_limit_packets": rate, "rate_limit_burst": 0.1})
    a, b = lab.peers
    before = lab.agent_metrics(a)
    assert before["pgvpn_send_rate_limit_packets_per_second"] == rate
    assert before["pgvpn_send_rate_limit_bytes_per_second"] == 0
    # 4000 datagrams in about a second, 20 times the limit
    flood = ("import socket, time\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "for _ in range(40):\n"
             "    for _ in range(100):\n"
             "        try: s.sendto(b'x' * 200, (" + repr(b.ipv4) + ", 9))\n"
             "        except OSError: pass\n"
             "    time.sleep(0.025)\n")
    started = time.monotonic()
    out = lab.exec(a, [sys.executable, "-c", flood], timeout=60)
    assert out.returncode == 0, out.stderr
    elapsed = time.monotonic() - started

    def limited() -> None:
        after = lab.agent_metrics(a)
        dropped = (after['pgvpn_packets_dropped_total{reason="rate_limit"}']
                   - before['pgvpn_packets_dropped_total{reason="rate_limit"}'])
        sent = (after['pgvpn_packets_total{direction="tx",peer="peer2"}']
                - before['pgvpn_packets_total{direction="tx",peer="peer2"}'])
        assert dropped > 1000, (dropped, sent)
        assert sent <= rate * (elapsed + 1) + rate * 0.1, (dropped, sent)

    eventually(limited)
    assert lab.ping(a, b, count=3), "the tunnel still works within the limit"
    assert "Traceback" not in Path(a.log).read_text()
    assert lab.status()["peers"][0]["running"]
