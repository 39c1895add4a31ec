"""The configuration file: TOML, tunables by their kernel names plus the daemon's options.

The stdlib's tomllib parses; the checks after it are hand-written on purpose: they are the
kernel's refusals in the kernel's words (tunables.parse), regular expressions, socket paths.
A schema library (pydantic, jsonschema) would still need each of them as a custom validator,
and would add a dependency and its import time to every command that reads a configuration.
tomllib reports no positions for keys (nor does tomlkit), so the line an error names is found
in the text (_line_of, _target_lines).
"""

import os
import re
import stat
from dataclasses import dataclass, field

from hugepaged import paths
from hugepaged.errors import HugepagedError, InvalidTunable
from hugepaged.options import OPTIONS, DaemonOptions
from hugepaged.regex_bound import compile_bounded
from hugepaged.targets import KEYS as TARGET_KEYS
from hugepaged.targets import (
    MATCH_KEYS,
    MAX_TARGETS,
    NAME_RE,
    PRIORITY_RANGE,
    TUNABLE_KEYS,
    Target,
)
from hugepaged.tunables import SPECS, UINT_MAX, parse

DEFAULT_PATH = paths.CONFIG
DEFAULT_SOCKET = paths.SOCKET
# A configuration file is a few lines; anything this large is a mistake, refused before it
# is read (a huge exclude_comm once blocked the daemon for seconds compiling it).
MAX_FILE_BYTES = 1 << 20
MAX_PATTERN = 4096  # exclude_comm matches names of at most 15 bytes
SUN_PATH_MAX = 107  # sockaddr_un.sun_path less its terminating NUL


class ConfigError(HugepagedError):
    exit_status = 2


@dataclass
class Config:
    tunables: dict[str, int | str] = field(default_factory=dict)
    options: DaemonOptions = field(default_factory=DaemonOptions)
    targets: list[Target] = field(default_factory=list)




def _line_of(text: str, key: str) -> str:
    """The line that sets top-level `key`: `key = ...`, `"key" = ...`, `key.x = ...`, `[key]`."""
    k = re.escape(key)
    name = rf"(?:{k}|\"{k}\"|'{k}')"
    pattern = re.compile(rf"\s*(?:{name}\s*[=.]|\[\[?\s*{name}\s*[\].])")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return f"line {n}"
    return "line ?"


_TARGET_KEYS = TARGET_KEYS
_HEADER = re.compile(r"\s*\[\[\s*(?:target|\"target\"|'target')\s*\]\]")


def _target_lines(text: str) -> list[tuple[int, int]]:
    """(first, last) line numbers of each `[[target]]` table, in file order."""
    lines = text.splitlines()
    heads = [n for n, line in enumerate(lines, 1) if _HEADER.match(line)]
    spans = []
    for i, head in enumerate(heads):
        end = heads[i + 1] - 1 if i + 1 < len(heads) else len(lines)
        for n in range(head + 1, end + 1):  # a table ends at the next header of any kind
            if lines[n - 1].lstrip().startswith("["):
                end = n - 1
                break
        spans.append((head, end))
    return spans


def _key_line(text: str, span: tuple[int, int] | None, key: str) -> str:
    if span is None:
        return _line_of(text, "target")
    pattern = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=")
    lines = text.splitlines()
    for n in range(span[0] + 1, span[1] + 1):
        if pattern.match(lines[n - 1]):
            return f"line {n}"
    return f"line {span[0]}"


