"""Shared fixtures: golden files, private test-driver connections."""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOMAINS = REPO / "domains"
GOLDEN = Path(__file__).resolve().parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.xml from the current renderer instead of comparing",
    )


# The disk-image guest's module (tests/test_real_disk_guest.py) runs last, with the session guest paused
# meanwhile: two TCG guests side by side on a small machine starve each other's audio and take twice as long.
# Its image is built (scripts/build-dsp-guest --disk, about a minute, no libvirtd needed) while the fast tier
# runs: the fast tier goes first, and the first real test waits for the build, so that the build never runs
# beside a TCG guest's audio.
LAST_MODULES = ("test_real_disk_guest.py",)
DISK_MODULE = "test_real_disk_guest.py"
_DISK_BUILD: dict = {}  # the build started at collection: proc, out, err (files), started


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    def real(item) -> bool:
        return item.get_closest_marker("real") is not None

    rest = [item for item in items if item.path.name not in LAST_MODULES]
    last = [item for item in items if item.path.name in LAST_MODULES]
    items[:] = [i for i in rest if not real(i)] + [i for i in rest if real(i)] + last


def disk_guest_dir() -> Path:
    """ARCHDSP_DISK_GUEST_DIR, else a folder keyed on the build script: a suite never boots, or
    overwrites, the image another checkout built."""
    if os.environ.get("ARCHDSP_DISK_GUEST_DIR"):
        return Path(os.environ["ARCHDSP_DISK_GUEST_DIR"])
    digest = hashlib.sha256((REPO / "scripts/build-disk-guest").read_bytes()).hexdigest()[:12]
    return Path(f"/var/lib/archdsp-libvirt/disk-guest-{digest}")


def disk_guest_wanted() -> str | None:
    """Why the disk guest cannot be built here, or None."""
    if os.environ.get("ARCHDSP_DISK_GUEST") == "0":
        return "the disk-image guest is left out: ARCHDSP_DISK_GUEST=0"
    if os.geteuid() != 0:
        return "building the disk-image guest needs root (mmdebstrap --mode=root)"
    if not shutil.which("mmdebstrap"):
        return "mmdebstrap is not installed (scripts/install-test-deps installs it): no disk guest to build"
    return None


def _start_disk_build() -> None:
    out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(["bash", str(REPO / "scripts/build-dsp-guest"), "--disk", "--dir", str(disk_guest_dir())],
                            stdout=out, stderr=err, text=True, start_new_session=True)
    _DISK_BUILD.update(proc=proc, out=out, err=err, started=time.monotonic())


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.path.name == DISK_MODULE for item in session.items) and disk_guest_wanted() is None:
        _start_disk_build()


def disk_build_result(timeout: float = 1800) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of the disk guest's build started at collection (or now)."""
    if not _DISK_BUILD:
        _start_disk_build()
    proc = _DISK_BUILD["proc"]
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_disk_build()
        raise
    texts = []
    for f in (_DISK_BUILD["out"], _DISK_BUILD["err"]):
        f.seek(0)
        texts.append(f.read())
    return rc, texts[0], texts[1], time.monotonic() - _DISK_BUILD["started"]


def _stop_disk_build() -> None:
    proc = _DISK_BUILD.get("proc")
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the build and the mmdebstrap it runs
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def pytest_runtest_setup(item: pytest.Item) -> None:
    proc = _DISK_BUILD.get("proc")
    if proc is not None and proc.poll() is None and item.get_closest_marker("real") is not None:
        try:
            proc.wait(timeout=1800)  # the image is built before any real test runs beside it
        except subprocess.TimeoutExpired:
            _stop_disk_build()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_disk_build()  # a session that ended early (-x, ^C) leaves no build running


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """``golden(name, text)``: exact compare with a unified diff, or rewrite with --regenerate-golden."""
    regenerate = request.config.getoption("--regenerate-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if regenerate:
            path.write_text(text)
            return
        if not path.exists():
            pytest.fail(f"no golden file {path}; run pytest --regenerate-golden and review it")
        expected = path.read_text()
        if text != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True), text.splitlines(keepends=True),
                    fromfile=f"golden/{name}", tofile="rendered",
                )
            )
            pytest.fail(f"rendered XML differs from golden/{name}:\n{diff}")

    return check


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    """A private in-process libvirt test driver (its own empty node), not the shared test:///default."""
    node = tmp_path / "node.xml"
    node.write_text(
        "<node>\n"
        "  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\n"
        "  <memory>8388608</memory>\n"
        "</node>\n"
    )
    return f"test://{node}"


