"""Config validation: YAML text to located `Node`s to the schema's typed `Config`.

A config file is read within limits (a regular file under a size cap, UTF-8
without control characters); its YAML events are built into `Node`s that keep
the file and line of every value, within the nesting, value, alias and length
limits defined here, with scalars typed only as str, int, float, bool or null
(`minivmm.config.yamltree`; a file's tree is reused from `minivmm.config.treecache`
while its text is unchanged); `--set` overrides are applied to that tree; then
`_Validator` walks it, checking every key and converting every value, and
raises `ConfigError("file:line: key: what was expected, got what")` at the
first problem. Symbols are only recorded here (`SymbolRef`): they resolve
when the images are loaded (`minivmm.config.build`).
"""
from __future__ import annotations

import codecs
import math
import os
import re
import stat
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import controls
from ..exits import Vector, vector_name
from ..memory import parse_size
from .schema import (DEFAULT_MEMORY, SCHEMA_VERSION, Address, BuildConfig, Config, ConfigError,
                     DebugExitConfig, DevicesConfig, EptConfig, ExpectConfig, FuzzConfig, HypercallConfig,
                     ImageConfig, INPUT_FILE, Loc, MachineConfig, ModuleConfig, SerialConfig, SymbolRef,
                     VmcsConfig, platform_config)

if TYPE_CHECKING:
    from ..platform import PlatformConfig
    from .rule_types import (ControlSetting, CpuidRule, ExceptionRule, HookRule, HypercallRule, IoRule, MmioRule,
                             MonitorRule, MsrRule, ProtectRule)

REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                  "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
MODES = ("real", "protected", "long", "user")
_SYMBOL_RE = re.compile(r"^[A-Za-z_.$][A-Za-z0-9_.$]*$")


# ---------------------------------------------------------------------------
# Limits on what a config file may hold (hostile input gets one error, not a blow-up)

MAX_CONFIG_BYTES = 1 << 20          # default size cap; MINIVMM_MAX_CONFIG_SIZE overrides it
CONFIG_SIZE_ENV = "MINIVMM_MAX_CONFIG_SIZE"
MAX_DEPTH = 32                      # nested mappings/lists
MAX_VALUES = 100_000                # values in one document, aliases expanded
MAX_ALIAS_VALUES = 1_000            # values copied by alias expansion
MAX_STRING_CHARS = 65_536           # one scalar
MAX_KEY_CHARS = 256                 # one mapping key
MAX_NUMBER_CHARS = 100              # a scalar read as a number
MAX_SECONDS = 1_000_000.0           # timeouts
MAX_MEMORY = 64 << 30               # machine.memory
INT_MIN, INT_LIMIT = -(1 << 63), 1 << 64     # integers fit in 64 bits (signed or unsigned)


