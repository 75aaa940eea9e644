"""Frames, the RFC 2743 first token and ERROR bodies (``handoffd/core/framing.py``).

Layouts are written out here from ``docs/PROTOCOL.md`` (frame header, first-token
prefix, the UUID OID derived by hand) rather than taken from the module.
"""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.core.framing import (
    MAX_FRAME,
    MECH_OID,
    MECH_OID_DER,
    Frame,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_error,
    encode_frame,
    encode_oid,
    read_first_token,
    unwrap_first_token,
    wrap_first_token,
)
from handoffd.minor import Minor
from handoffd.status import GSS_S_BAD_MECH, GSS_S_DEFECTIVE_TOKEN, GSSError

# docs/PROTOCOL.md, "The first token": 60 3d 06 14 <20 bytes of OID contents>
DOC_OID_DER = bytes.fromhex("06146982d2cdb2ed8df0da969d81e4c7c9dfabd3f642")
KERBEROS_OID_DER = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2


def _base128(value: int) -> bytes:
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups.reverse()
    return bytes([0x80 | g for g in groups[:-1]] + [groups[-1]])


def _defect(call: object, minor: Minor, major: int = GSS_S_DEFECTIVE_TOKEN) -> None:
    with pytest.raises(GSSError) as caught:
        call()  # type: ignore[operator]
    assert (caught.value.major, caught.value.minor) == (major, minor), caught.value


# --- OIDs ---------------------------------------------------------------------------


def test_mech_oid_is_the_documented_uuid_oid() -> None:
    number = uuid.UUID("a94d65b4-6f0b-458e-81c9-1e4df574fb42").int
    assert f"2.25.{number}" == MECH_OID
    contents = bytes([40 * 2 + 25]) + _base128(number)
    assert encode_oid(MECH_OID) == contents
    assert MECH_OID_DER == bytes([0x06, len(contents)]) + contents == DOC_OID_DER


@pytest.mark.parametrize(
    ("dotted", "der"),
    [
        ("1.2.840.113554.1.2.2", "2a864886f712010202"),  # Kerberos v5 (RFC 1964)
        ("1.3.6.1.5.5.2", "2b0601050502"),  # SPNEGO (RFC 4178)
        ("2.999.3", "883703"),  # X.690 example: first subidentifier 1079
        ("1.2.127.128", "2a7f8100"),
    ],
)
def test_encode_oid_known_answers(dotted: str, der: str) -> None:
    assert encode_oid(dotted).hex() == der


# --- the first token ----------------------------------------------------------------


def test_first_token_is_the_documented_prefix_and_inner_token() -> None:
    inner = bytes(range(39))  # message 1 is always 39 bytes
    token = wrap_first_token(inner)
    assert token == bytes.fromhex("603d") + DOC_OID_DER + inner
    assert unwrap_first_token(token) == inner
    assert read_first_token(token) == (DOC_OID_DER, inner)


@pytest.mark.parametrize("size", [0, 1, 103, 104, 105, 255, 256, 65535, 70000])
def test_der_lengths_short_and_long_form(size: int) -> None:
    inner = bytes([size % 251]) * size
    token = wrap_first_token(inner)
    body = len(DOC_OID_DER) + size
    if body < 0x80:
        assert token[1] == body
        assert token[2:24] == DOC_OID_DER
    else:
        count = token[1] & 0x7F
        assert token[1] & 0x80 and count == (body.bit_length() + 7) // 8
        assert int.from_bytes(token[2:2 + count], "big") == body
    assert unwrap_first_token(token) == inner


def _framed(length_octets: bytes, body: bytes) -> bytes:
    return b"\x60" + length_octets + body


BODY = DOC_OID_DER + b"msg1"


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"\x60",
        b"\x61" + bytes([len(BODY)]) + BODY,  # not [APPLICATION 0]
        _framed(b"\x80", BODY),  # indefinite length
        _framed(b"\x81" + bytes([len(BODY)]), BODY),  # long form for a short length
        _framed(b"\x82\x00" + bytes([len(BODY)]), BODY),  # leading zero
        _framed(b"\x85" + bytes(4) + bytes([len(BODY)]), BODY),  # more than 4 length bytes
        _framed(b"\x82\x01", BODY),  # length bytes cut short... then mismatch
        _framed(bytes([len(BODY) + 1]), BODY),  # truncated
        _framed(bytes([len(BODY) - 1]), BODY),  # trailing bytes
        _framed(b"\x01", b"\x06"),  # too short for an OID
        _framed(b"\x04", b"\x04\x02ab"),  # not an OID tag
        _framed(b"\x05", b"\x06\x05abc"),  # OID longer than the token
        _framed(b"\x04", b"\x06\x81ab"),  # long-form OID length
    ],
    ids=["empty", "tag-only", "wrong-tag", "indefinite", "non-minimal", "leading-zero",
         "five-length-bytes", "short-length", "truncated", "trailing", "no-oid-room",
         "not-oid", "oid-overruns", "oid-long-form"],
)
def test_malformed_first_tokens_are_bad_framing(token: bytes) -> None:
    _defect(lambda: unwrap_first_token(token), Minor.TOKEN_BAD_FRAMING)


@pytest.mark.parametrize("oid_der", [KERBEROS_OID_DER, b"\x06\x00",
                                     DOC_OID_DER[:-1] + bytes([DOC_OID_DER[-1] ^ 1])])
