"""The serial console through libvirt's console stream (what ``virsh console`` uses).

libvirt delivers console data only with an event loop running: the default
event implementation is registered before the connection is opened, a
thread runs it, and the stream is non-blocking with a READABLE callback.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time

import libvirt

from .connection import LibvirtFailure, Session, quietly
from ..errors import ArchdspError

ESCAPE = b"\x1d"  # Ctrl-]

_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    """Register and run libvirt's default event loop once per process (before connecting)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class ConsoleStream:
    """A domain's console as a queue of byte chunks (``None`` marks the end)."""

    def __init__(self, session: Session, name: str, force: bool = False) -> None:
        self.session = session
        self.name = name
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        flags = libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else libvirt.VIR_DOMAIN_CONSOLE_SAFE
        doing = f"opening the console of {name}"
        conn = session.conn
        self.stream = session.call(doing, conn.newStream, libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom = session.call(doing, conn.lookupByName, name)
            session.call(doing, dom.openConsole, None, self.stream, flags)
        except LibvirtFailure as err:
            if err.code != libvirt.VIR_ERR_OPERATION_FAILED:  # libvirt's code for "an active console session"
                raise
            raise LibvirtFailure(f"the console of {name} is in use by another session: use --force to take it over",
                                 code=err.code) from None
        session.call(doing, self.stream.eventAddCallback,
            libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP,
            self._on_event,
            None,
        )

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = self.session.call("reading the console", stream.recv, 4096)
                except LibvirtFailure:
                    data = b""  # the stream broke: the end
                if data == -2:  # would block
                    break
                if not data:
                    self._finish()
                    return
                self.chunks.put(bytes(data))
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._finish()

    def _finish(self) -> None:
        quietly(self.stream.eventRemoveCallback)
        self.chunks.put(None)

    def send(self, data: bytes) -> None:
        self.session.call("writing to the console", self.stream.send, data)

    def close(self) -> None:
        quietly(self.stream.eventRemoveCallback)
        quietly(self.stream.finish)


def expect(session: Session, name: str, pattern: str, timeout: float, force: bool = False,
           echo=None, send: bytes | None = None) -> tuple[bool, str]:
    """Read the console until ``pattern`` matches or ``timeout`` s pass: (matched, text seen).

    ``send`` is written to the console once it is attached (e.g. a command for a shell).
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ArchdspError(f"--expect: not a regular expression: {exc}") from None
    cons = ConsoleStream(session, name, force=force)
    if send:
        cons.send(send)
    seen = ""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, seen
            try:
                chunk = cons.chunks.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if chunk is None:
                return bool(regex.search(seen)), seen
            text = chunk.decode("utf-8", "replace")
            if echo:
                echo(text)
            seen += text
            if regex.search(seen):
                return True, seen
    finally:
        cons.close()


def interactive(session: Session, name: str, force: bool = False) -> None:  # pragma: no cover - needs a tty
    """Attach the terminal to the console in raw mode; Ctrl-] leaves."""
    import termios
    import tty

    cons = ConsoleStream(session, name, force=force)
    out = sys.stdout.buffer
    fd = sys.stdin.fileno()
    is_tty = os.isatty(fd)
    saved = termios.tcgetattr(fd) if is_tty else None
    done = threading.Event()

    def pump_out() -> None:
        while True:
            chunk = cons.chunks.get()
            if chunk is None:
                done.set()
                return
            out.write(chunk)
            out.flush()

    threading.Thread(target=pump_out, daemon=True).start()
    sys.stderr.write(f"Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r\n")
    try:
        if is_tty:
            tty.setraw(fd)
        while not done.is_set():
            data = os.read(fd, 1024)
            if not data or ESCAPE in data:
                before = data.split(ESCAPE, 1)[0]
                if before:
                    cons.send(before)
                break
            cons.send(data)
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        cons.close()
        sys.stderr.write("\n")
