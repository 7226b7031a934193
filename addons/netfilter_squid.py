"""netfilter as a Squid external ACL helper (Squid's helper protocol, concurrency ids):

    external_acl_type netfilter concurrency=100 children-max=2 ttl=0 negative_ttl=30 \
        %>a %>rm %>ru /usr/bin/python3 /path/to/addons/netfilter_squid.py --config FILE
    acl netfilter_blocked external netfilter
    http_access deny netfilter_blocked
    deny_info 307:http://STOP-PAGE-ADDRESS/ netfilter_blocked

OK = blocked (recorded by the engine, frontend `squid`), ERR = allowed, BH = a line it
could not read. SIGHUP reloads the lists. This file only wires Squid to
netfilter.squid; the logic lives there. From a checkout, ../src is used when netfilter
is not installed (run it with the Python that has netfilter's dependencies).
"""

import os
import sys

try:
    from netfilter.squid import main
except ImportError:  # a checkout, not installed: use ../src beside this file
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from netfilter.squid import main

if __name__ == "__main__":
    sys.exit(main())
