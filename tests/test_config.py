"""kumopy.config, kumopy.validation and kumopy.units: dataclasses, durations, mx hosts."""

from __future__ import annotations

import msgpack
import pytest

from kumopy.config import (
    UNSPECIFIED,
    EgressPool,
    EgressSource,
    EntryDefinition,
    MxHost,
    PoolDefinition,
    PoolEntry,
    QueueConfig,
    SourceDefinition,
)
from kumopy.errors import ConfigError
from kumopy.units import parse_duration
from kumopy.validation import build_config, parse_mx_host, source_from_dict


def source(name: str, **options: object) -> SourceDefinition:
    """Return a source definition located at test:1."""
    return SourceDefinition(name, dict(options), "test:1")


def pool(name: str, *entries: object) -> PoolDefinition:
    """Return a pool definition located at test:2."""
    defs = [EntryDefinition(e, f"entries[{i}]", "test:2") for i, e in enumerate(entries)]
    return PoolDefinition(name, defs, "test:2")


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """Return the `field: problem` strings of a ConfigError."""
    return [f"{i.field}: {i.problem}" for i in exc.value.issues]


def test_default_config_has_only_the_builtins() -> None:
    config = build_config((), ())
    assert list(config.sources) == [UNSPECIFIED]
    assert config.sources[UNSPECIFIED] == EgressSource(UNSPECIFIED)
    assert config.pools[UNSPECIFIED] == EgressPool(UNSPECIFIED, (PoolEntry(UNSPECIFIED, 1),))
    assert config.used_sources() == [EgressSource(UNSPECIFIED)]


def test_config_mappings_are_read_only_and_ordered() -> None:
    config = build_config([source("b"), source("a")], [pool("p", {"name": "a"})])
    assert list(config.sources) == [UNSPECIFIED, "b", "a"]
    assert list(config.pools) == [UNSPECIFIED, "p"]
    with pytest.raises(TypeError):
        config.sources["c"] = EgressSource("c")  # type: ignore[index]


def test_used_sources_skips_sources_in_no_pool_and_weight_zero_entries() -> None:
    config = build_config(
        [source("a"), source("b"), source("c")],
        [
            pool("p", {"name": "c", "weight": 2}, {"name": "b", "weight": 0}),
            pool("q", {"name": "a"}),
        ],
    )
    assert config.pools["p"].entries == (PoolEntry("c", 2),)
    assert [s.name for s in config.used_sources()] == [UNSPECIFIED, "a", "c"]


def test_empty_pool_is_allowed() -> None:
    config = build_config([], [pool("empty"), pool("zeroes", {"name": UNSPECIFIED, "weight": 0})])
    assert config.pools["empty"].entries == ()
    assert config.pools["zeroes"].entries == ()


