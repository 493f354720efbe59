"""YAML text to located `Node` trees, from PyYAML's events (libyaml's parser when PyYAML has it).

The tree is built iteratively within the limits of `minivmm.config.validate` (depth, values,
aliases, string and key sizes); scalars are typed the YAML 1.1 way, but only as str, int,
float, bool and None. This is the one module that imports PyYAML: `load_config` needs it only
for a text the tree cache (`minivmm.config.treecache`) does not hold.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import yaml

from .schema import ConfigError
from .validate import (MAX_ALIAS_VALUES, MAX_DEPTH, MAX_KEY_CHARS, MAX_NUMBER_CHARS, MAX_STRING_CHARS,
                       MAX_VALUES, Node, check_printable, join_key, shorten)


# -- scalars: typed by the schema, so YAML itself builds only str, int, float, bool and None --

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}
_COLLECTION_TAGS = {None, "!", f"{_TAG}map", f"{_TAG}seq"}
# YAML 1.1's implicit bool, int, float and null (no timestamps, merge keys or `=`)
_IMPLICIT: dict[str | None, list[tuple[str, re.Pattern]]] = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in _SCALAR_TAGS]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()}
_TRUE, _FALSE = {"yes", "true", "on"}, {"no", "false", "off"}


def _plain_tag(value: str) -> str:
    """The tag YAML 1.1 gives an untagged plain scalar (str unless it reads as bool/int/float/null)."""
    for tag, regexp in _IMPLICIT.get(value[:1] if value else "", []) + _IMPLICIT.get(None, []):
        if regexp.match(value):
            return tag
    return f"{_TAG}str"


def _yaml_int(text: str) -> int:
    """A YAML 1.1 integer: sign, then 0b binary, 0x hex, 0 octal, base 60 (1:30) or decimal."""
    text = text.replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text[1:] if text[:1] in "+-" else text
    if text.startswith(("0b", "0x")):
        return sign * int(text[2:], 2 if text[1] == "b" else 16)
    if ":" in text:
        value = 0
        for part in text.split(":"):
            value = value * 60 + int(part)
        return sign * value
    if len(text) > 1 and text.startswith("0"):
        return sign * int(text[1:], 8)
    return sign * int(text)


def _yaml_float(text: str) -> float:
    """A YAML 1.1 float, including .inf, -.inf, .nan and base 60 (1:30.5)."""
    text = text.replace("_", "").lower()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text[1:] if text[:1] in "+-" else text
    if text in (".inf", ".nan"):
        return sign * float(text[1:])
    if ":" in text:
        value = 0.0
        for part in text.split(":"):
            value = value * 60 + float(part)
        return sign * value
    return sign * float(text)


def _yaml_null(text: str) -> None:
    if text not in ("", "~", "null", "Null", "NULL"):
        raise ValueError(text)
    return None


def _yaml_bool(text: str) -> bool:
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise ValueError(text)


_CONSTRUCT: dict[str, Callable[[str], Any]] = {
    f"{_TAG}str": str, f"{_TAG}int": _yaml_int, f"{_TAG}float": _yaml_float,
    f"{_TAG}bool": _yaml_bool, f"{_TAG}null": _yaml_null}


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag


class _TreeBuilder:
    """YAML events to one located `Node` tree, iteratively, within the limits above.

    Mapping values carry the line of their key; an alias is expanded into a
    copy (its values keep the lines they were written at) so that `--set` and
    error keys see a plain tree.
    """

    def __init__(self, file: str, origin: str | None = None, line: int | None = None, key: str = "") -> None:
        self.file = file
        self.key = key                      # the dotted key of the root
        self.origin = origin
        self.line = line                    # a fixed line for every node (--set values), else the mark's
        self.stack: list[tuple[Node, str | None]] = []     # open collections and their anchors
        self.pending: list[tuple[str, int] | None] = []     # per open mapping: the key awaiting its value
        self.anchors: dict[str, Node] = {}
        self.values = 0
        self.alias_values = 0
        self.documents = 0
        self.root: Node | None = None

    def where(self, mark: Any) -> str:
        return self.origin or f"{self.file}:{self.line if self.line is not None else mark.line + 1}"

    def fail(self, message: str, mark: Any, key: str = "") -> ConfigError:
        return ConfigError(message, self.where(mark), key)

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise self.fail("expected one YAML document, found a second one", event.start_mark)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            node, anchor = self.stack.pop()
            self.pending.pop()
            if anchor is not None:
                self.anchors[anchor] = node
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent,
                                yaml.SequenceStartEvent)):
            self.value_or_key(event)

    def value_or_key(self, event: yaml.Event) -> None:
        if self.stack and isinstance(self.stack[-1][0].value, dict) and self.pending[-1] is None:
            self.pending[-1] = (self.key_name(event), event.start_mark.line + 1)
            return
        key, line = self.slot(event)
        self.count(event, key)
        if isinstance(event, yaml.AliasEvent):
            node = self.expand(event, key, line)
        elif isinstance(event, yaml.ScalarEvent):
            node = Node(self.scalar(event, key), self.file, line, key, self.origin)
        else:
            node = self.open(event, key, line)
        self.attach(node)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self.stack.append((node, event.anchor))
            self.pending.append(None)
        elif isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
            self.anchors[event.anchor] = node

    def slot(self, event: yaml.Event) -> tuple[str, int]:
        """The dotted key and the line of the value `event` starts."""
        line = self.line if self.line is not None else event.start_mark.line + 1
        if not self.stack:
            return self.key, line
        parent = self.stack[-1][0]
        if isinstance(parent.value, dict):
            name, key_line = self.pending[-1]
            return join_key(parent.key, name), self.line if self.line is not None else key_line
        return f"{parent.key}[{len(parent.value)}]", line

    def attach(self, node: Node) -> None:
        if not self.stack:
            self.root = node
            return
        parent = self.stack[-1][0]
        if isinstance(parent.value, dict):
            name, _ = self.pending[-1]
            parent.value[name] = node
            self.pending[-1] = None
        else:
            parent.value.append(node)

    def count(self, event: yaml.Event, key: str, values: int = 1) -> None:
        self.values += values
        if self.values > MAX_VALUES:
            raise self.fail(f"expected at most {MAX_VALUES} values in a config", event.start_mark, key)

    def key_name(self, event: yaml.Event) -> str:
        parent = self.stack[-1][0]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            value = target.value if target is not None and not isinstance(target.value, (dict, list)) else None
            if value is None:
                raise self.fail("mapping keys must be plain names or numbers", event.start_mark, parent.key)
        elif isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_KEY_CHARS:
                raise self.fail(f"expected a key of at most {MAX_KEY_CHARS} characters, got one of "
                                f"{len(event.value)}", event.start_mark, parent.key)
            value = self.scalar(event, parent.key)
        else:
            raise self.fail("mapping keys must be plain names or numbers", event.start_mark, parent.key)
        name = str(value)
        if name in parent.value:
            raise self.fail(f"duplicate key {shorten(name)!r}", event.start_mark, join_key(parent.key, name))
        return name

    def scalar(self, event: yaml.ScalarEvent, key: str) -> Any:
        text, tag = event.value, event.tag
        if len(text) > MAX_STRING_CHARS:
            raise self.fail(f"expected a value of at most {MAX_STRING_CHARS} characters, got one of "
                            f"{len(text)}", event.start_mark, key)
        if tag is None:
            tag = _plain_tag(text) if event.implicit[0] else f"{_TAG}str"
        elif tag == "!":
            tag = f"{_TAG}str"
        if tag not in _CONSTRUCT:
            raise self.fail(f"expected a plain value, got the YAML tag {shorten(_tag_name(tag))} (minivmm "
                            "configs use only str, int, float, bool and null)", event.start_mark, key)
        if tag != f"{_TAG}str" and len(text) > MAX_NUMBER_CHARS:
            raise self.fail(f"expected a number of at most {MAX_NUMBER_CHARS} characters, got one of "
                            f"{len(text)}", event.start_mark, key)
        try:
            return _CONSTRUCT[tag](text)
        except ValueError:
            raise self.fail(f"expected a value for {_tag_name(tag)}, got {shorten(repr(text))}",
                            event.start_mark, key) from None

    def open(self, event: yaml.Event, key: str, line: int) -> Node:
        if event.tag not in _COLLECTION_TAGS:
            raise self.fail(f"expected a plain mapping or list, got the YAML tag "
                            f"{shorten(_tag_name(event.tag))}", event.start_mark, key)
        if len(self.stack) >= MAX_DEPTH:
            raise self.fail(f"expected at most {MAX_DEPTH} levels of nesting", event.start_mark, key)
        value: dict | list = {} if isinstance(event, yaml.MappingStartEvent) else []
        return Node(value, self.file, line, key, self.origin)

    def expand(self, event: yaml.AliasEvent, key: str, line: int) -> Node:
        target = self.anchors.get(event.anchor)
        if target is None:
            inside = any(anchor == event.anchor for _, anchor in self.stack)
            raise self.fail(f"alias *{shorten(event.anchor)} refers to "
                            + ("the collection that contains it" if inside else "no anchor defined before it"),
                            event.start_mark, key)
        size = _tree_size(target, MAX_ALIAS_VALUES - self.alias_values + 1)
        self.alias_values += size
        if self.alias_values > MAX_ALIAS_VALUES:
            raise self.fail(f"expected aliases to expand to at most {MAX_ALIAS_VALUES} values in all",
                            event.start_mark, key)
        self.count(event, key, size - 1)
        if len(self.stack) + _tree_depth(target) > MAX_DEPTH + 1:
            raise self.fail(f"expected at most {MAX_DEPTH} levels of nesting", event.start_mark, key)
        return _copy_tree(target, key, line if not isinstance(target.value, (dict, list)) else target.line)


def _tree_size(node: Node, limit: int) -> int:
    """The number of values in `node`'s tree, counting stopped once above `limit`."""
    size, todo = 0, [node]
    while todo and size <= limit:
        current = todo.pop()
        size += 1
        if isinstance(current.value, dict):
            todo.extend(current.value.values())
        elif isinstance(current.value, list):
            todo.extend(current.value)
    return size


