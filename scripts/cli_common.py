"""What the training scripts share: one-line errors, the end-of-run summary, the parser setup.

A mistake in a recipe or a flag ends the run with one line on stderr that names the key, the
value and what is allowed, and exit status 2::

    error: trainer.callbacks[1] (LRScaling): rule must be 'linear', 'sqrt' or 'none', got 'squareroot'

Set ``EPOCHWISE_TRACEBACK=1`` (or pass ``--traceback``) for the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from epochwise.callbacks import ConfigurationError

TRACEBACK_ENV = "EPOCHWISE_TRACEBACK"

#: errors a user's recipe, flags or files cause: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigurationError, ValueError, TypeError, FileNotFoundError,
                                                NotADirectoryError, KeyError)


_CHATTY = ("lightning.pytorch", "lightning.fabric")


def quiet_lightning() -> None:
    """Hold back Lightning's info lines (until :class:`LoudAgain` at the start of the fit)."""
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


class LoudAgain(Callback):
    """Lightning's info lines (model summary, epochwise's stop notices) from the start of the fit on."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.INFO)


class RecipeError(Exception):
    """A mistake in the command line or a recipe, as jsonargparse reports it."""


class CompactHelpFormatter(DefaultHelpFormatter):
    """``--help`` a user can read: one line per option (its first sentence and its default), a
    one-line usage; ``--<group>.help CLASS`` still shows a class's full options."""

    width_limit = 110

    def _format_usage(self, usage, actions, groups, prefix):  # noqa: ANN001, ANN202 - argparse's
        words = [w for w in self._prog.split() if w != "usage:"]
        command = words[0] if len(words) < 2 else f"{words[0]} {words[-1]}"  # "train.py fit"
        return f"usage: {command} [--config FILE] [--<group>.<option> VALUE ...]\n\n"

    def _expand_help(self, action):  # noqa: ANN001, ANN202
        text = " ".join(super()._expand_help(action).split())
        default = re.search(r"default: ([^,)]+)", text)
        described = re.sub(r"\s*\(type: .*$", "", text)
        first = re.split(r"(?<=[.:])\s", described, maxsplit=1)[0].rstrip(".:")
        if default:
            first = f"{first} (default: {default.group(1)})" if first not in ("", "default") else f"default: {default.group(1)}"
        return first if len(first) <= self.width_limit else first[: self.width_limit - 1] + "…"

    def _split_lines(self, text, width):  # noqa: ANN001, ANN202
        return [text]


class OneLineParser(LightningArgumentParser):
    """A LightningArgumentParser that raises instead of printing usage and exiting, and takes no
    abbreviated option (``--trainer.max_epoch`` is a typo, not ``--trainer.max_epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["exit_on_error"] = False
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", CompactHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise RecipeError(message) from ex


_BASES = {"LightningDataModule": "data", "LightningModule": "model", "Callback": "trainer.callbacks",
          "Logger": "trainer.logger"}


def _allowed(expected: str) -> str:
    """jsonargparse's ``Expected a ...`` -> what a user reads: ``'a', 'b' or 'c'``, ``an int``."""
    literal = re.search(r"Literal\[(.*)\]", expected)
    if literal:
        choices = [c.strip() for c in literal.group(1).split(",")]
        return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    kind = re.search(r"<class '([\w.]+)'>", expected)
    if kind:
        name = kind.group(1).rsplit(".", 1)[-1]
        return {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)
    return expected.strip()


