"""The CLI's one registration scheme: every command module registers itself, and every command answers --help."""

import argparse
import pkgutil

import pytest

from llmarch import cli


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("module", cli.COMMANDS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_command_module_registers_its_parser(module):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.register(sub)
    name = module.__name__.rsplit(".", 1)[-1]
    assert list(sub.choices) == [name]  # one command, named after its module
    leaves = [sub.choices[name]]
    while leaves:  # `data` registers `data prepare`: each leaf sets the function to run
        p = leaves.pop()
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            leaves.extend(nested[0].choices.values())
        else:
            assert callable(p.get_default("func")), f"{name}: a parser without func"


COMMAND_NAMES = list(_subcommands(cli.build_parser()))


def test_every_command_module_is_listed():
    """A command module left out of COMMANDS would never reach the parser."""
    listed = [m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS]
    assert COMMAND_NAMES == listed
    helpers = {"__main__", "options"}
    assert sorted(m.name for m in pkgutil.iter_modules(cli.__path__) if m.name not in helpers) == sorted(listed)


@pytest.mark.parametrize("argv", [[name, "--help"] for name in COMMAND_NAMES] + [["data", "prepare", "--help"]],
                         ids=" ".join)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llmarch {' '.join(argv[:-1])}")
    assert "-h, --help" in out
