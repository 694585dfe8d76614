"""`_records.py`, the one reader of stored records: round trips, the layout Powertools 3.x
writes, expiry at its exact boundaries, malformed input refused, owner tokens.

Powertools' own cache layer (given a client that only keeps what it is asked to set)
writes the reference JSON.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import select
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, cast

import pytest
from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
    CachePersistenceLayer as PowertoolsCacheLayer,
)
from aws_lambda_powertools.utilities.idempotency.persistence.datarecord import (
    DataRecord as PowertoolsRecord,
)

from aioidempotency._records import (
    DataRecord,
    RecordAttributes,
    RecordStatus,
    new_owner_token,
)
from aioidempotency.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyPersistenceConfigError,
)

KEY = "fn.pay#5d41402abc4b2a76b9719d911017c592"
EXPIRY = 1_700_000_600  # epoch seconds
IN_PROGRESS = 1_700_000_060_123  # epoch milliseconds
HASH = "7d793037a0760186574b0282f2f435e7"
OWNER = "0123456789abcdef0123456789abcdef"
RESULT = '{"paid": 1, "note": "caf\\u00e9"}'
CUSTOM = RecordAttributes(
    status_attr="state",
    expiry_attr="ttl",
    in_progress_expiry_attr="lease_until",
    data_attr="result",
    validation_key_attr="hash",
    owner_attr="owner",
)
DEFAULT = RecordAttributes()
WAIT = 10.0  # seconds: bound on waiting for a forked child


def record(
    status: RecordStatus = RecordStatus.INPROGRESS,
    *,
    in_progress: int | None = IN_PROGRESS,
    payload_hash: str | None = HASH,
    owner: str | None = OWNER,
    data: str | None = None,
    expiry: int = EXPIRY,
) -> DataRecord:
    if data is None and status is RecordStatus.COMPLETED:
        data = RESULT
    return DataRecord(
        KEY,
        status,
        expiry,
        in_progress_expiry_timestamp=in_progress,
        response_data=data,
        payload_hash=payload_hash,
        owner=owner,
    )


def replace(data: DataRecord, **changes: Any) -> DataRecord:
    return dataclasses.replace(data, **changes)


OPTIONAL_FIELDS = list(itertools.product([None, IN_PROGRESS], [None, HASH], [None, OWNER]))


def _id(fields: tuple[int | None, str | None, str | None]) -> str:
    names = ["in_progress", "hash", "owner"]
    return (
        "+".join(name for name, value in zip(names, fields, strict=True) if value is not None)
        or "bare"
    )


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("attributes", [RecordAttributes(), CUSTOM], ids=["default", "custom"])
@pytest.mark.parametrize("fields", OPTIONAL_FIELDS, ids=_id)
@pytest.mark.parametrize("status", [RecordStatus.INPROGRESS, RecordStatus.COMPLETED])
def test_a_record_survives_a_mapping_and_a_json_round_trip(
    attributes: RecordAttributes,
    fields: tuple[int | None, str | None, str | None],
    status: RecordStatus,
) -> None:
    in_progress, payload_hash, owner = fields
    original = record(status, in_progress=in_progress, payload_hash=payload_hash, owner=owner)
    # The owner token is kept on in-progress records only (a completed one needs none).
    expected = original if status is RecordStatus.INPROGRESS else replace(original, owner=None)
    mapping = attributes.to_mapping(original)
    assert set(mapping) <= set(attributes.names())
    assert attributes.from_mapping(KEY, mapping) == expected
    text = attributes.to_json(original)
    assert attributes.from_json(KEY, text) == expected
    assert attributes.from_json(KEY, text.encode()) == expected
    assert json.loads(text) == mapping


def test_an_in_progress_record_stores_no_result_and_a_completed_one_no_owner() -> None:
    attributes = RecordAttributes()
    claim = record(data="ignored")
    assert "data" not in attributes.to_mapping(claim)
    assert attributes.from_json(KEY, attributes.to_json(claim)).response_data is None
    done = record(RecordStatus.COMPLETED)
    assert "owner_token" not in attributes.to_mapping(done)


def test_a_completed_record_without_a_result_keeps_the_data_attribute_as_null() -> None:
    done = replace(record(RecordStatus.COMPLETED), response_data=None)
    assert RecordAttributes().to_json(done).startswith('{"data": null, "status": "COMPLETED"')
    back = RecordAttributes().from_json(KEY, RecordAttributes().to_json(done))
    assert back.response_data is None
    assert back.response_json() is None


def test_a_store_may_hand_numbers_as_decimals_or_floats() -> None:
    """DynamoDB's clients give numbers as `Decimal`; a float is rounded down."""
    attributes = RecordAttributes()
    item: dict[str, Any] = {
        "status": "INPROGRESS",
        "expiration": Decimal(EXPIRY),
        "in_progress_expiration": Decimal(IN_PROGRESS) + Decimal("0.9"),
    }
    back = attributes.from_mapping(KEY, item)
    assert (back.expiry_timestamp, back.in_progress_expiry_timestamp) == (EXPIRY, IN_PROGRESS)
    assert type(back.expiry_timestamp) is int
    assert type(back.in_progress_expiry_timestamp) is int
    item["expiration"] = EXPIRY + 0.999
    assert attributes.from_mapping(KEY, item).expiry_timestamp == EXPIRY
    item["expiration"] = -1.5
    assert attributes.from_mapping(KEY, item).expiry_timestamp == -2


