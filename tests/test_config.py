"""The TOML configuration: defaults, validation, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoffd.config import Config, load_config, parse_address, parse_config
from handoffd.minor import Minor
from handoffd.status import GSS_S_FAILURE, GSSError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handoffd.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = parse_config({}, base=Path("/etc/handoffd"))
    assert config == Config()
    assert config.workers.count == 4
    assert config.server.allow_anonymous is True


def test_full_config_and_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
listen = ["0.0.0.0:7443", "[::]:7443"]
key = "keys/server.key"
allowed_clients = "/etc/handoffd/clients"
allow_anonymous = false
handshake_timeout = 2
[workers]
app = "examples.echo.app:handler"
count = 8
keyring = "fallback"
pythonpath = ["src"]
[policy]
worker_uids = [1000]
worker_labels = ["u:r:handoffd_worker_t"]
[control]
metrics = "127.0.0.1:9464"
[log]
format = "json"
""")
    config = load_config(path)
    assert config.server.listen == ("0.0.0.0:7443", "[::]:7443")
    assert config.server.key == tmp_path.resolve() / "keys/server.key"
    assert config.server.allowed_clients == Path("/etc/handoffd/clients")
    assert config.server.handshake_timeout == 2.0
    assert config.workers.pythonpath == (str(tmp_path.resolve() / "src"),)
    assert config.policy.worker_uids == (1000,)
    assert config.log.format == "json"


@pytest.mark.parametrize(("text", "needle"), [
    ("[server]\nlisten = \"x\"", "[server] listen"),
    ("[server]\nlisten = [\"nohost\"]", "host:port"),
    ("[server]\nlisten = [\"::1:80\"]", "brackets"),
    ("[server]\nlisten = [\"1.2.3.4:99999\"]", "port out of range"),
    ("[server]\nkye = \"x\"", "unknown key"),
    ("[sever]\n", "unknown section"),
    ("[workers]\ncount = 0", "needs a register_socket"),
    ("[workers]\ncount = -1", "must not be negative"),
    ("[server]\nallow_anonymous = false", "would refuse every client"),
    ("[workers]\ncount = 2.5", "whole number"),
    ("[workers]\ncount = true", "expected a number"),
    ("[server]\ncontext_lifetime = nan", "[server] context_lifetime: expected a finite"),
    ("[server]\nhandshake_timeout = inf", "finite number"),
    ("[workers]\nack_timeout = -inf", "finite number"),
    ("[workers]\nkeyring = \"maybe\"", "one of auto, keyring, fallback"),
    ("[server]\nallow_anonymous = 1", "true or false"),
    ("[policy]\nworker_uids = [-1]", "non-negative"),
    ("server = 3", "expected a table"),
    ("[server\n", "handoffd.toml"),
])
def test_invalid_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(GSSError) as info:
        load_config(write(tmp_path, text))
    assert info.value.major == GSS_S_FAILURE
    assert info.value.minor == Minor.CONFIG_INVALID
    assert needle in str(info.value)


def test_load_config_errors_name_the_file_then_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = ["nope"]\n')
    with pytest.raises(GSSError) as info:
        load_config(path)
    assert info.value.detail == (f"{path}: [server] listen: 'nope': expected host:port or "
                                 "[ipv6]:port")
    with pytest.raises(GSSError) as info:
        parse_config({"control": {"metrics": "x"}}, base=tmp_path)
    assert info.value.detail == "[control] metrics: 'x': expected host:port or [ipv6]:port"


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(GSSError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.minor == Minor.CONFIG_UNREADABLE
    assert "missing.toml" in str(info.value)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:7443") == ("::1", 7443)
    assert parse_address("localhost:80") == ("localhost", 80)


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3), max_leaves=6)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["server", "workers", "policy", "control", "log", "x"]),
                       st.dictionaries(st.text(max_size=20) | st.sampled_from(
                           ["listen", "count", "key", "app", "metrics", "worker_uids",
                            "keyring", "level"]), toml_values, max_size=4), max_size=4))
def test_arbitrary_documents_give_config_or_config_error(data: dict[str, object]) -> None:
    try:
        parse_config(data, base=Path("/"))
    except GSSError as error:
        assert error.minor == Minor.CONFIG_INVALID
