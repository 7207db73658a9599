"""Tests for kumopy.policy: the `kumo` API, load_policy and Policy.queue_config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kumopy import kumo
from kumopy.config import UNSPECIFIED, EgressPool, EgressSource, MxHost, PoolEntry, QueueConfig
from kumopy.errors import ConfigError, KumoError, PolicyError
from kumopy.policy import Policy, load_policy

DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parent.parent / "kumopy" / "examples"
BUILTIN_SOURCE = EgressSource(UNSPECIFIED)
BUILTIN_POOL = EgressPool(UNSPECIFIED, (PoolEntry(UNSPECIFIED),))
IP1 = EgressSource("ip-1", "10.0.0.1", "mta1.examplecorp.com")
IP2 = EgressSource("ip-2", "2001:db8:3333:4444:5555:6666:7777:8888", "mta2.examplecorp.com")
CHAPTER = {
    "name_only": ({"example": EgressSource("example")}, {}),
    "ipv4": ({"ip-1": IP1}, {}),
    "ipv6": ({"ip-2": IP2}, {}),
    "pools": (
        {"ip-1": IP1, "ip-2": IP2},
        {
            "CustomerA": EgressPool("CustomerA", (PoolEntry("ip-1"),)),
            "SharedPool": EgressPool("SharedPool", (PoolEntry("ip-1", 1), PoolEntry("ip-2", 2))),
        },
    ),
}


def write_policy(tmp_path: Path, body: str, name: str = "policy.py") -> Path:
    """Write a policy file importing kumo and return its path."""
    path = tmp_path / name
    path.write_text("from kumopy import kumo\n" + textwrap.dedent(body))
    return path


def load_error(path: Path, *sources: Path) -> ConfigError:
    """Load a policy that must fail and return the ConfigError."""
    with pytest.raises(ConfigError) as exc:
        load_policy(path, sources)
    return exc.value


@pytest.mark.parametrize("example", sorted(CHAPTER))
def test_chapter_examples_in_python(example: str) -> None:
    sources, pools = CHAPTER[example]
    policy = load_policy(DATA / "chapter" / f"{example}.py")
    assert dict(policy.config.sources) == {UNSPECIFIED: BUILTIN_SOURCE, **sources}
    assert dict(policy.config.pools) == {UNSPECIFIED: BUILTIN_POOL, **pools}
    assert next(iter(policy.config.sources)) == UNSPECIFIED


def test_chapter_queue_assignment() -> None:
    policy = load_policy(DATA / "chapter" / "pools.py")
    assert policy.queue_config("example.com", "CustomerA", None).egress_pool == "CustomerA"
    assert policy.queue_config("example.com", "other", "c1").egress_pool == "SharedPool"


def test_shipped_chapter_policy_matches_shipped_sources_file() -> None:
    from_python = load_policy(EXAMPLES / "chapter.py").config
    from_toml = load_policy(None, [EXAMPLES / "sources.toml"]).config
    assert from_python == from_toml
    assert set(from_python.sources) == {UNSPECIFIED, "example", "ip-1", "ip-2"}


def test_demo_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUMOPY_DEMO_SINK", "127.0.0.1:2526")
    policy = load_policy(EXAMPLES / "demo_policy.py")
    config = policy.config
    assert [s.source_address for s in config.used_sources()] == [
        None,
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
    ]
    assert config.sources["mta2"].ehlo_domain == "mta2.demo.kumopy.test"
    assert config.pools["transactional"].entries == (PoolEntry("mta1", 1), PoolEntry("mta2", 2))
    assert config.pools["bulk"].entries == (PoolEntry("mta2", 1), PoolEntry("mta3", 3))
    sink = (MxHost("127.0.0.1", 2526),)
    assert policy.queue_config("a.example", "acme", None) == QueueConfig(
        "transactional", mx_list=sink
    )
    assert policy.queue_config("a.example", "bigco", "x") == QueueConfig("bulk", mx_list=sink)
    assert policy.queue_config("a.example", None, None).egress_pool == "transactional"


def test_demo_policy_without_sink_uses_mx_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUMOPY_DEMO_SINK", raising=False)
    policy = load_policy(EXAMPLES / "demo_policy.py")
    assert policy.queue_config("a.example", "acme", None).mx_list is None


def test_kumo_outside_a_load_raises() -> None:
    with pytest.raises(KumoError, match=r"kumo.define_egress_source\(\) can only be called"):
        kumo.define_egress_source(name="x")
    with pytest.raises(PolicyError, match="while a policy file is being loaded"):
        kumo.on("init", lambda: None)


def test_on_as_plain_call_and_lua_style_tables(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        def init():
            kumo.define_egress_source({"name": "a", "source_address": "192.0.2.1"})
            kumo.define_egress_pool({"name": "p", "entries": ({"name": "a", "weight": 2},)})

        def queues(domain, tenant, campaign, routing_domain):
            return kumo.make_queue_config(egress_pool="p", mx_list=[routing_domain])

        kumo.on("init", init)
        kumo.on("get_queue_config", queues)
        """,
    )
    policy = load_policy(path)
    assert policy.path == path
    assert policy.config.pools["p"] == EgressPool("p", (PoolEntry("a", 2),))
    config = policy.queue_config("example.com", None, None, "relay.example.net")
    assert config.mx_list == (MxHost("relay.example.net"),)


