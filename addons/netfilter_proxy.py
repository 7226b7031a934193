"""netfilter as a mitmproxy addon (mitmproxy 11, regular or transparent mode):

    mitmdump -s addons/netfilter_proxy.py --set netfilter_config=netfilter.yaml

The addon sets `connection_strategy=lazy` itself (the upstream is opened only for a
request it forwards) and, when the config has `proxy.confdir`, mitmproxy's `confdir`
(the CA used for interception; clients must trust its mitmproxy-ca-cert.pem). Unless
`audit.client` is `full`, no client is named in mitmdump's output: the addon drops
mitmproxy's "client connect/disconnect" lines, strips the client from its other lines
and sets `flow_detail=0`. The listening address is mitmdump's own (`--listen-host`,
`-p`), not `proxy.listen`.
Reload the lists with SIGHUP, the `netfilter.reload` command, or by setting
`netfilter_config` again. A bad config makes mitmdump exit with the reason.

This file only wires mitmproxy to netfilter.proxy; the logic lives there. netfilter
must be importable by mitmproxy's Python: install both in one environment (the
`proxy` extra); from a checkout, ../src is used when netfilter is not installed.
"""

import os
import sys

try:
    from netfilter.proxy import NetfilterAddon
except ImportError:  # a checkout, not installed: use ../src beside this file
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from netfilter.proxy import NetfilterAddon

addons = [NetfilterAddon()]
