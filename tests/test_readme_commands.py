"""Every `occbench ...` command shown in README.md names a real subcommand and real options, so the README and
the CLI cannot drift apart. Commands come from fenced and indented code blocks and from inline code spans;
they are parsed against the click commands, never run."""
import re
import shlex
from pathlib import Path

import click
import pytest

from occbench.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
SEPARATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")"}


def code_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of code: fenced blocks (not Python ones), indented blocks and
    inline code spans."""
    out, fenced, python, previous_blank, in_indented = [], False, False, True, False
    for number, line in enumerate(markdown.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            python = fenced and line.strip().removeprefix("```").strip().lower() in ("python", "py", "pycon")
            continue
        indented = line.startswith("    ") and line.strip() and (previous_blank or in_indented)
        if fenced and python:
            pass
        elif fenced or indented:
            out.append((number, line.strip()))
        else:
            out.extend((number, span) for span in re.findall(r"`([^`]+)`", line))
        in_indented = bool(indented) or (in_indented and not line.strip())
        previous_blank = not line.strip()
    return out


def _join_continuations(lines):
    joined, pending = [], None
    for number, text in lines:
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text
        if text.endswith("\\"):
            pending = (number, text[:-1])
            continue
        pending = None
        joined.append((number, text))
    return joined


def occbench_commands(markdown: str) -> list[tuple[int, list[str]]]:
    """(line number, arguments after `occbench`) for each occbench command line in the markdown's code."""
    commands = []
    for number, text in _join_continuations(code_lines(markdown)):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:        # an unbalanced quote: prose, not a command
            continue
        for i, token in enumerate(tokens):
            at_command = i == 0 or tokens[i - 1] in SEPARATORS or tokens[i - 1] == "-m"   # python -m occbench
            if token.rsplit("/", 1)[-1] != "occbench" or not at_command:
                continue
            args = []
            for arg in tokens[i + 1:]:
                if arg in SEPARATORS:
                    break
                args.append(arg)
            if any(arg != "..." for arg in args):      # "`occbench ...`" in prose names no command
                commands.append((number, args))
    return commands


def _options(command: click.Command) -> dict[str, bool]:
    """Every option name of ``command`` (help included) -> whether it takes a value."""
    names = {}
    for param in command.get_params(click.Context(command)):
        if isinstance(param, click.Option):
            takes_value = not (param.is_flag or param.count)
            names.update({name: takes_value for name in param.opts + param.secondary_opts})
    return names


def problems(args: list[str]) -> list[str]:
    """What in ``occbench ARGS`` does not exist in the CLI (empty when the command line is valid)."""
    args = [a for a in args if a != "..."]          # "occbench run ... --shard 0/4": the elided part
    command, path = cli, ["occbench"]
    while isinstance(command, click.Group):
        if not args or args[0].startswith("-"):
            return [] if args and args[0] in ("-h", "--help", "--version") else [
                f"`{' '.join(path)}` needs a subcommand ({', '.join(command.list_commands(None))})"]
        sub = command.get_command(click.Context(command), args[0])
        if sub is None:
            return [f"`{' '.join(path)}` has no subcommand {args[0]!r}"]
        command, path, args = sub, path + [args[0]], args[1:]
    names, found, positionals, i = _options(command), [], [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            name, has_value, _ = token.partition("=")
            if name not in names:
                found.append(f"`{' '.join(path)}` has no option {name}")
            elif names[name] and not has_value:
                i += 1                                  # the option's value
        else:
            positionals.append(token)
        i += 1
    if not found:
        ctx = command.make_context(path[-1], list(args), resilient_parsing=True)
        if ctx.args:
            found.append(f"`{' '.join(path)}` takes no argument(s) {ctx.args}")
    return found


COMMANDS = occbench_commands(README.read_text())


def test_the_readme_shows_the_main_commands():
    used = {args[0] for _, args in COMMANDS}
    assert {"run", "train", "report", "check-checkpoint", "models", "datasets", "merge"} <= used
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("line,args", COMMANDS, ids=[f"README:{n}:{' '.join(a)[:40]}" for n, a in COMMANDS])
def test_readme_command_exists(line, args):
    assert problems(args) == [], f"README.md line {line}: occbench {' '.join(args)}"


MADE_UP = """\
A paragraph with `occbench run --model pare --protocol clean --no-such-option 3`.

```bash
occbench run --model pare --protocol clean   # fine
.venv/bin/occbench run -m spin -p clean --frobnicate && occbench models
occbench train --model spin \\
    --dataset demo --steps 2 --out x.pt --nope
```

    occbench no-such-command --x
    occbench datasets list --wrong
    occbench merge a b --out c --allow-partial
    occbench models extra-argument

```python
from occbench import Outputs
```
"""


def test_made_up_commands_are_found_and_each_flaw_is_reported():
    commands = occbench_commands(MADE_UP)
    assert [(n, args[0]) for n, args in commands] == [
        (1, "run"), (4, "run"), (5, "run"), (5, "models"), (6, "train"),
        (10, "no-such-command"), (11, "datasets"), (12, "merge"), (13, "models")]
    reports = [problems(args) for _, args in commands]
    assert reports[0] == ["`occbench run` has no option --no-such-option"]
    assert reports[1] == [] and reports[3] == []
    assert reports[2] == ["`occbench run` has no option --frobnicate"]
    assert reports[4] == ["`occbench train` has no option --nope"]
    assert reports[5] == ["`occbench` has no subcommand 'no-such-command'"]
    assert reports[6] == ["`occbench datasets list` has no option --wrong"]
    assert reports[7] == ["`occbench merge` has no option --allow-partial"]
    assert reports[8] == ["`occbench models` takes no argument(s) ['extra-argument']"]


def test_options_with_values_and_flags_are_told_apart():
    assert problems(["run", "-o", "backbone=resnet50", "--allow-partial", "--smpl-dir", "S", "--data-dir", "D"]) == []
    assert problems(["run", "--set=stride=20", "--no-report"]) == []
    # a flag does not swallow the next word: "extra" is left over as an argument run does not take
    assert problems(["run", "--no-report", "extra"]) == ["`occbench run` takes no argument(s) ['extra']"]
