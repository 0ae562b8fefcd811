"""TLS on both sides: an HTTPS listener (reloaded on SIGHUP) and https:// backends."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web

from tests.support import Backends, backend_app, proxy_config, write_config


async def _https_backend(backends: Backends, name: str, ca: trustme.CA) -> str:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    runner = web.AppRunner(backend_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    backends.runners[name] = runner
    return f"https://localhost:{port}"


def _write_cert(tmp_path: Path, ca: trustme.CA, tag: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / f"{tag}.crt", tmp_path / f"{tag}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


async def _https_proxy(backends: Backends, start_proxy: Any, tmp_path: Path,
                       ca: trustme.CA) -> tuple[Any, Path, Path]:
    """A proxy with an HTTPS listener in front of backend "a", and its certificate files."""
    urls = {"a": await backends.start("a")}
    cert_file, key_file = _write_cert(tmp_path, ca, "first")
    proxy = await start_proxy(proxy_config(urls, listen={
        "host": "127.0.0.1", "port": 0, "tls": {"cert_file": str(cert_file), "key_file": str(key_file)}}))
    return proxy, cert_file, key_file


async def _peer_cert(port: int, ca: trustme.CA) -> bytes:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def test_https_backend_verified_with_private_ca(backends: Backends, start_proxy, client,
                                                      tmp_path: Path) -> None:
    ca = trustme.CA()
    url = await _https_backend(backends, "secure", ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = proxy_config({"secure": url})
    del cfg["backends"], cfg["policy"], cfg["health"]
    cfg["clusters"] = {"default": {"backends": [{"id": "secure", "url": url}],
                                   "health": {"active": {"enabled": False}},
                                   "tls": {"ca_file": str(ca_file)}}}
    proxy = await start_proxy(cfg)
    async with client.get(proxy.url + "/echo") as resp:
        assert resp.status == 200
        assert (await resp.json())["backend"] == "secure"
    # Verification is on by default: without the private CA the backend is refused.
    untrusting = await start_proxy(proxy_config({"secure": url}, retries={"attempts": 1}))
    async with client.get(untrusting.url + "/echo") as resp:
        assert resp.status == 502
        assert resp.headers["x-foretell-error"] == "upstream_connect_failure"


async def test_https_listener_and_certificate_reload(backends: Backends, start_proxy,
                                                     tmp_path: Path) -> None:
    ca = trustme.CA()
    proxy, cert_file, key_file = await _https_proxy(backends, start_proxy, tmp_path, ca)
    port = proxy.worker.listen_port
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    url = f"https://localhost:{port}/echo"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=client_ctx) as resp:
        assert resp.status == 200
        assert (await resp.json())["headers"]["X-Forwarded-Proto"] == "https"
    before = await _peer_cert(port, ca)
    # Replace the files in place and reload, as SIGHUP does.
    new_cert, new_key = _write_cert(tmp_path, ca, "second")
    cert_file.write_bytes(new_cert.read_bytes())
    key_file.write_bytes(new_key.read_bytes())
    assert await proxy.worker.reload()
    after = await _peer_cert(port, ca)
    assert after != before
    assert after == ssl.PEM_cert_to_DER_cert(new_cert.read_text().split("-----END CERTIFICATE-----")[0]
                                             + "-----END CERTIFICATE-----\n")
    write_config(proxy.worker.config_path, {"listen": "bad"})
    assert not await proxy.worker.reload()
    assert await _peer_cert(port, ca) == after


async def test_a_certificate_that_does_not_match_its_key_is_refused_and_the_old_pair_serves(
        backends: Backends, start_proxy, tmp_path: Path) -> None:
    """OpenSSL installs a new certificate and then drops the old key that does not match
    it: loaded into the live context, a mismatched pair left every handshake failing."""
    ca = trustme.CA()
    proxy, cert_file, _ = await _https_proxy(backends, start_proxy, tmp_path, ca)
    port = proxy.worker.listen_port
    before = await _peer_cert(port, ca)
    other_cert, _ = _write_cert(tmp_path, ca, "second")
    cert_file.write_bytes(other_cert.read_bytes())  # the key stays the first one's
    assert not await proxy.worker.reload()
    assert await _peer_cert(port, ca) == before


async def test_without_verification_a_ca_file_is_not_read(backends: Backends, start_proxy, client,
                                                          tmp_path: Path) -> None:
    """check-config does not hold a missing ca_file against verify: false; neither may the
    connections (every one failed on the missing file)."""
    url = await _https_backend(backends, "secure", trustme.CA())
    cfg = proxy_config({"secure": url})
    del cfg["backends"], cfg["policy"], cfg["health"]
    cfg["clusters"] = {"default": {"backends": [{"id": "secure", "url": url}],
                                   "health": {"active": {"enabled": False}},
                                   "tls": {"verify": False, "ca_file": str(tmp_path / "gone.pem")}}}
    proxy = await start_proxy(cfg)
    async with client.get(proxy.url + "/echo") as resp:
        assert resp.status == 200