def test_unknown_attributes_are_ignored() -> None:
    attributes = RecordAttributes()
    mapping = {**attributes.to_mapping(record()), "id": KEY, "sort": "x", "extra": [1]}
    assert attributes.from_mapping(KEY, mapping) == record()


def test_the_record_is_read_under_the_key_it_is_given() -> None:
    text = RecordAttributes().to_json(record())
    assert RecordAttributes().from_json("other#key", text).idempotency_key == "other#key"


def test_custom_names_replace_every_default_name() -> None:
    mapping = CUSTOM.to_mapping(record(RecordStatus.COMPLETED))
    assert list(mapping) == ["result", "state", "ttl", "lease_until", "hash"]
    mapping = CUSTOM.to_mapping(record())
    assert list(mapping) == ["state", "ttl", "lease_until", "hash", "owner"]
    # the default names mean nothing to a store with custom names
    with pytest.raises(IdempotencyInvalidStatusError):
        CUSTOM.from_json(KEY, RecordAttributes().to_json(record()))


# -- the layout Powertools writes -------------------------------------------------------


class KeptValues:
    """A cache client for Powertools' layer that keeps each value it is asked to set."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def set(self, name: str, value: str, **options: Any) -> bool:
        self.values.append(value)
        return True

    def get(self, name: str) -> None:
        return None

    def delete(self, *names: str) -> int:
        return 0


def powertools_layer(
    client: KeptValues, attributes: RecordAttributes = DEFAULT
) -> PowertoolsCacheLayer:
    with warnings.catch_warnings():
        # Powertools 3.x deprecates the class under its old name; the alias warns too
        warnings.simplefilter("ignore", DeprecationWarning)
        return PowertoolsCacheLayer(
            client=cast(Any, client),
            status_attr=attributes.status_attr,
            expiry_attr=attributes.expiry_attr,
            in_progress_expiry_attr=attributes.in_progress_expiry_attr,
            data_attr=attributes.data_attr,
            validation_key_attr=attributes.validation_key_attr,
        )


def powertools_text(
    status: RecordStatus,
    *,
    expiry: int,
    in_progress: int | None,
    payload_hash: str | None,
    attributes: RecordAttributes,
) -> str:
    """The JSON text Powertools' cache layer writes for the record (claim or completion)."""
    client = KeptValues()
    layer = powertools_layer(client, attributes)
    layer.payload_validation_enabled = payload_hash is not None
    reference = PowertoolsRecord(
        KEY,
        status=status.value,
        expiry_timestamp=expiry,
        in_progress_expiry_timestamp=in_progress,
        response_data=RESULT,
        payload_hash=payload_hash or "",
    )
    if status is RecordStatus.INPROGRESS:
        layer._put_in_progress_record(reference)
    else:
        layer._update_record(reference)
    assert len(client.values) == 1
    return client.values[0]


