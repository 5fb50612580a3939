"""https endpoints are verified: a server whose certificate no trusted authority signed is refused
(a TLS failure holds the destination, CDE-207), and nothing is lost: the items wait, pending, and
go once the endpoint is trusted (a reload releases the hold)."""

import http.server
import ssl
import subprocess
import tempfile
import threading
from pathlib import Path

from conftest import wait_until


def test_an_untrusted_certificate_is_refused(catalog, sink):
    d = Path(tempfile.mkdtemp(prefix="cde-tls-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        catalog.configure(endpoint=f"https://127.0.0.1:{server.server_port}/ingest")
        catalog.run("UPDATE products SET name = 'over tls' WHERE id = 12")
        wait_until("the certificate refused", lambda: (catalog.one("SELECT destination_error FROM cde_worker_status") or "")
                   .startswith("TLS failure"))
        error = catalog.one("SELECT destination_error FROM cde_worker_status")
        assert "certificate" in error.lower() or "issuer" in error.lower(), error
        # A destination-level failure: the item waits, pending, and is not counted as an attempt.
        assert catalog.one("SELECT status FROM cde.feed_products WHERE key = '12'") == "pending"
        assert hits == [], "no request may reach an endpoint whose certificate failed verification"
    finally:
        server.shutdown()
    catalog.configure(endpoint=None)
    wait_until("delivery to the trusted endpoint", lambda: (sink.doc("products", 12) or {}).get("data", {}).get("name") == "over tls")
