"""URIs from -c/--connect and LIBVIRT_DEFAULT_URI: a bad one is one line and exit 2 before libvirt is
asked, and what libvirt echoes of a file it could not parse never reaches the output."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.errors import UsageError
from archdsp_libvirt.virt.connection import Session, summary, translate
from archdsp_libvirt.virt.uri import check_uri, is_local_uri, resolve_uri

CONFIG = Path(__file__).parent.parent / "domains" / "minimal.toml"

BAD_HOSTS = [
    ("bad-ipv6", "qemu://[::zz]/system", "::zz"),
    ("open-bracket", "qemu://[fe80::1/system", "IPv6"),
    ("not-ipv6-in-brackets", "test+unix://[v1.x]/default", "[v1.x]"),
    ("stray-bracket", "qemu://a]b/system", "bracket"),
    ("unbracketed-ipv6", "test+unix://fe80::1/default", "port"),
    ("port-out-of-range", "test+unix://[::1]:99999/default", "port"),
]
CONTROL = [
    ("newline", "test:///default\nfoo", "\\n"),
    ("carriage-return", "test:///default\r", "\\r"),
    ("escape", "test:///\x1b[31mdefault", "\\x1b"),
    ("delete", "test:///default\x7f", "\\x7f"),
    ("line-separator", "test:///default\u2028x", "\\u2028"),
]


def _one_line_usage(result, needle: str, source: str) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert out.count("\n") == 1 and out.startswith("Error: "), repr(out)
    assert source in out and needle in out, out
    assert "internal error" not in out and "Traceback" not in out
    assert all(c.isprintable() for c in out.rstrip("\n")), repr(out)


@pytest.mark.parametrize("uri,needle", [(u, n) for _, u, n in BAD_HOSTS + CONTROL],
                         ids=[i for i, _, _ in BAD_HOSTS + CONTROL])
def test_bad_uri_from_connect_is_one_line_exit_2(uri: str, needle: str) -> None:
    result = CliRunner().invoke(cli, ["-c", uri, "status", str(CONFIG)], env={"LIBVIRT_DEFAULT_URI": None})
    _one_line_usage(result, needle, "-c/--connect")


@pytest.mark.parametrize("uri,needle", [(u, n) for _, u, n in BAD_HOSTS + CONTROL],
                         ids=[i for i, _, _ in BAD_HOSTS + CONTROL])
def test_bad_uri_from_environment_is_one_line_exit_2(uri: str, needle: str) -> None:
    result = CliRunner().invoke(cli, ["status", str(CONFIG)], env={"LIBVIRT_DEFAULT_URI": uri})
    _one_line_usage(result, needle, "LIBVIRT_DEFAULT_URI")


def test_the_fix_is_named() -> None:
    with pytest.raises(UsageError, match=r"brackets, e\.g\. qemu\+ssh://\[fe80::1\]/system"):
        check_uri("qemu://[::zz]/system")
    with pytest.raises(UsageError, match="write it on one line"):
        check_uri("test:///default\nx")


@pytest.mark.parametrize("uri", ["qemu:///system", "test:///default", "qemu+ssh://root@[fe80::1]/system",
                                 "qemu+ssh://[fe80::1%eth0]:2222/system", "qemu+ssh://host.example/system",
                                 "qemu+ssh://[::1]/system?keyfile=/k", "xen://h/", "qemu:///session"])
def test_good_uris_pass_unchanged(uri: str, monkeypatch) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert check_uri(uri) == uri
    assert resolve_uri(uri) == uri
    assert Session(uri).uri == uri


def test_is_local_refuses_a_bad_uri_rather_than_crashing(monkeypatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu://[::zz]/system")
    with pytest.raises(UsageError, match="LIBVIRT_DEFAULT_URI"):
        is_local_uri(None)
    assert is_local_uri("qemu+ssh://[::1]/system") is False


# --- what libvirt echoes ---------------------------------------------------------------------

SECRET = "root:SECRET-HASH:20228:0:99999:7:::"


def _libvirt_error(uri: str) -> libvirt.libvirtError:
    try:
        libvirt.openReadOnly(uri).close()
    except libvirt.libvirtError as err:
        return err
    raise AssertionError(f"{uri} opened")


@pytest.mark.parametrize("text", [SECRET + "\n", "<a>\n<b>" + SECRET + "</c>\n</a>\n", "", "<node>\n" + SECRET])
def test_a_file_libvirt_cannot_parse_is_not_echoed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "shadow"
    path.write_text(text)
    uri = f"test://{path}"
    err = _libvirt_error(uri)
    assert err.get_error_code() == libvirt.VIR_ERR_XML_DETAIL
    assert "\n" in err.get_error_message()  # libvirt echoes the line and a caret under it

    failure = translate(err, uri, f"connecting to {uri}")
    assert failure.code == libvirt.VIR_ERR_XML_DETAIL
    assert "SECRET" not in failure.message and "\n" not in failure.message and "^" not in failure.message
    assert f"{path}:" in failure.message  # libvirt's FILE:LINE: reason stays
    assert "test-driver XML" in failure.message

    result = CliRunner().invoke(cli, ["-c", uri, "status", str(CONFIG)])
    assert result.exit_code == 1, result.output
    assert "SECRET" not in result.output and result.output.count("\n") == 1, result.output
    assert str(path) in result.output


def test_etc_passwd_is_not_printed() -> None:
    first = Path("/etc/passwd").read_text().splitlines()[0]
    result = CliRunner().invoke(cli, ["-c", "test:///etc/passwd", "status", str(CONFIG)])
    assert result.exit_code == 1
    assert first not in result.output and result.output.count("\n") == 1, result.output
    assert "Start tag expected" in result.output


class _Err(libvirt.libvirtError):
    def __init__(self, message: str, code: int) -> None:
        Exception.__init__(self, message)
        self._message, self._code = message, code

    def get_error_message(self) -> str:
        return self._message

    def get_error_code(self) -> int:
        return self._code


def test_other_multi_line_messages_stay_but_on_one_line() -> None:
    err = _Err("internal error: qemu unexpectedly closed the monitor:\n  first\nsecond \x1b[0m", libvirt.VIR_ERR_INTERNAL_ERROR)
    text = summary(err)
    assert text == "internal error: qemu unexpectedly closed the monitor: | first | second \\x1b[0m"
    assert translate(err, "qemu:///system", "starting").code == libvirt.VIR_ERR_INTERNAL_ERROR
