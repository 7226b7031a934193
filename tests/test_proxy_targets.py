"""The proxy's per-origin shortcut: a Target's canonical hosts must be the host of
every URL the addon would otherwise check, whatever the path, so skipping check_url
for hosts the engine calls URL-free (Engine.urls_free) never changes a decision."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from netfilter.canonical import canonical_parts
from netfilter.proxy.addon import make_target

HOSTS = ["blocked.example", "WWW.Partly.Example", "192.0.2.66", "3232235777", "0x7f.1",
         "a..b.example.", "xn--bcher-kva.example", "b\u00fccher.example", "::1",
         "[2001:db8::1]", "evil.example@good.example", "a.example%2fb", "a.example#x",
         "host_with_underscore.test", "", "h.example:80", "h.example:99999"]
PATH_CHARS = st.sampled_from([*"/abc.%2F?#@:\\ ~", "%25", "%2e", "..", "//", "\t"])


@settings(max_examples=600, deadline=None)
@given(scheme=st.sampled_from(["http", "https", "ws"]), header=st.sampled_from([None, *HOSTS]),
       host=st.sampled_from([h for h in HOSTS if h]), port=st.sampled_from([80, 443, 8080]),
       tail=st.lists(PATH_CHARS, max_size=12).map("".join))
def test_target_hosts_are_the_host_of_every_checked_url(
        scheme: str, header: str | None, host: str, port: int, tail: str) -> None:
    target = make_target(scheme, header, host, port, allowed=True)
    if target.hosts is None:
        return  # the full check runs for every request of this origin
    path = "/" + tail
    origins = [target.asked] if target.dialled is None else [target.asked, target.dialled]
    assert len(target.hosts) == len(origins)
    for origin, expected in zip(origins, target.hosts, strict=True):
        assert canonical_parts(origin + path)[0] == expected


def test_plain_origins_get_hosts_and_odd_ones_do_not() -> None:
    assert make_target("http", "www.example.com", "www.example.com", 80,
                       allowed=True).hosts == ("www.example.com",)
    assert make_target("http", "WWW.Example.COM", "www.example.com", 80,
                       allowed=True).hosts == ("www.example.com", "www.example.com")
    assert make_target("http", "a.example:8080", "127.0.0.1", 8080,
                       allowed=True).hosts == ("a.example", "127.0.0.1")
    for odd in ["a.example%2fb", "evil.example@good.example", "[2001:db8::1]", "a.example#x"]:
        assert make_target("http", odd, "a.example", 80, allowed=True).hosts is None, odd
