"""The compiled schema checks agree with jsonschema on accept/reject (issue 10).

Instances are drawn from the shipped schemas themselves (valid-shaped ones,
then mutated: wrong types, members missing or extra, integers out of range,
values outside an enum, the wrong union variant) for every command's
arguments and returns and every event's data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpd.schema import Schema
from qmpd.schema_check import Compiler, SchemaCompileError
from tests.support.tools import REPO

SCHEMA = Schema()
TARGETS = sorted(
    [("arguments", name) for name in SCHEMA.commands]
    + [("returns", name) for name, cmd in SCHEMA.commands.items() if cmd.returns is not None]
    + [("event", name) for name, ev in SCHEMA.events.items() if ev.data is not None]
)
MAX_DEPTH = 4

#: Values of every JSON type, including QAPI's traps (bool is no int, 2.0 no integer).
ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2.0, 1.5, 1 << 63, -(1 << 63) - 1, 1 << 64, "", "x",
    "on", [], [1], ["x"], {}, {"x": 1}, {"driver": "file"},
]


def _root(kind: str, name: str) -> dict[str, Any]:
    if kind == "event":
        data = SCHEMA.events[name].data
        assert data is not None
        return data
    cmd = SCHEMA.commands[name]
    schema = cmd.arguments if kind == "arguments" else cmd.returns
    assert schema is not None
    return schema


def _ints(schema: dict[str, Any]) -> st.SearchStrategy[int]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    edges = [x for x in (lo, hi, 0, 1) if x is not None and (lo is None or x >= lo)
             and (hi is None or x <= hi)]
    return st.one_of(st.sampled_from(edges), st.integers(min_value=lo, max_value=hi))


def instances(schema: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Instances shaped by ``schema`` (mostly valid; if/then/else is not solved)."""
    if not isinstance(schema, dict) or not schema:
        return st.sampled_from(ODD_VALUES)
    schema = SCHEMA.resolve(schema)
    if "anyOf" in schema:
        branches = schema["anyOf"]
        if depth >= MAX_DEPTH:  # prefer the branches that do not nest
            flat = [b for b in branches if "$ref" not in b]
            branches = flat or branches
        return st.one_of([instances(b, depth + 1) for b in branches])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return _ints(schema)
    if kind == "number":
        return st.one_of(st.integers(-(1 << 53), 1 << 53), st.floats(allow_nan=False,
                                                                    allow_infinity=False))
    if kind == "string":
        return st.text(max_size=4)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(instances(schema.get("items", {}), depth + 1), max_size=0 if
                        depth >= MAX_DEPTH else 3)
    if kind == "object" or "properties" in schema:
        return _objects(schema, depth)
    return st.sampled_from(ODD_VALUES)


