"""Transparent mode for real: `mitmdump --mode transparent` with the addon behind an
iptables REDIRECT, as a school gateway runs it, in a network namespace of its own.

Inside `unshare --net` (so no rule and no packet is seen outside it): loopback up; an
origin on 127.0.0.2:8080; mitmdump in transparent mode on 127.0.0.1:8081, run under
the group GID; the rule `OUTPUT -d 127.0.0.2 --dport 8080 ! --gid-owner GID -j
REDIRECT --to-ports 8081` sends the clients' connections to mitmdump and lets its own
go to the origin. curl asks for names that resolve (--resolve) to 127.0.0.2, as a
client that knows of no proxy. Needs root, unshare, setpriv, iptables (nat table) and
curl; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.proxy_support import ADDON, MITMDUMP, write_config

GID = 4242
ORIGIN = "127.0.0.2"
PORT, PROXY_PORT = 8080, 8081
RUN_BOUND = 90  # seconds for the whole script (mitmdump's start is most of it)
CASES = {  # name -> (host, path, expected status): the demo list and its exceptions
    "clean": ("clean.example", "/page.html", 200),
    "domain": ("sub.blocked.example", "/any/page", 451),
    "url": ("partly.example", "/dir/page.html", 451),
    "url-clean": ("partly.example", "/elsewhere.html", 200),
    "exception": ("cleared.blocked.example", "/", 200),
}

ORIGIN_SCRIPT = """\
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(sys.argv[1], "a") as seen:
            seen.write(self.headers.get("Host", "") + self.path + "\\n")
        body = b"origin page"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("{origin}", {port}), Handler).serve_forever()
"""

SCRIPT = """\
set -u
cd "$WORK"
ip link set lo up
iptables -t nat -A OUTPUT -p tcp -d {origin} --dport {port} -m owner ! --gid-owner {gid} \\
    -j REDIRECT --to-ports {proxy_port}
"$PY" origin.py seen.txt 2> origin.log &
ORIGIN_PID=$!
setpriv --regid {gid} --clear-groups "$MITMDUMP" --mode transparent --listen-host 127.0.0.1 \\
    -p {proxy_port} -s "$ADDON" --set netfilter_config="$CONFIG" --set confdir="$WORK/confdir" \\
    --set termlog_verbosity=info > mitmdump.log 2>&1 &
MITM_PID=$!
for _ in $(seq 300); do
    (exec 3<>/dev/tcp/127.0.0.1/{proxy_port}) 2>/dev/null && break
    sleep 0.1
done
for case in {cases}; do
    IFS=: read -r name host path <<< "$case"
    curl -s -m 10 -o "$name.body" -w '%{{http_code}}' --resolve "$host:{port}:{origin}" \\
        "http://$host:{port}$path" > "$name.code" || echo "curl $?" > "$name.code"
done
kill $MITM_PID $ORIGIN_PID
wait $MITM_PID
echo "mitmdump exit $?" >> mitmdump.log
"""


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (a network namespace and an iptables rule in it)"
    missing = [t for t in ("unshare", "setpriv", "iptables", "curl", "ip") if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: iptables, util-linux, curl)"
    probe = subprocess.run(["unshare", "--net", "iptables", "-t", "nat", "-L", "OUTPUT"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"no iptables nat table in a network namespace here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def transparent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("transparent")
    config = write_config(work, allowed=["127.0.0.0/8"])
    (work / "origin.py").write_text(ORIGIN_SCRIPT.format(origin=ORIGIN, port=PORT),
                                    encoding="utf-8")
    cases = " ".join(f"{name}:{host}:{path}" for name, (host, path, _) in CASES.items())
    script = work / "run.sh"
    script.write_text(SCRIPT.format(origin=ORIGIN, port=PORT, gid=GID, proxy_port=PROXY_PORT,
                                    cases=cases), encoding="utf-8")
    env = {**os.environ, "WORK": str(work), "PY": sys.executable, "MITMDUMP": str(MITMDUMP),
           "ADDON": str(ADDON), "CONFIG": str(config)}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    done = subprocess.run(["unshare", "--net", "bash", str(script)], env=env,
                          capture_output=True, text=True, timeout=RUN_BOUND, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return work


def _log(work: Path) -> str:
    return (work / "mitmdump.log").read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("case", list(CASES))
def test_transparent_requests_are_decided(transparent_run: Path, case: str) -> None:
    status = CASES[case][2]
    got = (transparent_run / f"{case}.code").read_text().strip()
    assert got == str(status), f"{case}: {got}\n{_log(transparent_run)[-3000:]}"
    body = (transparent_run / f"{case}.body").read_bytes()
    if status == 451:  # the stop page, from the proxy
        assert b"restricted" in body.lower() and b"origin page" not in body, body[:500]
    else:
        assert body == b"origin page"


def test_blocked_requests_never_reach_the_origin(transparent_run: Path) -> None:
    seen = (transparent_run / "seen.txt").read_text().splitlines()
    expected = sorted(f"{host}:{PORT}{path}" for host, path, status in CASES.values()
                      if status == 200)
    assert sorted(seen) == expected


def test_transparent_mitmdump_ran_cleanly(transparent_run: Path) -> None:
    log = _log(transparent_run)
    assert "transparent" in log.lower(), log[-2000:]
    assert "Traceback" not in log, log[-3000:]