def test_several_init_handlers_run_in_order(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        @kumo.on("init")
        def first():
            kumo.define_egress_source(name="a")

        @kumo.on("init")
        def second():
            kumo.define_egress_pool(name="p", entries=[{"name": "a"}])
        """,
    )
    assert load_policy(path).config.pools["p"].entries == (PoolEntry("a"),)


def test_validation_issues_name_file_line_object_and_field(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        @kumo.on("init")
        def init():
            kumo.define_egress_source(name="ip-1", source_address="mta1.example.com")
            kumo.define_egress_source(name="ip-2", ehlo_domain="bad_name.example.com")
            kumo.define_egress_source(name="ip-1")
            kumo.define_egress_source(name="unspecified")
            kumo.define_egress_source(name="p", socks5_proxy_password="s3cret", colour="red")
            kumo.define_egress_pool(
                name="x", entries=[{"name": "ip-9"}, {"name": "p", "weight": -1}]
            )
        """,
    )
    error = load_error(path)
    found = [(i.where, i.obj, i.field) for i in error.issues]
    where = str(path)
    assert found == [
        (f"{where}:5", 'source "ip-1"', "source_address"),
        (f"{where}:6", 'source "ip-2"', "ehlo_domain"),
        (f"{where}:7", 'source "ip-1"', "name"),
        (f"{where}:8", 'source "unspecified"', "name"),
        (f"{where}:9", 'source "p"', "socks5_proxy_password"),
        (f"{where}:9", 'source "p"', "colour"),
        (f"{where}:10", 'pool "x"', "entries[0].name"),
        (f"{where}:10", 'pool "x"', "entries[1].weight"),
    ]
    text = str(error)
    assert text.startswith("8 configuration errors:")
    assert (
        "source_address must be an IP literal, not a host name; resolve it yourself and give "
        "the address (kumopy never resolves names to bind): 'mta1.example.com'"
    ) in text
    assert f"defined twice: at {where}:5 and at {where}:7" in text
    assert "s3cret" not in text


def test_errors_in_pool_and_event_registration(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        @kumo.on("init")
        def init():
            kumo.define_egress_pool(name="p", entries="ip-1", size=3)

        @kumo.on("get_queue_confg")
        def typo(domain, tenant, campaign, routing_domain):
            pass

        @kumo.on("get_queue_config")
        def one(domain, tenant, campaign, routing_domain):
            pass

        @kumo.on("get_queue_config")
        def two(domain, tenant, campaign, routing_domain):
            pass

        @kumo.on("init")
        def needs_an_argument(x):
            pass
        """,
    )
    problems = [i.problem for i in load_error(path).issues]
    assert problems == [
        "unknown event 'get_queue_confg' (did you mean 'get_queue_config'?); kumopy knows "
        "'init', 'get_queue_config', 'get_egress_path_config'",
        f"a get_queue_config handler is already registered at {path}:11; keep one",
        "the init handler must accept (no arguments)",
        "unknown option; a pool takes name and entries",
        'must be a list like [{"name": "ip-1", "weight": 1}], not a str',
    ]


def test_policy_raising_at_import_names_file_line_and_exception(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "x = 1\ny = x / 0\n")
    (issue,) = load_error(path).issues
    assert issue.where == f"{path}:3"
    assert issue.problem == "the policy raised ZeroDivisionError: division by zero"


def test_init_raising_names_the_handler_and_line(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        def helper():
            return {}["missing"]

        @kumo.on("init")
        def init():
            kumo.define_egress_source(name="a")
            helper()
        """,
    )
    (issue,) = load_error(path).issues
    assert issue.where == f"{path}:4"
    assert issue.problem == f"init handler ({path}:6) raised KeyError: 'missing'"


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "def broken(:\n    pass\n")
    (issue,) = load_error(path).issues
    assert issue.where == f"{path}:2"
    assert issue.problem.startswith("syntax error:")
    (issue,) = load_error(tmp_path / "nope.py").issues
    assert issue.problem == "file not found"


