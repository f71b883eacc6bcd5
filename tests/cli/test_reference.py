"""docs/cli.md is the reference rendered from the parser, byte for byte, on any terminal."""

from __future__ import annotations

from pathlib import Path

from ecanfnet.cli import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_docs_cli_md_is_current():
    assert DOC.read_text(encoding="utf-8") == reference.render(), (
        f"docs/cli.md differs from the parser; regenerate it with: {reference.REGENERATE}")


def test_rendering_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    wide = reference.render()
    monkeypatch.setenv("COLUMNS", "30")
    assert reference.render() == wide


def test_every_command_option_and_example_is_in_it():
    from ecanfnet.cli import COMMANDS, build_parser

    text = reference.render()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        assert f"\n## `ecanfnet {name}`\n" in text
        for action in parser._actions:
            assert all(f"`{option}" in text for option in action.option_strings if option != "-h")
    for command in COMMANDS:
        assert all(f"\n# {what}\n{line}\n" in text for what, line in command.EXAMPLES)


def test_write_replaces_the_file_and_stdout_gets_the_same_text(tmp_path, capsys):
    target = tmp_path / "docs" / "cli.md"
    target.parent.mkdir()
    target.write_text("stale\n")
    assert reference.main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == reference.render() and capsys.readouterr().out == ""
    assert [p.name for p in target.parent.iterdir()] == ["cli.md"]  # no temp file left beside it
    assert reference.main([]) == 0 and capsys.readouterr().out == target.read_text(encoding="utf-8")
