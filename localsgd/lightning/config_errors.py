"""jsonargparse's error reports (LightningCLI's, the comparison runner's) as one line.

jsonargparse reports a bad key or value as the usage block, then every Union subtype it tried,
nested by indentation. A user needs one line: the key, what is wrong, and the closest valid
choice ("did you mean"). :func:`parse_error_line` finds the innermost error in such a report;
:func:`error_reason` finds the library's own message in a ValueError's text.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Collection, Sequence
from typing import Any

_NOT_THE_CAUSE = (  # lines of jsonargparse's report that are context, not the error
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a path but ",
)


def _closest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def _class_options(class_path: str | None, hidden: Collection[str]) -> list[str]:
    """The keyword arguments ``class_path`` accepts (``hidden`` aside)."""
    if not class_path or "." not in class_path:
        return []
    module, _, name = class_path.rpartition(".")
    try:
        signature = inspect.signature(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.name not in hidden]


def _parser_keys(parser: Any) -> list[str]:
    return [a.dest for a in getattr(parser, "_actions", []) if not a.dest.endswith(".help")]


def _unknown_dotted(name: str, keys: Sequence[str]) -> str:
    """``dta.init_args.batch_size: ...`` names an unknown ``dta``: the first part no key starts with."""
    parts, split = name.split("."), [k.split(".") for k in keys]
    for i in range(len(parts)):
        if not any(k[: i + 1] == parts[: i + 1] for k in split):
            siblings = sorted({k[i] for k in split if len(k) > i and k[:i] == parts[:i]})
            return f"{'.'.join(parts[: i + 1])}: no such option{_closest(parts[i], siblings)}"
    return f"{name}: no such option"


def _report_cause(message: str) -> tuple[list[str], str, str | None]:
    """The innermost error of a jsonargparse report: (the key's path, the error's line, the class
    whose option it is). The report nests by indentation: ``Parser key "k":`` and ``Problem with
    given class_path 'C':`` open a level; each other line is an error, one per subtype tried."""
    stack: list[tuple[int, list[str], str | None]] = []  # (indent, path parts, class_path)
    types: dict[tuple[str, ...], list[str]] = {}  # a Union's plain subtypes that did not match
    values: dict[tuple[str, ...], str] = {}
    found = False
    best: tuple[list[str], str, str | None] = (
        [],
        message.strip().splitlines()[0] if message.strip() else "",
        None,
    )
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        if line.startswith("- "):
            line, indent = line[2:], indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [part for _, parts, _ in stack for part in parts]
        owner = next((c for _, _, c in reversed(stack) if c), None)
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            stack.append((indent, key[1].split("."), owner))
            line = key[2]
            path, indent = path + key[1].split("."), indent + 1
            if not line:
                continue
        given = re.match(r"Problem with given class_path '([^']+)':", line)
        if given:
            stack.append((indent, ["init_args"], given[1]))
            continue
        plain = re.fullmatch(r"Expected a <class '([^']+)'>", line)
        if plain:  # one subtype of a Union, said alone: a cause only if no subtype says more
            types.setdefault(tuple(path), []).append(plain[1])
            continue
        if line.startswith("Given value: "):
            values.setdefault(tuple(path), line[len("Given value: ") :])
        if line.startswith(_NOT_THE_CAUSE):
            continue
        if not found or len(path) > len(best[0]):
            best, found = (path, line, owner), True
    if not found:  # no subtype said more than "Expected a <class 'X'>"
        for path_key, names in types.items():
            if path_key in values and len(path_key) >= len(best[0]):
                best = (
                    list(path_key),
                    f"Expected a {' or '.join(names)}. Got value: {values[path_key]}",
                    None,
                )
    return best


def parse_error_line(message: str, parser: Any = None, hidden: Collection[str] = ()) -> str:
    """jsonargparse's error ``message`` as one line: the key, what is wrong, the closest valid
    choice ("did you mean"). ``parser`` (the one that failed) knows the valid keys; ``hidden`` are
    arguments deliberately not offered (LightningCLI's ``skip``): the frame fills them in."""
    path, line, owner = _report_cause(message)
    nested = re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", line)
    if nested:  # `fit --config X` with a misspelt trainer key: relative to the subcommand's parser
        return _unknown_dotted(nested[1], _parser_keys(parser))
    option = re.match(r"Option '([^']+)' is not accepted", line) or re.match(
        r"Group '([^']+)' does not accept option '([^']+)'", line
    )
    if option and option.lastindex == 2:  # a Trainer-level (or other group) key
        group, name = option[1], option[2]
        keys = [k[len(group) + 1 :].split(".")[0] for k in _parser_keys(parser) if k.startswith(group + ".")]
        return f"{group}.{name}: no such option{_closest(name, keys)}"
    if option and not path and "." in option[1]:
        return _unknown_dotted(option[1], _parser_keys(parser))
    if option:
        name = option[1]
        if name in hidden:
            fix = " (the Trainer fills it in)" if name != "accelerator" else "; set trainer.accelerator"
        else:
            fix = _closest(name, _class_options(owner, hidden))
        return f"{'.'.join([*path, name])}: no such option{fix}"
    unknown = re.match(r"unrecognized arguments: (--[^\s=]+)", line, re.IGNORECASE)
    if unknown:
        flag, keys = unknown[1], _parser_keys(parser)
        close = _closest(flag, [f"--{k}" for k in keys])
        return f"{flag}: no such option{close}" if close else f"--{_unknown_dotted(flag[2:], keys)}"
    where = ".".join(path[:-1] if path[-1:] == ["init_args"] else path)
    prefix = f"{where}: " if where else ""
    missing = re.match(r"module '([^']+)' has no attribute '([^']+)'", line)
    if missing:
        module, name = missing[1], missing[2]
        names = [n for n in dir(sys.modules.get(module)) if not n.startswith("_")]
        return f"{prefix}no class {module}.{name}{_closest(name, names, module + '.')}"
    required = re.match(r"the following arguments are required: (.*)", line)
    if required and owner:  # a class path alone, where the class needs arguments
        return f"{prefix}{owner} needs init_args: {required[1]}"
    choice = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", line)
    if choice:
        choices = re.findall(r"'([^']*)'", choice[1])
        return f"{prefix}{choice[2]!r} is not one of {choice[1]}{_closest(choice[2], choices)}"
    typed = re.match(r"Expected a (?:<class '([^']+)'>|(.+?))\. Got value: (.*)", line)
    if typed:
        return f"{prefix}expected {typed[1] or typed[2]}, got {typed[3]!r}"
    cut = " (--debug shows the full report)" if len(message.strip().splitlines()) > 1 else ""
    return f"{prefix}{line}{cut}"


def error_reason(text: str) -> str:
    """The library's own message in an error text that jsonargparse (or a remote traceback) may
    wrap: a class that failed to instantiate is reported as a Union mismatch listing each
    subtype's error; a traceback ends with the error's line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons, listing = [], False
    for line in lines:  # jsonargparse: "Errors:" then one "- ..." line per subtype tried
        if line == "Errors:":
            listing = True
        elif listing and line.startswith("- "):
            if not line.startswith("- Expected a "):
                reasons.append(line[2:])
        else:
            listing = False
    if reasons:
        return reasons[-1]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return errors[-1] if errors else (lines[0] if lines else text)
