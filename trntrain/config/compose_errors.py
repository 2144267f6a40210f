"""Hydra's composition errors, restated as one paragraph that names the key and what is valid."""

from __future__ import annotations

import dataclasses
import re

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def _first_lines(text: str) -> str:
    """Hydra's message without its search-path listing and HYDRA_FULL_ERROR hint."""
    keep = []
    for line in text.splitlines():
        if line.startswith(("Config search path", "Set the environment variable HYDRA_FULL")):
            break
        if line.strip() and not line.startswith(("    full_key", "    reference_type",
                                                  "    object_type")):
            keep.append(line.strip())
    return " ".join(keep)


def _field_type(schema: type | None, key: object) -> str:
    if schema is not None and dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            if f.name == key:
                return f"a value of type {f.type if isinstance(f.type, str) else f.type.__name__}"
    return "a value of the key's type (trntrain/config/schema.py)"


def explain(exc: Exception) -> str:
    """A one-paragraph message for an exception raised while composing the config."""
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(exc))
        if found:
            group, option = found.groups()
            return (f"{group}={option} is invalid: conf/{group}/ has no option {option!r}; "
                    f"valid: one of {', '.join(sorted(exc.options))}.")
    cause = exc.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        section = cause.full_key.rpartition(".")[0] or "the config root"
        valid = ""
        if cause.object_type is not None and dataclasses.is_dataclass(cause.object_type):
            names = [f.name for f in dataclasses.fields(cause.object_type)]
            valid = f"; valid keys of {section}: {', '.join(names)}"
        return f"{cause.full_key} is not a key of {section}{valid}."
    if isinstance(cause, ValidationError) and cause.full_key:
        return (f"{cause.full_key}={cause.value!r} is invalid: {_first_lines(cause.msg)}; "
                f"valid: {_field_type(cause.object_type, cause.key)}.")
    if isinstance(exc, OverrideParseException):
        return (f"{_first_lines(str(exc))}; valid: key=value in Hydra's override grammar "
                f"({GRAMMAR_URL}).")
    message = _first_lines(str(exc)) or type(exc).__name__
    if cause is not None and _first_lines(str(cause)):
        message = f"{message}: {_first_lines(str(cause))}"
    return message if message.endswith(".") else message + "."
