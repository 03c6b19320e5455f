"""User errors of the command lines: one line, exit code 2, no traceback.

The command lines are `train.py`, `infer.py`, `evaluate.py` and the tools run with `python -m tea_lightning.<tool>`
(`bake`, `drift_report`, `step_metrics`).

A user error is a mistake in what the user asked for, found before any work starts: a `ValueError` or
`FileNotFoundError` raised by tea-lightning's own checks (their messages name the bad value and the fix), an
argument the parser refused (jsonargparse's `ArgumentError`), or a Lightning `MisconfigurationException` (a trainer
setting that contradicts another). Libraries wrap ours (jsonargparse reports a failed class instantiation as a
"Union subtypes" dump whose `__cause__` is our error), so the chain of causes is searched. Anything else is a bug or
an environment failure and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError, ArgumentParser
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

USAGE_ERROR = 2  # the exit code argparse uses for bad arguments
_OUR_MODULES = ("tea_lightning", "__main__", "train", "infer", "evaluate")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and its causes, outermost first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _raised_by_us(error: BaseException) -> bool:
    """Whether `error` was raised by a `raise` in tea-lightning's code (the package, its callbacks, an entry point)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    name = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
    return name.split(".")[0] in _OUR_MODULES


def _is_misconfiguration(error: BaseException) -> bool:
    return any(cls.__name__ == "MisconfigurationException" for cls in type(error).__mro__)


def _type_phrase(expected: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
    if literal:
        return f"one of {literal.group(1)}"
    names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", expected)
    plain = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a text"}
    return " or ".join(plain.get(n, n) for n in names) if names else expected


def _argument_message(text: str, prog: str) -> str:
    """jsonargparse's (often multi-line) parse error as `<what> <value>. <fix>`."""
    help_hint = f"`python {prog} --help` lists every option and its type"
    key = ".".join(re.findall(r'Parser key "([^"]+)"', text))  # outer to inner: model + num_vectors
    where = f"--{key}" if key else "an option"
    lines = [re.sub(r'Parser key "[^"]+":\s*', "", line).strip().lstrip("- ").strip() for line in text.splitlines()]
    value = next((m.group(1) for line in lines if (m := re.search(r"(?:Got|Given) value: (.*)", line))), None)
    expected = [m.group(1) for line in lines if (m := re.match(r"Expected a (.+?)(?:\. Got value: .*)?$", line))
                and "NoneType" not in m.group(1)]
    if expected and value is not None:
        return f"{where}={value!r} is not {' or '.join(_type_phrase(e) for e in expected)}. {help_hint}"
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
             "Expected a <class 'NoneType'>")
    details = [line for line in lines if line and not line.startswith(noise)]
    owner = next((m.group(1) for d in details if d.startswith("Problem with given class_path")
                  and (m := re.search(r"'([^']+)'", d))), None)
    detail = next((d for d in details if not d.startswith("Problem with given class_path")), text.strip()).rstrip(".")
    linked = re.fullmatch(r'Linked "(.+)" must be given via "(.+)"', detail)
    if linked:
        return f"--{linked.group(1)} follows --{linked.group(2)} and cannot be set apart. Set --{linked.group(2)}"
    unknown = re.fullmatch(r"unrecognized arguments: (.*)", detail)
    if unknown:
        return f"unknown option(s) {unknown.group(1)}. Check the spelling; {help_hint}"
    required = re.fullmatch(r"the following arguments are required: (.*)", detail)
    if required:
        names = ", ".join(f"--{name.strip()}" for name in required.group(1).split(","))
        return f"missing required option {names}. {help_hint[0].upper()}{help_hint[1:]}"
    if owner:
        where = f"{where} ({owner})"
    return f"{where}: {detail}. {help_hint[0].upper()}{help_hint[1:]}" if key or owner else f"{detail}. {help_hint}"


class OneLineParser(ArgumentParser):
    """An argparse parser whose refusals reach `run_command` as `ArgumentError`s instead of usage text and exit."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(None, message)


def user_error_message(error: BaseException, prog: str) -> str | None:
    """The one line to print for `error` when it is a user error (see the module docstring), else None."""
    for link in _chain(error):
        if isinstance(link, ArgumentError) or type(link).__name__ == "ArgumentError":
            return one_line(_argument_message(str(link), prog))
        if _is_misconfiguration(link):
            return one_line(str(link))
        if isinstance(link, (ValueError, FileNotFoundError)) and _raised_by_us(link):
            return one_line(str(link))
    return None


def one_line(message: str) -> str:
    """`message` on one line (list items joined by "; "), ending with a full stop."""
    message = re.sub(r"(:?)\s*\n\s*-\s+", lambda m: ": " if m.group(1) else "; ", message.strip())
    message = re.sub(r"\s+", " ", message).strip()
    return message if message.endswith((".", "!", "?")) else message + "."


def run_command(main: Callable[[list[str] | None], Any], args: list[str] | None = None, *, prog: str) -> Any:
    """Run a command line's `main(args)`; a user error ends it with `error: <message>` on stderr and exit code 2.

    Args:
        main: The command's `main`, taking the argument list (None: `sys.argv[1:]`).
        args: Arguments; None reads the command line.
        prog: The script's name, for the pointer to `--help`.
    """
    try:
        return main(args)
    except Exception as error:
        message = user_error_message(error, prog)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
