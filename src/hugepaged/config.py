"""The configuration file: TOML, tunables by their kernel names plus the daemon's options."""

import re
import tomllib
from dataclasses import dataclass, field

from hugepaged.errors import HugepagedError, InvalidTunable
from hugepaged.tunables import SPECS, parse

DEFAULT_PATH = "/etc/hugepaged/hugepaged.toml"
DEFAULT_SOCKET = "/run/hugepaged/hugepaged.sock"


class ConfigError(HugepagedError):
    exit_status = 2


@dataclass
class DaemonOptions:
    """Options of the daemon itself (not tunables: they cannot change live)."""

    socket: str = DEFAULT_SOCKET
    socket_group: str | None = None
    metrics: str | None = None
    metrics_top_processes: int = 20
    log_format: str = "text"
    log_level: str = "info"
    exclude_comm: str | None = None


@dataclass
class Config:
    tunables: dict[str, int | str] = field(default_factory=dict)
    options: DaemonOptions = field(default_factory=DaemonOptions)


_OPTION_TYPES = {"socket": str, "socket_group": str, "metrics": str,
                 "metrics_top_processes": int, "log_format": str, "log_level": str,
                 "exclude_comm": str}
_CHOICES = {"log_format": ("text", "json"),
            "log_level": ("debug", "info", "warning", "error")}


def _line_of(text: str, key: str) -> str:
    """The line that sets top-level `key`: `key = ...`, `"key" = ...`, `key.x = ...`, `[key]`."""
    k = re.escape(key)
    name = rf"(?:{k}|\"{k}\"|'{k}')"
    pattern = re.compile(rf"\s*(?:{name}\s*[=.]|\[\[?\s*{name}\s*[\].])")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return f"line {n}"
    return "line ?"


def parse_config(text: str, path: str) -> Config:
    """Parse and check everything; a problem is one ConfigError naming file and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        if "(at end of document)" in msg:  # e.g. a duplicate key on the last, unterminated line
            msg = msg.replace("(at end of document)",
                              f"(at line {max(1, len(text.splitlines()))}, end of file)")
        raise ConfigError(f"{path}: {msg}") from err
    cfg = Config()
    for key, value in data.items():
        where = f"{path}, {_line_of(text, key)}"
        if key in SPECS:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ConfigError(f"{where}: {key}: expected {SPECS[key].describe()}")
            try:
                parse(key, str(value))
            except InvalidTunable as err:
                raise ConfigError(f"{where}: {err}") from err
            cfg.tunables[key] = str(value)
        elif key in _OPTION_TYPES:
            if not isinstance(value, _OPTION_TYPES[key]) or isinstance(value, bool):
                raise ConfigError(f"{where}: {key}: expected a {_OPTION_TYPES[key].__name__}")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"{where}: {key}: one of {', '.join(_CHOICES[key])}")
            setattr(cfg.options, key, value)
        else:
            raise ConfigError(f"{where}: unknown key '{key}'")
    return cfg


def load_config(path: str | None) -> Config:
    """`path` None means the default file, which may be absent; a named file must exist."""
    target = path or DEFAULT_PATH
    try:
        with open(target, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{target}: {err.strerror}") from err
    return parse_config(text, target)
