"""The README is what a new user reads first: keep it true to the code."""

import re
import tomllib
from pathlib import Path

from datatether.engine.settings import Settings
from datatether.tools.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_settings_example_is_valid():
    block = re.search(r"```toml\n(.*?)```", README, re.S).group(1)
    Settings.parse(tomllib.loads(block))  # raises on an unknown key or a bad value


def test_every_message_id_in_the_code_is_listed():
    used = set()
    for folder in ("engine", "apply", "capture", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r'msgid\s*=\s*"(DT-[A-Z]\d+)"', path.read_text()))
    assert used, "no message ids found: the pattern is stale"
    missing = sorted(i for i in used if f"| {i} |" not in README)
    assert not missing, f"message ids missing from the README's table: {missing}"


def test_every_command_is_documented():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [c for c in commands if f"dt {c}" not in README]
    assert not missing, f"commands missing from the README: {missing}"


def test_the_stream_commands_rows_name_every_option():
    """The command table is where users look up tail, history, restore, snapshot and apply."""
    import argparse

    common = {"--help", "--state", "--json", "--log-level"}
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = []
    for name in ("tail", "history", "restore", "snapshot", "apply"):
        row = next(line for line in README.splitlines() if line.startswith("|") and f"`dt {name} " in line)
        parsers = [commands[name]]
        for action in commands[name]._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
        for p in parsers:
            for action in p._actions:
                options = action.option_strings
                if options and not common & set(options) and \
                        not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", row) for o in options):
                    missing.append(f"dt {name} {options[-1]}")
    assert not missing, f"options missing from the README's command table: {missing}"
