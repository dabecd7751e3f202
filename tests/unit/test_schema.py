"""Schema loading, QAPI-worded validation errors, introspection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import qmpd.commands  # noqa: F401
from qmpd.errors import ArgumentError
from qmpd.qmp.dispatch import HANDLERS
from qmpd.schema import Schema, schema_dir


def _int(kind: str, lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "x-qapi-type": kind, "minimum": lo, "maximum": hi}


@pytest.fixture(scope="module")
def test_schema(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    root = tmp_path_factory.mktemp("schema")
    (root / "commands").mkdir()
    (root / "events").mkdir()
    types = {
        "$defs": {
            "Mode": {"type": "string", "enum": ["on", "off"]},
            "Cap": {
                "type": "object",
                "properties": {"capability": {"$ref": "#/$defs/Mode"}, "state": {"type": "boolean"}},
                "required": ["capability", "state"],
                "additionalProperties": False,
            },
            "Child": {
                "type": "object",
                "properties": {"driver": {"type": "string"}, "filename": {"type": "string"}},
                "required": ["driver", "filename"],
                "additionalProperties": False,
            },
            "ChildRef": {
                "x-qapi-alternate": "BlockdevRef",
                "anyOf": [{"$ref": "#/$defs/Child"}, {"type": "string"}],
            },
        }
    }
    (root / "types.json").write_text(json.dumps(types))
    args = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "count": _int("int", -(1 << 63), (1 << 63) - 1),
            "small": _int("int32", -(1 << 31), (1 << 31) - 1),
            "u32": _int("uint32", 0, (1 << 32) - 1),
            "limit": _int("uint64", -(1 << 63), (1 << 64) - 1),
            "mode": {"$ref": "../types.json#/$defs/Mode"},
            "caps": {"type": "array", "items": {"$ref": "../types.json#/$defs/Cap"}},
            "file": {"$ref": "../types.json#/$defs/ChildRef"},
            "flag": {"type": "boolean"},
        },
        "required": ["name"],
        "additionalProperties": False,
    }
    (root / "commands" / "t.json").write_text(json.dumps({"command": "t", "arguments": args}))
    return Schema(root)


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({}, "Parameter 'name' is missing"),
        ({"name": 1}, "Invalid parameter type for 'name', expected: string"),
        ({"name": None}, "Invalid parameter type for 'name', expected: string"),
        ({"name": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"name": "x", "bogus": 1, "count": "y"}, "Invalid parameter type for 'count', expected: integer"),
        ({"bogus": 1}, "Parameter 'name' is missing"),
        ({"name": "x", "count": 2.0}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "x", "count": 1 << 63}, "Invalid parameter type for 'count', expected: integer"),
        ({"name": "x", "small": 1 << 31}, "Parameter 'small' expects int32_t"),
        ({"name": "x", "small": 1.5}, "Invalid parameter type for 'small', expected: integer"),
        ({"name": "x", "u32": -1}, "Parameter 'u32' expects uint32_t"),
        ({"name": "x", "u32": "x"}, "Parameter 'u32' expects uint64"),
        ({"name": "x", "limit": "x"}, "Parameter 'limit' expects uint64"),
        ({"name": "x", "limit": 1 << 64}, "Parameter 'limit' expects uint64"),
        ({"name": "x", "mode": "maybe"}, "Parameter 'mode' does not accept value 'maybe'"),
        ({"name": "x", "mode": 3}, "Invalid parameter type for 'mode', expected: string"),
        ({"name": "x", "flag": 1}, "Invalid parameter type for 'flag', expected: boolean"),
        ({"name": "x", "caps": {}}, "Invalid parameter type for 'caps', expected: array"),
        ({"name": "x", "caps": [{"capability": "bogus"}]},
         "Parameter 'capability' does not accept value 'bogus'"),
        ({"name": "x", "caps": [{"capability": "on"}]}, "Parameter 'caps[0].state' is missing"),
        ({"name": "x", "caps": [{"capability": "on", "state": True, "x": 1}]},
         "Parameter 'caps[0].x' is unexpected"),
        ({"name": "x", "file": 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
        ({"name": "x", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
        ({"name": "x", "file": {"driver": "file", "filename": "f", "foo": 1}},
         "Parameter 'file.foo' is unexpected"),
    ],
)
def test_qapi_wording(test_schema: Schema, args: dict[str, Any], desc: str) -> None:
    with pytest.raises(ArgumentError) as info:
        test_schema.validate_arguments("t", args)
    assert info.value.desc == desc


def test_valid_arguments_pass(test_schema: Schema) -> None:
    test_schema.validate_arguments(
        "t",
        {"name": "x", "count": -5, "u32": 7, "limit": -1, "file": "node0",
         "caps": [{"capability": "off", "state": False}]},
    )


def test_shipped_schema_matches_handlers() -> None:
    schema = Schema()
    assert set(schema.commands) == set(HANDLERS)
    for name in ("STOP", "RESUME", "SHUTDOWN"):
        assert name in schema.events


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ({"enable": None}, "Invalid parameter type for 'enable', expected: array"),
        ({"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
        ({"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
    ],
)
def test_qmp_capabilities_errors(args: dict[str, Any], desc: str) -> None:
    with pytest.raises(ArgumentError) as info:
        Schema().validate_arguments("qmp_capabilities", args)
    assert info.value.desc == desc


def test_introspection_shape() -> None:
    entries = Schema().introspect()
    by_name = {e["name"]: e for e in entries}
    for name in HANDLERS:
        assert by_name[name]["meta-type"] == "command"
    qs = by_name["query-status"]
    ret = by_name[qs["ret-type"]]
    assert ret["meta-type"] == "object"
    assert [m["name"] for m in ret["members"]] == ["running", "singlestep", "status"]
    status_type = by_name[ret["members"][2]["type"]]
    assert status_type["meta-type"] == "enum" and "inmigrate" in status_type["values"]
    caps = by_name[by_name["qmp_capabilities"]["arg-type"]]
    assert caps["members"] == [{"name": "enable", "type": caps["members"][0]["type"], "default": None}]
    assert by_name[caps["members"][0]["type"]]["meta-type"] == "array"
    assert by_name["SHUTDOWN"]["meta-type"] == "event"
    # Type names other than builtins, arrays, commands and events are masked.
    for entry in entries:
        if entry["meta-type"] in ("object", "enum", "alternate"):
            assert entry["name"].isdigit()
    assert by_name["str"] == {"name": "str", "meta-type": "builtin", "json-type": "string"}


def test_schema_files_are_in_one_layout() -> None:
    root = Path(schema_dir())
    for path in (root / "commands").glob("*.json"):
        doc = json.loads(path.read_text())
        assert doc["command"] == path.stem
        if doc.get("boxed"):
            assert "$ref" in doc["arguments"]
            continue
        assert doc["arguments"]["type"] == "object"
        assert doc["arguments"].get("additionalProperties") is False
    for path in (root / "events").glob("*.json"):
        assert json.loads(path.read_text())["event"] == path.stem


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        # Observed on QEMU 7.2 (tests/conformance/golden/extra-arguments.jsonl).
        (["foo", "bar"], "bar"),
        (["a", "b"], "b"),
        (["x", "y", "z"], "z"),
        (["foo", "bar", "baz", "qux"], "baz"),
        ([f"id{i}" for i in range(10)], "id1"),
    ],
)
def test_unexpected_member_named_like_qemu(keys: list[str], named: str) -> None:
    with pytest.raises(ArgumentError) as info:
        Schema().validate_arguments("query-status", dict.fromkeys(keys, 1))
    assert info.value.desc == f"Parameter '{named}' is unexpected"
