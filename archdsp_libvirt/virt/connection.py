"""The libvirt boundary: one place opens connections, one place translates errors.

Every :class:`libvirt.libvirtError` leaving this package's libvirt calls
becomes a :class:`LibvirtFailure` that keeps libvirt's error code and says
what to do. Only transient failures (daemon not up yet, connection closed
by a restarting libvirtd, state-change lock timeouts) are retried.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import libvirt
from lxml import etree

if TYPE_CHECKING:
    from tenacity import Retrying

from ..errors import LibvirtFailure, shown
from .uri import DEFAULT_URI, is_local_uri, resolve_uri  # noqa: F401 - part of this module's API

T = TypeVar("T")


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr unless a handler takes it."""


libvirt.registerErrorHandler(_quiet, None)


_TRANSIENT_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,  # socket connect failed (daemon restarting)
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}
_TRANSIENT_TEXT = re.compile(
    r"(Failed to connect socket|Connection refused|No such file or directory.*sock|"
    r"connection (?:closed|reset)|End of file while reading|Cannot recv data|Cannot write data|"
    r"client socket is closed|Broken pipe|"
    r"Timed out during operation: cannot acquire state change lock|"
    r"cannot acquire state change lock)",
    re.IGNORECASE,
)
_PERMANENT_TEXT = re.compile(r"(Permission denied|authentication|not authorized|Operation not permitted)", re.I)


def is_transient(err: libvirt.libvirtError) -> bool:
    """True for failures that a retry after a short wait may cure."""
    text = str(err)
    if _PERMANENT_TEXT.search(text):
        return False
    code = err.get_error_code()
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return True
    return code in _TRANSIENT_CODES and bool(_TRANSIENT_TEXT.search(text))


def summary(err: libvirt.libvirtError) -> str:
    """libvirt's message on one line, without what it echoes of a file.

    An XML parse error (``VIR_ERR_XML_DETAIL``) is libxml2's ``FILE:LINE: reason`` followed by the
    offending line of the file and a caret under it: with ``-c test:///etc/shadow`` that line is a
    line of /etc/shadow. Only the first line is kept. Any other message keeps its lines, joined with
    `` | ``, and shows a character that does not print as its escape.
    """
    text = (err.get_error_message() or str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if err.get_error_code() == libvirt.VIR_ERR_XML_DETAIL and len(lines) > 1:
        lines = [lines[0] + " (the file's text is not shown)"]
    return shown(" | ".join(lines))


def translate(err: libvirt.libvirtError, uri: str, doing: str) -> LibvirtFailure:
    """The one place a libvirt error becomes ours, with what to do about it."""
    text = summary(err)
    code = err.get_error_code() or 0
    if _PERMANENT_TEXT.search(text) and ("sock" in text or code in (libvirt.VIR_ERR_AUTH_FAILED,
                                                                     libvirt.VIR_ERR_SYSTEM_ERROR)):
        hint = "permission denied: join the libvirt group or use sudo"
    elif re.search(r"Failed to connect socket|No such file or directory.*sock|Connection refused", text):
        hint = f"libvirtd is not running for {uri}: start it (systemctl start libvirtd, or libvirtd -d)"
    elif code == libvirt.VIR_ERR_NO_DOMAIN:
        hint = "no such domain: run 'archdsp-virt up CONFIG' to define it"
    elif code == libvirt.VIR_ERR_OPERATION_INVALID and "already running" in text:
        hint = "the domain is already running"
    elif "host forwarding rule" in text:
        hint = "a forwarded host port is already in use: free it or pick another port in network.hostfwd"
    elif re.search(r"failed to set MSR 0x10a", text, re.I):
        # MSR 0x10a is IA32_ARCH_CAPABILITIES: a nested (or older) KVM host cannot set it for the guest.
        hint = ("the host's KVM cannot give the guest the arch-capabilities MSR (usual under nested KVM): "
                "set cpu_disable_features = [\"arch-capabilities\"]")
    elif "vhost-net was requested" in text:
        # <driver name='vhost'/> (rendered under KVM) on a host without /dev/vhost-net.
        hint = ("the host has no /dev/vhost-net: load it there (modprobe vhost_net), then start again; "
                "without it virtio-net would run in QEMU's main loop")
    elif "hugepages" in text.lower() and ("Cannot allocate memory" in text or "unable to map" in text):
        hint = "the hugepage pool is exhausted: see 'archdsp-virt check' (hugepages.free)"
    elif code == libvirt.VIR_ERR_XML_DETAIL and uri.startswith("test://") and uri[len("test://"):] in text:
        hint = "test:///PATH needs PATH to be a libvirt test-driver XML file, e.g. test:///default"
    else:
        hint = ""
    msg = f"{doing} failed: {text}" + (f" ({hint})" if hint else "")
    return LibvirtFailure(msg, code=code, transient=is_transient(err))


FIRST_WAIT = 0.25  # seconds after the first failure; doubling after each next one, at most 4


def retrying(attempts: int = 6, seconds: float = 30.0, first_wait: float = FIRST_WAIT) -> Retrying:
    """The retry policy for libvirt calls: transient failures only, bounded, with backoff."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

    return Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, LibvirtFailure) and e.transient),
        stop=stop_after_attempt(attempts) | stop_after_delay(seconds),
        wait=wait_exponential(multiplier=first_wait, max=4),
        reraise=True,
    )


def with_retries(attempt: Callable[[], T], attempts: int = 6, seconds: float = 30.0) -> T:
    """``attempt()``; after a transient failure, ``attempt`` again under :func:`retrying`.

    The first attempt runs bare, so a command whose calls all succeed never
    imports tenacity (start-up time is part of every command); the backoff
    and the bounds are those of ``retrying(attempts, seconds)``.
    """
    try:
        return attempt()
    except LibvirtFailure as err:
        if not err.transient or attempts <= 1:
            raise
    time.sleep(FIRST_WAIT)
    return retrying(attempts - 1, seconds, first_wait=2 * FIRST_WAIT)(attempt)


def call(uri: str, doing: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one libvirt call, translating its error once."""
    try:
        return fn(*args)
    except libvirt.libvirtError as err:
        raise translate(err, uri, doing) from None


def _open(uri: str, readonly: bool) -> libvirt.virConnect:
    """Open a libvirt connection the way virsh would (only :class:`Session` opens connections)."""
    return call(uri, f"connecting to {uri}", libvirt.openReadOnly if readonly else libvirt.open, uri)


def quietly(fn: Callable[..., Any], *args: Any) -> None:
    """A best-effort libvirt call whose failure changes nothing (closing, removing a callback)."""
    try:
        fn(*args)
    except libvirt.libvirtError:
        pass


# Errors that mean "this driver or daemon cannot answer that question": no passt, as far as we can tell.
_UNSUPPORTED_CODES = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_INVALID_ARG,  # e.g. no emulator for the host's architecture
}


