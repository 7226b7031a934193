"""CPU per /metrics scrape of the metrics listener, in the serving process: a one-off
comparison, not a pytest benchmark (the old server it was compared with is gone).

    .venv/bin/python benchmarks/scrape_cpu.py new 3000
    # the old httpd server, from the commit before the move:
    mkdir /tmp/old && git archive dfdf106 src/netfilter | tar -x -C /tmp/old
    cp src/netfilter/_fastpath*.so /tmp/old/src/netfilter/
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/scrape_cpu.py old 3000

A NodeMetrics of 200 counters is served on a loop of its own in a thread; a client in
another process scrapes it N times over one kept-alive connection (a new one where the
server closes it). Printed: this process's CPU time and the wall time per scrape.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from netfilter.metrics import NodeMetrics

CLIENT = """
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    response.read()
    if response.getheader("connection") == "close":
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port)
"""


def serve(which: str, metrics: NodeMetrics) -> tuple[int, Callable[[], None]]:
    server: Any
    if which == "old":
        from netfilter.metrics import MetricsServer  # type: ignore[attr-defined]

        server = MetricsServer(metrics, "127.0.0.1", 0)

        def stop() -> None:
            server.shutdown()
            server.server_close()
    else:
        from netfilter.web.metrics import MetricsSite
        from netfilter.web.server import Standalone, bind_tcp

        site = MetricsSite(metrics)
        server = Standalone([site.listener(bind_tcp("127.0.0.1", 0))])

        def stop() -> None:
            server.shutdown()
            server.server_close()
            site.close()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], stop


def main() -> None:
    which, n = sys.argv[1], int(sys.argv[2])
    metrics = NodeMetrics()
    for part in range(10):
        metrics.add(f"part{part}", lambda: {f"c{i}": i for i in range(20)})
    port, stop = serve(which, metrics)
    time.sleep(0.5)
    cpu, wall = time.process_time(), time.monotonic()
    subprocess.run([sys.executable, "-c", CLIENT, str(port), str(n)], check=True)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    stop()
    sys.stdout.write(f"{which}: {n} scrapes, server CPU {cpu * 1e6 / n:.0f} us/scrape, "
                     f"wall {wall * 1e6 / n:.0f} us/scrape\n")


if __name__ == "__main__":
    main()
