"""The file `netfilter serve proxy` hands to mitmdump's `-s` (the installed twin of
addons/netfilter_proxy.py)."""

from netfilter.proxy import NetfilterAddon

addons = [NetfilterAddon()]
