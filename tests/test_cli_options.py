"""Every option of every command, given a value of the wrong type or outside its choices, is one line
naming the option, exit 2 (the README's promise), never argparse's usage block. The options are read from
the parser itself, so a new command or option is covered when it is added."""
import argparse

import pytest

from fastsd.cli import build_parser, main


def _bad_values():
    cases = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            option = max(action.option_strings, key=len)
            if action.choices:
                bad = "not-a-choice"
            elif action.type in (int, float):
                bad = "abc"
            elif action.type is not None:  # a parser of its own (GPU lists, flag values)
                bad = "@@"
            else:
                continue  # free text: checked by the command (see test_cli.py's BAD)
            cases.append((command, option, bad))
    return cases


CASES = _bad_values()


def test_every_command_is_covered():
    commands = {c for c, _, _ in CASES}
    assert {"generate", "verify", "serve", "query", "batch", "ui"} <= commands, commands


@pytest.mark.parametrize("command, option, bad", CASES, ids=[f"{c} {o} {b}" for c, o, b in CASES])
def test_bad_value_is_one_line_exit_2(capsys, command, option, bad):
    with pytest.raises(SystemExit) as e:
        main([command, option, bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith(f"fastsd {command}: error: ") and option in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--negative", "a", "--negative", "b"], "--negative: given twice"),
    (["batch", "in.csv", "--out", "o", "--negative", "a", "--negative", "b"], "--negative: given twice"),
])
def test_repeated_single_value_option_is_an_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv", [
    ["generate", "x", "--config", "sd-1.5", "--model", "tiny"],
    ["verify", "--config", "sd-1.5", "--model", "tiny"],
    ["generate", "x", "--config", "nope", "--model", "model.safetensors"],
    ["serve", "--deployment", "d", "--config", "sd-1.5", "--model", "tiny"],
    ["batch", "in.csv", "--out", "o", "--config", "sd-1.5", "--model", "tiny"],
])
def test_config_that_would_be_ignored_is_an_error(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("prompt\na red circle\n")
    code = main(argv + ["--quiet"] if argv[0] != "serve" else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error: config:" in err[0], err
