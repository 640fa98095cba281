"""The lab's certificate authority, one per lab: it signs the https mirror's certificate and every lab host trusts it.

Made with openssl when the lab comes up, in the lab's keys directory (root only, 700; the keys 600). The CA's key
never leaves this machine; the hosts get only its certificate, installed into their system trust store
(hosts.trust_ca), as an admin installs an internal CA. `lab down` deletes it with the rest of the state dir.
"""

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from gpufleet_lab.system import LabError, run

CA_NAME = "gpufleet lab CA"
DAYS = 30


@dataclass(frozen=True)
class ServerTls:
    ca_cert: Path
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    run(["openssl", *args])


def ensure_ca(keys_dir: Path, server_ip: str) -> ServerTls:
    """The lab CA and a server certificate for `server_ip` (its subjectAltName), made once per lab."""
    ipaddress.ip_address(server_ip)  # raises on anything but an address: it goes into the certificate
    if not keys_dir.is_dir() or keys_dir.stat().st_mode & 0o077:
        raise LabError(f"{keys_dir} must be a directory only root can read (mode 700) before the CA is made there")
    ca_key, ca_cert = keys_dir / "ca.key", keys_dir / "ca.crt"
    key, cert = keys_dir / "mirror-tls.key", keys_dir / "mirror-tls.crt"
    tls = ServerTls(ca_cert, cert, key)
    if ca_cert.exists() and cert.exists() and key.exists():
        return tls
    old_umask = os.umask(0o077)
    try:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(ca_key), "-out", str(ca_cert), "-days", str(DAYS), "-subj", f"/CN={CA_NAME}",
                 "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash")
        request = keys_dir / "mirror-tls.csr"
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(request), "-subj", f"/CN={server_ip}")
        extensions = keys_dir / "mirror-tls.ext"
        extensions.write_text(
            f"subjectAltName=IP:{server_ip}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n")
        _openssl("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", str(DAYS), "-extfile", str(extensions))
        request.unlink()
        extensions.unlink()
    finally:
        os.umask(old_umask)
    ca_cert.chmod(0o644)
    return tls
