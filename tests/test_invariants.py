"""Security invariants of the handoff, checked on the real objects.

* No key material in the clear: the HANDOFF message a worker receives holds neither
  traffic key of the context nor the key that opens it (that key is in the keyring).
* Single instantiation: the parked key opens the token once; the exported context
  object is dead.
"""

from __future__ import annotations

import os
import time

import pytest

from bench.common import established_pair
from handoffd.core.context import AcceptorContext, import_context
from handoffd.core.credentials import StaticKeyPair
from handoffd.core.handoff import Handoff
from handoffd.core.seal import open_sealed
from handoffd.kernel.parking import AcceptorParking
from handoffd.minor import Minor
from handoffd.runtime.daemon import prepare_handoff
from handoffd.status import GSS_S_NO_CONTEXT, GSSError

SERVER = StaticKeyPair.generate(os.urandom)


def _traffic_keys(context: AcceptorContext) -> tuple[bytes, bytes]:
    # docs/PER-MESSAGE.md: protection state = version | flags | send_key | recv_key | ...
    assert context._protection is not None
    state = context._protection.export_state()
    return state[2:34], state[34:66]


@pytest.mark.parametrize("mode", ["keyring", "fallback"])
def test_the_handoff_message_carries_no_key_in_the_clear(mode: str) -> None:
    _, server = established_pair(SERVER)
    send_key, recv_key = _traffic_keys(server)
    inner = server.export(unread=b"pipelined")
    assert send_key in inner and recv_key in inner  # the export itself is secret material
    parking = AcceptorParking.open(slots_per_worker=2, mode=mode)
    worker_id = os.urandom(16)
    grant = parking.add_worker(worker_id)
    try:
        for fd in grant.pass_fds:
            os.close(fd)
        key_ref, message = prepare_handoff(parking, worker_id, 1, inner, time.time())
        for secret in (send_key, recv_key, inner, SERVER.private_bytes):
            assert secret not in message
        # ... and the key that opens it is not in the message either: opening the seal
        # with anything derived from the message alone fails.
        handoff = Handoff.decode(message)
        for guess in (handoff.key_ref.ljust(32, b"\0")[:32], bytes(32)):
            with pytest.raises(GSSError):
                open_sealed(guess, handoff.sealed, worker_id=worker_id, now=time.time())
        assert key_ref == handoff.key_ref
    finally:
        parking.close()


def test_an_exported_context_is_single_use() -> None:
    _, server = established_pair(SERVER)
    blob = server.export()
    with pytest.raises(GSSError) as caught:
        server.export()
    assert (caught.value.major, caught.value.minor) == (GSS_S_NO_CONTEXT,
                                                        Minor.CONTEXT_EXPORTED)
    with pytest.raises(GSSError):
        server.wrap(b"the acceptor's copy can no longer speak")
    imported, _ = import_context(blob, clock=time.time)
    assert imported.wrap(b"the worker's can")
