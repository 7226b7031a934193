"""`netfilter serve` starts every configured part in one process, and stops cleanly."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.support import DEMO_LIST, DEMO_PUB, free_port

REPO = Path(__file__).resolve().parent.parent


def test_serve_starts_configured_parts(tmp_path: Path) -> None:
    dns_port, stop_port, proxy_port, tiles_port = (free_port(), free_port(), free_port(),
                                                   free_port())
    config = tmp_path / "netfilter.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"id": "serve-test.example"},
        "lists": [{"path": str(DEMO_LIST), "trust": [str(DEMO_PUB)]}],
        "dns": {"listen": [f"127.0.0.1:{dns_port}"], "upstreams": ["127.0.0.1:9"]},
        "stoppage": {"listen": f"127.0.0.1:{stop_port}"},
        "proxy": {"listen": f"127.0.0.1:{proxy_port}", "intercept": "none",
                  "allowed_destinations": ["127.0.0.0/8"]},
        "audit": {"path": str(tmp_path / "audit.sqlite"), "client": "none",
                  "checkpoint_interval": 0.3, "tiles": str(tmp_path / "tiles"),
                  "tiles_listen": f"127.0.0.1:{tiles_port}"},
    }), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "netfilter.cli", "serve", "--config",
                             str(config)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", stop_port, timeout=5)
                connection.request("GET", "/any", headers={"Host": "sub.blocked.example"})
                response = connection.getresponse()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        body = response.read().decode()
        assert response.status == 451 and "DEMO-0001" in body
        for _ in range(100):  # the proxy (mitmdump, a child) starts last: bounded wait
            proxied = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                 "-x", f"http://127.0.0.1:{proxy_port}", "http://partly.example/dir/p.html"],
                capture_output=True, text=True, timeout=30)
            if proxied.stdout != "000":
                break
            time.sleep(0.2)
        assert proxied.stdout == "451", proxied
        checkpoint = b""
        for _ in range(100):  # the next checkpoint appears in the served tiles
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{tiles_port}/checkpoint",
                                            timeout=5) as served:
                    checkpoint = served.read()
                break
            except OSError:
                time.sleep(0.1)
        assert checkpoint.startswith(b"serve-test.example\n")
        assert (tmp_path / "tiles" / "tile" / "0").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert "serving dns, proxy, stoppage" in stderr and "Traceback" not in stderr


def test_serve_names_a_wrong_part(tmp_path: Path) -> None:
    config = tmp_path / "netfilter.yaml"
    config.write_text("dns: {}\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "netfilter.cli", "serve", "bogus",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == ("netfilter: error: bogus: not a part to serve "
                                     "(one of: dns, proxy, stoppage, icap)")
