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