def config_size_limit() -> int:
    """The config size cap in bytes: `MINIVMM_MAX_CONFIG_SIZE` (a size like 4M) or 1 MiB."""
    text = os.environ.get(CONFIG_SIZE_ENV, "").strip()
    if not text:
        return MAX_CONFIG_BYTES
    try:
        value = parse_size(text) if len(text) <= MAX_NUMBER_CHARS else -1
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"expected a positive size like 4M, got {shorten(text)!r}", "environment",
                          CONFIG_SIZE_ENV)
    return value


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_config_bytes(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (ConfigError otherwise); never blocks
    on a FIFO and never reads more than `limit` + 1 bytes."""
    where = str(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError("no such config file", where) from None
    except OSError as exc:
        raise ConfigError(f"cannot open the config: {exc.strerror or exc}", where) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"expected a regular file, got {_file_kind(info.st_mode)}", where)
        if info.st_size > limit:
            raise _too_large(where, limit)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read the config: {exc.strerror or exc}", where) from None
    finally:
        os.close(fd)
    if size > limit:
        raise _too_large(where, limit)
    return b"".join(chunks)


def _too_large(where: str, limit: int) -> ConfigError:
    return ConfigError(f"expected a config of at most {limit} bytes (set {CONFIG_SIZE_ENV}=SIZE to allow "
                       "more)", where)


def _byte_position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column in characters) of byte `offset`; CR, LF and CRLF each end a line."""
    head = data[:offset]
    line = 1 + head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n")
    start = max(head.rfind(b"\n"), head.rfind(b"\r")) + 1
    return line, len(head[start:].decode("utf-8", errors="replace")) + 1


def _text_position(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of character `offset` in `text`."""
    return _byte_position(text[:offset].encode("utf-8", errors="replace"),
                          len(text[:offset].encode("utf-8", errors="replace")))


_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
# what YAML allows in a stream (printable characters, tab and line breaks): the whole class takes
# milliseconds to compile, so ASCII text (most configs) is checked against its ASCII part only
_NOT_PRINTABLE_ASCII = re.compile("[^\t\n\r\x20-\x7e]")


@cache
def _not_printable() -> re.Pattern:
    return re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def decode_config(data: bytes, file: str) -> str:
    """UTF-8 text (a leading UTF-8 byte-order mark dropped) of only the characters YAML allows;
    ConfigError at `file:line:col` otherwise."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise ConfigError(f"expected UTF-8 text, got a {name} byte-order mark", f"{file}:1:1")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _byte_position(data, exc.start)
        raise ConfigError(f"expected UTF-8 text, got the byte 0x{data[exc.start]:02x}",
                          f"{file}:{line}:{column}") from None
    check_printable(text, file)
    return text


def check_printable(text: str, file: str, origin: str | None = None) -> None:
    """ConfigError at `file:line:col` (or `origin`) on the first character YAML does not allow."""
    bad = (_NOT_PRINTABLE_ASCII if text.isascii() else _not_printable()).search(text)
    if bad:
        line, column = _text_position(text, bad.start())
        char = bad.group()
        what = "a NUL byte" if char == "\0" else f"the control character U+{ord(char):04X}"
        raise ConfigError(f"expected printable text, got {what}", origin or f"{file}:{line}:{column}")


# ---------------------------------------------------------------------------
# Located YAML nodes


@dataclass(eq=False)
class Node:
    """A YAML value with its origin: `value` is a scalar, `dict[str, Node]` or `list[Node]`."""

    value: Any
    file: str
    line: int
    key: str
    origin: str | None = None

    @property
    def where(self) -> str:
        return self.origin or f"{self.file}:{self.line}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.where, self.key)

    def expected(self, what: str) -> ConfigError:
        return self.error(f"expected {what}, got {self.shown()}")

    def shown(self) -> str:
        if isinstance(self.value, dict):
            return "a mapping"
        if isinstance(self.value, list):
            return "a list"
        if self.value is None:
            return "nothing (null)"
        return shorten(repr(self.value))


def close_matches(word: str, possibilities: Sequence[str], n: int, cutoff: float) -> list[str]:
    """`difflib.get_close_matches`, for "did you mean" hints; difflib loads with the first unknown name."""
    import difflib
    return difflib.get_close_matches(word, possibilities, n, cutoff)


def shorten(text: str, width: int = 80) -> str:
    """`text`, cut to about `width` characters for an error message."""
    return text if len(text) <= width else f"{text[:width - 20]}... ({len(text)} characters)"


def _loc(node: Node | None) -> Loc:
    return Loc(node.where, node.key) if node is not None else Loc()


def join_key(key: str, name: str) -> str:
    """The dotted key of `name` under `key` (`machine` + `memory` -> `machine.memory`)."""
    return f"{key}.{name}" if key else name


def parse_yaml(text: str, file: str) -> Node:
    """Compose `text` into a located `Node` tree (an empty document is an empty mapping)."""
    if len(text) > MAX_CONFIG_BYTES and len(text) > config_size_limit():
        raise _too_large(file, config_size_limit())
    from .yamltree import compose
    root = compose(text, file)
    return root if root is not None else Node({}, file, 1, "")


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(root: Node, assignment: str) -> None:
    """Apply `--set dotted.key=value` (`images[0].address=0x200000` for lists); value is YAML."""
    origin = f"--set {assignment}"
    if "=" not in assignment:
        raise ConfigError("expected key=value (e.g. machine.memory=4M)", origin)
    path, _, text = assignment.partition("=")
    parts: list[str | int] = []
    for name, index in _PATH_PART.findall(path.strip()):
        parts.append(int(index) if index else name)
    if not parts:
        raise ConfigError("expected a dotted key before '='", origin)
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"expected a key of at most {MAX_DEPTH} parts", origin)
    if len(text) > MAX_STRING_CHARS:
        raise ConfigError(f"expected a value of at most {MAX_STRING_CHARS} characters", origin)
    node, key = root, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node.value, list) or part >= len(node.value):
                raise ConfigError(f"no list item [{part}] at {key or 'the top level'}", origin)
            key = f"{key}[{part}]"
        else:
            if node.value is None:
                node.value = {}
            if not isinstance(node.value, dict):
                raise ConfigError(f"{key} is not a mapping", origin)
            key = join_key(key, part)
        if last:
            from .yamltree import compose
            new = compose(text, "--set", origin, 0, key) or Node(None, "--set", 0, key, origin)
            if isinstance(part, int):
                node.value[part] = new
            else:
                node.value[part] = new
            return
        child = node.value[part] if isinstance(part, int) else node.value.get(part)
        if child is None:
            child = node.value[part] = Node({}, "--set", 0, key, origin)
        node = child


# ---------------------------------------------------------------------------
# Scalar converters: Node -> value, raising ConfigError with the node's location


def _int(node: Node) -> int:
    """An integer that fits in 64 bits (signed or unsigned): YAML's, or a string like 4K or 0x1000."""
    value = node.value
    if isinstance(value, bool):
        raise node.expected("an integer")
    if isinstance(value, str):
        try:
            value = _parse_number(value)
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT_MIN <= value < INT_LIMIT:
            raise node.expected("an integer that fits in 64 bits")
        return value
    raise node.expected("an integer (decimal, 0x hex, or with a K/M/G suffix)")


def _parse_number(text: str) -> int:
    text = text.strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"more than {MAX_NUMBER_CHARS} characters")
    if text.startswith("-"):
        return -parse_size(text[1:])
    return parse_size(text)


def seconds_value(value: Any) -> float:
    """`value` as a timeout: a finite number above 0 and at most MAX_SECONDS (ValueError otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if not isinstance(value, int) or abs(value) < INT_LIMIT else math.inf
        if math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS:
            return seconds
        if not seconds <= 0:
            raise ValueError(f"a finite number of seconds, at most {MAX_SECONDS:.0f}")
    raise ValueError("a positive number of seconds")


def count_value(value: Any) -> int:
    """`value` as a limit like max_exits: an integer from 1 below 2**64 (ValueError otherwise)."""
    if isinstance(value, str):
        value = _parse_number(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < INT_LIMIT:
        return value
    raise ValueError("a positive integer")


def _uint(node: Node) -> int:
    value = _int(node)
    if value < 0:
        raise node.expected("a non-negative integer")
    return value


def _count(node: Node) -> int:
    try:
        return count_value(node.value)
    except ValueError as exc:
        raise node.expected(str(exc)) from None


def _u32(node: Node) -> int:
    value = _int(node)
    if not 0 <= value <= 0xFFFFFFFF:
        raise node.expected("a 32-bit value 0-0xffffffff")
    return value


def _define_name(node: Node, name: str) -> str:
    """An assembler define's name: a symbol name (nothing the assembler would read as more)."""
    if _SYMBOL_RE.match(name):
        return name
    raise node.error(f"expected a symbol name as the define's name, got {shorten(repr(name))}")


