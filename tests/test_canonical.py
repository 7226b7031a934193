"""Tests for netfilter.canonical: the Safe Browsing v4 guide, to the letter."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netfilter import canonical
from netfilter.canonical import (
    InvalidURL,
    canonical_host,
    canonical_parts,
    canonicalize,
    expressions,
    host_expressions,
    host_suffixes,
    is_ip_literal,
    path_prefixes,
)

# The whole "Canonicalization" example table of the Safe Browsing v4 guide
# (developers.google.com/safe-browsing/v4/urls-hashing), in its order.
GUIDE_TABLE: list[tuple[str | bytes, str]] = [
    ("http://host/%25%32%35", "http://host/%25"),
    ("http://host/%25%32%35%25%32%35", "http://host/%25%25"),
    ("http://host/%2525252525252525", "http://host/%25"),
    ("http://host/asdf%25%32%35asd", "http://host/asdf%25asd"),
    ("http://host/%%%25%32%35asd%%", "http://host/%25%25%25asd%25%25"),
    ("http://www.google.com/", "http://www.google.com/"),
    (
        "http://%31%36%38%2e%31%38%38%2e%39%39%2e%32%36/%2E%73%65%63%75%72%65/"
        "%77%77%77%2E%65%62%61%79%2E%63%6F%6D/",
        "http://168.188.99.26/.secure/www.ebay.com/",
    ),
    (
        "http://195.127.0.11/uploads/%20%20%20%20/.verify/"
        ".eBaysecure=updateuserdataxplimnbqmn-xplmvalidateinfoswqpcmlx=hgplmcx/",
        "http://195.127.0.11/uploads/%20%20%20%20/.verify/"
        ".eBaysecure=updateuserdataxplimnbqmn-xplmvalidateinfoswqpcmlx=hgplmcx/",
    ),
    (
        "http://host%23.com/%257Ea%2521b%2540c%2523d%2524e%25f%255E00%252611%252A22"
        "%252833%252944_55%252B",
        "http://host%23.com/~a!b@c%23d$e%25f^00&11*22(33)44_55+",
    ),
    ("http://3279880203/blah", "http://195.127.0.11/blah"),
    ("http://www.google.com/blah/..", "http://www.google.com/"),
    ("www.google.com/", "http://www.google.com/"),
    ("www.google.com", "http://www.google.com/"),
    ("http://www.evil.com/blah#frag", "http://www.evil.com/blah"),
    ("http://www.GOOgle.com/", "http://www.google.com/"),
    ("http://www.google.com.../", "http://www.google.com/"),
    ("http://www.google.com/foo\tbar\rbaz\n2", "http://www.google.com/foobarbaz2"),
    ("http://www.google.com/q?", "http://www.google.com/q?"),
    ("http://www.google.com/q?r?", "http://www.google.com/q?r?"),
    ("http://www.google.com/q?r?s", "http://www.google.com/q?r?s"),
    ("http://evil.com/foo#bar#baz", "http://evil.com/foo"),
    ("http://evil.com/foo;", "http://evil.com/foo;"),
    ("http://evil.com/foo?bar;", "http://evil.com/foo?bar;"),
    # The guide's C string: raw bytes 0x01 and 0x80, so bytes here (see test_str_x80).
    (b"http://\x01\x80.com/", "http://%01%80.com/"),
    ("http://notrailingslash.com", "http://notrailingslash.com/"),
    ("http://www.gotaport.com:1234/", "http://www.gotaport.com/"),
    ("  http://www.google.com/  ", "http://www.google.com/"),
    ("http:// leadingspace.com/", "http://%20leadingspace.com/"),
    ("http://%20leadingspace.com/", "http://%20leadingspace.com/"),
    ("%20leadingspace.com/", "http://%20leadingspace.com/"),
    ("https://www.securesite.com/", "https://www.securesite.com/"),
    ("http://host.com/ab%23cd", "http://host.com/ab%23cd"),
    ("http://host.com//twoslashes?more//slashes", "http://host.com/twoslashes?more//slashes"),
]


def _split(canonical_url: str) -> tuple[str, str]:
    rest = canonical_url.split("://", 1)[1]
    slash = rest.index("/")
    return rest[:slash], rest[slash:]


@pytest.mark.parametrize(("url", "expected"), GUIDE_TABLE)
def test_guide_table(url: str | bytes, expected: str) -> None:
    assert canonicalize(url) == expected
    assert canonical_parts(url) == _split(expected)


@pytest.mark.parametrize(("url", "expected"), GUIDE_TABLE)
def test_guide_table_slow_path(url: str | bytes, expected: str) -> None:
    scheme, host, rest = canonical._slow_parts(url)
    assert f"{scheme}://{host}{rest}" == expected


def test_str_x80() -> None:
    # A str is UTF-8 encoded first: U+0080 is the two bytes C2 80.
    assert canonicalize("http://\x01\x80.com/") == "http://%01%C2%80.com/"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://Example.COM/A/b", "http://example.com/A/b"),
        ("http://user:pass@host.com:99/a/./b/../c?x#y", "http://host.com/a/c?x"),
        ("http://a@b@host.com/", "http://host.com/"),
        ("example.com:8080/x", "http://example.com/x"),
        ("example.com:8080", "http://example.com/"),
        ("example.com:8080?q", "http://example.com/?q"),
        ("http%3A%2F%2Fwackyurl.com:80/", "http://wackyurl.com/"),
        ("ftp://ftp.myfiles.com/", "ftp://ftp.myfiles.com/"),
        ("http://some%1bhost.com/%1b", "http://some%1Bhost.com/%1B"),
        ("http://W!eird<>Ho$^.com/", "http://w!eird<>ho$^.com/"),
        ("http://host.com?q", "http://host.com/?q"),
        ("http://host.com/a?b/../c", "http://host.com/a?b/../c"),
        ("http://host.com/a/b/.", "http://host.com/a/b/"),
        ("http://host.com/a/./b", "http://host.com/a/b"),
        ("http://host.com/../../a", "http://host.com/a"),
        ("http://host.com/a/..b", "http://host.com/a/..b"),
        ("http://host.com/.hidden/x", "http://host.com/.hidden/x"),
        ("http://host.com//a//b///c////", "http://host.com/a/b/c/"),
        ("http://host.com/%2e%2e/x", "http://host.com/x"),
        ("http://host.com/a%2fb", "http://host.com/a/b"),
        ("http://host.com/foo%09bar%0d%0a", "http://host.com/foo%09bar%0D%0A"),
        ("http://host.com/%", "http://host.com/%25"),
        ("http://host.com/%zz%4", "http://host.com/%25zz%254"),
        ("http://host.com/a b", "http://host.com/a%20b"),
        ("http://host.com/caf\u00e9", "http://host.com/caf%C3%A9"),
        ("http://..host..com../", "http://host.com/"),
        ("http://i.have.way.too.many.dots.com/", "http://i.have.way.too.many.dots.com/"),
    ],
)
def test_more_canonicalization(url: str, expected: str) -> None:
    assert canonicalize(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/asdf", "no host"),
        ("mailto:x@y", "scheme but no host"),
        ("javascript:alert(1)", "scheme but no host"),
        ("data:text/html,hi", "scheme but no host"),
        ("", "empty URL"),
        ("   ", "empty URL"),
        ("http://", "no host"),
        ("http:///x", "no host"),
        ("http://@", "no host"),
        ("http://.../x", "no host"),
        ("http://:80/x", "no host"),
        ("http://?q", "no host"),
        ("http://#ref", "no host"),
        ("#ref", "empty URL"),
        ("?query", "no host"),
        ("//host/path", "no host"),
        ("http:www.google.com:8080/foo.html", "scheme but no host"),
    ],
)
def test_invalid(url: str, message: str) -> None:
    with pytest.raises(InvalidURL, match=message):
        canonicalize(url)
    with pytest.raises(InvalidURL, match=message):
        canonical_parts(url)
    with pytest.raises(InvalidURL, match=message):
        expressions(url)


def test_invalid_message_names_input_capped() -> None:
    with pytest.raises(InvalidURL, match=r"'mailto:x@y'"):
        canonicalize("mailto:x@y")
    with pytest.raises(InvalidURL) as info:
        canonicalize("mailto:" + "x" * 100_000)
    assert len(str(info.value)) < 300
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------ hosts: IPv4, IPv6, IDNA


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("3279880203", "195.127.0.11"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("1.2.3", "1.2.0.3"),
        ("276.2.3", "276.2.3"),  # 276 > 255 in a non-final part: not an address
        ("12.0x12.01234", "12.18.2.156"),
        ("012.034.01.055", "10.28.1.45"),
        ("0x12.0x43.0x44.0x01", "18.67.68.1"),
        ("167838211", "10.1.2.3"),
        ("4294967295", "255.255.255.255"),
        ("4294967296", "4294967296"),
        ("1.16777215", "1.255.255.255"),
        ("1.16777216", "1.16777216"),
        ("08", "08"),  # bad octal
        ("0x", "0x"),
        ("1.2.3.00x0", "1.2.3.00x0"),
        ("123.123.0.0.1", "123.123.0.0.1"),
        ("00000000000000000000001", "0.0.0.1"),
        ("1" * 5000, "1" * 5000),
        ("1..2.3.4.", "1.2.3.4"),
        ("%31%32%37.0.0.1", "127.0.0.1"),
        ("\uff11\uff12\uff17.0.0.1", "127.0.0.1"),  # fullwidth digits, via IDNA
    ],
)
def test_ipv4_forms(host: str, expected: str) -> None:
    assert canonical_parts(f"http://{host}/")[0] == expected
    assert canonical_host(host) == expected


@given(
    st.lists(
        st.one_of(
            st.integers(0, 2**32).map(str),
            st.integers(0, 2**32).map(lambda n: f"0{n:o}"),
            st.integers(0, 2**32).map(lambda n: f"0x{n:x}"),
            st.text("0123456789xa", min_size=1, max_size=5),
        ),
        min_size=1,
        max_size=5,
    ).map(".".join)
)
def test_ipv4_matches_inet_aton(host: str) -> None:
    try:
        expected = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        expected = None
    assert canonical._parse_ipv4(host) == expected


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://[2001:470:1:18::114]/", "[2001:470:1:18::114]"),
        (
            "http://[FEDC:BA98:7654:3210:FEDC:BA98:7654:3210]:80/i",
            "[fedc:ba98:7654:3210:fedc:ba98:7654:3210]",
        ),
        ("http://[2001:0db8:0000::1]/", "[2001:db8::1]"),
        ("http://[::1]:8080/", "[::1]"),
        # An IPv4 address in IPv6 clothes is that IPv4 host (RFC 4291, RFC 6052).
        ("http://[::FFFF:1.2.3.4]/", "1.2.3.4"),
        ("http://[::ffff:7f00:1]:8080/", "127.0.0.1"),
        ("http://[0:0:0:0:0:FFFF:127.0.0.1]/", "127.0.0.1"),
        ("http://[64:ff9b::192.0.2.33]/", "192.0.2.33"),
        ("http://[64:FF9B::C000:221]/", "192.0.2.33"),
        ("http://[::ffff:127.0.0.1%25eth0]/", "127.0.0.1"),
        # Not embeddings: deprecated IPv4-compatible, obsolete SIIT, local-use NAT64.
        ("http://[::1.2.3.4]/", "[::102:304]"),
        ("http://[::ffff:0:1.2.3.4]/", "[::ffff:0:102:304]"),
        ("http://[64:ff9b:1::1.2.3.4]/", "[64:ff9b:1::102:304]"),
        ("http://[fe80::1%25eth0]/", "[fe80::1%25eth0]"),
        ("http://[not-v6]/", "[not-v6]"),
        ("http://[::1/", "[::1"),
        ("http://[/", "["),
    ],
)
def test_ipv6(url: str, host: str) -> None:
    assert canonical_parts(url)[0] == host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("1.2.3.4", True),
        ("255.255.255.255", True),
        ("256.1.1.1", False),
        ("01.2.3.4", False),
        ("1.2.3", False),
        ("[::1]", True),
        ("[2001:db8::1]", True),
        ("[zz]", False),
        ("::1]", False),
        ("example.com", False),
        ("a.1", False),
        ("", False),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://www.\u00fcmlat.com/", "www.xn--mlat-zra.com"),
        ("http://www.%C3%BCmlat.com/", "www.xn--mlat-zra.com"),
        ("http://B\u00dcCHER.example/", "xn--bcher-kva.example"),
        ("http://xn--bcher-kva.example/", "xn--bcher-kva.example"),
        ("http://XN--BCHER-KVA.example/", "xn--bcher-kva.example"),
        ("http://\u4f60\u597d\u4f60\u597d/", "xn--6qqa088eba"),
        ("http://a\u3002b.com/", "a.b.com"),
        ("http://my_site.b\u00fccher.de/", "my_site.xn--bcher-kva.de"),
        ("http://\u00fc_x.com/", "%C3%BC_x.com"),  # not a valid IDN label: escaped bytes
        (b"http://\xff\xfe.com/", "%FF%FE.com"),  # not UTF-8
    ],
)
def test_idna(url: str | bytes, host: str) -> None:
    assert canonical_parts(url)[0] == host


# ------------------------------------------------------------------ expressions


def test_expressions_guide_examples() -> None:
    assert set(expressions("http://a.b.c/1/2.html?param=1")) == {
        "a.b.c/1/2.html?param=1",
        "a.b.c/1/2.html",
        "a.b.c/",
        "a.b.c/1/",
        "b.c/1/2.html?param=1",
        "b.c/1/2.html",
        "b.c/",
        "b.c/1/",
    }
    assert set(expressions("http://a.b.c.d.e.f.g/1.html")) == {
        "a.b.c.d.e.f.g/1.html",
        "a.b.c.d.e.f.g/",
        "c.d.e.f.g/1.html",
        "c.d.e.f.g/",
        "d.e.f.g/1.html",
        "d.e.f.g/",
        "e.f.g/1.html",
        "e.f.g/",
        "f.g/1.html",
        "f.g/",
    }
    assert set(expressions("http://1.2.3.4/1/")) == {"1.2.3.4/1/", "1.2.3.4/"}


def test_expressions_deep_path_and_count() -> None:
    exprs = expressions("http://a.b.c.d.e.f.g/1/2/3/4/5/6.html?x=1")
    assert len(exprs) == 30 == len(set(exprs))
    assert exprs[0] == "a.b.c.d.e.f.g/1/2/3/4/5/6.html?x=1"
    assert set(path_prefixes("/1/2/3/4/5/6.html")) == {
        "/1/2/3/4/5/6.html",
        "/",
        "/1/",
        "/1/2/",
        "/1/2/3/",
    }


def test_expressions_other_shapes() -> None:
    assert expressions("http://b/") == ["b/"]
    assert expressions("http://a.b/?") == ["a.b/?", "a.b/"]
    assert set(expressions("http://[2001:470:1:18::114]/a/b")) == {
        "[2001:470:1:18::114]/a/b",
        "[2001:470:1:18::114]/",
        "[2001:470:1:18::114]/a/",
    }


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.b.c.d.e.f.g", ["a.b.c.d.e.f.g", "c.d.e.f.g", "d.e.f.g", "e.f.g", "f.g"]),
        ("a.b.c.d.e", ["a.b.c.d.e", "b.c.d.e", "c.d.e", "d.e"]),
        ("a.b.c.d.e.f", ["a.b.c.d.e.f", "b.c.d.e.f", "c.d.e.f", "d.e.f", "e.f"]),
        ("www.google.com", ["www.google.com", "google.com"]),
        ("a.b", ["a.b"]),
        ("com", ["com"]),
        ("1.2.3.4", ["1.2.3.4"]),
        ("[::1]", ["[::1]"]),
        ("1.2.3.4.5", ["1.2.3.4.5", "2.3.4.5", "3.4.5", "4.5"]),
    ],
)
def test_host_suffixes(host: str, expected: list[str]) -> None:
    assert host_suffixes(host) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/1/2.html?param=1", ["/1/2.html?param=1", "/1/2.html", "/", "/1/"]),
        ("/", ["/"]),
        ("/1/", ["/1/", "/"]),
        (
            "/a/b/c/d/e.html?123",
            ["/a/b/c/d/e.html?123", "/a/b/c/d/e.html", "/", "/a/", "/a/b/", "/a/b/c/"],
        ),
        ("/a/b/c/", ["/a/b/c/", "/", "/a/", "/a/b/"]),
        ("/q?r?s", ["/q?r?s", "/q", "/"]),
        ("/?", ["/?", "/"]),
    ],
)
def test_path_prefixes(path: str, expected: list[str]) -> None:
    assert path_prefixes(path) == expected


def test_host_expressions() -> None:
    expected = ["a.b.example.org/", "b.example.org/", "example.org/"]
    assert host_expressions("a.b.example.org.") == expected
    assert host_expressions("A.B.Example.ORG") == expected
    assert host_expressions("bücher.example") == ["xn--bcher-kva.example/"]
    assert host_expressions("1.2.3.4") == ["1.2.3.4/"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("example.com", "example.com"),
        ("..a..b..", "a.b"),
        ("www.example.com:8443", "www.example.com"),
        ("0x7f.1", "127.0.0.1"),
        ("[::1]:443", "[::1]"),
        ("::1", "[::1]"),
        ("2001:DB8::1", "[2001:db8::1]"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # a CONNECT or resolver's bare form
        ("[::FFFF:7F00:1]:443", "127.0.0.1"),
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example.", "xn--bcher-kva.example"),
        ("a b.com", "a%20b.com"),
    ],
)
def test_canonical_host(name: str, expected: str) -> None:
    assert canonical_host(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x#.evil.com", ["x%23.evil.com/", "evil.com/"]),
        ("a:.evil.com", ["a:.evil.com/", "evil.com/"]),
        ("[x].evil.com", ["[x].evil.com/", "evil.com/"]),
        ("x@evil.com", ["x@evil.com/"]),
        ("evil.com:80", ["evil.com/"]),
        ("evil.com%3A80", ["evil.com/"]),
    ],
)
def test_host_expressions_never_lose_a_suffix(name: str, expected: list[str]) -> None:
    # A DNS label may hold any byte: '#', '@' and a non-numeric ':' must not cut it.
    assert host_expressions(name) == expected


@pytest.mark.parametrize("name", ["", ".", "...", "  ", ":80"])
def test_canonical_host_invalid(name: str) -> None:
    with pytest.raises(InvalidURL, match="empty host name"):
        canonical_host(name)
    with pytest.raises(InvalidURL, match="empty host name"):
        host_expressions(name)


def test_canonical_host_agrees_with_url_host() -> None:
    for name in ["WWW.Example.com", "bücher.example", "3279880203", "a..b.", "%41.com"]:
        assert canonical_host(name) == canonical_parts(f"http://{name}/")[0]


# ------------------------------------------------------------------ properties

# fmt: off
_FRAGMENTS = [
    "http://", "https://", "HTTP://", "ftp:", "//", "%", "%2", "%25", "%2e", "%2E", "%41",
    "%C3%BC", "%zz", "..", ".", "/", "./", "../", "?", "#", "@", ":", ":80", "[", "]", "::1",
    "0", "1", "9", "255", "0x", "0x7f", "a", "b", "Z", "www", "com", "xn--", "xn--tda", "-", "_",
    ";", "&", "=", "~", "user:pass@", "mailto:", "ü", "ß", "\u4f60", "\u3002", "\uff0e",
    "\u212a", "\ud800", " ", "\t", "\n", "\x00", "\x7f", "\x80",
]
# fmt: on
url_ish = st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join)
# st.text() leaves out lone surrogates; they are valid str values, so include them.
any_text = st.text(st.characters(exclude_categories=()))

# Built to pass the fast path most of the time, with near misses mixed in.
_LABEL = st.text("abcxyz019-_", min_size=1, max_size=6)
_LAST_LABEL = st.builds(str.__add__, st.sampled_from("abxz"), st.text("az09-_", max_size=5))
fast_hosts = st.builds(
    lambda labels, last: ".".join([*labels, last]),
    st.lists(st.one_of(_LABEL, st.sampled_from(["xn--tda", "0x7f", "1", "www"])), max_size=6),
    st.one_of(_LAST_LABEL, _LAST_LABEL, _LAST_LABEL, st.sampled_from(["1", "0x7f", "A", ""])),
)
_SEGMENT_TEXT = st.text("abXY09.;@:~!=&-_()*+,$'", max_size=5)
_SEGMENT = st.one_of(
    *[_SEGMENT_TEXT] * 5,  # mostly plain segments
    st.sampled_from(["", ".", "..", "...", ".a", "..b", "%41", "a b"]),
)
# Ports as a proxy writes them, and near misses (empty, too long, not numeric, two).
_PORTS = st.one_of(
    st.just(""), st.just(""),
    st.sampled_from([":80", ":443", ":8080", ":1", ":0", ":00080", ":65535", ":99999"]),
    st.sampled_from([":", ":123456", ":8a", ":-1", ":80:80", ":+80", ": 80", ":\uff18"]),
)
fast_candidates = st.builds(
    lambda scheme, host, port, segments, query: f"{scheme}://{host}{port}{segments}{query}",
    st.sampled_from(["http", "https", "ftp", "a+b.c", "http", "HTTP"]),
    fast_hosts,
    _PORTS,
    st.lists(_SEGMENT, max_size=6).map(lambda segs: "".join("/" + s for s in segs)),
    st.one_of(
        st.just(""),
        st.text("ab./?=&:@", max_size=6).map(lambda q: "?" + q),
        st.sampled_from(["?%", "?#", "?a b"]),
    ),
)
# Always canonical already: the fast path must accept every one of these.
_STRICT_SEGMENT = st.one_of(
    st.text("abXY09;@:~!=&-_()*+,$'", min_size=1, max_size=5),
    st.sampled_from([".a", "a.b", "...", "..x", "x..", "a.", "index.html"]),
)
strict_fast_urls = st.builds(
    lambda scheme, host, port, segments, slash, query:
        f"{scheme}://{host}{port}{segments}{slash}{query}",
    st.sampled_from(["http", "https", "ftp", "a+b.c"]),
    st.builds(
        lambda labels, last: ".".join([*labels, last]), st.lists(_LABEL, max_size=6), _LAST_LABEL
    ),
    st.one_of(st.just(""), st.integers(0, 99999).map(lambda p: f":{p}")),
    st.lists(_STRICT_SEGMENT, max_size=6).map(lambda segs: "".join("/" + s for s in segs)),
    st.sampled_from(["", "/"]),
    st.one_of(st.just(""), st.text("ab./?=&:@", max_size=6).map(lambda q: "?" + q)),
)
fast_names = st.builds(
    str.__add__,
    st.one_of(fast_hosts, fast_hosts.map(str.upper)),
    st.sampled_from(["", "", ".", "..", ":80"]),
)

_PROPERTY_SETTINGS = settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _check_never_raises_other(url: str | bytes) -> None:
    try:
        host, rest = canonical_parts(url)
    except InvalidURL:
        return
    assert host
    assert rest.startswith("/")
    assert canonicalize(url).endswith(host + rest)


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish, fast_candidates))
@example("http://[")
@example("http://@")
@example("http://host/%")
@example("http://host:99999999999999999999999999/")
@example("http://" + "%25" * 30_000 + "2525/")
@example("http://a.com/" + "%2525" * 20_000)
@example("http://" + "1" * 100_000 + "/")
@example("http://" + "ü" * 50_000 + "/")
@example("\ud800://\udfff")
def test_only_invalid_url_is_raised_str(url: str) -> None:
    _check_never_raises_other(url)


@_PROPERTY_SETTINGS
@given(st.one_of(st.binary(), url_ish.map(lambda s: s.encode("utf-8", "surrogatepass"))))
@example(b"http://\xff/\xfe")
@example(b"\x00" * 1000)
def test_only_invalid_url_is_raised_bytes(url: bytes) -> None:
    _check_never_raises_other(url)


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish))
def test_canonical_host_only_invalid_url(name: str) -> None:
    try:
        host = canonical_host(name)
    except InvalidURL:
        return
    assert host
    assert canonical_host(host) == host
    assert 1 <= len(host_expressions(name)) <= 5


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish, fast_candidates, st.binary()))
def test_canonical_host_keeps_url_hosts(url: str | bytes) -> None:
    try:
        host, _ = canonical_parts(url)
    except InvalidURL:
        return
    assert canonical_host(host) == host


@_PROPERTY_SETTINGS
@given(strict_fast_urls)
def test_fast_path_accepts_canonical_urls(url: str) -> None:
    fast = canonical._fast_parts(url)
    assert fast is not None
    assert canonical._slow_parts(url) == fast
    assert canonical_parts(url) == fast[1:]


@_PROPERTY_SETTINGS
@given(fast_candidates)
def test_fast_path_equals_slow_path(url: str) -> None:
    fast = canonical._fast_parts(url)
    if fast is None:  # a near miss: the slow path handles it; nothing to compare
        return
    assert canonical._slow_parts(url) == fast
    assert canonical._slow_parts(url.encode()) == fast
    assert canonical_parts(url) == fast[1:]


def test_fast_path_is_exercised() -> None:
    accepted = [
        "http://www.example.com/path/page.html?q=1",
        "http://a.b",
        "https://x.y/?a//b",
        "http://host/a/b/",
        "http://host?q",
        "http://h/.hidden/..x/...",
        "http://h/a.?b",
        "http://h:80/",
        "http://www.example.com:8080/path/page.html?q=1",
        "https://h:443",
        "http://h:8080?q",
    ]
    rejected = [
        "http://www.Example.com/",
        "http://1.2.3.4/",
        "http://1.2.3.4:80/",
        "http://h:/",
        "http://h:123456/",
        "http://h:8a/",
        "http://h:80:80/",
        "http://u@h:80/",
        "http://h.:80/",
        "http://h:80//a",
        "http://u@h/",
        "http://h//a",
        "http://h/./a",
        "http://h/a/..",
        "http://h/a/.?q",
        "http://h/%41",
        "http://h/#f",
        "http://h/a b",
        "http://h/\u00e9",
        "http://0x7f/",
        "HTTP://h/",
        "http://h./",
        "http://.h/",
        "http://a..b/",
        "h.com/",
    ]
    for url in accepted:
        assert canonical._fast_parts(url) is not None, url
        assert canonical._slow_parts(url) == canonical._fast_parts(url)
    for url in rejected:
        assert canonical._fast_parts(url) is None, url


@_PROPERTY_SETTINGS
@given(fast_names)
def test_fast_host_equals_slow_host(name: str) -> None:
    if canonical._FAST_HOST.fullmatch(name.lower()) is None:
        return
    fast = canonical_host(name)
    slow = canonical._slow_host(name)
    assert fast == slow


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish, fast_candidates, st.binary()))
@example(".[]0")  # leading dots once hid a bracket from the port split
@example("..[0:0::1]/x")
def test_canonicalize_is_idempotent(url: str | bytes) -> None:
    try:
        once = canonicalize(url)
    except InvalidURL:
        return
    assert canonicalize(once) == once
    assert canonical_parts(once) == canonical_parts(url)


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish, fast_candidates))
def test_expressions_shape(url: str) -> None:
    try:
        exprs = expressions(url)
        host, rest = canonical_parts(url)
    except InvalidURL:
        return
    assert 1 <= len(exprs) <= 30
    assert len(set(exprs)) == len(exprs)
    assert exprs[0] == host + rest
    for expr in exprs:
        assert "://" not in expr.split("/", 1)[0]
        assert "/" in expr
        assert not expr.startswith(("http:", "https:"))


@_PROPERTY_SETTINGS
@given(st.one_of(any_text, url_ish))
def test_dns_name_keeps_its_registered_suffix(prefix: str) -> None:
    assert "evil.com/" in host_expressions(prefix + ".evil.com")


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.text(alphabet="abcz09_-.%A:#[]ü ", max_size=30),
                 st.from_regex(r"[a-z0-9_.-]{0,30}", fullmatch=True)))
def test_name_suffixes_shortcut_equals_canonical_host(name: str) -> None:
    from netfilter.canonical import name_suffixes

    try:
        expected = host_suffixes(canonical_host(name))
    except InvalidURL:
        with pytest.raises(InvalidURL):
            name_suffixes(name)
        return
    assert name_suffixes(name) == expected
