"""Run in the dnspython[doh] venv (tests/dohclient_venv.py), not in the dev environment:
reads {"port", "cafile", "cases": [{"query": base64 wire, "post", "http"}]} as JSON on
stdin, asks each case with dnspython's own DoH client (dns.query.https) at
https://127.0.0.1:port/dns-query, and prints one JSON object per case: rcode, EDE
(code, text), answer records as text, the HTTP version the response came over, and the
answer's wire (base64)."""

import base64
import json
import sys

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.version

try:  # dnspython >= 2.9 speaks DoH through httpx2, earlier 2.x through httpx
    import httpx2 as httpx
except ImportError:
    import httpx

seen = []
_send = httpx.Client.send


def _recording_send(self, request, **kwargs):  # only records the version used
    response = _send(self, request, **kwargs)
    seen.append(response.http_version)
    return response


httpx.Client.send = _recording_send

job = json.load(sys.stdin)
results = []
for case in job["cases"]:
    query = dns.message.from_wire(base64.b64decode(case["query"]))
    version = dns.query.HTTPVersion.H2 if case["http"] == "h2" else dns.query.HTTPVersion.H1
    seen.clear()
    answer = dns.query.https(query, "127.0.0.1", port=job["port"], timeout=5,
                             post=case["post"], verify=job["cafile"], http_version=version)
    results.append({
        "rcode": dns.rcode.to_text(answer.rcode()),
        "ede": [[int(o.code), o.text] for o in answer.options
                if isinstance(o, dns.edns.EDEOption)],
        "answer": [str(rr) for rrset in answer.answer for rr in rrset],
        "http_version": seen[-1] if seen else None,
        "wire": base64.b64encode(answer.to_wire()).decode(),
    })
print(json.dumps({"dnspython": dns.version.version, "results": results}))