def _conn_uri(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "libvirt"


def supports_passt(conn: libvirt.virConnect) -> bool:
    """Whether libvirt accepts ``<interface type='user'><backend type='passt'/>``.

    Asked of the domain capabilities where libvirt lists interface backends;
    libvirt that does not list them (Debian 12's 9.0 among them) is taken at
    its version: 9.2 was the first whose QEMU driver took passt.

    Only "not supported" answers count as "no passt"; any other failure (a
    daemon restarting, a dropped connection) is raised as a
    :class:`LibvirtFailure`, transient where it is, so that a session retries
    it instead of silently switching the port-forward backend.
    """
    try:
        caps = etree.fromstring(conn.getDomainCapabilities().encode())
    except libvirt.libvirtError as err:
        if err.get_error_code() not in _UNSUPPORTED_CODES:
            raise translate(err, _conn_uri(conn), "reading domain capabilities") from None
    else:
        values = caps.xpath("/domainCapabilities/devices/interface/enum[@name='backendType']/value/text()")
        if values:
            return "passt" in values
    try:
        return conn.getLibVersion() >= 9_002_000
    except libvirt.libvirtError as err:
        if err.get_error_code() in _UNSUPPORTED_CODES:
            return False
        raise translate(err, _conn_uri(conn), "reading the libvirt version") from None


class Session:
    """A libvirt connection that reconnects and retries transient failures.

    Domain handles do not survive a reconnect, so calls name the domain and
    look it up again on every attempt (see :meth:`dom`).
    """

    def __init__(self, uri: str | None = None, readonly: bool = False,
                 attempts: int = 6, seconds: float = 30.0) -> None:
        self.uri = resolve_uri(uri)
        self.readonly = readonly
        self.attempts = attempts
        self.seconds = seconds
        self._conn: libvirt.virConnect | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self._conn = _open(self.uri, self.readonly)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            quietly(self._conn.close)
        self._conn = None

    def connect(self) -> None:
        """Open the connection now (retrying transient failures as :meth:`run` does)."""
        self.run("connecting", lambda _conn: None)

    def call(self, doing: str, fn: Callable[..., T], *args: Any) -> T:
        """One libvirt call that is not retried (a stream's send, a console's open), translated once."""
        return call(self.uri, doing, fn, *args)

    def run(self, doing: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """``fn(conn)`` with transient failures retried on a fresh connection."""

        def attempt() -> T:
            try:
                return call(self.uri, doing, fn, self.conn)
            except LibvirtFailure as err:
                if err.transient:
                    self._drop()
                raise

        return with_retries(attempt, self.attempts, self.seconds)

    def dom(self, name: str, doing: str, fn: Callable[[libvirt.virDomain], T]) -> T:
        """``fn(domain)`` for the domain called ``name``, looked up on each attempt."""
        return self.run(doing, lambda conn: fn(conn.lookupByName(name)))

    def lookup(self, name: str) -> libvirt.virDomain | None:
        """The domain called ``name``, or None when there is none."""
        try:
            return self.run(f"looking up domain {name}", lambda conn: conn.lookupByName(name))
        except LibvirtFailure as err:
            if err.code == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def is_local(self) -> bool:
        """True when the domain's QEMU runs on this machine (its /proc is ours to read)."""
        return is_local_uri(self.uri)

