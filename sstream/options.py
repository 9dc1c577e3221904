"""One declaration per option: a job's configuration dataclass.

Every job (train, predict, saliency, heatmap, verify, estimate-memory, split, report, tissue,
info, view, make-sample-data) takes a dataclass whose fields are its options. A field
declared with `option` carries the option's default and its help text (what `--help`
prints); the command line reads both from the field, so a default or a help text is written
once. `Options` gives every such dataclass the same `to_dict` and `from_dict` (config files,
`config.json`, checkpoints), and `given`: how a job takes its options as a config, by name,
or both.

Standard library only: jobs, the CLI and the tests all import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, Field, asdict, fields
from typing import Any, TypeVar

from sstream.errors import InputError

# help texts several jobs' options share
DEVICE_HELP = "auto (CUDA when a GPU is there, else the CPU), cpu, cuda or cuda:N."
ASSUME_MPP_HELP = ("Level 0's µm per pixel for slides that do not state it (a CSV's mpp "
                   "column gives each slide its own); a stated one wins.")
AS_TRAINED = "as the model was trained"  # the shown default of read options from a checkpoint

_Config = TypeVar("_Config", bound="Options")


def option(default: Any = MISSING, help: str = "", *, shown: str | None = None,
           factory: Any = MISSING) -> Any:
    """A dataclass field that is a command-line option: its default (or `factory` for a
    mutable one), its help, and `shown`, what `--help` prints as the default where the value
    itself would mislead (None meaning "as the model was trained", say)."""
    metadata = {"help": help, **({"shown": shown} if shown is not None else {})}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def option_field(config: type, name: str) -> Field:
    """The field that declares option `name` of `config` (KeyError if there is none)."""
    for declared in fields(config):
        if declared.name == name:
            return declared
    raise KeyError(f"{config.__name__} has no option {name!r}")


def option_default(declared: Field) -> Any:
    """The field's default value (a fresh one for a factory; None for a required field)."""
    if declared.default is not MISSING:
        return declared.default
    if declared.default_factory is not MISSING:
        return declared.default_factory()
    return None


class Options:
    """The dict round trip every job configuration shares: `to_dict` gives plain values
    (JSON-ready but for tuples), `from_dict` refuses keys it does not know (a typo in a
    config file, a newer format) and turns lists back into tuples where a field holds one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_Config], values: dict[str, Any]) -> _Config:
        declared = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**{name: _tuple_if_declared(declared[name], value)
                      for name, value in values.items()})

    @classmethod
    def given(cls: type[_Config], config: _Config | None, options: dict[str, Any]) -> _Config:
        """`config` with the options given by name in its place, or those options alone: how
        a job takes a config, its options as keywords, or both (TypeError for a name that is
        no option, as for a function's keyword)."""
        return dataclasses.replace(config, **options) if config is not None else cls(**options)


def _tuple_if_declared(declared: Field, value: Any) -> Any:
    """JSON and TOML have no tuples: a list given to a tuple-typed field becomes one."""
    return tuple(value) if isinstance(value, list) and "tuple[" in str(declared.type) else value