def _element(given: str, key: str, value: str) -> tuple[int, str] | None:
    """Index and class of the list element (in a ``Given value: [...]`` repr) holding ``key: value``."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"class_path[=':\s]+'([\w.]+)'", given)]
    for index, (start, class_path) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(given)
        chunk = given[start:end]
        if re.search(rf"\b{re.escape(key)}\b\W+{re.escape(value)}", chunk):
            return index, class_path.rsplit(".", 1)[-1]
    return None


def condense(message: str) -> str:
    """jsonargparse's nested error report -> one line: ``key (Class): what is wrong``.

    The report nests a ``Parser key`` per level, lists one error per type it tried (the first is
    the one that matters: the others say "not None", "not a class path"), and ends with the value
    given; this keeps the key, the class, the argument, the value and what is allowed.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    unknown = re.search(r"(?i)unrecognized arguments?: (.+)", message) or re.search(r'No action for key "([^"]+)"', message)
    if unknown:
        return f"unknown option {unknown.group(1).strip()} (see --help for the options)"
    missing = re.search(r"File does not exist: '?([^'\n]+)'?", message)
    if missing:
        return f"no such file: {missing.group(1)}"
    outer = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    where = outer.group(1) if outer else ""
    if not where:
        base = re.search(r"Subtypes: \[<class '[\w.]+\.(\w+)'>", message)
        where = _BASES.get(base.group(1), "") if base else ""
    errors = [ln[2:] for ln in lines if ln.startswith("- ")]
    reasons = [e for e in errors if not e.startswith(("Expected a <class 'NoneType'>", "Not a valid subclass", "a "))]
    detail = reasons[0] if reasons else (lines[1] if len(lines) > 1 else message)
    inner = re.match(r'Parser key "([^"]+)":?\s*(.*)', detail)
    index = lines.index(f"- {detail}") if f"- {detail}" in lines else -1
    if inner:
        key = inner.group(1)
        follow = inner.group(2) or (lines[index + 1] if 0 <= index < len(lines) - 1 else "")
        got = re.search(r"Expected a (.+?)\.? Got value: (.+)", follow)
        if got:
            value = got.group(2).strip()
            detail = f"{key} must be {_allowed(got.group(1))}, got {value!r}"
        else:
            value = ""
            detail = f"{key}: {follow}"
    else:
        value, key = "", ""
        named = re.match(r"`?(\w+)`? (.+)", detail.replace("`", ""))
        if named:
            key = named.group(1)
            bad = re.search(r"got (.+)$", detail)
            value = bad.group(1).strip("'") if bad else ""
        detail = detail.replace("`", "")
    given = re.search(r"Given value: (.+)", message, re.S)
    if given and key:
        found = _element(given.group(1), key, value) if value else None
        if found is None:
            single = re.search(r"class_path='([\w.]+)'", given.group(1))
            found = (-1, single.group(1).rsplit(".", 1)[-1]) if single else None
        if found is not None:
            position, cls = found
            if where.endswith("callbacks") and position >= 0:
                where = f"{where}[{position}]"
            where = f"{where} ({cls})"
    return f"{where}: {detail}" if where else detail


def describe(error: BaseException) -> str:
    """One line for an error raised while building or running the fit: the class that raised it
    (from the traceback) and its message."""
    if "Does not validate against" in str(error) or "Parser key" in str(error):
        return condense(str(error))
    owner = None
    tb = error.__traceback__
    while tb is not None:  # the innermost object whose method raised, if it is not the machinery's
        local_self = tb.tb_frame.f_locals.get("self")
        module = type(local_self).__module__ if local_self is not None else ""
        if local_self is not None and not module.startswith(("lightning", "jsonargparse", "torch", "cli_common")) \
                and not isinstance(local_self, LightningCLI):
            owner = type(local_self).__name__
        tb = tb.tb_next
    text = " ".join(line.strip() for line in str(error).strip().splitlines()) or type(error).__name__
    text = text.replace("`", "")
    if isinstance(error, KeyError):
        text = f"missing key {text}"
    return f"{owner}: {text}" if owner and not text.startswith(owner) else text


def run_cli(build: Callable[[list[str] | None], Any], args: list[str] | None = None) -> Any:
    """Build and run a CLI; user errors become one line on stderr and exit status 2.

    ``args=None`` reads the command line (``sys.argv``), as LightningCLI itself does.
    """
    argv = sys.argv[1:] if args is None else args
    verbose = bool(os.environ.get(TRACEBACK_ENV)) or "--traceback" in argv
    if "--traceback" in argv:
        argv.remove("--traceback")  # in place: sys.argv when reading the command line
    try:
        return build(None if args is None else argv)
    except RecipeError as err:
        if verbose:
            raise
        print(f"error: {condense(str(err))}", file=sys.stderr)
    except USER_ERRORS as err:
        if verbose:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 or pass --traceback for the traceback)", file=sys.stderr)
    sys.exit(2)


def print_summary(cli: LightningCLI, best: str, png: str | None, extra: dict[str, str | list[str]]) -> None:
    """The end-of-run summary (rank zero): where everything went, and why the fit stopped."""
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return
    log_dir = trainer.logger.log_dir if trainer.logger is not None else None
    print("\n== epochwise run ==")
    if log_dir:
        print(f"logs (TensorBoard): {log_dir}   ->  tensorboard --logdir {Path(log_dir).parent}")
    print(f"best checkpoint:    {best or '(none)'}")
    print(f"learning curves:    {png or '(none)'}")
    for key, value in extra.items():
        for i, line in enumerate(value if isinstance(value, list) else [value]):
            print(f"{(key + ':') if i == 0 else '':<20}{line}")


def write_run_summary(trainer: pl.Trainer, summary: dict) -> Path | None:
    """``run_summary.json`` in the run folder (rank zero): what ``scripts/results.py`` quotes of a run."""
    if not trainer.is_global_zero or trainer.logger is None or not trainer.logger.log_dir:
        return None
    path = Path(trainer.logger.log_dir) / "run_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


def traceback_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))
