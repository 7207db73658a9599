"""Bounce classification: the shipped rules, the cache, rules files and their errors, the policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kumopy.bounce_class import (
    CLASSES,
    SHIPPED_RULES,
    UNCATEGORIZED,
    BounceClassifier,
    default_classifier,
    make_classifier,
    normalize,
    parse_rules,
    read_rules,
)
from kumopy.errors import ConfigError
from kumopy.policy import load_policy
from kumopy.toml_lines import item_line, key_lines

SHIPPED = [
    ((550, "5.1.1", "<bob@x.test>: Recipient address rejected: User unknown"), "InvalidRecipient"),
    ((550, None, "No such user here"), "InvalidRecipient"),
    ((452, "4.2.2", "Mailbox full"), "QuotaIssues"),
    ((552, "5.2.2", "The email account that you tried to reach is over quota"), "QuotaIssues"),
    ((550, "5.7.1", "Client host [192.0.2.1] blocked using zen.spamhaus.org"), "SpamBlock"),
    ((554, "5.7.1", "Service unavailable; your IP is listed"), "SpamBlock"),
    ((550, "5.7.1", "Message rejected as spam by content filtering"), "SpamContent"),
    ((551, "5.4.7", "message expired: next attempt would pass max_age 3600s"), "MessageExpired"),
    ((451, "4.4.7", "delivery time expired"), "MessageExpired"),
    ((550, "5.1.2", "kumopy: domain nxdomain.test does not exist"), "BadDomain"),
    ((550, "5.4.4", "kumopy: no address for the domain"), "BadDomain"),
    ((556, "5.1.10", "kumopy: null MX"), "BadDomain"),
    ((452, "4.5.3", "Too many recipients"), "TooManyRecipients"),
    ((550, None, "too many recipients in this message"), "TooManyRecipients"),
    ((550, "5.7.26", "Unauthenticated email is not accepted due to DMARC policy"), "PolicyRelated"),
    (
        (451, "4.4.1", "kumopy: connect to 192.0.2.9:25 from 127.0.0.2 failed: Connection refused"),
        "NoAnswerFromHost",
    ),
    ((451, "4.4.1", "kumopy: connect to 192.0.2.9:25 from any timed out"), "NoAnswerFromHost"),
    (
        (451, "4.4.2", "kumopy: session with 192.0.2.9:25 from 127.0.0.2 connection lost"),
        "BadConnection",
    ),
    ((451, "4.4.1", "kumopy: cannot bind source address 192.0.2.4: gone"), "BadConfiguration"),
    ((451, "4.4.3", "kumopy: cannot look up the MX records of x.test: SERVFAIL"), "DNSFailure"),
    ((553, "5.6.7", "kumopy: non-ASCII address 'é@x' needs SMTPUTF8"), "ProtocolErrors"),
    ((554, "5.6.3", "kumopy: 8-bit content and x does not offer 8BITMIME"), "ProtocolErrors"),
    ((552, "5.3.4", "kumopy: message of 900 bytes exceeds the SIZE 800"), "ContentRelated"),
    ((553, "5.1.7", "kumopy: bad sender address"), "InvalidSender"),
    ((550, "5.7.1", "Relaying denied"), "RelayDenied"),
    ((550, "5.7.1", "Message contains a virus"), "VirusRelated"),
    ((550, "5.2.1", "The email account that you tried to reach is disabled"), "InactiveMailbox"),
    ((535, "5.7.8", "Authentication credentials invalid"), "AuthenticationFailed"),
    ((451, "4.7.1", "Greylisted, please try again later"), "TransientFailure"),
    ((451, "4.4.5", "kumopy: delayed: limit 10/s on source a"), "TransientFailure"),
    ((421, "4.7.28", "unusual rate of unsolicited mail from your IP"), "SpamRelated"),
    ((250, "2.0.0", "OK queued as 3.41"), UNCATEGORIZED),
    ((599, None, "something nobody wrote a rule for"), UNCATEGORIZED),
]  # fmt: skip


@pytest.mark.parametrize(("response", "expected"), SHIPPED, ids=[c for _r, c in SHIPPED])
def test_shipped_rules_classify_common_replies(
    response: tuple[int, str | None, str], expected: str
) -> None:
    assert default_classifier().classify(*response) == expected


def test_every_shipped_class_is_kumomtas_and_the_file_is_ours() -> None:
    rules = read_rules(SHIPPED_RULES)
    assert len(rules) > 50
    assert {r.classification for r in rules} <= set(CLASSES)
    assert all(re.fullmatch(rf"{re.escape(str(SHIPPED_RULES))}:\d+", r.where) for r in rules)


def test_the_normalized_subject_is_code_enhanced_text() -> None:
    assert normalize(550, "5.1.1", "no such\r\n  user") == "550 5.1.1 no such user"
    assert normalize(550, None, "no such user") == "550 no such user"


def test_twenty_thousand_identical_replies_cost_one_scan() -> None:
    classifier = make_classifier()
    for _ in range(20_000):
        assert classifier.classify(452, "4.2.2", "mailbox full") == "QuotaIssues"
    assert classifier.scans == 1
    classifier.classify(452, "4.2.2", "mailbox full!")
    assert classifier.scans == 2


def test_the_first_matching_rule_of_the_first_file_wins(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(
        "[rules]\n"
        "'^550 5\\.1\\.1 .*vacation' = \"AutoReply\"\n"
        "'^550 5\\.1\\.1 ' = \"InactiveMailbox\"\n"
        "'^550 5\\.1\\.1 .*gone' = \"BadDomain\"\n"
    )
    classifier = make_classifier([mine])
    assert classifier.files == (str(mine), str(SHIPPED_RULES))
    assert classifier.classify(550, "5.1.1", "user on vacation") == "AutoReply"
    assert classifier.classify(550, "5.1.1", "gone") == "InactiveMailbox"
    # Not in my file: the shipped rules still apply.
    assert classifier.classify(452, "4.2.2", "full") == "QuotaIssues"


def _issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_rules(path)
    return [str(i) for i in info.value.issues]


def test_bad_toml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[rules]\n'^550 ' = \"SpamBlock\"\n'^551 ' = SpamBlock\n")
    (issue,) = _issues(bad)
    assert issue.startswith(f"{bad}:3: bounce rules: TOML syntax error")


def test_an_unknown_class_says_did_you_mean_at_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('# mine\n[rules]\n\'^550 \' = "SpamBlock"\n"^552 " = "QuotaIssue"\n')
    (issue,) = _issues(bad)
    assert issue.startswith(f"{bad}:4: bounce rule: ^552 : unknown class 'QuotaIssue'")
    assert "(did you mean 'QuotaIssues'?)" in issue


def test_a_bad_regex_is_reported_at_its_line_with_the_others(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[rules]\n'^550 (' = \"SpamBlock\"\n'ok' = \"SpamBlock\"\n'[x' = 3\n[other]\n")
    issues = _issues(bad)
    assert issues[0].startswith(f"{bad}:5: bounce rules: other: a rules file holds one")
    assert issues[1].startswith(f"{bad}:2: bounce rule: ^550 (: bad regex: missing )")
    assert issues[2].startswith(f"{bad}:4: bounce rule: [x: unknown class 3")
    assert len(issues) == 3


def test_a_missing_rules_file_is_an_issue(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert _issues(missing) == [f"{missing}: bounce rules: file not found"]


def test_parse_rules_keeps_file_order() -> None:
    rules, issues = parse_rules("[rules]\n'b' = \"SpamBlock\"\n'a' = \"AutoReply\"\n", "t.toml")
    assert not issues
    assert [(r.pattern.pattern, r.classification, r.where) for r in rules] == [
        ("b", "SpamBlock", "t.toml:2"),
        ("a", "AutoReply", "t.toml:3"),
    ]
    assert BounceClassifier(rules).classify(1, None, "A B") == "SpamBlock"  # case-insensitive


def test_the_policy_adds_its_files_before_the_shipped_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text("[rules]\n'mailbox full' = \"InactiveMailbox\"\n")
    policy = tmp_path / "policy.py"
    policy.write_text(
        "from kumopy import kumo\n"
        "kumo.define_egress_source(name='a', source_address='127.0.0.2')\n"
        "kumo.define_egress_pool(name='p', entries=[{'name': 'a'}])\n"
        "kumo.configure_bounce_classifier(files=['rules.toml'])\n"
    )
    classifier = load_policy(policy).settings["bounce_classifier"]
    assert isinstance(classifier, BounceClassifier)
    assert classifier.files == (str(tmp_path / "rules.toml"), str(SHIPPED_RULES))
    assert classifier.classify(452, "4.2.2", "Mailbox full") == "InactiveMailbox"
    assert classifier.classify(550, "5.1.1", "unknown") == "InvalidRecipient"


def test_the_policy_reports_a_bad_rules_file_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text("[rules]\n'x' = \"Spam\"\n")
    policy = tmp_path / "policy.py"
    policy.write_text(
        "from kumopy import kumo\n"
        "kumo.define_egress_source(name='a', source_address='127.0.0.2')\n"
        "kumo.define_egress_pool(name='p', entries=[{'name': 'a'}])\n"
        "kumo.configure_bounce_classifier(files=['rules.toml'])\n"
        "kumo.configure_bounce_classifier(file=['rules.toml'])\n"
    )
    with pytest.raises(ConfigError) as info:
        load_policy(policy)
    text = [str(i) for i in info.value.issues]
    assert text[0].startswith(f"{tmp_path / 'rules.toml'}:2: bounce rule: x: unknown class 'Spam'")
    assert text[1].startswith(f"{policy}:5: configure_bounce_classifier: unknown option 'file'")
    assert "did you mean 'files'" in text[1]


def test_key_lines_and_item_lines_find_toml_lines() -> None:
    text = '[rules]\n\'a\' = "X"\n\n"b\\\\.c" = "Y"\nlist = [\n  \'one\', # \'no\'\n  "two",\n]\n'
    lines = key_lines(text)
    assert lines[("rules", "a")] == 2 and lines[("rules", "b\\.c")] == 4
    assert [item_line(text, 5, i) for i in range(3)] == [6, 7, 5]
