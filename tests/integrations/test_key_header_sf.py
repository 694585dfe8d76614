"""The `Idempotency-Key` header as an RFC 9651 sf-string, parsed with http-sf: what
the hand-written parser it replaced let through, and the reasons a client is given."""

from __future__ import annotations

import pytest

from aioidempotency.integrations._http import InvalidKeyError, parse_idempotency_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ('"abc"; a=1; b="two"; c', "abc"),
        ('  "abc"  ', "abc"),
        ('"~ !#"', "~ !#"),
        (r'"\\"', "\\"),
    ],
)
def test_sf_strings_with_parameters_and_padding(raw: str, key: str) -> None:
    assert parse_idempotency_key([raw]) == key


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('"abc";', "after the quoted key"),  # a parameter needs a name
        ('"abc"; =1', "after the quoted key"),
        ('"abc", "def"', "after the quoted key"),  # a list, not one item
        ('"abc"; a=\u00e9', "after the quoted key"),
        ('"cl\u00e9"', "printable ASCII"),
        ('"a\\\\\u00e9"', "printable ASCII"),  # an escaped backslash, then a bad character
        (r'"a\x"', "escape"),
        ('"a\\', "not terminated"),
    ],
)
def test_what_the_old_parser_let_through_or_misnamed_is_refused_with_a_reason(
    raw: str, reason: str
) -> None:
    with pytest.raises(InvalidKeyError, match=reason) as refused:
        parse_idempotency_key([raw])
    assert type(refused.value.__cause__).__name__ == "StructuredFieldError"
