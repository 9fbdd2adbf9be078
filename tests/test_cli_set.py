"""dt set: every action through the real command line, human and JSON output, exit codes."""

import json
import os
import subprocess

import pytest

from datatether.tools.cli import main

ACTIONS = ["create", "show", "list", "add-rule", "remove-rule", "export", "import", "size", "delete"]


@pytest.fixture
def dt(tmp_path, capsys):
    """Run ``dt set ...`` in-process against a fresh state dir: (exit code, stdout, stderr)."""
    state = str(tmp_path / "state")

    def run(*argv):
        code = main(["set", *argv, "--state", state])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def dt_json(dt, *argv):
    code, out, err = dt(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_create_add_remove_show_list_delete(dt, tmp_path):
    src = str(tmp_path / "src")
    assert dt("create", "web", "--include", src, "--exclude", f"{src}/*.tmp")[0] == 0
    code, out, _ = dt("add-rule", "web", f"{src}/old", "--include", "--no-recursive")
    assert code == 0 and "now generation 2" in out and f"discarded: {src} already covers it" in out
    shown = dt_json(dt, "show", "web")
    assert shown["generation"] == 2 and shown["root"] == src
    assert [(r["path"], r["type"], r["recursive"]) for r in shown["rules"]] == [
        (src, "include", True), (f"{src}/*.tmp", "exclude", True), (f"{src}/old", "include", False)]
    assert shown["rules"][2]["status"].startswith("discarded")
    code, out, _ = dt("show", "web")
    assert code == 0 and "generation  2" in out and "discarded (covered by" in out
    assert dt("remove-rule", "web", f"{src}/old")[0] == 0
    assert dt_json(dt, "show", "web")["generation"] == 3
    dt("create", "db", "--include", str(tmp_path / "db"))
    assert [(s["name"], s["generation"]) for s in dt_json(dt, "list")] == [("db", 1), ("web", 3)]
    code, out, _ = dt("list")
    assert out.splitlines()[0].split() == ["NAME", "GENERATION", "RULES", "ROOT"]
    assert dt("delete", "db")[0] == 0
    assert [s["name"] for s in dt_json(dt, "list")] == ["web"]


def test_errors_exit_2_with_a_clear_message(dt, tmp_path):
    src = str(tmp_path / "src")
    dt("create", "web", "--include", src)
    cases = [
        (("create", "web"), "already exists: web"),
        (("create", "a:b"), "contains :"),
        (("show", "nope"), "replication set not found: nope"),
        (("add-rule", "web", "relative/path", "--include"), "must be absolute"),
        (("add-rule", "web", "/" + "a" * 260, "--exclude"), "at most 259 characters"),
        (("add-rule", "web", f"{src}/x", "--include", "--generation", "7"), "at generation 1, not 7: that generation does not exist yet"),
        (("remove-rule", "web", "/not/there"), "not found: /not/there"),
        (("delete", "web", "--generation", "5"), "at generation 1, not 5: that generation does not exist yet"),
    ]
    for argv, message in cases:
        code, out, err = dt(*argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    code, _, err = dt("show", "nope", "--json")
    assert code == 2 and json.loads(err)["error"] == "DT-E002"
    assert dt_json(dt, "show", "web")["generation"] == 1  # nothing changed


def test_export_import_round_trip_and_replace(dt, tmp_path):
    src = str(tmp_path / "src")
    dt("create", "web", "--include", src, "--exclude", f"{src}/cache")
    exported = tmp_path / "web.json"
    assert dt("export", "web", str(exported))[0] == 0
    before = dt_json(dt, "show", "web")["rules"]
    code, _, err = dt("import", str(exported))
    assert code == 2 and "use --replace" in err
    dt("delete", "web")
    assert dt("import", str(exported))[0] == 0
    assert dt_json(dt, "show", "web")["rules"] == before
    dt("add-rule", "web", f"{src}/extra", "--exclude")
    replaced = dt_json(dt, "import", str(exported), "--replace")
    assert replaced["rules"] == before and replaced["generation"] == 3
    code, out, _ = dt("export", "web", "-")
    assert code == 0 and json.loads(out)["name"] == "web"


def test_an_export_to_a_folder_or_into_a_missing_one_is_refused_and_leaves_nothing(dt, tmp_path):
    dt("create", "web", "--include", str(tmp_path / "src"))
    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = dt("export", "web", str(folder))
    assert code == 2 and "is a directory" in err and "[DT-E001]" in err
    assert sorted(os.listdir(tmp_path)) == ["folder", "state"]  # no temporary file left beside it
    assert os.listdir(folder) == []
    code, _, err = dt("export", "web", str(tmp_path / "missing" / "web.json"))
    assert code == 2 and "does not exist" in err and "[DT-E001]" in err
    assert not (tmp_path / "missing").exists()


def test_size_on_a_real_tree(dt, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"x" * 1234)
    (src / "sub" / "b").write_bytes(b"y" * 4321)
    (src / "sub" / "c.tmp").write_bytes(b"z" * 999)
    dt("create", "web", "--include", str(src), "--exclude", f"{src}/*.tmp")
    size = dt_json(dt, "size", "web")
    assert (size["files"], size["dirs"], size["bytes"]) == (2, 2, 1234 + 4321)
    code, out, _ = dt("size", "web")
    assert code == 0 and "5555 (5.4 KiB)" in out
    shown = dt_json(dt, "show", "web")["size"]
    assert shown["bytes"] == 5555 and shown["stale"] is False
    dt("add-rule", "web", f"{src}/sub", "--exclude")
    assert dt_json(dt, "show", "web")["size"]["stale"] is True


def test_show_names_overlapping_sets(dt, tmp_path):
    dt("create", "web", "--include", str(tmp_path / "srv"))
    dt("create", "static", "--include", str(tmp_path / "srv/static"))
    dt("create", "home", "--include", str(tmp_path / "home"))
    assert dt_json(dt, "show", "web")["overlaps"] == ["static"]
    assert dt_json(dt, "show", "home")["overlaps"] == []


def _dt(*argv, input=None):
    return subprocess.run(["dt", *argv], capture_output=True, text=True, input=input,
                          env={**os.environ, "DT_STATE": "/nonexistent-dt-state"}, timeout=60)


def test_help_on_every_action(capsys):
    top = _dt("set", "--help")  # the installed console script
    assert top.returncode == 0 and all(a in top.stdout for a in ACTIONS)
    for action in ACTIONS:
        with pytest.raises(SystemExit) as done:
            main(["set", action, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and "--state" in out and "--json" in out, action
        assert len(out.split("\n\n")[1].strip()) > 10, action  # a description, not just usage


def test_console_script_malformed_import_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "datatether-replication-set", "version": 1, "name": "x", '
                   '"rules": [{"path": "/a/*/b", "include": true, "recursive": true}]}')
    res = _dt("set", "import", str(bad), "--state", str(tmp_path / "state"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "wildcards are allowed only in the last component" in res.stderr
    res = _dt("set", "import", "-", "--state", str(tmp_path / "state"), input="garbage")
    assert res.returncode == 2 and "cannot import standard input: not JSON" in res.stderr
    res = _dt("set", "frobnicate")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_a_command_line_argparse_refuses_is_a_usage_error_with_its_id(tmp_path):
    res = _dt("mirror", "--state", str(tmp_path / "state"))
    assert res.returncode == 2 and "usage: dt mirror" in res.stderr
    assert res.stderr.rstrip().endswith("the following arguments are required: SOURCE, TARGET [DT-E001]")
    res = _dt("tail", "web", "--since", "garbage", "--json", "--state", str(tmp_path / "state"))
    assert res.returncode == 2 and json.loads(res.stderr)["error"] == "DT-E001"
    assert "not a time: 'garbage'" in json.loads(res.stderr)["message"]


def test_a_set_a_connection_uses_is_not_deleted(tmp_path, capsys):
    src, state = tmp_path / "src", str(tmp_path / "state")
    src.mkdir()
    assert main(["mirror", str(src), str(tmp_path / "dst"), "--state", state]) == 0
    [conn] = json.loads(subprocess.run(["dt", "status", "--json", "--state", state], capture_output=True,
                                       text=True, check=True).stdout)["connections"]
    capsys.readouterr()
    assert main(["set", "delete", conn["replication_set"], "--state", state]) == 2
    assert f"used by connection(s) {conn['connection']}" in capsys.readouterr().err
    assert main(["unprotect", conn["connection"], "--state", state]) == 0
    assert main(["set", "delete", conn["replication_set"], "--state", state]) == 0
