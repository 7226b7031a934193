#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive for real (dig, kdig, unbound
# with its Python module, dnsperf, curl, wrk, headless Chromium, npm, iptables, squid, c-icap), when they are missing. Needs root for apt-get;
# without it, it says what is missing and the tests that need it skip with a reason.
set -euo pipefail
need=()
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v unbound >/dev/null 2>&1 || need+=(unbound)
[ -f /usr/lib/python3/dist-packages/unboundmodule.py ] || need+=(python3-unbound)
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v kdig >/dev/null 2>&1 || need+=(knot-dnsutils)  # DoT and DoH tests (kdig +tls, +https)
command -v dnsdist >/dev/null 2>&1 || need+=(dnsdist)  # a DoT reference in benchmarks/test_encrypted_dns.py; load balancer in tests/test_dnsdist_front.py
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)  # axe-core for the browser tests (scripts/axe-core.sh)
command -v iptables >/dev/null 2>&1 || need+=(iptables)  # the transparent-proxy test
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # scrapes a node in a test
command -v squid >/dev/null 2>&1 || [ -x /usr/sbin/squid ] || need+=(squid)  # the Squid helper and ICAP tests
command -v c-icap >/dev/null 2>&1 || need+=(c-icap)  # the reference ICAP server in benchmarks/test_squid_perf.py
command -v strace >/dev/null 2>&1 || need+=(strace)  # the systemd units' sandbox, traced
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # verifies the units
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${need[*]}; not root, so tests that need them will be skipped" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