def _int_in(value: object, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return None
    return value


def _target_value(key: str, value: object) -> object:
    """One key of a target, checked; a refusal is a ValueError with the one-line reason."""
    if key in TUNABLE_KEYS:  # as the tunable of that name is checked (see _tunable)
        wanted = SPECS[key].type
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ValueError(f"{key}: expected {SPECS[key].describe()}")
        try:
            return parse(key, str(value))
        except InvalidTunable as err:
            raise ValueError(str(err)) from err
    if key == "name":
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise ValueError(f"name: invalid value {value!r} ([a-z0-9_-]{{1,32}})")
        return value
    if key == "comm":
        if not isinstance(value, str):
            raise ValueError("comm: expected a regular expression (a string)")
        if len(value) > MAX_PATTERN:
            raise ValueError(f"comm: regular expression too long ({len(value)} characters, "
                             f"at most {MAX_PATTERN})")
        try:
            compile_bounded(value)  # a name is anyone's input: refuse what backtracks long
        except (re.error, RecursionError, OverflowError) as err:
            raise ValueError(f"comm: invalid regular expression {value!r}: {err}") from None
        except ValueError as err:
            raise ValueError(f"comm: {err}") from None
        return value
    if key in ("exe", "cgroup"):
        if not isinstance(value, str) or not value.startswith("/"):
            raise ValueError(f"{key}: expected an absolute path, got {value!r}")
        return value
    if key == "pid":
        pids = value if isinstance(value, list) else None
        if not pids or any(_int_in(p, 1, 2**22) is None for p in pids):
            raise ValueError(f"pid: expected a non-empty list of pids, got {value!r}")
        return tuple(pids)
    bounds = {"priority": PRIORITY_RANGE, "min_coverage": (0, 100),
              "coverage_deadline": (1, 86400)}.get(key)
    if bounds is not None:
        lo, hi = bounds
        if _int_in(value, lo, hi) is None:
            raise ValueError(f"{key}: invalid value {value!r} (an integer {lo}..{hi})")
        return value
    if _int_in(value, 0, UINT_MAX) is None:  # max_bloat_mb
        raise ValueError(f"{key}: invalid value {value!r} (an integer 0..{UINT_MAX})")
    return value


def parse_targets(value: object, text: str, path: str) -> list[Target]:
    """Every `[[target]]` table checked: known keys, valid values, a match key, unique names."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{path}, {_line_of(text, 'target')}: target: expected "
                          "[[target]] tables")
    if len(value) > MAX_TARGETS:
        raise ConfigError(f"{path}, {_line_of(text, 'target')}: at most {MAX_TARGETS} targets")
    spans = _target_lines(text)
    targets: list[Target] = []
    for i, table in enumerate(value):
        span = spans[i] if len(spans) == len(value) else None
        here = f"{path}, line {span[0]}" if span else f"{path}, {_line_of(text, 'target')}"
        name = table.get("name")
        label = f"target {name}" if isinstance(name, str) and NAME_RE.fullmatch(name) \
            else f"target {i + 1}"
        kwargs = {}
        for key, raw in table.items():
            where = f"{path}, {_key_line(text, span, key)}"
            if key not in _TARGET_KEYS:
                raise ConfigError(f"{where}: {label}: unknown key '{key}' "
                                  f"(known: {', '.join(_TARGET_KEYS)})")
            try:
                kwargs[key] = _target_value(key, raw)
            except ValueError as err:
                raise ConfigError(f"{where}: {label}: {err}") from None
        if "name" not in kwargs:
            raise ConfigError(f"{here}: {label}: 'name' is required")
        if not any(k in kwargs for k in MATCH_KEYS):
            raise ConfigError(f"{here}: {label}: needs at least one match key "
                              f"({', '.join(MATCH_KEYS)})")
        if any(t.name == kwargs["name"] for t in targets):
            raise ConfigError(f"{path}, {_key_line(text, span, 'name')}: {label}: "
                              "name already used by an earlier target")
        targets.append(Target(**kwargs))
    return targets


def check_socket_path(path: str, what: str = "socket") -> str:
    """A path a client can reach: not empty (Linux would bind an abstract socket), no NUL,
    short enough for sun_path."""
    if not path:
        raise ConfigError(f"{what}: empty path")
    if "\0" in path:
        raise ConfigError(f"{what}: {path!r}: contains a NUL byte")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{what}: {path!r}: longer than {SUN_PATH_MAX} bytes")
    return path


def check_pattern(pattern: str, where: str = "exclude_comm") -> re.Pattern:
    if len(pattern) > MAX_PATTERN:
        raise ConfigError(f"{where}: regular expression too long ({len(pattern)} characters, "
                          f"at most {MAX_PATTERN})")
    try:
        return compile_bounded(pattern)  # a name is anyone's input: refuse what backtracks long
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{where}: invalid regular expression: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _loads(text: str, path: str) -> dict:
    import tomllib  # only commands that read a configuration pay for the parser

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        if "(at end of document)" in msg:  # e.g. a duplicate key on the last, unterminated line
            msg = msg.replace("(at end of document)",
                              f"(at line {max(1, len(text.splitlines()))}, end of file)")
        raise ConfigError(f"{path}: {msg}") from err
    except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        m = re.search(r"[0-9_]{4000,}", text)
        line = f", line {text.count(chr(10), 0, m.start()) + 1}" if m else ""
        msg = str(err).split(";")[0].splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}{line}: {msg}") from None


def _tunable(key: str, value: object, where: str) -> str:
    """A tunable's value as sysfs would be written: an integer tunable takes a TOML integer,
    a word tunable a string; both are then refused exactly as the kernel refuses them."""
    spec = SPECS[key]
    wanted = spec.type
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ConfigError(f"{where}: {key}: expected {spec.describe()}")
    try:
        parse(key, str(value))
    except InvalidTunable as err:
        raise ConfigError(f"{where}: {err}") from err
    return str(value)


def _option(key: str, value: object, where: str) -> object:
    opt = OPTIONS[key]
    if not isinstance(value, opt.type) or (isinstance(value, bool) and opt.type is not bool):
        what = "boolean (true or false)" if opt.type is bool else opt.type.__name__
        raise ConfigError(f"{where}: {key}: expected a {what}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: {key}: one of {', '.join(opt.choices)}")
    if opt.range and not opt.range[0] <= value <= opt.range[1]:  # type: ignore[operator]
        raise ConfigError(f"{where}: {key}: an integer {opt.range[0]}..{opt.range[1]}")
    if key == "socket":
        check_socket_path(value, f"{where}: socket")  # type: ignore[arg-type]
    if key == "exclude_comm":
        check_pattern(value, f"{where}: exclude_comm")  # type: ignore[arg-type]
    return value


def parse_config(text: str, path: str) -> Config:
    """Parse and check everything; a problem is one ConfigError naming file and line."""
    data = _loads(text, path)
    cfg = Config()
    for key, value in data.items():
        where = f"{path}, {_line_of(text, key)}"
        if key in SPECS:
            cfg.tunables[key] = _tunable(key, value, where)
        elif key == "target":
            cfg.targets = parse_targets(value, text, path)
        elif key in OPTIONS:
            setattr(cfg.options, key, _option(key, value, where))
        else:
            raise ConfigError(f"{where}: unknown key {_quoted(key)}")
    return cfg


def _quoted(text: str) -> str:
    """'text', with control characters escaped so an error stays one line."""
    return repr(text) if not text.isprintable() else f"'{text}'"


def _read(target: str) -> bytes:
    """The file's bytes, opened so that a FIFO or a device cannot block or flood us."""
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{target}: Is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{target}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{target}: too large ({st.st_size} bytes, "
                              f"at most {MAX_FILE_BYTES})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def load_config(path: str | None) -> Config:
    """`path` None means the default file, which may be absent; a named file must exist."""
    target = path or DEFAULT_PATH
    try:
        data = _read(target)
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{target}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{target}: too large (more than {MAX_FILE_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{target}, line {line}: not UTF-8 (byte {data[err.start]:#04x} "
                          f"at offset {err.start})") from None
    return parse_config(text, target)