@pytest.mark.parametrize("attributes", [RecordAttributes(), CUSTOM], ids=["default", "custom"])
@pytest.mark.parametrize("in_progress", [None, IN_PROGRESS], ids=["no_lease", "lease"])
@pytest.mark.parametrize("payload_hash", [None, HASH], ids=["no_hash", "hash"])
def test_a_claim_without_owner_is_the_text_powertools_writes(
    attributes: RecordAttributes, in_progress: int | None, payload_hash: str | None
) -> None:
    # Powertools computes the status from the wall clock: the expiry must lie ahead.
    expiry = int(time.time()) + 3600
    claim = record(expiry=expiry, in_progress=in_progress, payload_hash=payload_hash, owner=None)
    expected = powertools_text(
        RecordStatus.INPROGRESS,
        expiry=expiry,
        in_progress=in_progress,
        payload_hash=payload_hash,
        attributes=attributes,
    )
    assert attributes.to_json(claim) == expected


@pytest.mark.parametrize("attributes", [RecordAttributes(), CUSTOM], ids=["default", "custom"])
def test_a_claims_owner_token_comes_last_after_what_powertools_writes(
    attributes: RecordAttributes,
) -> None:
    expiry = int(time.time()) + 3600
    claim = record(expiry=expiry)
    reference = powertools_text(
        RecordStatus.INPROGRESS,
        expiry=expiry,
        in_progress=IN_PROGRESS,
        payload_hash=HASH,
        attributes=attributes,
    )
    assert reference.endswith("}")
    assert attributes.to_json(claim) == (
        f'{reference[:-1]}, "{attributes.owner_attr}": "{OWNER}"}}'
    )


@pytest.mark.parametrize("attributes", [RecordAttributes(), CUSTOM], ids=["default", "custom"])
def test_a_completion_is_the_text_powertools_writes_then_its_validation_hash(
    attributes: RecordAttributes,
) -> None:
    expiry = int(time.time()) + 3600
    reference = powertools_text(
        RecordStatus.COMPLETED,
        expiry=expiry,
        in_progress=None,
        payload_hash=HASH,
        attributes=attributes,
    )
    done = record(RecordStatus.COMPLETED, expiry=expiry, in_progress=None, owner=None)
    assert attributes.to_json(replace(done, payload_hash=None)) == reference
    # Powertools 3.x's cache layer drops the hash from a completion; we keep it, last.
    assert attributes.to_json(done) == (
        f'{reference[:-1]}, "{attributes.validation_key_attr}": "{HASH}"}}'
    )


def test_the_exact_text_of_a_claim_and_a_completion() -> None:
    attributes = RecordAttributes()
    assert attributes.to_json(record()) == (
        '{"status": "INPROGRESS", "expiration": 1700000600, '
        '"in_progress_expiration": 1700000060123, '
        '"validation": "7d793037a0760186574b0282f2f435e7", '
        '"owner_token": "0123456789abcdef0123456789abcdef"}'
    )
    assert attributes.to_json(record(RecordStatus.COMPLETED, in_progress=None)) == (
        '{"data": "{\\"paid\\": 1, \\"note\\": \\"caf\\\\u00e9\\"}", '
        '"status": "COMPLETED", "expiration": 1700000600, '
        '"validation": "7d793037a0760186574b0282f2f435e7"}'
    )


