"""Lifecycle flows on libvirt's in-process test driver (a private node per test)."""

from __future__ import annotations

import libvirt
import pytest

from archdsp_libvirt import parse_config
from archdsp_libvirt.virt import lifecycle
from archdsp_libvirt.virt.connection import LibvirtFailure, Session, is_transient
from archdsp_libvirt.errors import ArchdspError
from archdsp_libvirt.domain.build import render_domain
from archdsp_libvirt.service.domain import host_model
from archdsp_libvirt.virt.lifecycle import down, up as lifecycle_up
from archdsp_libvirt.virt.status import format_status, status as status_of

PASST_ACCEPTED = libvirt.getVersion() >= 9_002_000


def up(cfg, session, **kw):
    """``up`` as ``archdsp-virt up`` calls it: on the command's one host model, rendering for it."""
    model = host_model(cfg, session)
    return lifecycle_up(cfg, session, model, lambda uuid: render_domain(cfg, model, uuid=uuid), **kw)


def status(cfg, session):
    return status_of(cfg, session, host_model(cfg, session))


def make_cfg(name, **over):
    data = {"name": name, "isolated_cores": [1], "memory_mb": 256, "boot": {"kernel": "/k"}}
    data.update(over)
    return parse_config(data)


@pytest.fixture
def session(test_uri):
    s = Session(test_uri)
    yield s
    s.close()


def inactive(session, name):
    return session.conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_up_defines_starts_and_sets_autostart(session, unique_name):
    lines = []
    r = up(make_cfg(unique_name), session, say=lines.append)
    dom = session.conn.lookupByName(unique_name)
    assert r.defined == "new" and r.started
    assert dom.isActive() and dom.isPersistent() and dom.autostart()
    assert dom.UUIDString() == r.uuid
    assert any(line.startswith("defined ") for line in lines) and any(line.startswith("started ") for line in lines)
    assert dom.vcpuPinInfo(0)[0][1]  # vCPU 0 may run on core 1
    assert not any(dom.vcpuPinInfo(0)[0][c] for c in (0, 2, 3))


def test_up_again_is_idempotent_and_keeps_the_uuid(session, unique_name):
    cfg = make_cfg(unique_name)
    first = up(cfg, session)
    before = inactive(session, unique_name)
    lines = []
    again = up(cfg, session, say=lines.append)
    assert again.uuid == first.uuid
    assert again.defined == "unchanged" and not again.started
    assert f"{unique_name} is already running" in lines
    assert inactive(session, unique_name) == before