def test_source_address_is_normalised_and_family_derived() -> None:
    config = build_config(
        [
            source("v6", source_address="2001:DB8:0::0010"),
            source("v4", source_address=" 10.0.0.1 "),
        ],
        [],
    )
    assert config.sources["v6"].source_address == "2001:db8::10"
    assert config.sources["v6"].family == "ipv6"
    assert config.sources["v4"].source_address == "10.0.0.1"
    assert config.sources["v4"].family == "ipv4"
    assert config.sources[UNSPECIFIED].family is None


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("mta1.example.com", "must be an IP literal, not a host name"),
        ("localhost", "must be an IP literal, not a host name"),
        ("10.0.0.256", "not a valid IPv4 or IPv6 address"),
        ("10.0.0.1:25", "has a port"),
        ("10.0.0.0/24", "is a network"),
        ("0.0.0.0", "omit source_address"),
        ("::", "omit source_address"),
        ("224.0.0.1", "multicast"),
        (42, "must be an IP address string, not an integer"),
    ],
)
def test_bad_source_address(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([source("s", source_address=value)], [])
    (issue,) = exc.value.issues
    assert (issue.where, issue.obj, issue.field) == ("test:1", 'source "s"', "source_address")
    assert fragment in issue.problem


@pytest.mark.parametrize(
    "value", ["mta1.example.com", "a-b.example", "[192.0.2.1]", "[IPv6:2001:db8::1]"]
)
def test_good_ehlo_domain(value: str) -> None:
    config = build_config([source("s", ehlo_domain=value)], [])
    assert config.sources["s"].ehlo_domain == value


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("mta1", "not a fully-qualified name"),
        ("bad_name.example.com", "invalid label 'bad_name'"),
        ("-a.example.com", "invalid label '-a'"),
        ("a..example.com", "empty label"),
        ("mta1.example.com.", "ends with a dot"),
        ("x" * 64 + ".example.com", "longer than 63"),
        (("a" * 60 + ".") * 5 + "com", "longer than 253"),
        ("192.0.2.1", "write it as [192.0.2.1]"),
        ("[2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("mta1.exämple.com", "xn--"),
        ("", "must not be empty"),
        (3, "must be a host name string"),
    ],
)
def test_bad_ehlo_domain(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([source("s", ehlo_domain=value)], [])
    assert [i.field for i in exc.value.issues] == ["ehlo_domain"]
    assert fragment in exc.value.issues[0].problem


@pytest.mark.parametrize("value", [0, 65536, -1, True, "25", 25.0])
def test_bad_remote_port(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([source("s", remote_port=value)], [])
    assert [i.field for i in exc.value.issues] == ["remote_port"]


def test_none_means_unset() -> None:
    config = build_config([source("s", source_address=None, ehlo_domain=None)], [])
    assert config.sources["s"] == EgressSource("s")


@pytest.mark.parametrize(
    "name, fragment",
    [(None, "a name is required"), ("", "must not be empty"), ("a b", "spaces"), (7, "string")],
)
def test_bad_names(name: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([SourceDefinition(name, {}, "t:1")], [PoolDefinition(name, [], "t:2")])
    assert len(exc.value.issues) == 2
    assert all(fragment in i.problem for i in exc.value.issues)


@pytest.mark.parametrize(
    "weight, fragment",
    [
        (-1, "negative"),
        (1.5, "not 1.5"),
        (2.0, "not 2.0"),
        ("3", "not a string"),
        (True, "not a boolean"),
        (2**32, "larger than"),
    ],
)
def test_bad_weights(weight: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([source("a")], [pool("p", {"name": "a", "weight": weight})])
    (issue,) = exc.value.issues
    assert (issue.obj, issue.field) == ('pool "p"', "entries[0].weight")
    assert fragment in issue.problem


def test_pool_entry_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(
            [source("ip-1")],
            [
                pool(
                    "p",
                    {"name": "ip-l"},
                    {"name": "ip-1"},
                    {"name": "ip-1", "weight": 2},
                    {"name": "ip-1", "wieght": 2},
                    "ip-1",
                )
            ],
        )
    assert problems(exc) == [
        "entries[0].name: unknown source 'ip-l' (did you mean 'ip-1'?); define it first",
        "entries[2].name: source 'ip-1' is already in this pool as entries[1]",
        "entries[3].wieght: unknown option (did you mean 'weight'?); "
        "an entry takes name and weight",
        "entries[3].name: source 'ip-1' is already in this pool as entries[1]",
        'entries[4]: must be a table like {"name": "ip-1", "weight": 1}, not a string',
    ]


def test_invalid_source_is_still_known_to_pools() -> None:
    with pytest.raises(ConfigError) as exc:
        build_config([source("a", source_address="nope.example")], [pool("p", {"name": "a"})])
    assert [i.field for i in exc.value.issues] == ["source_address"]


def test_duplicates_and_builtins() -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(
            [source("a"), SourceDefinition("a", {}, "other:9"), source(UNSPECIFIED)],
            [pool("p"), pool("p"), pool(UNSPECIFIED)],
        )
    assert problems(exc) == [
        "name: source 'a' is defined twice: at test:1 and at other:9",
        'name: "unspecified" is the built-in source and cannot be redefined; pick another name',
        "name: pool 'p' is defined twice: at test:2 and at test:2",
        'name: "unspecified" is the built-in pool and cannot be redefined; pick another name',
    ]


KNOWN = "name, source_address, ehlo_domain, remote_port, source_selection_rate, warmup"


def test_unknown_and_reserved_options_never_echo_values() -> None:
    secret = "hunter2-secret"
    with pytest.raises(ConfigError) as exc:
        build_config(
            [source("s", socks5_proxy_password=secret, socks5_pasword=secret, colour="blue")], []
        )
    assert problems(exc) == [
        "socks5_proxy_password: not supported yet by kumopy; remove it",
        "socks5_pasword: unknown option (did you mean 'socks5_proxy_password'?); "
        f"known options: {KNOWN}",
        f"colour: unknown option; known options: {KNOWN}",
    ]
    assert secret not in str(exc.value)


@pytest.mark.parametrize(
    "option",
    [
        "ha_proxy_server",
        "ha_proxy_source_address",
        "socks5_proxy_server",
        "socks5_proxy_source_address",
        "socks5_proxy_username",
        "suspend_when_unplumbed",
    ],
)
def test_reserved_options(option: str) -> None:
    with pytest.raises(ConfigError, match="not supported yet") as exc:
        build_config([source("s", **{option: "x"})], [])
    assert exc.value.issues[0].field == option


@pytest.mark.parametrize(
    "value",
    [
        EgressSource("a"),
        EgressSource("b", "192.0.2.1", "b.example.com", 2525),
        EgressSource("c", "2001:db8::1", "c.example.com"),
    ],
)
def test_source_round_trips_through_msgpack(value: EgressSource) -> None:
    packed = msgpack.packb(value.to_dict())
    assert source_from_dict(msgpack.unpackb(packed)) == value


def test_source_from_bad_dict() -> None:
    with pytest.raises(ConfigError, match="host name"):
        source_from_dict({"name": "a", "source_address": "mx.example.com"})
    with pytest.raises(ConfigError, match="a name is required"):
        source_from_dict({"source_address": "192.0.2.1"})
    with pytest.raises(ConfigError, match="unknown option"):
        source_from_dict({"name": "a", "bind": "192.0.2.1"})


@pytest.mark.parametrize(
    "value, seconds",
    [
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
        ("90s", 90.0),
        ("20m", 1200.0),
        ("1h", 3600.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("2 hours", 7200.0),
        ("1 day 2 hours", 93600.0),
        ("1.5h", 5400.0),
        ("1w", 604800.0),
        ("500ms", 0.5),
        ("300", 300.0),
        (" 20M ", 1200.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("", "is not a number of seconds"),
        ("abc", "is not a number of seconds"),
        ("20x", "unknown unit 'x'"),
        ("1h30", "number without a unit"),
        ("-5m", "is not a number of seconds"),
        ("1h-", "is not a number of seconds"),
        (-1, "finite duration >= 0"),
        (float("nan"), "finite duration >= 0"),
        (float("inf"), "finite duration >= 0"),
        (True, "not a boolean"),
        (None, "not nothing (None)"),
        ([1], "not a list"),
    ],
)
def test_parse_duration_errors(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_duration(value, where="retry_interval")
    (issue,) = exc.value.issues
    assert issue.where == "retry_interval"
    assert fragment in issue.problem


@pytest.mark.parametrize(
    "text, host, port, shown",
    [
        ("mx.example.com", "mx.example.com", None, "mx.example.com"),
        ("MX.Example.COM.", "mx.example.com", None, "mx.example.com"),
        ("mx.example.com:2525", "mx.example.com", 2525, "mx.example.com:2525"),
        ("localhost:25", "localhost", 25, "localhost:25"),
        ("1.2.3.4:2525", "1.2.3.4", 2525, "1.2.3.4:2525"),
        ("1.2.3.4", "1.2.3.4", None, "1.2.3.4"),
        ("[::1]:2525", "::1", 2525, "[::1]:2525"),
        ("[2001:DB8::1]", "2001:db8::1", None, "2001:db8::1"),
        ("::1", "::1", None, "::1"),
        ("2001:db8::25", "2001:db8::25", None, "2001:db8::25"),
    ],
)
def test_parse_mx_host(text: str, host: str, port: int | None, shown: str) -> None:
    parsed = parse_mx_host(text)
    assert parsed == MxHost(host, port)
    assert str(parsed) == shown
    assert parse_mx_host(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("mx.example.com:", "invalid port ''"),
        ("mx.example.com:smtp", "invalid port 'smtp'"),
        ("mx.example.com:70000", "not a port number"),
        ("[::1", "malformed"),
        ("[::1]2525", "malformed"),
        ("[1.2.3.4]:25", "brackets are only for IPv6"),
        ("1.2.3.400", "not a valid IPv4 address"),
        ("2001:db8:::1", "not a valid IPv6 address"),
        ("bad_host.example", "invalid label"),
        ("", "must not be empty"),
        (25, "must be a string"),
    ],
)
def test_parse_mx_host_errors(text: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_mx_host(text)
    assert fragment in exc.value.issues[0].problem


def test_queue_config_defaults_match_kumomta() -> None:
    config = QueueConfig()
    assert config.egress_pool == UNSPECIFIED
    assert config.retry_interval == 20 * 60
    assert config.max_retry_interval is None
    assert config.max_age == 7 * 86400
    assert config.mx_list is None