@pytest.mark.parametrize("status", [RecordStatus.INPROGRESS, RecordStatus.COMPLETED])
def test_powertools_reads_what_we_write(status: RecordStatus) -> None:
    client = KeptValues()
    layer = powertools_layer(client)
    expiry = int(time.time()) + 3600
    ours = record(status, expiry=expiry)
    theirs = layer._item_to_data_record(KEY, json.loads(RecordAttributes().to_json(ours)))
    assert theirs.status == status.value
    assert theirs.expiry_timestamp == expiry
    assert theirs.in_progress_expiry_timestamp == IN_PROGRESS
    assert theirs.payload_hash == HASH
    assert theirs.response_data == (RESULT if status is RecordStatus.COMPLETED else "")
    if status is RecordStatus.COMPLETED:
        assert theirs.response_json_as_dict() == ours.response_json()


# -- expiry and claims at their boundaries ------------------------------------------------


def test_a_record_expires_after_the_second_of_its_expiry() -> None:
    done = record(RecordStatus.COMPLETED)
    for now in (EXPIRY - 1, EXPIRY, EXPIRY + 0.999999):
        assert not done.is_expired(now), now
        assert not done.is_claimable(now), now
        assert done.status_at(now) is RecordStatus.COMPLETED
    for now in (EXPIRY + 1, EXPIRY + 1.5, EXPIRY + 10**6):
        assert done.is_expired(now), now
        assert done.is_claimable(now), now
        assert done.status_at(now) is RecordStatus.EXPIRED


def test_a_claim_is_orphaned_after_the_millisecond_of_its_in_progress_expiry() -> None:
    claim = record()
    for ms in (IN_PROGRESS - 1000, IN_PROGRESS - 1, IN_PROGRESS):
        now = ms / 1000
        assert not claim.is_orphaned(now), ms
        assert not claim.is_claimable(now), ms
        assert claim.status_at(now) is RecordStatus.INPROGRESS
    # within the millisecond of the expiry the claim still holds
    assert not claim.is_orphaned((IN_PROGRESS + 0.5) / 1000)
    for ms in (IN_PROGRESS + 1, IN_PROGRESS + 2, IN_PROGRESS + 60_000):
        now = ms / 1000
        assert claim.is_orphaned(now), ms
        assert claim.is_claimable(now), ms
        # orphaned is not expired: the record is still in progress until its expiry
        assert claim.status_at(now) is RecordStatus.INPROGRESS


def test_a_claim_without_in_progress_expiry_holds_until_its_record_expires() -> None:
    claim = record(in_progress=None)
    assert not claim.is_orphaned(EXPIRY)
    assert not claim.is_claimable(EXPIRY + 0.5)
    assert claim.is_claimable(EXPIRY + 1)


def test_a_completed_record_is_never_orphaned() -> None:
    done = record(RecordStatus.COMPLETED)  # carries a past in-progress expiry
    assert not done.is_orphaned(IN_PROGRESS / 1000 + 60)
    assert not done.is_claimable(IN_PROGRESS / 1000 + 60)


def test_an_in_progress_record_expires_whatever_its_lease() -> None:
    claim = record(in_progress=(EXPIRY + 600) * 1000)
    assert not claim.is_orphaned(EXPIRY + 1)
    assert claim.is_expired(EXPIRY + 1)
    assert claim.is_claimable(EXPIRY + 1)
    assert claim.status_at(EXPIRY + 1) is RecordStatus.EXPIRED


def test_the_boundaries_of_a_record_read_back_are_the_same() -> None:
    back = CUSTOM.from_json(KEY, CUSTOM.to_json(record()))
    assert not back.is_claimable(IN_PROGRESS / 1000)
    assert back.is_claimable((IN_PROGRESS + 1) / 1000)


# -- malformed input ---------------------------------------------------------------------

VALID: dict[str, Any] = {
    "status": "INPROGRESS",
    "expiration": EXPIRY,
    "in_progress_expiration": IN_PROGRESS,
}