def test_policy_calling_exit_is_a_config_error(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "import sys\nsys.exit(3)\n")
    assert "raised SystemExit: 3" in load_error(path).issues[0].problem


def test_make_queue_config_error_at_load_keeps_its_issues(tmp_path: Path) -> None:
    path = write_policy(tmp_path, 'DEFAULT = kumo.make_queue_config(max_age="7 fortnights")\n')
    (issue,) = load_error(path).issues
    assert (issue.where, issue.obj, issue.field) == (f"{path}:2", "queue config", "max_age")
    assert "unknown unit 'fortnights'" in issue.problem


def test_failed_load_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = write_policy(
        tmp_path,
        """
        kumo.define_egress_source(name="leak", source_address="192.0.2.1")
        kumo.define_egress_pool(name="p", entries=[{"name": "missing"}])
        """,
        name="bad.py",
    )
    load_error(bad)
    with pytest.raises(PolicyError):
        kumo.define_egress_source(name="outside")
    good = write_policy(tmp_path, 'kumo.define_egress_source(name="ok")\n', name="good.py")
    config = load_policy(good).config
    assert list(config.sources) == [UNSPECIFIED, "ok"]
    assert list(config.pools) == [UNSPECIFIED]


def test_policy_loading_a_policy_keeps_registries_apart(tmp_path: Path) -> None:
    inner = write_policy(tmp_path, 'kumo.define_egress_source(name="inner")\n', name="inner.py")
    outer = write_policy(
        tmp_path,
        f"""
        from kumopy.policy import load_policy
        INNER = load_policy({str(inner)!r})
        kumo.define_egress_source(name="outer")
        """,
        name="outer.py",
    )
    assert list(load_policy(outer).config.sources) == [UNSPECIFIED, "outer"]


def test_sources_files_merge_in_order_with_the_policy(tmp_path: Path) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text('[source."late"]\n[pool."bulk"."late"]\nweight = 5\n')
    policy = load_policy(DATA / "with_sources.py", [extra])
    config = policy.config
    assert list(config.sources) == [UNSPECIFIED, "relay", "mta-a", "mta-b", "late"]
    assert config.sources["relay"] == EgressSource("relay", None, "relay.example.net", 2525)
    assert config.sources["mta-b"] == EgressSource("mta-b", "2001:db8::20", "b.mta.example.net")
    assert config.pools["bulk"].entries == (
        PoolEntry("mta-a", 3),
        PoolEntry("mta-b", 2),
        PoolEntry("relay", 1),
        PoolEntry("late", 5),
    )
    assert list(config.pools) == [UNSPECIFIED, "bulk", "relays"]


def test_source_in_policy_and_sources_file_is_a_duplicate(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text('\n[source."a"]\nsource_address = "192.0.2.1"\n')
    path = write_policy(
        tmp_path,
        """
        kumo.define_egress_source(name="a")
        kumo.load_sources("s.toml")
        """,
    )
    (issue,) = load_error(path).issues
    assert issue.problem == f"source 'a' is defined twice: at {path}:3 and at {tmp_path}/s.toml:2"


def test_queue_config_without_handler_is_the_default(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, ""))
    assert policy.queue_config("example.com", None, None) == QueueConfig()
    assert Policy(policy.config).queue_config("example.com", "t", "c") == QueueConfig()


