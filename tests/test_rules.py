"""Rules: validation, the reference's precedence, wildcards, non-recursive rules, traversal."""

import itertools
import random

import pytest
from structlog.testing import capture_logs

from datatether.engine.errors import InvalidRule
from datatether.engine.rules import (PATH_MAX_BYTES, RULE_MAX_CHARS, RuleSet, parse_rule,
                                     path_too_long, skip_long_path)


def inc(path, recursive=True):
    return parse_rule(path, True, recursive)


def exc(path, recursive=True):
    return parse_rule(path, False, recursive)


def selected(rules, *paths, is_dir=False):
    rs = RuleSet(rules)
    return [rs.matches(p, is_dir) for p in paths]


# -- the reference's examples --------------------------------------------------------------

def test_recursive_rule_discards_lower_non_recursive_rule_of_same_type():
    rs = RuleSet([inc("/var/data"), inc("/var/data/old", recursive=False)])
    assert rs.discarded == {"/var/data/old": "/var/data"}
    assert [r.path for r in rs.effective] == ["/var/data"]
    # Discarding matters once an exclude pattern is involved: the lower include no longer
    # outranks it, so the top-level rule and the pattern decide.
    rs = RuleSet([inc("/var/data"), inc("/var/data/old", recursive=False), exc("/var/data/*.db")])
    assert not rs.matches("/var/data/old/x.db", False)
    assert rs.matches("/var/data/old/x.txt", False)


def test_same_type_exclude_rules_are_discarded_too():
    rs = RuleSet([inc("/"), exc("/tmp"), exc("/tmp/keep", recursive=False)])
    assert rs.discarded == {"/tmp/keep": "/tmp"}


def test_rules_of_different_types_both_apply():
    rules = [inc("/var/data"), exc("/var/data/old")]
    assert RuleSet(rules).discarded == {}
    assert selected(rules, "/var/data/f", "/var/data/old/f", "/var/data/old/sub/g", "/var/other") == \
        [True, False, False, False]
    assert selected(rules, "/var/data", "/var/data/old", is_dir=True) == [True, False]


def test_recursive_lower_rule_of_same_type_is_kept():
    rs = RuleSet([inc("/srv"), exc("/srv/*.tmp"), inc("/srv/keep")])
    assert rs.discarded == {}
    assert not rs.matches("/srv/a.tmp", False)
    assert rs.matches("/srv/keep/a.tmp", False)  # the deeper rule is more specific


# -- specificity ---------------------------------------------------------------------------

def test_wildcard_beats_plain_rule_at_the_same_depth():
    rules = [inc("/srv"), exc("/srv/*.tmp")]
    assert selected(rules, "/srv/a.tmp", "/srv/deep/er/b.tmp", "/srv/a.txt") == [False, False, True]


def test_exclude_beats_include_at_full_equality():
    rules = [inc("/srv/*.log"), exc("/srv/a*")]
    assert selected(rules, "/srv/a.log", "/srv/b.log", "/srv/a.txt") == [False, True, False]


def test_deeper_rule_beats_shallower_one_whatever_the_type():
    rules = [exc("/srv"), inc("/srv/www"), exc("/srv/www/cache"), inc("/srv/www/cache/keep")]
    assert selected(rules, "/srv/f", "/srv/www/f", "/srv/www/cache/f", "/srv/www/cache/keep/f") == \
        [False, True, False, True]


# -- wildcards -----------------------------------------------------------------------------

def test_recursive_wildcard_matches_names_at_any_depth_and_everything_below_a_match():
    rules = [inc("/srv/*.db")]
    assert selected(rules, "/srv/a.db", "/srv/x/y/b.db", "/srv/a.txt", "/srv/x/a.dbx", "/other/a.db") == \
        [True, True, False, False, False]
    assert selected([inc("/etc/*.d")], "/etc/conf.d/file", "/etc/conf.d/sub/file", "/etc/conf/file") == \
        [True, True, False]
    assert selected([inc("/srv/*")], "/srv/a", "/srv/a/b/c") == [True, True]


def test_question_mark_and_brackets():
    assert selected([inc("/d/log?.txt")], "/d/log1.txt", "/d/log12.txt", "/d/log.txt") == [True, False, False]
    assert selected([inc("/d/[ab]*")], "/d/apple", "/d/banana", "/d/cherry") == [True, True, False]
    assert selected([inc("/d/[!a]*")], "/d/apple", "/d/banana") == [False, True]
    assert selected([inc("/d/[*]")], "/d/*", "/d/x") == [True, False]  # a literal star


def test_non_recursive_wildcard_applies_to_files_directly_in_its_directory():
    rules = [inc("/srv/*.db", recursive=False)]
    assert selected(rules, "/srv/a.db", "/srv/sub/b.db") == [True, False]
    assert selected(rules, "/srv/x.db", is_dir=True) == [False]


# -- non-recursive rules -------------------------------------------------------------------

def test_non_recursive_include_selects_the_directory_and_its_files_only():
    rs = RuleSet([inc("/srv", recursive=False)])
    assert rs.matches("/srv", True) and rs.matches("/srv/f", False)
    assert not rs.matches("/srv/sub", True) and not rs.matches("/srv/sub/f", False)
    assert rs.must_traverse("/srv") and not rs.must_traverse("/srv/sub")


