"""``handoffd display-status``, run as a real process and in-process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handoffd.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "handoffd", *args],
                          capture_output=True, text=True, check=False)


def test_display_status_prints_one_message_per_line() -> None:
    result = run("display-status", "0x90000")
    assert result.returncode == 0
    assert result.stdout == "Invalid token was supplied\n"


def test_display_status_combined_and_minor() -> None:
    result = run("display-status", "0x03080011", "--minor", "503")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "A parameter was malformed",
        "No context has been established",
        "The routine must be called again to complete its function",
        "An expected per-message token was not received",
        "A handoff message carried no file descriptor",
    ]


def test_display_status_unknown_code_is_a_gss_error() -> None:
    result = run("display-status", "0x130000")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "major 0x00050000" in result.stderr
    assert "An invalid status code was supplied" in result.stderr


def test_display_status_needs_a_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["display-status"]) == 1
    assert "give a major status" in capsys.readouterr().err


def test_display_status_rejects_garbage() -> None:
    result = run("display-status", "zebra")
    assert result.returncode == 2
    assert "not a status code" in result.stderr
    assert run("display-status", "-5").returncode == 2


def test_version_falls_back_to_the_package_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    import handoffd
    from handoffd import cli

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert cli.version() == handoffd.__version__
    monkeypatch.delattr(handoffd, "__version__")
    assert cli.version() == "unknown"


def test_version_option_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    from handoffd import cli

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"handoffd {cli.version()}\n"


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["display-status"]) == 1
    assert capsys.readouterr().err == ("handoffd: display-status: give a major status, "
                                       "--minor N, or both (USAGE_INVALID, minor 623)\n")