MALFORMED_MAPPINGS: dict[str, Mapping[str, Any]] = {
    "no_status": {"expiration": EXPIRY},
    "unknown_status": {**VALID, "status": "DONE"},
    "lower_case_status": {**VALID, "status": "inprogress"},
    "stored_expired": {**VALID, "status": "EXPIRED"},
    "status_null": {**VALID, "status": None},
    "status_number": {**VALID, "status": 1},
    "status_list": {**VALID, "status": ["INPROGRESS"]},
    "no_expiry": {"status": "COMPLETED", "data": "1"},
    "expiry_null": {**VALID, "expiration": None},
    "expiry_text": {**VALID, "expiration": str(EXPIRY)},
    "expiry_bool": {**VALID, "expiration": True},
    "expiry_list": {**VALID, "expiration": [EXPIRY]},
    "expiry_nan": {**VALID, "expiration": float("nan")},
    "expiry_inf": {**VALID, "expiration": float("inf")},
    "expiry_decimal_nan": {**VALID, "expiration": Decimal("NaN")},
    "expiry_decimal_snan": {**VALID, "expiration": Decimal("sNaN")},
    "expiry_decimal_inf": {**VALID, "expiration": Decimal("-Infinity")},
    "in_progress_text": {**VALID, "in_progress_expiration": "soon"},
    "in_progress_bool": {**VALID, "in_progress_expiration": False},
    "in_progress_inf": {**VALID, "in_progress_expiration": float("-inf")},
    "data_object": {**VALID, "status": "COMPLETED", "data": {"paid": 1}},
    "data_number": {**VALID, "status": "COMPLETED", "data": 1},
}


@pytest.mark.parametrize("attributes", [RecordAttributes(), CUSTOM], ids=["default", "custom"])
@pytest.mark.parametrize("item", MALFORMED_MAPPINGS.values(), ids=list(MALFORMED_MAPPINGS))
def test_a_malformed_mapping_is_refused_naming_the_key(
    attributes: RecordAttributes, item: Mapping[str, Any]
) -> None:
    renamed = dict(zip(RecordAttributes().names(), attributes.names(), strict=True))
    stored = {renamed.get(name, name): value for name, value in item.items()}
    with pytest.raises(IdempotencyInvalidStatusError) as raised:
        attributes.from_mapping(KEY, stored)
    assert repr(KEY) in str(raised.value)


def test_the_message_names_the_attribute_at_fault() -> None:
    cases: dict[str, Mapping[str, Any]] = {
        "'ttl'": {"state": "COMPLETED"},
        "'lease_until'": {"state": "INPROGRESS", "ttl": EXPIRY, "lease_until": "x"},
        "'result'": {"state": "COMPLETED", "ttl": EXPIRY, "result": [1]},
        "'DONE'": {"state": "DONE", "ttl": EXPIRY},
    }
    for name, item in cases.items():
        with pytest.raises(IdempotencyInvalidStatusError, match=name):
            CUSTOM.from_mapping(KEY, item)


MALFORMED_TEXTS: dict[str, str | bytes] = {
    "empty": "",
    "empty_bytes": b"",
    "not_json": "INPROGRESS",
    "truncated": RecordAttributes().to_json(record())[:-1],
    "truncated_bytes": RecordAttributes().to_json(record()).encode()[:-1],
    "not_utf8": b"\xff\xfe\x00{",
    "invalid_utf8": b'{"status": "\xc3\x28"}',
    "array": json.dumps([VALID]),
    "string": json.dumps("INPROGRESS"),
    "number": "1700000600",
    "null": "null",
    "true": "true",
    "nested_too_deep": "[" * 100_000 + "]" * 100_000,
    "object_without_status": json.dumps({"expiration": EXPIRY}),
    "unknown_status": json.dumps({**VALID, "status": "done"}),
    "expiry_text": json.dumps({**VALID, "expiration": "1700000600"}),
    "expiry_too_large": '{"status": "COMPLETED", "expiration": 1e400}',
    "expiry_nan": '{"status": "COMPLETED", "expiration": NaN}',
    "bytes_unknown_status": json.dumps({**VALID, "status": "EXPIRED"}).encode(),
}