@pytest.fixture
def unique_name() -> str:
    return f"archdsp-test-{uuid.uuid4().hex[:8]}"


# --- the real tier: a real libvirtd with QEMU -------------------------------------------------

SYSTEM_URI = "qemu:///system"
TEST_IMAGES = Path("/var/lib/libvirt/images/archdsp-test")


def _virsh_answers() -> bool:
    if not shutil.which("virsh"):
        return False
    try:
        return subprocess.run(["virsh", "-c", SYSTEM_URI, "version"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def system_libvirt():
    """qemu:///system with libvirtd, virtlogd, hugepages and the default network, started if needed.

    Skips (with the reason) where the machine cannot run QEMU domains. Stops at the end
    of the session only what it started.
    """
    if os.geteuid() != 0:
        pytest.skip("the real tier needs root: it starts libvirtd and QEMU")
    for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/install-test-deps installs it)")
    was_up = _virsh_answers()
    proc = subprocess.run(["bash", str(REPO / "scripts/host-services"), "start"],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"scripts/host-services start failed:\n{proc.stdout}\n{proc.stderr}")
    yield SYSTEM_URI
    if not was_up:
        subprocess.run(["bash", str(REPO / "scripts/host-services"), "stop"], capture_output=True, timeout=120)


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-c", SYSTEM_URI, *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def archdsp(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI for real (a subprocess, as a user would)."""
    import sys

    return subprocess.run([sys.executable, "-m", "archdsp_libvirt", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def remove_domain(name: str) -> None:
    virsh("destroy", name, check=False)
    virsh("undefine", name, "--nvram", check=False)
    virsh("undefine", name, check=False)


SHARED_GUEST_DIR = Path("/var/lib/archdsp-libvirt/guest")  # scripts/demo's, domains/demo-dsp.toml's


def guest_dir() -> Path:
    """Where the suite builds its demo guest: ARCHDSP_GUEST_DIR, else a folder keyed on the guest's
    init and build script, so that two checkouts with different guests (a suite and a demo of another
    tree at the same time) never boot, or overwrite, each other's image."""
    import hashlib

    if os.environ.get("ARCHDSP_GUEST_DIR"):
        return Path(os.environ["ARCHDSP_GUEST_DIR"])
    digest = hashlib.sha256()
    for script in ("scripts/dsp-guest-init.sh", "scripts/build-dsp-guest"):
        digest.update((REPO / script).read_bytes())
    return SHARED_GUEST_DIR.with_name(f"guest-{digest.hexdigest()[:12]}")


def seed_debs(target: Path, shared: Path = SHARED_GUEST_DIR / "debs") -> None:
    """Hard-link the kernel packages already downloaded for the shared guest into ``target``'s cache
    (best effort): a keyed build needs no second download of the same .deb."""
    if target == shared.parent or not shared.is_dir():
        return
    (target / "debs").mkdir(parents=True, exist_ok=True)
    for deb in shared.glob("*.deb"):
        dest = target / "debs" / deb.name
        if not dest.exists():
            try:
                os.link(deb, dest)
            except OSError:
                shutil.copy2(deb, dest)


GUEST_DIR = guest_dir()


@pytest.fixture(scope="session")
def dsp_guest_files(system_libvirt):
    """The demo guest's kernel and initramfs (built from Debian packages; cached between runs, in
    :func:`guest_dir`)."""
    seed_debs(GUEST_DIR)
    proc = subprocess.run(["bash", str(REPO / "scripts/build-dsp-guest"), "--dir", str(GUEST_DIR)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-dsp-guest failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.img"


JACK_SERVER_NAMES = tuple(f"archdsp-test-{n}" for n in range(1, 5))


def jack_server_running(name: str) -> bool:
    """Whether a JACK server called ``name`` answers (never starting one)."""
    if not shutil.which("jack_lsp"):
        return False
    env = {**os.environ, "JACK_NO_START_SERVER": "1", "JACK_NO_AUDIO_RESERVATION": "1"}
    try:
        return subprocess.run(["jack_lsp", "-s", name], capture_output=True, timeout=15, env=env).returncode == 0
    except subprocess.TimeoutExpired:
        return True  # something answers, slowly: not ours to take


def free_jack_server_name(running=jack_server_running) -> str:
    """A JACK server name of this session's own: the first of a few fixed names that no running
    server holds (the demo's server, another session's). Fixed names, not random ones: JACK2
    reclaims the registry slot of a server that died only for a new server of the same name, and
    it has eight slots."""
    for name in JACK_SERVER_NAMES:
        if not running(name):
            return name
    raise RuntimeError(f"every test JACK server name is in use: {', '.join(JACK_SERVER_NAMES)}")


def pick_guest_cores(online: frozenset[int], busy: frozenset[int]) -> tuple[int, bool]:
    """(core for the test guest's vCPU, whether it may run SCHED_FIFO).

    ``busy`` are the cores other running domains' vCPUs are pinned to (the demo's TCG guest keeps
    its FIFO vCPU on core 1 busy). Two FIFO vCPUs of the same priority on one core take turns only
    when one blocks: a TCG guest booting beside the demo's starved it (and was starved by it), and
    never reported ready. So the guest takes a core no other domain's vCPU is pinned to, leaving
    at least one core to the host; where there is none, it shares a core without SCHED_FIFO.
    """
    free = sorted(online - busy)
    for core in reversed(free):
        if online - {core}:
            return core, True
    return max(online), False


def busy_cores(uri: str = SYSTEM_URI, ours: str | None = None) -> frozenset[int]:
    """Cores the vCPUs of the other running domains on ``uri`` may run on."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        cores: set[int] = set()
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if dom.name() == ours:
                continue
            try:
                maps = dom.vcpus()[1]
            except libvirt.libvirtError:
                continue
            for cpumap in maps:
                cores.update(i for i, on in enumerate(cpumap) if on)
        return frozenset(cores)
    finally:
        conn.close()


def free_udp_port(lo: int, hi: int, tries: int = 50, rng=None) -> int:
    """A UDP port in [lo, hi] that nothing holds now: bound once on every address to check (and let go),
    at most ``tries`` random picks."""
    import random
    import socket

    rng = rng or random
    for _ in range(tries):
        port = rng.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free UDP port in {lo}-{hi} after {tries} tries")


def session_guest_text(text: str, name: str, slave: str, port: int, core: int, fifo: bool,
                       kernel: Path | str, initrd: Path | str) -> str:
    """The session's demo guest from domains/demo-dsp.toml's ``text``: a domain name, NETJACK slave name and
    port of its own (so that a running scripts/demo, slave 'dsp' on 19000, is no neighbour it shares a link
    with), its vCPU core, and realtime only where the core is its own."""
    for old, new in (('name = "archdsp-demo"', f'name = "{name}"'), ("source_port = 19000", f"source_port = {port}"),
                     ('client_name = "dsp"', f'client_name = "{slave}"'),
                     ("isolated_cores = [1]", f"isolated_cores = [{core}]"),
                     ("[realtime]\nenable = true", f"[realtime]\nenable = {'true' if fifo else 'false'}"),
                     ("emulator_priority = 3", f"emulator_priority = {3 if fifo else 0}"),
                     ("/var/lib/archdsp-libvirt/guest/vmlinuz", str(kernel)),
                     ("/var/lib/archdsp-libvirt/guest/initrd.img", str(initrd))):
        assert old in text, old
        text = text.replace(old, new)
    return text


SESSION_GUESTS: list[str] = []  # the domain of demo_domain, while it is up


@pytest.fixture(scope="session")
def demo_domain(dsp_guest_files, tmp_path_factory):
    """One TCG demo guest for the whole session (TCG boots are slow), joined to a host JACK
    server of the test's own through the bridge: yields the config path, domain name and server name.

    It coexists with whatever else runs (scripts/demo among them): its own domain name, NETJACK
    port and JACK server name, and a vCPU core no other running domain's vCPU is pinned to
    (:func:`pick_guest_cores`). The link uses the master's unicast address on libvirt's virbr0
    (no multicast, nothing leaves the machine).
    """
    import tomllib
    import uuid as uuidlib

    from archdsp_libvirt.cpuset import parse_cpuset

    tag = uuidlib.uuid4().hex[:6]
    name = f"archdsp-test-demo-{tag}"
    server = free_jack_server_name()
    port = free_udp_port(19100, 19900)
    online = parse_cpuset(Path("/sys/devices/system/cpu/online").read_text())
    core, fifo = pick_guest_cores(online, busy_cores(ours=name))
    text = session_guest_text((DOMAINS / "demo-dsp.toml").read_text(), name, f"dsp-{tag}", port, core, fifo,
                              *dsp_guest_files)
    tomllib.loads(text)
    path = tmp_path_factory.mktemp("demo") / "demo.toml"
    path.write_text(text)
    bridge = archdsp("netjack", "start", "--jack-server", server, "--server", "dummy", str(path), timeout=120)
    if bridge.returncode != 0:
        pytest.fail(f"archdsp-virt netjack start failed:\n{bridge.stdout}\n{bridge.stderr}")
    r = archdsp("-c", SYSTEM_URI, "up", str(path))
    if r.returncode != 0:
        remove_domain(name)
        archdsp("netjack", "stop", str(path))
        pytest.fail(f"archdsp-virt up of the demo guest failed:\n{r.stdout}\n{r.stderr}")
    SESSION_GUESTS.append(name)
    yield path, name, server
    SESSION_GUESTS.remove(name)
    remove_domain(name)
    archdsp("netjack", "stop", str(path))
    for leftover in Path("/run/archdsp-libvirt").glob(f"netjack-{name}.*"):  # the log and lock of this session's name
        leftover.unlink(missing_ok=True)


@pytest.fixture
def kvm_config(system_libvirt, tmp_path, unique_name):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine: the KVM domain cannot run")
    if os.cpu_count() < 2:
        pytest.skip("needs two host cores: core 1 for the vCPU, core 0 for QEMU itself")
    TEST_IMAGES.mkdir(parents=True, exist_ok=True)
    disk = TEST_IMAGES / f"{unique_name}.raw"
    with open(disk, "wb") as fh:
        fh.truncate(1024 * 1024)
    cfg = tmp_path / "kvm.toml"
    cfg.write_text(f"""
name = "{unique_name}"
domain_type = "kvm"
isolated_cores = [1]
memory_mb = 128
hugepages = 64
cpu_disable_features = ["arch-capabilities"]
console_log = "/var/log/libvirt/qemu/{unique_name}-console.log"

[archibaldos]
disk_image = "{disk}"

[realtime]
enable = true
mlock = false
nice = -5

[network]
enable = false
""")
    yield cfg, unique_name
    remove_domain(unique_name)
    disk.unlink(missing_ok=True)


def assert_config_refused(result, path: Path, needles) -> None:
    """A refused config: exit 2, one line on stderr that names the file and holds each needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    err = result.stderr
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"Error: {path}")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


# --- a remote host that is this machine: libvirt's ssh transport to a private sshd on 127.0.0.1 --------------


@pytest.fixture(scope="session")
def remote_uri(system_libvirt, tmp_path_factory):
    """``qemu+ssh://root@127.0.0.1:PORT/system?...``: a private sshd on loopback, with a host key and a
    user key this session makes and removes. 127.0.0.1 is another host to libvirt's URI rules and to
    ours, so every command over this URI must take its host facts from libvirt alone."""
    import random
    import socket
    import time

    for tool in ("sshd", "ssh", "ssh-keygen"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            pytest.skip(f"{tool} is not installed (scripts/install-test-deps installs openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("hostkey", "userkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "userkey.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    proc = None
    for _attempt in range(5):  # a random free port; bounded retries if one is taken
        port = random.randint(30000, 39999)
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
             "-o", "PermitRootLogin=prohibit-password", "-o", f"AuthorizedKeysFile={d}/authorized_keys",
             "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", f"PidFile={d}/sshd.pid",
             "-h", str(d / "hostkey")],
            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        if proc.poll() is None:
            break
    if proc is None or proc.poll() is not None:
        pytest.fail(f"the private sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={d}/userkey&no_verify=1"
    try:
        r = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"virsh over {uri} failed: {r.stderr}\nsshd: {(d / 'sshd.log').read_text()[-2000:]}")
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