def _size(node: Node) -> int:
    try:
        value = _int(node)
    except ConfigError:
        raise node.expected("a size like 2M or 0x200000") from None
    if value <= 0:
        raise node.expected("a size like 2M or 0x200000")
    return value


def _port(node: Node) -> int:
    value = _int(node)
    if not 0 <= value <= 0xFFFF:
        raise node.expected("an I/O port number 0-0xffff")
    return value


def _seconds(node: Node) -> float:
    try:
        return seconds_value(node.value)
    except ValueError as exc:
        raise node.expected(str(exc)) from None


def _rtc_start(node: Node) -> float:
    """An RTC start time: epoch seconds, or a UTC date "YYYY-MM-DD[ HH:MM:SS]" (YAML may hand
    over a date or datetime already)."""
    import calendar
    import datetime
    value = node.value
    if isinstance(value, bool):
        raise node.expected("epoch seconds or a date like 2026-12-01 12:00:00")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise node.expected("epoch seconds or a date like 2026-12-01 12:00:00") from None
    if isinstance(value, datetime.datetime):
        return float(calendar.timegm(value.utctimetuple()))
    if isinstance(value, datetime.date):
        return float(calendar.timegm(value.timetuple()))
    raise node.expected("epoch seconds or a date like 2026-12-01 12:00:00")


def _str(node: Node) -> str:
    if isinstance(node.value, str):
        return node.value
    raise node.expected("a string")


def _bool(node: Node) -> bool:
    if isinstance(node.value, bool):
        return node.value
    raise node.expected("true or false")


def _symbol_name(node: Node) -> str:
    if isinstance(node.value, str) and _SYMBOL_RE.match(node.value):
        return node.value
    raise node.expected("a symbol name")


def _input_symbol(node: Node) -> str:
    if node.value == INPUT_FILE:
        return INPUT_FILE
    if isinstance(node.value, str) and _SYMBOL_RE.match(node.value):
        return node.value
    raise node.expected("a symbol name (or '@@' for the input file of a linux image's argv)")


def _address(node: Node) -> Address:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise node.expected("a non-negative address or a symbol name")
        if value >= INT_LIMIT:
            raise node.expected("an address that fits in 64 bits")
        return value
    if isinstance(value, str):
        try:
            return _uint(node)
        except ConfigError:
            pass
        if _SYMBOL_RE.match(value):
            return SymbolRef(value, _loc(node))
    raise node.expected("an address (integer) or a symbol name")


def _choice(*choices: str) -> Callable[[Node], str]:
    def convert(node: Node) -> str:
        if isinstance(node.value, str) and node.value in choices:
            return node.value
        hint = ""
        if isinstance(node.value, str):
            close = close_matches(node.value, choices, 1, 0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise node.expected(f"one of {', '.join(choices)}") if not hint else \
            node.error(f"expected one of {', '.join(choices)}, got {node.value!r}{hint}")
    return convert


def _list(convert: Callable[[Node], Any], what: str = "a list") -> Callable[[Node], list]:
    def convert_list(node: Node) -> list:
        if not isinstance(node.value, list):
            raise node.expected(what)
        return [convert(item) for item in node.value]
    return convert_list


def _str_list(node: Node) -> list[str]:
    if isinstance(node.value, str):
        return [node.value]
    return _list(_str, "a string or a list of strings")(node)


_VECTOR_NAMES = {v.name: int(v) for v in Vector}


def _vector(node: Node) -> int:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 255:
            return value
    elif isinstance(value, str):
        name = value.strip().lstrip("#").upper()
        if name in _VECTOR_NAMES:
            return _VECTOR_NAMES[name]
        try:
            number = _parse_number(value)
            if 0 <= number <= 255:
                return number
        except ValueError:
            pass
    raise node.expected(f"an exception vector: a name like \"#UD\" or UD ({', '.join(_VECTOR_NAMES)}) "
                        "or a number 0-255")


def _perms(node: Node) -> str:
    value = node.value
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"[r-][w-][x-]", text):
            return text
        if re.fullmatch(r"r?w?x?", text) and text:
            return "".join(c if c in text else "-" for c in "rwx")
    raise node.expected("page permissions like rwx, r-x, r-- or ---")


def _access(node: Node) -> str:
    value = node.value
    if isinstance(value, str) and value and re.fullmatch(r"[rwx-]+", value.lower()):
        text = value.lower()
        if len(set(text.replace("-", ""))) == len(text.replace("-", "")):
            return "".join(c for c in "rwx" if c in text)
    raise node.expected("an access kind made of r, w, x (e.g. w, rw, rwx)")


def _monitor_access(node: Node) -> str:
    value = _access(node)
    if value not in ("r", "w", "rw"):
        raise node.expected("r, w or rw (execution is watched with ept.hooks)")
    return value


def _register(node: Node) -> str:
    if isinstance(node.value, str) and node.value.lower() in REGISTER_NAMES:
        return node.value.lower()
    raise node.expected(f"a register name ({', '.join(REGISTER_NAMES)})")


def _reg32_value(node: Node) -> int:
    """A CPUID output register: an integer or a 4-character string (little endian, like vendor ids)."""
    value = node.value
    if isinstance(value, str) and len(value.encode()) == 4 and not value.strip().lower().startswith("0x"):
        try:
            _parse_number(value)
        except ValueError:
            return int.from_bytes(value.encode(), "little")
    result = _int(node)
    if not 0 <= result <= 0xFFFFFFFF:
        raise node.expected("a 32-bit value or a 4-character string")
    return result