def test_up_after_a_virsh_made_domain_keeps_its_uuid(session, unique_name):
    uuid = "0d4b0a5c-2b7e-4a0f-9f5e-111111111111"
    session.conn.defineXML(f"<domain type='test'><name>{unique_name}</name><uuid>{uuid}</uuid>"
                           "<memory>262144</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    r = up(make_cfg(unique_name), session)
    assert r.uuid == uuid and r.defined == "updated"
    assert "vcpupin" in inactive(session, unique_name)


def test_changed_config_updates_the_definition(session, unique_name):
    up(make_cfg(unique_name), session)
    r = up(make_cfg(unique_name, memory_mb=512), session)
    assert r.defined == "updated"
    assert "<memory unit='KiB'>524288</memory>" in inactive(session, unique_name)


@pytest.mark.skipif(PASST_ACCEPTED, reason="this libvirt accepts the passt backend, so the change is not rejected")
def test_rejected_redefine_leaves_the_old_definition_byte_for_byte(session, unique_name):
    up(make_cfg(unique_name), session)
    before = inactive(session, unique_name)
    bad = make_cfg(unique_name, network={"hostfwd": {"2222": 22}, "port_forward_backend": "passt"})
    with pytest.raises(LibvirtFailure, match="passt"):
        up(bad, session)
    assert inactive(session, unique_name) == before


def test_rejected_first_define_leaves_nothing(session, unique_name):
    if PASST_ACCEPTED:
        pytest.skip("this libvirt accepts the passt backend, so the define is not rejected")
    bad = make_cfg(unique_name, network={"hostfwd": {"2222": 22}, "port_forward_backend": "passt"})
    with pytest.raises(LibvirtFailure):
        up(bad, session)
    assert session.lookup(unique_name) is None


def test_dropped_parts_roll_back_to_the_old_definition(session, unique_name, monkeypatch):
    up(make_cfg(unique_name), session)
    before = inactive(session, unique_name)
    monkeypatch.setattr(lifecycle, "differences", lambda *a, **k: ["vcpupin: config wants [...], libvirt has []"])
    with pytest.raises(ArchdspError, match="did not keep the definition"):
        up(make_cfg(unique_name, memory_mb=512), session)
    assert inactive(session, unique_name) == before


def test_dropped_parts_of_a_new_domain_leave_no_definition(session, unique_name, monkeypatch):
    monkeypatch.setattr(lifecycle, "differences", lambda *a, **k: ["hostdev: lost"])
    with pytest.raises(ArchdspError):
        up(make_cfg(unique_name), session)
    assert session.lookup(unique_name) is None


def test_failed_start_of_a_new_domain_leaves_no_definition(session, unique_name, monkeypatch):
    real_lookup = session.conn.lookupByName

    class Refusing:
        def __init__(self, dom):
            self._dom = dom

        def create(self):
            raise libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor")

        def __getattr__(self, attr):
            return getattr(self._dom, attr)

    conn = session.conn
    monkeypatch.setattr(conn, "lookupByName", lambda n: Refusing(real_lookup(n)))
    with pytest.raises(LibvirtFailure, match="starting"):
        up(make_cfg(unique_name), session)
    monkeypatch.undo()
    assert session.lookup(unique_name) is None


def test_down_shutdown_then_undefine_is_idempotent(session, unique_name):
    cfg = make_cfg(unique_name)
    up(cfg, session)
    r = down(unique_name, session, timeout=5)
    assert r.was == "running" and r.how in ("shutdown", "destroy")
    assert not session.conn.lookupByName(unique_name).isActive()
    assert down(unique_name, session).was == "shut off"
    r = down(unique_name, session, undefine=True)
    assert r.undefined and session.lookup(unique_name) is None
    assert down(unique_name, session).was == "absent"


def test_down_force_destroys_at_once(session, unique_name):
    up(make_cfg(unique_name), session)
    r = down(unique_name, session, force=True)
    assert r.how == "destroy"


def test_status_reports_state_pins_and_drift(session, unique_name):
    cfg = make_cfg(unique_name, isolated_cores=[1, 2])
    info = status(cfg, session)
    assert info["state"] == "not defined" and not info["defined"]
    up(cfg, session)
    info = status(cfg, session)
    assert info["state"] == "running" and info["autostart"]
    assert [v["pinned"] for v in info["vcpus"]] == ["1", "2"]
    assert info["drift"] == []
    # Someone edits the definition behind our back (virsh edit): drift is reported.
    xml = inactive(session, unique_name).replace("<vcpupin vcpu='1' cpuset='2'/>", "<vcpupin vcpu='1' cpuset='3'/>")
    session.conn.defineXML(xml)
    info = status(cfg, session)
    assert any(d.startswith("vcpupin:") for d in info["drift"])
    text = format_status(info)
    assert "=== Drift" in text and "vcpupin" in text


def test_status_shows_why_a_domain_stopped(session, unique_name):
    up(make_cfg(unique_name), session)
    session.conn.lookupByName(unique_name).destroy()
    info = status(make_cfg(unique_name), session)
    assert info["state"] == "shut off" and info["reason"] == "destroyed"


# --- errors and the retry policy ------------------------------------------------------------


def test_no_domain_is_permanent_and_not_retried(session):
    calls = []

    def fn(conn):
        calls.append(1)
        return conn.lookupByName("no-such-domain")

    with pytest.raises(LibvirtFailure) as exc:
        session.run("looking up", fn)
    assert len(calls) == 1
    assert exc.value.code == libvirt.VIR_ERR_NO_DOMAIN
    assert not exc.value.transient


def _socket_error():
    try:
        libvirt.open("qemu+unix:///system?socket=/nonexistent/archdsp-test-sock")
    except libvirt.libvirtError as err:
        return err
    raise AssertionError("connecting to a missing socket succeeded")


def test_daemon_not_up_is_transient_and_says_what_to_do():
    err = _socket_error()
    assert is_transient(err)
    from archdsp_libvirt.virt.connection import translate

    failure = translate(err, "qemu:///system", "connecting")
    assert "libvirtd is not running" in failure.message and failure.transient


def test_transient_failures_are_retried_until_success(session):
    calls = []

    def fn(conn):
        calls.append(1)
        if len(calls) < 3:
            raise _socket_error()
        return conn.getLibVersion()

    assert session.run("asking", fn) > 0
    assert len(calls) == 3


def test_transient_failures_stop_at_the_bound(test_uri):
    s = Session(test_uri, attempts=3, seconds=10)
    calls = []

    def fn(conn):
        calls.append(1)
        raise _socket_error()

    with pytest.raises(LibvirtFailure, match="libvirtd is not running"):
        s.run("asking", fn)
    assert len(calls) == 3


def test_xml_errors_are_not_retried(session):
    calls = []

    def fn(conn):
        calls.append(1)
        return conn.defineXML("<domain type='test'><name>x</name><bogus/></domain>")

    with pytest.raises(LibvirtFailure):
        session.run("defining", fn)
    assert len(calls) == 1


def test_missing_daemon_fails_within_the_bound():
    import time

    s = Session("qemu+unix:///system?socket=/nonexistent/archdsp-test-sock", attempts=4, seconds=5)
    t0 = time.monotonic()
    with pytest.raises(LibvirtFailure, match="libvirtd is not running"):
        s.conn_check = s.run("connecting", lambda c: c.getLibVersion())
    assert time.monotonic() - t0 < 10


# --- up --restart: a new definition that cannot start leaves the old VM running -----------------


class _StartFails:
    """The domain handle, with create() refused the first ``times`` times (QEMU refusing the new definition)."""

    def __init__(self, dom, counter):
        self._dom = dom
        self._counter = counter

    def create(self):
        self._counter["calls"] += 1
        if self._counter["calls"] <= self._counter["fail"]:
            raise libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor")
        return self._dom.create()

    def __getattr__(self, attr):
        return getattr(self._dom, attr)


def _refuse_starts(monkeypatch, session, fail):
    real_lookup = session.conn.lookupByName
    counter = {"calls": 0, "fail": fail}
    monkeypatch.setattr(session.conn, "lookupByName", lambda n: _StartFails(real_lookup(n), counter))
    return counter


def test_restart_whose_new_definition_fails_restores_and_restarts_the_old(session, unique_name, monkeypatch):
    up(make_cfg(unique_name), session)
    before = inactive(session, unique_name)
    counter = _refuse_starts(monkeypatch, session, fail=1)
    lines = []
    with pytest.raises(LibvirtFailure, match="runs it again") as exc:
        up(make_cfg(unique_name, memory_mb=512), session, restart=True, say=lines.append)
    monkeypatch.undo()
    assert "starting" in exc.value.message and exc.value.exit_code == 1
    assert counter["calls"] == 2  # the new definition, then the old one again
    dom = session.conn.lookupByName(unique_name)
    assert dom.isActive(), "the VM must run again, from its previous definition"
    assert inactive(session, unique_name) == before
    assert "<memory unit='KiB'>262144</memory>" in dom.XMLDesc(0)
    assert f"restored the previous definition of {unique_name}" in lines
    assert f"started {unique_name} again from its previous definition" in lines


def test_restart_of_an_already_defined_new_definition_restarts_what_ran(session, unique_name, monkeypatch):
    """An earlier up defined the new definition without --restart: the VM's running one comes back."""
    up(make_cfg(unique_name), session)
    up(make_cfg(unique_name, memory_mb=512), session)  # defined, not applied: the VM runs 256 MiB
    _refuse_starts(monkeypatch, session, fail=1)
    with pytest.raises(LibvirtFailure, match="runs it again"):
        up(make_cfg(unique_name, memory_mb=512), session, restart=True)
    monkeypatch.undo()
    dom = session.conn.lookupByName(unique_name)
    assert dom.isActive()
    assert "<memory unit='KiB'>262144</memory>" in dom.XMLDesc(0)


def test_restart_whose_old_definition_also_fails_says_so(session, unique_name, monkeypatch):
    up(make_cfg(unique_name), session)
    _refuse_starts(monkeypatch, session, fail=2)
    with pytest.raises(LibvirtFailure, match="could not be started again"):
        up(make_cfg(unique_name, memory_mb=512), session, restart=True)
    monkeypatch.undo()
    assert not session.conn.lookupByName(unique_name).isActive()


@pytest.mark.parametrize("restart", [True, False])
def test_a_failing_before_start_hook_restores_the_old_definition(session, unique_name, restart, tmp_path):
    """A pre-start hook that hits a file it may not write (as the bridge's state under /run can):
    one HostError naming the file, the previous definition back, the old VM running again."""
    up(make_cfg(unique_name), session)
    before = inactive(session, unique_name)
    if not restart:
        session.conn.lookupByName(unique_name).destroy()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")

    def hook():
        (blocker / "netjack.stale.json").write_text("{}")  # NotADirectoryError: a real OSError

    lines = []
    with pytest.raises(ArchdspError) as exc:
        up(make_cfg(unique_name, memory_mb=512), session, restart=restart, before_start=hook, say=lines.append)
    msg = exc.value.message
    assert "\n" not in msg and f"before starting {unique_name}" in msg and str(blocker) in msg
    assert "Not a directory" in msg
    assert inactive(session, unique_name) == before
    assert session.conn.lookupByName(unique_name).isActive() == restart
    if restart:
        assert "runs it again" in msg


def test_a_failing_before_start_hook_of_a_new_domain_leaves_no_definition(session, unique_name):
    def hook():
        raise KeyError("master_port")

    with pytest.raises(ArchdspError, match="KeyError"):
        up(make_cfg(unique_name), session, before_start=hook)
    assert session.lookup(unique_name) is None


# --- supports_passt: "not supported" is "no passt", a restarting daemon is not ---------------------


class _CapsConn:
    """A connection whose capability calls fail with a real libvirt error (from a real failing call)."""

    def __init__(self, caps_error=None, version_error=None, version=9_000_000):
        self.caps_error, self.version_error, self.version = caps_error, version_error, version
        self.calls = 0

    def getDomainCapabilities(self):
        self.calls += 1
        if self.caps_error:
            raise self.caps_error
        return "<domainCapabilities/>"

    def getLibVersion(self):
        if self.version_error:
            raise self.version_error
        return self.version

    def getURI(self):
        return "qemu:///system"

    def close(self):
        return 0


def _unsupported_error(test_uri):
    conn = libvirt.open(test_uri)
    try:
        conn.getDomainCapabilities()  # the test driver does not implement it
    except libvirt.libvirtError as err:
        assert err.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
        return err
    finally:
        conn.close()
    raise AssertionError("the test driver answered getDomainCapabilities")


def test_supports_passt_on_a_driver_without_domain_capabilities_falls_back_to_the_version(test_uri):
    from archdsp_libvirt.virt.connection import supports_passt

    conn = libvirt.open(test_uri)
    try:
        assert supports_passt(conn) is (conn.getLibVersion() >= 9_002_000)
    finally:
        conn.close()
    assert supports_passt(_CapsConn(caps_error=_unsupported_error(test_uri), version=9_002_000)) is True
    assert supports_passt(_CapsConn(caps_error=_unsupported_error(test_uri),
                                    version_error=_unsupported_error(test_uri))) is False


def test_supports_passt_raises_a_transient_failure_when_the_daemon_goes_away():
    from archdsp_libvirt.virt.connection import supports_passt

    with pytest.raises(LibvirtFailure) as exc:
        supports_passt(_CapsConn(caps_error=_socket_error()))
    assert exc.value.transient and "libvirtd is not running" in exc.value.message
    with pytest.raises(LibvirtFailure) as exc:
        supports_passt(_CapsConn(caps_error=_socket_error(), version_error=_socket_error()))
    assert exc.value.transient


def test_a_session_retries_supports_passt_on_a_fresh_connection(session):
    from archdsp_libvirt.virt.connection import supports_passt

    dropped = _CapsConn(caps_error=_socket_error(), version=9_002_000)
    session._conn = dropped  # the connection libvirtd closed when it restarted
    answer = session.run("reading domain capabilities", supports_passt)
    assert dropped.calls == 1
    # Answered by the fresh test-driver connection, not by "no passt" from the failed one.
    assert answer is (libvirt.getVersion() >= 9_002_000)
    assert session._conn is not dropped
