"""netfilter as an Unbound Python module. Unbound config:

    server:
        module-config: "python iterator"      # or "validator python iterator"
    python:
        python-script: "/path/to/netfilter/addons/unbound_netfilter.py"

Environment of the unbound process:
    NETFILTER_CONFIG         the netfilter YAML (lists, dns answers, audit) - required
    NETFILTER_SITE_PACKAGES  site-packages of the venv netfilter is installed in
                             (default: ../.venv/lib/python3.X/site-packages beside this file)
    PYTHONPATH=/usr/lib/python3/dist-packages   so Unbound's Python finds unboundmodule
    NETFILTER_UNBOUND_CONTROL  how to run unbound-control, which flushes Unbound's cache
                             when a list update adds entries (default: unbound-control)

Do not `unbound-control reload` to load new lists: the plugin reloads them itself, and
a reload restarts Unbound's Python, where compiled modules cannot load again.

This file only wires Unbound to netfilter.dns.unbound; the logic lives there.
"""

import os
import site
import sys


def _use_venv() -> None:
    """Put netfilter's venv first: Debian's own older packages must not shadow it."""
    here = os.path.dirname(os.path.abspath(_SCRIPT))
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    default = os.path.join(here, "..", ".venv", "lib", version, "site-packages")
    packages = os.path.abspath(os.environ.get("NETFILTER_SITE_PACKAGES", default))
    before = list(sys.path)
    site.addsitedir(packages)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


def _script_path() -> str:
    try:
        return __file__
    except NameError:  # Unbound runs the script without __file__
        return os.environ.get("NETFILTER_ADDON", os.path.join(os.getcwd(), "addons", "x.py"))


_SCRIPT = _script_path()
_plugin = None


def init(id, cfg):  # Unbound calls these four by name, with these signatures
    global _SCRIPT, _plugin
    script = cfg.python_script
    try:  # a SWIG list of configured scripts; ours is one of them
        names = [str(s) for s in script] if not isinstance(script, str) else [script]
        ours = [n for n in names if n.endswith("unbound_netfilter.py")]
        if ours:
            _SCRIPT = ours[0]
    except TypeError:
        pass
    _use_venv()
    from netfilter.dns.unbound import Plugin

    config = os.environ.get("NETFILTER_CONFIG")
    if not config:
        log_err("netfilter: set NETFILTER_CONFIG to the netfilter config file")  # noqa: F821
        return False
    _plugin = Plugin(config)
    return True


def deinit(id):
    if _plugin is not None:
        _plugin.close()
    return True


def inform_super(id, qstate, superqstate, qdata):
    return True


def operate(id, event, qstate, qdata):
    return _plugin.operate(id, event, qstate, qdata)