@pytest.mark.parametrize(
    "body, message",
    [
        (
            'return kumo.make_queue_config(egress_pool="nope")',
            "queue 'camp:acme@example.com' names unknown egress pool 'nope'; "
            "known pools: unspecified",
        ),
        (
            "return None",
            "get_queue_config ({where}:3) returned NoneType for queue "
            "'camp:acme@example.com'; it must return kumo.make_queue_config(...)",
        ),
        (
            "return 1 / 0",
            "get_queue_config ({where}:3) failed for queue 'camp:acme@example.com' at "
            "{where}:6: ZeroDivisionError: division by zero",
        ),
        (
            'return kumo.make_queue_config(egress_pool="unspecified", mx_list="mx.example")',
            "failed for queue 'camp:acme@example.com' at {where}:6: ConfigError: "
            "1 configuration error:\n"
            "  - {where}:6: queue config: mx_list: must be a list of hosts",
        ),
    ],
)
def test_unusable_queue_config_is_a_policy_error(tmp_path: Path, body: str, message: str) -> None:
    path = write_policy(
        tmp_path,
        f"""
        @kumo.on("get_queue_config")
        def queues(domain, tenant, campaign, routing_domain):
            assert (tenant, campaign) == ("acme", "camp")
            {body}
        """,
    )
    policy = load_policy(path)
    with pytest.raises(PolicyError) as exc:
        policy.queue_config("example.com", "acme", "camp")
    assert message.format(where=path) in str(exc.value)
    assert exc.value.transient


def test_make_queue_config_parses_everything(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        @kumo.on("get_queue_config")
        def queues(domain, tenant, campaign, routing_domain):
            return kumo.make_queue_config(
                retry_interval="5m",
                max_retry_interval="1h30m",
                max_age=3600,
                mx_list=["mx1.example.com", "192.0.2.7:2525", "[2001:db8::1]:587", "::1"],
            )
        """,
    )
    config = load_policy(path).queue_config("example.com", None, None)
    assert config == QueueConfig(
        egress_pool=UNSPECIFIED,
        retry_interval=300.0,
        max_retry_interval=5400.0,
        max_age=3600.0,
        mx_list=(
            MxHost("mx1.example.com"),
            MxHost("192.0.2.7", 2525),
            MxHost("2001:db8::1", 587),
            MxHost("::1"),
        ),
    )


def test_make_queue_config_reports_every_bad_option(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        """
        kumo.make_queue_config(
            egress_pool="",
            retry_interval="1h",
            max_retry_interval="10m",
            max_age=0,
            mx_list=[],
            max_message_rate="10 per second",
            egres_pool="x",
        )
        """,
    )
    problems = {i.field: i.problem for i in load_error(path).issues}
    assert problems == {
        "egress_pool": "must be the name of a pool, not ''",
        "max_age": "must be longer than zero",
        "mx_list": "is empty; leave mx_list out to look up MX records",
        "max_message_rate": '\'10 per second\' is not a rate such as "100/s", "5000/h", '
        '"20000/day" or "50/10min,max_burst=5"',
        "egres_pool": "unknown option (did you mean 'egress_pool'?); known options: "
        "egress_pool, retry_interval, max_retry_interval, max_age, mx_list, max_message_rate",
        "max_retry_interval": "600s is shorter than retry_interval (3600s)",
    }


def test_make_queue_config_rejects_bad_mx_item(tmp_path: Path) -> None:
    path = write_policy(tmp_path, 'kumo.make_queue_config(mx_list=["ok.example", "x:99999"])\n')
    (issue,) = load_error(path).issues
    assert issue.problem == "item 1: 99999 is not a port number (1 to 65535)"


def test_describe(tmp_path: Path) -> None:
    policy = load_policy(DATA / "chapter" / "pools.py")
    described = policy.describe()
    assert described["pools"][2] == {
        "name": "SharedPool",
        "entries": [
            {"name": "ip-1", "weight": 1, "share": 33.3},
            {"name": "ip-2", "weight": 2, "share": 66.7},
        ],
    }
    assert described["sources"][1] == {
        "name": "ip-1",
        "source_address": "10.0.0.1",
        "ehlo_domain": "mta1.examplecorp.com",
        "remote_port": None,
        "source_selection_rate": None,
        "warmup": None,
        "family": "ipv4",
        "pools": ["CustomerA", "SharedPool"],
    }