class _Map:
    """Reads a mapping node: unknown keys are errors, with a "did you mean"."""

    def __init__(self, node: Node, allowed: Sequence[str], what: str | None = None) -> None:
        if not isinstance(node.value, dict):
            raise node.expected(what or f"a mapping with keys {', '.join(allowed)}")
        self.node = node
        self.items: dict[str, Node] = node.value
        for name, child in self.items.items():
            if name not in allowed:
                close = close_matches(name, allowed, 1, 0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(allowed)}"
                raise child.error(f"unknown key{hint}")

    def has(self, name: str) -> bool:
        child = self.items.get(name)
        return child is not None and child.value is not None

    def child(self, name: str) -> Node | None:
        child = self.items.get(name)
        return child if child is not None and child.value is not None else None

    def get(self, name: str, convert: Callable[[Node], Any], default: Any = None) -> Any:
        child = self.child(name)
        return default if child is None else convert(child)

    def need(self, name: str, convert: Callable[[Node], Any], what: str = "") -> Any:
        child = self.child(name)
        if child is None:
            detail = f" ({what})" if what else ""
            raise ConfigError(f"required key {name!r} is missing{detail}", self.node.where,
                              join_key(self.node.key, name))
        return convert(child)

    def exclusive(self, *names: str) -> None:
        given = [n for n in names if self.has(n)]
        if len(given) > 1:
            raise self.items[given[1]].error(f"give only one of {', '.join(repr(n) for n in names)}")


def _range(m: _Map, start_key: str = "start") -> tuple[Address, Address | None, int | None]:
    """`start` with `end` (exclusive) or `size`; returns (start, end, size)."""
    m.exclusive("end", "size")
    start = m.need(start_key, _address)
    end = m.get("end", _address)
    size = m.get("size", _size)
    if end is None and size is None:
        raise ConfigError("give 'end' (exclusive) or 'size'", m.node.where, m.node.key)
    if isinstance(start, int) and isinstance(end, int) and end <= start:
        raise m.items["end"].expected(f"an end above start {start:#x}")
    return start, end, size


# ---------------------------------------------------------------------------
# Validation


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override (`--set` assignments) and validate a config file: a regular UTF-8 file within
    the size cap (`config_size_limit`), one YAML document within the nesting, value and alias limits.
    A file's tree is kept in the tree cache (`minivmm.config.treecache`): a later load of the same
    text builds it from there, without the YAML parser."""
    from . import treecache
    path = Path(path)
    text = decode_config(read_config_bytes(path, config_size_limit()), str(path))
    root = treecache.load(text, str(path))
    if root is None:
        root = parse_yaml(text, str(path))
        treecache.save(text, str(path), root)
    return _validated(root, path, overrides)


def parse_config(text: str, *, path: str | Path = "<config>", overrides: Sequence[str] = ()) -> Config:
    """Validate config text; relative paths in it resolve against `path`'s directory."""
    path = Path(path)
    return _validated(parse_yaml(text, str(path)), path, overrides)


def _validated(root: Node, path: Path, overrides: Sequence[str]) -> Config:
    """The Config of a composed tree, after the `--set` assignments."""
    for assignment in overrides:
        apply_override(root, assignment)
    return _Validator(path).config(root)


