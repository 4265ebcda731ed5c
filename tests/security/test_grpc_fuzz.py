"""Every gRPC method of a real coordinator process, fed random and mutated messages (Hypothesis):
no call ends UNKNOWN, INTERNAL only with an error id and no internal text, and a refused call
changes nothing in the database.

Messages are built from the proto descriptors (every field, random values) or are raw bytes:
random ones, or a valid message with bytes flipped, cut or inserted. Each is sent without a
credential, with a forged one, or with a registered agent's."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_stack import Live
from sqlalchemy import create_engine, text

from fedhl.storage.db import normalise_url
from fedhl.v1 import agent_pb2

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
ERROR_ID = re.compile(r"^internal error \(error id [0-9a-f]{16}\)$")
LEAKS = re.compile(r"(?i)select |insert |update |sqlalchemy|psycopg|traceback|\.py\b|redis")
EXAMPLES = 30  # per method: 7 methods × 30 calls, each between two database snapshots

_INT = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "../../etc/passwd", "x" * 5000, "'; DROP TABLE agents; --", "\x00", "loss", "nan"]),
)


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in _INT:
        return _INT[f.type]
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        width = 32 if f.type == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.floats(width=width, allow_nan=False, allow_infinity=False),
            st.sampled_from(["NaN", "Infinity", "-Infinity"]),
        )
    if f.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values] + [999])
    return _message_json(f.message_type)


def _field(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key).map(str), _scalar(value), max_size=5)
    if f.is_repeated:
        return st.lists(_scalar(f), max_size=4)
    return _scalar(f)


def _message_json(desc: Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    # A oneof takes one member: several would be a ParseError, not a server input.
    oneof_members = {f.name for o in desc.oneofs for f in o.fields}
    plain = {f.name: st.deferred(lambda f=f: _field(f)) for f in desc.fields if f.name not in oneof_members}
    base = st.fixed_dictionaries({}, optional=plain)
    for o in desc.oneofs:
        choice = st.sampled_from(list(o.fields)).flatmap(
            lambda f: st.deferred(lambda f=f: _field(f)).map(lambda v, f=f: {f.name: v})
        )
        base = st.tuples(base, st.one_of(st.just({}), choice)).map(lambda t: {**t[0], **t[1]})
    return base


def _message_bytes(desc: Descriptor, cls: Any) -> st.SearchStrategy[bytes]:
    structured = _message_json(desc).map(lambda d: json_format.ParseDict(d, cls()).SerializeToString())

    def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
        buf = bytearray(data)
        for kind, pos, value in ops:
            at = pos % (len(buf) + 1)
            if kind == 0 and buf:
                buf[at % len(buf)] ^= value or 1
            elif kind == 1:
                buf.insert(at, value)
            elif buf:
                del buf[at % len(buf)]
        return bytes(buf)

    ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)
    return st.one_of(structured, st.builds(mutate, structured, ops), st.binary(max_size=200))


def _snapshot(url: str) -> str:
    """A digest of every row a refused call could touch (agents' liveness columns aside), in the
    live coordinator's database `url`."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as c:
            parts = {
                table: [list(map(str, r)) for r in c.execute(text(query))]
                for table, query in {
                    "tokens": "SELECT id, uses_left, revoked FROM enrolment_tokens ORDER BY id",
                    "agents": "SELECT id, status, rank_override, credential_hash FROM agents ORDER BY id",
                    "jobs": "SELECT id, status, current_round FROM jobs ORDER BY id",
                    "rounds": "SELECT id, state FROM rounds ORDER BY id",
                    "assignments": "SELECT * FROM assignments ORDER BY id",
                    "updates": "SELECT * FROM updates ORDER BY id",
                    "audit": "SELECT count(*) FROM audit_events",
                }.items()
            }
    finally:
        engine.dispose()
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


AUTH = st.sampled_from(["none", "forged", "agent"])


def _metadata(live: Live, auth: str) -> list[tuple[str, str]]:
    if auth == "none":
        return []
    return [("authorization", f"Bearer {live.credential if auth == 'agent' else 'forged-' + 'a' * 40}")]


def _check(code: grpc.StatusCode, details: str | None, changed: bool) -> None:
    details = details or ""
    assert code != grpc.StatusCode.UNKNOWN, details
    if code == grpc.StatusCode.INTERNAL:
        assert ERROR_ID.match(details), details
    assert not LEAKS.search(details), details
    if code != grpc.StatusCode.OK:
        assert not changed, f"a refused call ({code.name}: {details}) changed the database"


def _call(channel: grpc.Channel, method: Any, payload: bytes, md: list[tuple[str, str]]) -> tuple[Any, str | None]:
    path = f"/{SERVICE.full_name}/{method.name}"
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731  (raw bytes both ways)
    try:
        if method.server_streaming:
            it = channel.unary_stream(path, ident, ident)(payload, metadata=md, timeout=3)
            for _ in it:
                pass
        elif method.client_streaming:
            channel.stream_unary(path, ident, ident)(iter([payload, payload]), metadata=md, timeout=3)
        else:
            channel.unary_unary(path, ident, ident)(payload, metadata=md, timeout=3)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, None


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_fuzz_agent_service_method(live: Live, method: Any) -> None:
    cls = getattr(agent_pb2, method.input_type.name)
    with grpc.insecure_channel(live.grpc_target) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(payload=_message_bytes(method.input_type, cls), auth=AUTH)
        def run(payload: bytes, auth: str) -> None:
            before = _snapshot(live.proc.settings.database_url)
            code, details = _call(channel, method, payload, _metadata(live, auth))
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # a long poll that the client cut short: nothing refused
            _check(code, details, _snapshot(live.proc.settings.database_url) != before)

        run()


def test_fuzz_health_service(live: Live) -> None:
    with grpc.insecure_channel(live.grpc_target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", lambda b: b, lambda b: b)

        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(payload=st.binary(max_size=100))
        def run(payload: bytes) -> None:
            try:
                check(payload, timeout=3)
            except grpc.RpcError as e:
                _check(e.code(), e.details(), changed=False)

        run()