def test_non_recursive_exclude_leaves_subdirectories_to_the_rule_above():
    rules = [inc("/srv"), exc("/srv/old", recursive=False)]
    assert selected(rules, "/srv/old/f", "/srv/old/sub/g") == [False, True]
    assert selected(rules, "/srv/old", "/srv/old/sub", is_dir=True) == [False, True]
    assert RuleSet(rules).must_traverse("/srv/old")


def test_a_plain_rule_may_name_a_file():
    rs = RuleSet([inc("/etc/hosts", recursive=False)])
    assert rs.matches("/etc/hosts", False)
    assert not rs.matches("/etc/passwd", False)
    assert rs.must_traverse("/etc") and rs.must_traverse("/") and not rs.must_traverse("/etc/ssh")


def test_whole_filesystem_rule():
    rs = RuleSet([inc("/"), exc("/proc")])
    assert rs.matches("/", True) and rs.matches("/etc/hosts", False)
    assert not rs.matches("/proc/1/stat", False) and not rs.must_traverse("/proc")


# -- traversal -----------------------------------------------------------------------------

def test_nested_include_under_excluded_directory_is_reached_and_the_rest_pruned():
    rs = RuleSet([inc("/srv"), exc("/srv/cache"), inc("/srv/cache/keep"), exc("/srv/tmp")])
    assert rs.must_traverse("/srv/cache")
    assert not rs.matches("/srv/cache", True) and not rs.matches("/srv/cache/junk.bin", False)
    assert rs.matches("/srv/cache/keep/f", False)
    assert not rs.must_traverse("/srv/cache/junk") and not rs.must_traverse("/srv/tmp")
    assert not rs.must_traverse("/usr") and rs.must_traverse("/")


def test_a_wildcard_exclude_prunes_matching_directories():
    rs = RuleSet([inc("/srv"), exc("/srv/*.cache")])
    assert not rs.must_traverse("/srv/a.cache") and not rs.must_traverse("/srv/x/b.cache/y")
    assert rs.must_traverse("/srv/x")


def _random_rules(rng):
    names = ["a", "b", "c", "x.db", "y.db"]
    patterns = ["*.db", "?", "[ab]*", "*"]
    rules = {}
    for _ in range(rng.randint(1, 6)):
        parts = [rng.choice(names) for _ in range(rng.randint(0, 3))]
        last = [rng.choice(patterns)] if rng.random() < 0.4 else []
        path = "/" + "/".join(parts + last)
        rules[path] = parse_rule(path, rng.random() < 0.6, rng.random() < 0.6)
    return list(rules.values())


def test_pruning_never_hides_a_selected_path():
    """Property: wherever must_traverse says no, nothing beneath is selected."""
    rng = random.Random(20240611)
    names = ["a", "b", "c", "x.db", "y.db"]
    tree = ["/" + "/".join(p) for n in range(1, 5) for p in itertools.product(names, repeat=n)]
    pruned_total = 0
    for _ in range(60):
        rs = RuleSet(_random_rules(rng))
        selected = {p for p in tree if rs.matches(p, True) or rs.matches(p, False)}
        for d in tree:
            if not rs.must_traverse(d):
                pruned_total += 1
                assert not any(p.startswith(d + "/") for p in selected), (rs.rules, d)
    assert pruned_total > 0  # the property was exercised, not vacuous


def test_entry_verdict_agrees_with_matches():
    rng = random.Random(7)
    for _ in range(50):
        rs = RuleSet(_random_rules(rng))
        for d in ["/", "/a", "/a/x.db", "/b/c"]:
            verdict = rs.entry_verdict(d)
            for name, is_dir in itertools.product(["a", "x.db", "q"], [True, False]):
                assert verdict(name, is_dir) == rs.matches(d.rstrip("/") + "/" + name, is_dir)


# -- validation and limits -----------------------------------------------------------------

def test_rule_length_limit_is_259_characters():
    ok = "/" + "a" * (RULE_MAX_CHARS - 1)
    assert RULE_MAX_CHARS == 259 and parse_rule(ok).path == ok
    with pytest.raises(InvalidRule, match="at most 259 characters"):
        parse_rule(ok + "b")


@pytest.mark.parametrize("path, reason", [
    ("", "empty"),
    ("srv/data", "absolute"),
    ("/srv/../etc", "'..'"),
    ("/srv/*/data", "last component"),
    ("/srv/da[ta/x", "last component"),
    ("/srv/a\0b", "NUL"),
])
def test_malformed_rules_are_refused_with_a_reason(path, reason):
    with pytest.raises(InvalidRule, match=reason) as err:
        parse_rule(path)
    assert err.value.msgid == "DT-E006"


def test_rules_are_normalised():
    assert parse_rule("//srv//data/./").path == "/srv/data"
    assert parse_rule("/").path == "/"


def test_paths_longer_than_4094_bytes_are_skipped_and_logged():
    limit = "/" + "a" * (PATH_MAX_BYTES - 1)
    assert PATH_MAX_BYTES == 4094 and not path_too_long(limit) and path_too_long(limit + "a")
    assert path_too_long("/" + "é" * 2047)  # bytes count, not characters: 4095 bytes
    with capture_logs() as logs:
        assert not skip_long_path(limit)
        assert skip_long_path(limit + "a")
    assert [e["msgid"] for e in logs] == ["DT-R004"]