def test_another_mechanism_is_bad_mech(oid_der: bytes) -> None:
    token = wrap_first_token(b"inner", oid_der=oid_der)
    assert read_first_token(token) == (oid_der, b"inner")
    _defect(lambda: unwrap_first_token(token), Minor.TOKEN_BAD_MECH_OID, GSS_S_BAD_MECH)


@settings(max_examples=300)
@given(st.binary(max_size=80) | st.binary(max_size=40).map(lambda b: b"\x60" + b))
def test_arbitrary_first_tokens_raise_only_gsserror(token: bytes) -> None:
    try:
        inner = unwrap_first_token(token)
    except GSSError as error:
        assert error.major in (GSS_S_DEFECTIVE_TOKEN, GSS_S_BAD_MECH)
    else:
        assert wrap_first_token(inner) == token


# --- frames -------------------------------------------------------------------------


def test_frame_layout() -> None:
    assert encode_frame(FrameType.MESSAGE, b"abc") == b"\x02\x00\x00\x00\x03abc"
    assert encode_frame(FrameType.CLOSE, b"m" * 32) == b"\x04\x00\x00\x00\x20" + b"m" * 32
    assert [int(t) for t in FrameType] == [1, 2, 3, 4]


def test_decoder_reassembles_byte_by_byte_and_keeps_the_rest() -> None:
    frames = [Frame(FrameType.HANDSHAKE, b"h" * 300), Frame(FrameType.MESSAGE, b""),
              Frame(FrameType.ERROR, encode_error(0x000D0000, 616)),
              Frame(FrameType.CLOSE, b"c" * 32)]
    stream = b"".join(encode_frame(f.type, f.body) for f in frames) + b"\x02\x00\x00"
    decoder = FrameDecoder()
    out = []
    for byte in stream:
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == frames
    assert decoder.unread() == b"\x02\x00\x00"


def test_several_frames_in_one_feed_and_unread_payload() -> None:
    decoder = FrameDecoder()
    second = encode_frame(FrameType.MESSAGE, b"two")
    decoder.feed(encode_frame(FrameType.MESSAGE, b"one") + second[:-1])
    decoder.feed(memoryview(b"o!"))
    assert decoder.next_frame() == Frame(FrameType.MESSAGE, b"one")
    assert decoder.unread() == second + b"!"
    assert decoder.next_frame() == Frame(FrameType.MESSAGE, b"two")
    assert decoder.next_frame() is None
    assert decoder.unread() == b"!"


@pytest.mark.parametrize(
    ("header", "minor"),
    [
        (struct.pack(">BI", 0, 0), Minor.TOKEN_BAD_TYPE),
        (struct.pack(">BI", 5, 0), Minor.TOKEN_BAD_TYPE),
        (struct.pack(">BI", 0xFF, 1), Minor.TOKEN_BAD_TYPE),
        (struct.pack(">BI", 2, MAX_FRAME + 1), Minor.TOKEN_TOO_LARGE),
        (struct.pack(">BI", 1, 0xFFFFFFFF), Minor.TOKEN_TOO_LARGE),
        (struct.pack(">BI", 4, 0), Minor.TOKEN_BAD_FRAMING),
        (struct.pack(">BI", 3, 7), Minor.TOKEN_BAD_FRAMING),
        (struct.pack(">BI", 3, 9), Minor.TOKEN_BAD_FRAMING),
    ],
    ids=["type-0", "type-5", "type-255", "over-max", "u32-max", "close-empty", "error-7",
         "error-9"],
)
def test_bad_headers_fail_before_the_body_and_change_nothing(header: bytes, minor: Minor) -> None:
    decoder = FrameDecoder()
    decoder.feed(header)  # no body yet: the header alone is judged
    for _ in range(2):  # and judged the same again: the buffer is untouched
        _defect(decoder.next_frame, minor)
        assert decoder.unread() == header


def test_max_frame_is_inclusive_and_configurable() -> None:
    decoder = FrameDecoder(max_frame=4)
    decoder.feed(encode_frame(FrameType.MESSAGE, b"1234"))
    assert decoder.next_frame() == Frame(FrameType.MESSAGE, b"1234")
    decoder.feed(encode_frame(FrameType.MESSAGE, b"12345"))
    _defect(decoder.next_frame, Minor.TOKEN_TOO_LARGE)
    default = FrameDecoder()
    default.feed(struct.pack(">BI", 2, MAX_FRAME))
    assert default.next_frame() is None  # allowed, waiting for the body
    assert MAX_FRAME == 1_048_576


def test_error_bodies() -> None:
    assert encode_error(0x000F0000, 103) == bytes.fromhex("000f000000000067")
    assert decode_error(bytes.fromhex("000f000000000067")) == (0x000F0000, 103)
    assert encode_error(-1, 1 << 40) == b"\xff\xff\xff\xff\x00\x00\x00\x00"
    for body in (b"", bytes(7), bytes(9)):
        _defect(lambda b=body: decode_error(b), Minor.TOKEN_BAD_FRAMING)  # type: ignore[misc]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=24), max_size=6))
def test_arbitrary_streams_decode_or_raise_gsserror_without_loss(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame=64)
    consumed = b""
    fed = b""
    for chunk in chunks:
        decoder.feed(chunk)
        fed += chunk
        try:
            while (frame := decoder.next_frame()) is not None:
                consumed += encode_frame(frame.type, frame.body)
        except GSSError as error:
            assert error.major == GSS_S_DEFECTIVE_TOKEN
            break
    # Every byte fed is either in a returned frame or still unread, in order.
    assert consumed + decoder.unread() == fed