@pytest.mark.parametrize("text", MALFORMED_TEXTS.values(), ids=list(MALFORMED_TEXTS))
def test_malformed_json_is_refused_naming_the_key(text: str | bytes) -> None:
    with pytest.raises(IdempotencyInvalidStatusError) as raised:
        RecordAttributes().from_json(KEY, text)
    assert repr(KEY) in str(raised.value)


def test_bytes_and_text_read_alike() -> None:
    text = CUSTOM.to_json(record())
    assert CUSTOM.from_json(KEY, text.encode()) == CUSTOM.from_json(KEY, text)
    non_ascii = replace(record(RecordStatus.COMPLETED), response_data='"café"')
    raw = json.dumps(CUSTOM.to_mapping(non_ascii), ensure_ascii=False)
    assert CUSTOM.from_json(KEY, raw.encode()) == replace(non_ascii, owner=None)
    assert CUSTOM.from_json(KEY, raw.encode()).response_json() == "café"


# -- the names ---------------------------------------------------------------------------


def test_names_are_the_six_in_field_order() -> None:
    assert RecordAttributes().names() == (
        "status",
        "expiration",
        "in_progress_expiration",
        "data",
        "validation",
        "owner_token",
    )
    assert CUSTOM.names() == ("state", "ttl", "lease_until", "result", "hash", "owner")


def test_either_takes_the_object_or_the_keywords_never_both() -> None:
    defaults = RecordAttributes()
    keywords = RecordAttributes(owner_attr="mine", data_attr="result")
    assert RecordAttributes.either(None, keywords) is keywords
    assert RecordAttributes.either(CUSTOM, defaults) is CUSTOM
    with pytest.raises(IdempotencyPersistenceConfigError) as raised:
        RecordAttributes.either(CUSTOM, keywords)
    assert "data_attr='result'" in str(raised.value)
    assert "owner_attr='mine'" in str(raised.value)
    assert "status_attr" not in str(raised.value)
    with pytest.raises(IdempotencyPersistenceConfigError, match="not dict"):
        RecordAttributes.either(cast(Any, {"owner_attr": "x"}), defaults)


# -- owner tokens ------------------------------------------------------------------------


def test_an_owner_token_is_32_lower_case_hex_digits() -> None:
    for _ in range(1000):
        token = new_owner_token()
        assert len(token) == 32
        assert set(token) <= set("0123456789abcdef")
        int(token, 16)
    # leading zeros are kept: 1000 draws of 128 bits would not all start with 1-f
    first = {new_owner_token()[0] for _ in range(2000)}
    assert "0" in first


def test_owner_tokens_do_not_repeat() -> None:
    draws = 200_000
    tokens = {new_owner_token() for _ in range(draws)}
    assert len(tokens) == draws


def in_child(body: Callable[[], bytes]) -> bytes:
    """Fork, run `body` in the child and return what it returned, read through a pipe:
    its end of file says the child is exiting (no polling), within WAIT or it is killed."""
    reader, writer = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # threads of the test process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(reader)
            os.write(writer, body())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    received = b""
    try:
        deadline = time.monotonic() + WAIT
        while True:
            ready, _, _ = select.select([reader], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"child {pid} did not exit within {WAIT} s")
            chunk = os.read(reader, 4096)
            if not chunk:
                break
            received += chunk
    finally:
        os.close(reader)
        _, status = os.waitpid(pid, 0)  # exiting (end of file) or killed
    assert os.waitstatus_to_exitcode(status) == 0
    return received


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_its_parents_tokens() -> None:
    """The generator is reseeded in the child: without it, the child would draw the very
    tokens the parent draws next, and two calls would share an owner token."""
    received = in_child(lambda: "".join(new_owner_token() for _ in range(4)).encode())
    parent = [new_owner_token() for _ in range(4)]
    child = [received[i : i + 32].decode() for i in range(0, len(received), 32)]
    assert len(received) == 4 * 32
    assert all(len(token) == 32 for token in child)
    assert len(set(child)) == 4
    assert not set(child) & set(parent), (child, parent)