def _objects(schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    union = schema.get("x-qapi-union")
    if union is None:
        return _members(schema.get("properties", {}), schema.get("required", []), depth)

    @st.composite
    def variant(draw: st.DrawFn) -> dict[str, Any]:
        tag = union["discriminator"]
        case = draw(st.sampled_from(sorted(union["variants"])))
        body = SCHEMA.resolve({"$ref": union["variants"][case]})
        props = {k: v for k, v in schema.get("properties", {}).items() if k != tag}
        props.update(body.get("properties", {}))
        required = [r for r in schema.get("required", []) + body.get("required", []) if r != tag]
        value: dict[str, Any] = {tag: case}
        value.update(draw(_members(props, required, depth)))
        return value

    return variant()


def _members(props: dict[str, Any], required: list[str],
             depth: int) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or (depth < MAX_DEPTH and draw(st.booleans())):
                out[name] = draw(instances(sub, depth + 1))
        return out

    return build()


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, sub in value.items():
            out.extend(_paths(sub, (*path, key)))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out.extend(_paths(sub, (*path, i)))
    return out


def _replace(root: Any, path: tuple[Any, ...], fn: Callable[[Any], Any]) -> Any:
    if not path:
        return fn(root)
    head, rest = path[0], path[1:]
    if isinstance(root, dict):
        copy: Any = dict(root)
    else:
        copy = list(root)
    copy[head] = _replace(root[head], rest, fn)
    return copy


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one thing made wrong (or possibly still right) somewhere."""
    path = draw(st.sampled_from(_paths(value)))
    target: Any = value
    for step in path:
        target = target[step]
    choices = ["type"]
    if isinstance(target, dict):
        choices += ["extra", "drop"] if target else ["extra"]
    if isinstance(target, int) and not isinstance(target, bool):
        choices.append("range")
    if isinstance(target, str):
        choices.append("string")
    how = draw(st.sampled_from(choices))
    if how == "type":
        new = draw(st.sampled_from(ODD_VALUES))
        return _replace(value, path, lambda _old: new)
    if how == "extra":
        key = draw(st.sampled_from(["x-unknown", "driver", "node-name", "data", "type",
                                    "file", "host", "path"]))
        extra = draw(st.sampled_from(ODD_VALUES))
        return _replace(value, path, lambda old: {**old, key: extra})
    if how == "drop":
        key = draw(st.sampled_from(sorted(target)))
        return _replace(value, path, lambda old: {k: v for k, v in old.items() if k != key})
    if how == "range":
        delta = draw(st.sampled_from([-1, 1, 1 << 8, 1 << 16, 1 << 32, 1 << 64, -(1 << 64)]))
        return _replace(value, path, lambda old: old + delta)
    # A string: another enum value or union variant, or one nobody accepts.
    other = draw(st.sampled_from(["no-such-value", "file", "qcow2", "raw", "inet", "unix",
                                  "nbd", "on", "off", ""]))
    return _replace(value, path, lambda _old: other)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str, Any]:
    kind, name = draw(st.sampled_from(TARGETS))
    value = draw(instances(_root(kind, name)))
    if draw(st.integers(0, 2)):
        value = draw(mutated(value))
    return kind, name, value


def _agree(kind: str, name: str, value: Any) -> bool:
    fast = SCHEMA.check(kind, name)(value)
    slow = SCHEMA.validator(kind, name).is_valid(value)
    assert fast == slow, f"{kind} of {name}: compiled says {fast}, jsonschema {slow} " \
                         f"for {json.dumps(value)}"
    return fast


@settings(max_examples=500)
@given(cases())
def test_compiled_checks_agree_with_jsonschema(case: tuple[str, str, Any]) -> None:
    _agree(*case)


@pytest.mark.parametrize(("kind", "name"), TARGETS)
@settings(max_examples=40)
@given(data=st.data())
def test_each_schema_agrees_and_accepts_valid_input(kind: str, name: str,
                                                    data: st.DataObject) -> None:
    value = data.draw(instances(_root(kind, name)))
    _agree(kind, name, value)
    _agree(kind, name, data.draw(mutated(value)))


@pytest.mark.parametrize(("kind", "name"), TARGETS)
def test_generator_reaches_valid_input(kind: str, name: str) -> None:
    """The property tests above see accepted input too, not only rejections."""
    accepted = []

    @settings(max_examples=50, derandomize=True, database=None)
    @given(instances(_root(kind, name)))
    def collect(value: Any) -> None:
        if _agree(kind, name, value):
            accepted.append(value)

    collect()
    assert accepted, f"no valid {kind} of {name} drawn"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ({"driver": "qcow2", "file": "f0"}, True),
        ({"driver": "qcow2", "file": {"driver": "file", "filename": "/x"}}, True),
        ({"driver": "qcow2", "file": {"driver": "file", "filename": "/x", "bogus": 1}}, False),
        ({"driver": "qcow2", "file": "f0", "filename": "/x"}, False),  # file's member
        ({"driver": "file", "filename": "/x", "cache-size": 1}, False),  # qcow2's member
        ({"driver": "qcow2", "file": "f0", "cache-size": True}, False),
        ({"driver": "qcow2", "file": "f0", "cache-size": 2.0}, False),
        ({"driver": "qcow2", "file": "f0", "cache-size": 1 << 63}, False),
        ({"driver": "qcow2", "file": "f0", "cache-size": -(1 << 63)}, True),
        ({"driver": "qcow2"}, False),
        ({"driver": "no-such-driver", "file": "f0"}, False),
        ({"driver": "qcow2", "file": "f0", "backing": None}, True),
        ({"driver": "qcow2", "file": None}, False),
    ],
)
def test_blockdev_add_examples(value: dict[str, Any], valid: bool) -> None:
    assert _agree("arguments", "blockdev-add", value) is valid


def test_compiler_refuses_unknown_keywords() -> None:
    compiler = Compiler({"types.json": {"T": {"type": "string", "pattern": "^a"}}})
    assert compiler.compile({"type": "string"}, "commands/c.json").check("a")
    for schema in (
        {"type": "string", "pattern": "^a"},
        {"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}},
        {"type": "object", "patternProperties": {"^a": {}}},
        {"oneOf": [{"type": "string"}]},
        {"type": "integer", "exclusiveMinimum": 0},
        {"$ref": "../types.json#/$defs/T"},
        {"$ref": "../types.json#/$defs/Missing"},
        {"type": "bogus"},
        {"enum": [1, 2]},
    ):
        with pytest.raises(SchemaCompileError):
            compiler.compile(schema, "commands/c.json")


def test_every_shipped_schema_compiles() -> None:
    schema = Schema()
    for kind, name in TARGETS:
        assert callable(schema.check(kind, name))


def test_valid_input_does_not_import_jsonschema() -> None:
    code = """
import sys
import qmpd.schema
from qmpd.errors import ArgumentError
schema = qmpd.schema.Schema()
schema.validate_arguments("blockdev-add", {"driver": "qcow2", "node-name": "q0",
    "file": {"driver": "file", "node-name": "f0", "filename": "/tmp/x.qcow2"}})
schema.validate_arguments("query-named-block-nodes", {"flat": True})
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jsonschema", "referencing")))
try:
    schema.validate_arguments("blockdev-add", {"driver": "qcow2"})
except ArgumentError as exc:
    print(exc.desc)
print("jsonschema" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout
    assert out.splitlines() == ["[]", "Parameter 'file' is missing", "True"]