TOP_KEYS = ("version", "description", "machine", "image", "images", "devices", "vmcs", "ept",
            "handlers", "expect", "fuzz", "platform")


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def file(self, node: Node, *, must_exist: bool = True) -> Path:
        text = _str(node)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if must_exist and not path.is_file():
            raise node.error(f"expected an existing file (relative to {self.base or '.'}), "
                             f"got {text!r}: {path} does not exist")
        return path

    def config(self, root: Node) -> Config:
        m = _Map(root, TOP_KEYS, "a mapping (the config file's top level)")
        version = m.need("version", _int, f"this is schema version {SCHEMA_VERSION}: add 'version: 1'")
        if version != SCHEMA_VERSION:
            raise m.items["version"].expected(f"version {SCHEMA_VERSION}")
        config = Config(path=self.path, version=version)
        config.description = m.get("description", _str, "")
        machine_node = m.child("machine")
        config.machine = self.machine(machine_node) if machine_node else MachineConfig()
        m.exclusive("image", "images")
        if m.has("image"):
            config.images = [self.image(m.items["image"])]
        else:
            config.images = m.get("images", _list(self.image, "a list of images"), [])
        if not config.images:
            raise ConfigError("required key 'images' is missing (a config needs at least one image)",
                              root.where, "images")
        self.check_multiboot(config, m)
        linux = [image for image in config.images if image.type == "linux"]
        if linux and len(config.images) > 1:
            raise linux[0].loc.error("a linux image is the only image of its config (minivmm builds its "
                                     "address space)")
        if linux:
            if config.machine.mode_given and config.machine.mode != "user":
                raise ConfigError(f"a linux image runs at CPL 3: machine.mode must be user or left out, "
                                  f"not {config.machine.mode!r}", m.items["machine"].where, "machine.mode")
            config.machine.mode = "user"
        config.devices = m.get("devices", self.devices, DevicesConfig())
        config.vmcs = m.get("vmcs", self.vmcs, VmcsConfig())
        config.ept = m.get("ept", self.ept, EptConfig())
        config.handlers = m.get("handlers", _list(lambda n: (_handler_spec(n), _loc(n)),
                                                  "a list of \"module:function\" strings"), [])
        config.expect = m.get("expect", self.expect)
        config.fuzz = m.get("fuzz", self.fuzz)
        self.check_input_file(config, m)
        config.platform = m.get("platform", self.platform, platform_config())
        if config.machine.vcpus > 1:
            platform_node = m.child("platform")
            if platform_node is not None and isinstance(platform_node.value, dict) and \
                    "irqchip" in platform_node.value and not config.platform.irqchip:
                raise platform_node.value["irqchip"].error(
                    f"machine.vcpus is {config.machine.vcpus}: more than one vCPU needs the in-kernel "
                    "irqchip (the APs start on the LAPIC's INIT/SIPI); remove 'irqchip: false'")
            config.platform.irqchip = True
        return config

    def platform(self, node: Node) -> "PlatformConfig":
        from ..platform import RamWindow, ScratchConfig
        if node.value == "pc":                                 # `platform: pc`
            return platform_config(pc=True)
        if isinstance(node.value, str):
            raise node.expected("'pc' or a mapping of platform pieces")
        m = _Map(node, ("pc", "irqchip", "pit", "rtc", "fw_cfg", "acpi", "pci", "testdev", "scratch",
                        "ram_windows", "strict_ports"))
        pc = m.get("pc", _bool, False)
        platform = platform_config(irqchip=m.get("irqchip", _bool, pc), pit=m.get("pit", _bool, pc),
                                    fw_cfg=m.get("fw_cfg", _bool, pc), pci=m.get("pci", _bool, pc),
                                    strict_ports=m.get("strict_ports", _bool, False),
                                    testdev=m.get("testdev", _bool, False), acpi=pc, rtc=pc)
        if platform.pit and not platform.irqchip:
            raise m.items["pit"].error("the in-kernel PIT needs the in-kernel irqchip: add 'irqchip: true'")
        if platform.testdev and not platform.irqchip:
            raise m.items["testdev"].error("the test device drives IRQ lines through the in-kernel irqchip: "
                                           "add 'irqchip: true'")
        rtc = m.child("rtc")
        if rtc is not None:
            if isinstance(rtc.value, dict):
                r = _Map(rtc, ("start",))
                platform.rtc = True
                platform.rtc_start = r.get("start", _rtc_start, None)
            else:
                platform.rtc = _bool(rtc)
        acpi = m.child("acpi")
        if acpi is not None:
            if isinstance(acpi.value, dict):
                a = _Map(acpi, ("pm_timer_32bit",))
                platform.acpi = True
                platform.pm_timer_32bit = a.get("pm_timer_32bit", _bool, True)
            else:
                platform.acpi = _bool(acpi)

        def scratch(n: Node) -> ScratchConfig:
            if isinstance(n.value, dict):
                s = _Map(n, ("port", "width"))
                width = s.get("width", _int, 4)
                if width not in (1, 2, 4):
                    raise s.items["width"].expected("1, 2 or 4")
                return ScratchConfig(port=s.need("port", _port, "the register's I/O port"), width=width)
            return ScratchConfig(port=_port(n))

        node_scratch = m.child("scratch")
        if node_scratch is not None:
            platform.scratch = _list(scratch, "a list of scratch registers")(node_scratch) \
                if isinstance(node_scratch.value, list) else [scratch(node_scratch)]

        def window(n: Node) -> RamWindow:
            w = _Map(n, ("start", "size", "name"))
            start = w.need("start", _uint, "the window's guest-physical address")
            size = w.need("size", _size, "the window's size")
            if start % 4096 or size % 4096 or size == 0:
                raise n.error(f"a RAM window needs a page-aligned start and a non-zero page-multiple size; "
                              f"got start {start:#x} size {size:#x}")
            return RamWindow(start, size, w.get("name", _str, f"window@{start:#x}"), n.where)

        platform.ram_windows = m.get("ram_windows", _list(window, "a list of {start, size} RAM windows"), [])
        return platform

    def machine(self, node: Node) -> MachineConfig:
        m = _Map(node, ("name", "memory", "mode", "entry", "stack", "registers", "timeout", "max_exits",
                        "vcpus"))
        mc = MachineConfig()
        mc.name = m.get("name", _str, "")
        mc.memory = m.get("memory", _size, DEFAULT_MEMORY)
        where = m.items["memory"] if m.has("memory") else node
        mc.memory_loc = Loc(where.where, "machine.memory")
        if mc.memory > MAX_MEMORY:
            raise m.items["memory"].expected(f"a size of at most {MAX_MEMORY >> 30}G")
        if mc.memory % 4096:
            raise m.items["memory"].expected("a size that is a multiple of 4K")
        if m.has("mode"):
            mc.mode = _choice(*MODES)(m.items["mode"])
            mc.mode_given = True
        mc.entry = m.get("entry", _address)
        mc.entry_loc = Loc((m.items["entry"] if m.has("entry") else node).where, "machine.entry")
        mc.stack = m.get("stack", _address)
        registers = m.child("registers")
        if registers is not None:
            regs = _Map(registers, REGISTER_NAMES + tuple(r.upper() for r in REGISTER_NAMES))
            mc.registers = {name.lower(): _address(child) for name, child in regs.items.items()
                            if child.value is not None}
        if m.has("timeout"):
            mc.timeout = _seconds(m.items["timeout"])
        mc.max_exits = m.get("max_exits", _count)
        mc.vcpus = m.get("vcpus", _int, 1)
        if not 1 <= mc.vcpus <= 64:
            raise m.items["vcpus"].expected("a vCPU count from 1 to 64")
        return mc

    def image(self, node: Node) -> ImageConfig:
        if not isinstance(node.value, dict):
            raise node.expected("an image mapping with a 'type' (asm, binary, elf, multiboot, linux)")
        type_node = node.value.get("type")
        if type_node is None:
            raise ConfigError("required key 'type' is missing (asm, binary, elf, multiboot or linux)",
                              node.where, join_key(node.key, "type"))
        kind = _choice("asm", "binary", "elf", "multiboot", "linux")(type_node)
        if kind == "linux":
            return self.linux_image(node)
        allowed = {"asm": ("type", "source", "address", "entry", "defines"),
                   "binary": ("type", "path", "address", "entry"),
                   "elf": ("type", "path", "build", "entry"),
                   "multiboot": ("type", "path", "source", "build", "cmdline", "defines", "modules")}[kind]
        m = _Map(node, allowed)
        image = ImageConfig(type=kind, loc=_loc(node))
        if kind == "asm":
            image.path = m.need("source", self.file, "the assembly source file")
        elif kind == "binary":
            image.path = m.need("path", self.file, "the flat binary file")
            image.address = m.need("address", _address, "where the binary is loaded")
        elif kind == "elf":
            m.exclusive("path", "build")
            if m.has("build"):
                image.build = self.build(m.items["build"])
            else:
                image.path = m.need("path", self.file, "the ELF file, or 'build' to compile C sources")
        else:
            m.exclusive("path", "source", "build")
            if m.has("source"):
                image.path = self.file(m.items["source"])
                image.assemble = True
            elif m.has("build"):
                image.build = self.build(m.items["build"])
                image.path = image.build.c[0]
            else:
                image.path = m.need("path", self.file, "the kernel file, 'source' for an assembly kernel "
                                    "or 'build' to compile one")
            image.cmdline = m.get("cmdline", _str, "")
            image.modules = m.get("modules", _list(self.module, "a list of modules {path, cmdline}"), [])
        if kind == "asm":
            image.address = m.get("address", _address)
        if kind in ("asm", "multiboot") and m.has("defines"):
            defines = _Map(m.items["defines"], tuple(m.items["defines"].value or ()) if isinstance(
                m.items["defines"].value, dict) else (), "a mapping of NAME: integer")
            image.defines = {_define_name(child, name): _int(child) for name, child in defines.items.items()}
        image.entry = m.get("entry", _address)
        return image

    def linux_image(self, node: Node) -> ImageConfig:
        """`type: linux`: a static Linux program run by minivmm's Linux personality."""
        m = _Map(node, ("type", "path", "argv", "env", "expose", "stdin"))
        image = ImageConfig(type="linux", loc=_loc(node))
        image.path = m.need("path", self.file, "the static Linux executable")
        image.argv = m.get("argv", _list(_str, "a list of strings"), [image.path.name])
        if m.has("env"):
            env = m.items["env"]
            names = _Map(env, tuple(env.value or ()) if isinstance(env.value, dict) else (),
                         "a mapping of NAME: text")
            image.env = {name: _str(child) for name, child in names.items.items()}
        image.expose = m.get("expose", _list(_str, "a list of host paths (PATH or PATH:rw)"), [])
        if m.has("stdin"):
            image.stdin = self.file(m.items["stdin"])
        return image

    def module(self, node: Node) -> ModuleConfig:
        if isinstance(node.value, str):
            return ModuleConfig(path=self.file(node), loc=_loc(node))
        m = _Map(node, ("path", "cmdline"))
        return ModuleConfig(path=m.need("path", self.file, "the module's file"),
                            cmdline=m.get("cmdline", _str, ""), loc=_loc(node))

    def build(self, node: Node) -> BuildConfig:
        m = _Map(node, ("c", "cflags", "link_address"))
        sources = m.need("c", lambda n: [self.file(n)] if isinstance(n.value, str)
                         else _list(self.file, "a C file or a list of C files")(n), "the C sources")
        return BuildConfig(c=sources, cflags=m.get("cflags", _str_list, []),
                           link_address=m.get("link_address", _uint, 0x100000), loc=_loc(node))

    def check_input_file(self, config: Config, m: _Map) -> None:
        """`@@` in a linux image's argv (AFL's input file) and `fuzz.input_symbol: "@@"` go together."""
        named = any(image.type == "linux" and INPUT_FILE in image.argv for image in config.images)
        wants = config.fuzz is not None and config.fuzz.input_symbol == INPUT_FILE
        if wants and not named:
            raise ConfigError("fuzz.input_symbol '@@' is the input file named by '@@' in the linux image's argv, "
                              "and the argv has no '@@'", m.items["fuzz"].where, "fuzz.input_symbol")
        if named and config.fuzz is not None and not wants:
            raise ConfigError("the linux image's argv has '@@' (the input file, as for afl-fuzz): set "
                              "fuzz.input_symbol: '@@'", m.items["fuzz"].where, "fuzz.input_symbol")

    def check_multiboot(self, config: Config, m: _Map) -> None:
        multiboot = [image for image in config.images if image.type == "multiboot"]
        if not multiboot:
            return
        if config.machine.mode_given and config.machine.mode != "protected":
            raise multiboot[0].loc.error(f"a multiboot kernel starts in protected mode; machine.mode is "
                                         f"{config.machine.mode!r}: expected 'protected' or no mode")
        config.machine.mode = "protected"
        if len(multiboot) > 1:
            raise multiboot[1].loc.error("expected at most one multiboot kernel")

    def devices(self, node: Node) -> DevicesConfig:
        m = _Map(node, ("serial", "debug_exit", "hypercall", "mmio"))
        devices = DevicesConfig()
        serial = m.child("serial")
        if serial is not None:
            s = _Map(serial, ("enabled", "port", "output", "path"))
            devices.serial = SerialConfig(
                enabled=s.get("enabled", _bool, True), port=s.get("port", _port, 0x3F8),
                output=s.get("output", _choice("stdout", "stderr", "capture", "file", "none"), "stdout"))
            if devices.serial.output == "file":
                devices.serial.path = s.need("path", lambda n: self.file(n, must_exist=False),
                                             "the file the console goes to")
            elif s.has("path"):
                raise s.items["path"].error("'path' is only used with output: file")
        debug = m.child("debug_exit")
        if debug is not None:
            d = _Map(debug, ("enabled", "port", "width"))
            width = d.get("width", _int, 1)
            if width not in (1, 2, 4):
                raise d.items["width"].expected("1, 2 or 4")
            devices.debug_exit = DebugExitConfig(enabled=d.get("enabled", _bool, True),
                                                 port=d.get("port", _port, 0xF4), width=width)
        hyper = m.child("hypercall")
        if hyper is not None:
            h = _Map(hyper, ("port", "calls"))
            devices.hypercall = HypercallConfig(port=h.get("port", _port, 0xF5),
                                                calls=h.get("calls", _list(self.hypercall_rule), []))
        devices.mmio = m.get("mmio", _list(self.mmio_rule, "a list of MMIO rules"), [])
        return devices

    def hypercall_rule(self, node: Node) -> HypercallRule:
        from .rule_types import HypercallRule
        m = _Map(node, ("number", "action", "value", "name", "log"))
        number = m.need("number", _uint, "the hypercall number (RAX)")
        return HypercallRule(number=number,
                             action=m.get("action", _choice("return", "log", "count", "stop"), "return"),
                             value=m.get("value", _int, 0), name=m.get("name", _str, f"hypercall {number}"),
                             log=m.get("log", _bool, False))

    def mmio_rule(self, node: Node) -> MmioRule:
        from .rule_types import MmioRule
        m = _Map(node, ("start", "end", "size", "action", "value", "name", "log"))
        start, end, size = _range(m)
        return MmioRule(start, end, size, action=m.get("action", _choice("ignore", "count", "log", "stop"),
                                                       "ignore"),
                        value=m.get("value", _int, 0), name=m.get("name", _str, f"mmio {start}"),
                        log=m.get("log", _bool, False), loc=_loc(node))

    def vmcs(self, node: Node) -> VmcsConfig:
        m = _Map(node, ("controls", "exception_bitmap", "exceptions", "msrs", "io", "cpuid"))
        vmcs = VmcsConfig(loc=_loc(node))
        controls = m.child("controls")
        if controls is not None:
            vmcs.controls = self.controls(controls)
        vmcs.exception_bitmap = m.get("exception_bitmap", _list(_vector, "a list of exception vectors"), [])
        bitmap_node = m.child("exception_bitmap")
        vmcs.exception_bitmap_locs = [_loc(item) for item in bitmap_node.value] if bitmap_node else []
        vmcs.exceptions = m.get("exceptions", _list(self.exception_rule, "a list of exception rules"), [])
        vmcs.msrs = m.get("msrs", _list(self.msr_rule, "a list of MSR rules"), [])
        vmcs.io = m.get("io", _list(self.io_rule, "a list of I/O port rules"), [])
        vmcs.cpuid = m.get("cpuid", _list(self.cpuid_rule, "a list of CPUID overrides"), [])
        return vmcs

    def controls(self, node: Node) -> list[ControlSetting]:
        from .rule_types import ControlSetting
        names = _control_names()
        settings: list[ControlSetting] = []

        def lookup(name_node: Node, name: Any) -> Any:
            if not isinstance(name, str) or name not in names:
                close = close_matches(name, list(names), 1, 0.7) if isinstance(name, str) else []
                hint = f" (did you mean {close[0]!r}?)" if close else \
                    " (SDM names such as CPU_BASED_HLT_EXITING; see `minivmm caps`)"
                shown = shorten(repr(name)) if isinstance(name, str) else name_node.shown()
                raise name_node.error(f"expected a VMX control name, got {shown}{hint}")
            return names[name]

        if isinstance(node.value, list):
            for item in node.value:
                settings.append(ControlSetting(str(item.value), lookup(item, item.value), True, _loc(item)))
        elif isinstance(node.value, dict):
            for name, child in node.value.items():
                settings.append(ControlSetting(name, lookup(child, name), _bool(child), _loc(child)))
        else:
            raise node.expected("a list of control names or a mapping NAME: true/false")
        return settings

    def exception_rule(self, node: Node) -> ExceptionRule:
        from .rule_types import ExceptionRule
        m = _Map(node, ("vector", "action", "name", "log"))
        vector = m.need("vector", _vector, "e.g. \"#BP\"")
        return ExceptionRule(vector, m.get("action", _choice("count", "log", "skip", "stop", "inject", "pass"),
                                           "count"),
                             m.get("name", _str, vector_name(vector)), m.get("log", _bool, False), _loc(node))

    def msr_rule(self, node: Node) -> MsrRule:
        from .rule_types import MsrRule
        m = _Map(node, ("msr", "action", "value", "read", "write", "name", "log"))
        msr = m.need("msr", _u32, "the MSR index")
        action = m.get("action", _choice("allow", "deny", "fixed", "log", "count"), "log")
        if action == "fixed" and not m.has("value"):
            raise ConfigError("action 'fixed' needs a 'value'", m.node.where, join_key(m.node.key, "value"))
        return MsrRule(msr, action, m.get("value", _uint, 0), m.get("read", _bool, True),
                       m.get("write", _bool, True), m.get("name", _str, f"msr {msr:#x}"),
                       m.get("log", _bool, False), _loc(node))

    def io_rule(self, node: Node) -> IoRule:
        from .rule_types import IoRule
        m = _Map(node, ("port", "action", "value", "name", "log"))
        port_node = m.child("port")
        if port_node is None:
            raise ConfigError("required key 'port' is missing (a port or [start, end))", m.node.where,
                              join_key(m.node.key, "port"))
        if isinstance(port_node.value, list):
            if len(port_node.value) != 2:
                raise port_node.expected("a port or a [start, end) pair")
            start, end = _port(port_node.value[0]), _int(port_node.value[1])
            if not start < end <= 0x10000:
                raise port_node.expected("a [start, end) pair with start < end <= 0x10000")
        else:
            start = _port(port_node)
            end = start + 1
        action = m.get("action", _choice("ignore", "fixed", "log", "count", "stop"), "log")
        if action == "fixed" and not m.has("value"):
            raise ConfigError("action 'fixed' needs a 'value'", m.node.where, join_key(m.node.key, "value"))
        return IoRule(start, end, action, m.get("value", _uint), m.get("name", _str, f"port {start:#x}"),
                      m.get("log", _bool, False), _loc(node))

    def cpuid_rule(self, node: Node) -> CpuidRule:
        from .rule_types import CpuidRule
        m = _Map(node, ("leaf", "subleaf", "eax", "ebx", "ecx", "edx"))
        rule = CpuidRule(m.need("leaf", _u32, "the CPUID leaf (EAX)"), m.get("subleaf", _u32),
                         loc=_loc(node))
        for reg in ("eax", "ebx", "ecx", "edx"):
            setattr(rule, reg, m.get(reg, _reg32_value))
        return rule

    def ept(self, node: Node) -> EptConfig:
        m = _Map(node, ("protect", "monitors", "hooks"))
        return EptConfig(protect=m.get("protect", _list(self.protect_rule, "a list of ranges"), []),
                         monitors=m.get("monitors", _list(self.monitor_rule, "a list of monitors"), []),
                         hooks=m.get("hooks", _list(self.hook_rule, "a list of execute hooks"), []))

    def protect_rule(self, node: Node) -> ProtectRule:
        from .rule_types import ProtectRule
        m = _Map(node, ("start", "end", "size", "perms"))
        start, end, size = _range(m)
        return ProtectRule(start, end, size, m.need("perms", _perms, "e.g. r-x"), _loc(node))

    def monitor_rule(self, node: Node) -> MonitorRule:
        from .rule_types import MonitorRule
        m = _Map(node, ("start", "end", "size", "access", "action", "name", "log"))
        start, end, size = _range(m)
        return MonitorRule(start, end, size, m.get("access", _monitor_access, "rw"),
                           m.get("action", _choice("log", "count", "stop"), "log"),
                           m.get("name", _str, f"monitor {start}"), m.get("log", _bool, False), _loc(node))

    def hook_rule(self, node: Node) -> HookRule:
        from .rule_types import HookRule
        m = _Map(node, ("address", "action", "hidden", "name", "log"))
        address = m.need("address", _address, "an address or a symbol")
        return HookRule(address, m.get("action", _choice("log", "count", "stop", "skip"), "log"),
                        m.get("hidden", _bool, True), m.get("name", _str, f"hook {address}"),
                        m.get("log", _bool, False), _loc(node))

    def expect(self, node: Node) -> ExpectConfig:
        m = _Map(node, ("result", "exit_code", "console", "message", "counters"))
        counters: dict[str, int] = {}
        counters_node = m.child("counters")
        if counters_node is not None:
            if not isinstance(counters_node.value, dict):
                raise counters_node.expected("a mapping of counter name: count")
            counters = {name: _int(child) for name, child in counters_node.value.items()}
        return ExpectConfig(
            result=m.get("result", _choice("exit", "hlt", "timeout", "triple_fault", "exception", "error",
                                           "exit_limit", "stopped")),
            exit_code=m.get("exit_code", _int), console=m.get("console", _str),
            message=m.get("message", _str), counters=counters)

    def fuzz(self, node: Node) -> FuzzConfig:
        m = _Map(node, ("input_symbol", "input_address", "max_input_size", "length_register",
                        "length_address", "crash_vectors", "crash_addresses", "coverage_ranges", "timeout",
                        "batch", "batch_regions"))
        m.exclusive("input_symbol", "input_address")
        m.exclusive("length_register", "length_address")
        fuzz = FuzzConfig(
            input_symbol=m.get("input_symbol", _input_symbol),
            input_address=m.get("input_address", _uint),
            max_input_size=m.get("max_input_size", _size, 4096),
            length_register=m.get("length_register", _register),
            length_address=m.get("length_address", _uint),
            crash_vectors=m.get("crash_vectors", _list(_vector, "a list of exception vectors"), []),
            crash_addresses=m.get("crash_addresses", _list(_uint, "a list of addresses"), []),
            coverage_ranges=m.get("coverage_ranges", _list(_pair, "a list of [start, end) pairs"), []),
            timeout=m.get("timeout", _seconds, 1.0),
            batch=m.get("batch", _batch_size, 1),
            batch_regions=m.get("batch_regions", _list(_pair, "a list of [start, end) pairs"), []))
        if fuzz.input_symbol is None and fuzz.input_address is None:
            raise ConfigError("required key 'input_symbol' or 'input_address' is missing (where the input goes)",
                              node.where, join_key(node.key, "input_symbol"))
        return fuzz


def _batch_size(node: Node) -> int:
    value = _count(node)
    if value > 1024:
        raise node.expected("a batch size from 1 to 1024")
    return value


def _pair(node: Node) -> tuple[int, int]:
    if not isinstance(node.value, list) or len(node.value) != 2:
        raise node.expected("a [start, end) pair")
    start, end = _uint(node.value[0]), _uint(node.value[1])
    if end <= start:
        raise node.expected("a [start, end) pair with start < end")
    return start, end


def _handler_spec(node: Node) -> str:
    text = _str(node)
    module, sep, function = text.partition(":")
    if not sep or not module or not function.isidentifier():
        raise node.expected("\"module:function\" or \"file.py:function\"")
    return text


def _control_names() -> dict[str, Any]:
    names: dict[str, Any] = {}
    for cls in (controls.PinBasedControls, controls.ProcBasedControls, controls.SecondaryControls,
                controls.VmExitControls, controls.VmEntryControls):
        for member in cls:
            names[member.name] = member
    return names