def _tree_depth(node: Node) -> int:
    if isinstance(node.value, dict):
        return 1 + max((_tree_depth(child) for child in node.value.values()), default=0)
    if isinstance(node.value, list):
        return 1 + max((_tree_depth(child) for child in node.value), default=0)
    return 0


def _copy_tree(node: Node, key: str, line: int) -> Node:
    """A copy of `node` placed at `key` (children keyed below it, keeping their lines)."""
    if isinstance(node.value, dict):
        value: Any = {name: _copy_tree(child, join_key(key, name), child.line) for name, child in node.value.items()}
    elif isinstance(node.value, list):
        value = [_copy_tree(child, f"{key}[{i}]", child.line) for i, child in enumerate(node.value)]
    else:
        value = node.value
    return Node(value, node.file, line, key, node.origin)


def _event_parser(text: str) -> Any:
    """A YAML event source: libyaml's when PyYAML has it, else PyYAML's own parser."""
    cparser = getattr(yaml, "CParser", None) or getattr(getattr(yaml, "cyaml", None), "CParser", None)
    return cparser(text) if cparser is not None else yaml.SafeLoader(text)


def compose(text: str, file: str, origin: str | None = None, line: int | None = None,
             key: str = "") -> Node | None:
    """`text` (one YAML document) as a located `Node` tree rooted at `key`; None for an empty stream."""
    check_printable(text, file, origin)
    builder = _TreeBuilder(file, origin, line, key)
    parser = _event_parser(text)
    try:
        while parser.check_event():
            builder.feed(parser.get_event())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = origin or (f"{file}:{mark.line + 1}" if mark else file)
        column = f" (column {mark.column + 1})" if mark and not origin else ""
        raise ConfigError(f"invalid YAML: {_one_line(exc.problem or exc.context or 'syntax error')}{column}",
                          where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {_one_line(str(exc))}", origin or file) from None
    finally:
        parser.dispose()
    return builder.root


def _one_line(text: str) -> str:
    return " ".join(text.split())
