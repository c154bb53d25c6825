#!/bin/sh
# /init of the archdsp DSP test guest (busybox sh; copied into the initramfs
# by scripts/build-dsp-guest).  It never exits: PID 1 exiting panics the
# kernel.
#
# The link's settings come from the domain itself, as for every guest
# (docs/guest-contract.md): the SMBIOS type 11 OEM string
#   io.systemd.credential:archdsp.netjack=v=1 master=IP port=N name=S latency=N
#       channels=N sync=0|1 dsp=thru|direct rate=N period=N [ip=A.B.C.D/N]
# that archdsp-virt renders from [archibaldos.netjack], read here from
# /sys/firmware/dmi/entries/11-*/raw (the kernel's CONFIG_DMI_SYSFS):
#   master=IP             NETJACK master's unicast IP (REQUIRED; multicast is
#                         refused: it would follow the default route out)
#   ip=A.B.C.D/N          static address for the NIC (default: DHCP, udhcpc)
#   port=19000            NETJACK UDP port (jackd -d net -p)
#   name=dsp              slave client name (jackd -d net -n); the master then
#                         shows ports NAME:from_slave_N / NAME:to_slave_N
#   latency=0             network latency in periods (jackd -d net -l)
#   channels=2            audio channels each way (jackd -d net -C/-P)
#   dsp=thru              DSP loop: "thru" = Debian's jack_thru pass-through
#                         client (channels 1-2; further channels direct),
#                         "direct" = system:capture_N -> system:playback_N
#   sync=0                1 = run jackd in synchronous mode (jackd -S): the
#                         slave returns a period's output in the same cycle,
#                         so a client in the loop adds no period
#                         Round trip measured with jack_iodelay on the master
#                         (96 kHz, 128-frame periods, TCG guest): thru 256
#                         frames at latency 0 and 384 at 1 ((L+2) periods,
#                         the async slave adds one for a client in the loop);
#                         direct, or thru with sync=1: 128 ((L+1) periods)
#   rate, period          the master's; a NETJACK slave takes them from it
# Link settings on the kernel command line (archdsp.master= ...) are ignored.
#
# Kernel command line: this guest's own knobs, none of them a link setting
# (console=ttyS0 is expected: markers go to /dev/console):
#   archdsp.gw=IP         default gateway with a static address (default none)
#   archdsp.iface=eth0    network interface
#   archdsp.marker=ARCHDSP-READY   ready marker text
#   archdsp.timeout=120   seconds to wait for jackd + master before FAILED
#   archdsp.debug=1       jackd output on the console, kernel log level kept
#   archdsp.shell=1       also start a busybox shell on the console
#   archdsp.rtprio=70     SCHED_FIFO priority of jackd (-P); its clients run
#                         just below it; the virtio IRQ threads get rtprio+5
#                         so packets are taken in while the DSP computes
#
# Changing the link settings at run time (archdsp-virt tune): write
#   LATENCY=N SYNC=0|1 [DELAY=S]
# to /run/archdsp-restart; within a second init stops jackd, waits S seconds
# (default 1; the host drops its master for the old slave meanwhile), starts
# jackd with the new settings (and the DSP client), then prints the marker again.
# /run/archdsp-state says the same for a reader without the console (archdsp-virt through the
# guest agent): "RESTARTING latency=N sync=S", then "READY latency=N sync=S" or "FAILED reason".
#
# While the loop runs, init opens no JACK client (jack_lsp, jack_connect):
# it checks jackd and the DSP client by PID and the master by the NIC's
# receive counter every second, and looks at the ports only when those say
# something changed (or every 5 s while the loop is down).
#
# Console protocol (one line each, nothing periodic):
#   ARCHDSP-READY name=NAME master=IP port=PORT   (the marker; again after a
#                                                  lost master comes back)
#   ARCHDSP-FAILED <reason>
# Other lines start with "archdsp-init:".

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

# ---------------------------------------------------------------- basics ---

hold() {
	# PID 1 must never return.
	while :; do sleep 3600; done
}

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

log() { echo "archdsp-init: $*"; }
# /run/archdsp-state: the console protocol's last word, for a reader without the console (the
# guest agent): READY latency=N sync=0|1 | RESTARTING latency=N sync=0|1 | FAILED <reason>
STATE_FILE=/run/archdsp-state
fail_msg() {
	echo "ARCHDSP-FAILED $*"
	echo "FAILED $*" >"$STATE_FILE" 2>/dev/null
}
fail() {
	# fatal: report once, then keep PID 1 alive
	fail_msg "$@"
	hold
}

# --------------------------------------------------------------- options ---

IP='' GW='' IFACE=eth0 MASTER='' PORT=19000 NAME=dsp LATENCY=0 CHANNELS=2
MARKER=ARCHDSP-READY DSP=thru SYNC=0 TIMEOUT=120 DEBUG=0 SHELL_ON_CONSOLE=0 RTPRIO=70
IGNORED=''
set -f # no globbing of kernel command line words
for w in $(cat /proc/cmdline); do
	case "$w" in
	archdsp.gw=*) GW=${w#*=} ;;
	archdsp.iface=*) IFACE=${w#*=} ;;
	archdsp.marker=*) MARKER=${w#*=} ;;
	archdsp.timeout=*) TIMEOUT=${w#*=} ;;
	archdsp.debug=*) DEBUG=${w#*=} ;;
	archdsp.shell=*) SHELL_ON_CONSOLE=${w#*=} ;;
	archdsp.rtprio=*) RTPRIO=${w#*=} ;;
	archdsp.master=* | archdsp.port=* | archdsp.name=* | archdsp.latency=* | archdsp.channels=* | \
		archdsp.ip=* | archdsp.sync=* | archdsp.dsp=*) IGNORED="$IGNORED ${w%%=*}" ;;
	esac
done
set +f

is_uint() {
	case "$1" in '' | *[!0-9]*) return 1 ;; esac
	[ ${#1} -le 9 ]
}

[ -r /etc/archdsp/build-info ] && log "$(tr '\n' ' ' </etc/archdsp/build-info)"

# --------------------------------------------------------------- modules ---
# (dmi_sysfs among them where it is a module: the link settings below need it)

if [ -f /etc/archdsp/modules ]; then
	while read -r ko; do
		[ -n "$ko" ] || continue
		mod=${ko%.ko}
		[ -d "/sys/module/$mod" ] && continue
		insmod "/lib/modules/archdsp/$ko" || fail "insmod $mod failed"
	done </etc/archdsp/modules
fi

# ----------------------------------------------------- the guest contract ---

# oem_contract DIR: the value of the first archdsp.netjack OEM string under
# DIR (/sys/firmware/dmi/entries).  DIR/11-N/raw is one SMBIOS type 11
# structure: a header (type 11, its length -- 5: the 4-byte header and the
# string count --, a 2-byte handle), the count byte, then the strings, each
# ended by a NUL, the set by one more NUL.
CRED_PREFIX=io.systemd.credential:archdsp.netjack=
oem_contract() {
	for raw in "$1"/11-*/raw; do
		[ -r "$raw" ] || continue
		len=$(od -An -tu1 -j1 -N1 "$raw" | tr -d ' ')
		is_uint "$len" && [ "$len" -ge 5 ] || continue
		tail -c +$((len + 1)) "$raw" | tr '\0' '\n' | while read -r s; do
			case "$s" in "$CRED_PREFIX"*) printf '%s\n' "${s#"$CRED_PREFIX"}" ;; esac
		done
	done | head -n 1
}
# parse_contract VALUE: the link settings of a v=1 value (space-separated
# key=value words); keys it does not know are not this init's (rate, period,
# later ones of v=1).  False when the value is not v=1.
parse_contract() {
	V=''
	set -f
	for kv in $1; do
		case "$kv" in
		v=*) V=${kv#*=} ;;
		master=*) MASTER=${kv#*=} ;;
		ip=*) IP=${kv#*=} ;;
		port=*) PORT=${kv#*=} ;;
		name=*) NAME=${kv#*=} ;;
		latency=*) LATENCY=${kv#*=} ;;
		channels=*) CHANNELS=${kv#*=} ;;
		dsp=*) DSP=${kv#*=} ;;
		sync=*) SYNC=${kv#*=} ;;
		esac
	done
	set +f
	[ "$V" = 1 ]
}
# (end of the contract reader)

# ----------------------------------------------------------- guest agent ---
# The QEMU guest agent on the domain's virtio-serial port org.qemu.guest_agent.0:
# archdsp-virt's rt-test, tune, status and guest check talk to the guest through
# it.  No udev here: the port is found by its name in sysfs, its node
# (/dev/vportNpM) is devtmpfs's.  Started before the link settings are read, so
# that a guest whose link cannot come up can still be looked at.  Restarted when
# it dies, at most AGENT_RESTARTS times.

AGENT_PORT_NAME=org.qemu.guest_agent.0
AGENT_RESTARTS=10
agent_port() {
	for n in /sys/class/virtio-ports/*/name; do
		[ -r "$n" ] || continue
		[ "$(cat "$n")" = "$AGENT_PORT_NAME" ] || continue
		d=${n%/name}
		printf '/dev/%s\n' "${d##*/}"
		return 0
	done
	return 1
}
start_agent() {
	command -v qemu-ga >/dev/null 2>&1 || { log "no qemu-ga in this guest"; return 0; }
	i=0
	port=
	while [ $i -lt 30 ]; do
		port=$(agent_port) && [ -c "$port" ] && break
		port=
		usleep 100000
		i=$((i + 1))
	done
	if [ -z "$port" ]; then
		log "no virtio-serial port $AGENT_PORT_NAME: the guest agent is not started"
		return 0
	fi
	(
		n=0
		while [ $n -lt $AGENT_RESTARTS ]; do
			qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid >>/tmp/qemu-ga.log 2>&1
			n=$((n + 1))
			sleep 1
		done
		echo "archdsp-init: qemu-ga exited $n times, not restarted"
	) </dev/null &
	log "guest agent: qemu-ga on $port ($AGENT_PORT_NAME)"
}
start_agent


DMI_ENTRIES=/sys/firmware/dmi/entries
CONTRACT=$(oem_contract "$DMI_ENTRIES")
if [ -z "$CONTRACT" ]; then
	if [ -d "$DMI_ENTRIES" ]; then
		fail "no SMBIOS OEM string ${CRED_PREFIX}... (the domain's <sysinfo type='smbios'><oemStrings>, rendered by archdsp-virt from [archibaldos.netjack] with <smbios mode='sysinfo'/>)"
	fi
	fail "no $DMI_ENTRIES: this kernel has no CONFIG_DMI_SYSFS (module dmi_sysfs), so the link settings cannot be read"
fi
parse_contract "$CONTRACT" || fail "the OEM string archdsp.netjack is version v=$V; this init reads v=1"
log "link settings from the SMBIOS OEM string archdsp.netjack: $CONTRACT"
[ -z "$IGNORED" ] || log "ignored on the kernel command line (link settings come from the OEM string):$IGNORED"

is_ipv4() {
	case "$1" in *[!0-9.]* | *..* | .* | *.) return 1 ;; esac
	old_ifs=$IFS; IFS=.
	set -f
	set -- $1
	set +f
	IFS=$old_ifs
	[ $# -eq 4 ] || return 1
	for o in "$@"; do is_uint "$o" && [ "$o" -le 255 ] || return 1; done
	return 0
}

case "$MARKER" in '' | *[!A-Za-z0-9._-]*) MARKER=ARCHDSP-READY; log "bad archdsp.marker, using $MARKER" ;; esac
[ -n "$MASTER" ] || fail "no master= in the OEM string archdsp.netjack (the NETJACK master's unicast IP is required)"
is_ipv4 "$MASTER" || fail "master=$MASTER is not an IPv4 address"
first_octet=${MASTER%%.*}
if [ "$first_octet" -ge 224 ] && [ "$first_octet" -le 239 ]; then
	fail "master=$MASTER is multicast; give the master's unicast IP"
fi
is_uint "$PORT" && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || fail "bad port=$PORT"
is_uint "$LATENCY" && [ "$LATENCY" -le 64 ] || fail "bad latency=$LATENCY"
is_uint "$CHANNELS" && [ "$CHANNELS" -ge 1 ] && [ "$CHANNELS" -le 64 ] || fail "bad channels=$CHANNELS"
is_uint "$TIMEOUT" && [ "$TIMEOUT" -ge 1 ] || fail "bad archdsp.timeout=$TIMEOUT"
case "$NAME" in '' | *[!A-Za-z0-9_.-]*) fail "bad name=$NAME (letters, digits, . _ - only)" ;; esac
case "$IFACE" in '' | *[!A-Za-z0-9_.-]*) fail "bad archdsp.iface=$IFACE" ;; esac
case "$DSP" in thru | direct) ;; *) fail "bad dsp=$DSP (thru or direct)" ;; esac
case "$SYNC" in 0 | 1) ;; *) fail "bad sync=$SYNC (0 or 1)" ;; esac
is_uint "$RTPRIO" && [ "$RTPRIO" -ge 1 ] && [ "$RTPRIO" -le 90 ] || fail "bad archdsp.rtprio=$RTPRIO (1-90)"
if [ -n "$IP" ]; then
	case "$IP" in
	*/*) is_ipv4 "${IP%/*}" && is_uint "${IP#*/}" && [ "${IP#*/}" -le 32 ] || fail "bad ip=$IP" ;;
	*) is_ipv4 "$IP" || fail "bad ip=$IP"; IP=$IP/24; log "ip without a prefix length, using $IP" ;;
	esac
fi
[ -z "$GW" ] || is_ipv4 "$GW" || fail "bad archdsp.gw=$GW"

# keep the console for our markers (kernel messages would interleave)
[ "$DEBUG" = 1 ] || dmesg -n 1 2>/dev/null

hostname "$NAME" 2>/dev/null

if [ "$SHELL_ON_CONSOLE" = 1 ]; then
	setsid cttyhack sh </dev/console >/dev/console 2>&1 &
fi

# --------------------------------------------------------------- network ---

ip link set lo up
i=0
while [ ! -e "/sys/class/net/$IFACE" ] && [ $i -lt 100 ]; do
	usleep 100000
	i=$((i + 1))
done
[ -e "/sys/class/net/$IFACE" ] || fail "no network interface $IFACE (have: $(ls /sys/class/net | tr '\n' ' '))"
ip link set "$IFACE" up || fail "cannot bring $IFACE up"
if [ -n "$IP" ]; then
	ip addr add "$IP" dev "$IFACE" || fail "cannot set $IP on $IFACE"
	if [ -n "$GW" ]; then ip route add default via "$GW" dev "$IFACE" || fail "cannot add route via $GW"; fi
	log "$IFACE $IP${GW:+ via $GW}"
else
	udhcpc -i "$IFACE" -n -q -t 6 -T 2 -s /usr/share/udhcpc/default.script >/tmp/udhcpc.log 2>&1 ||
		fail "DHCP on $IFACE failed: $(tail -n 1 /tmp/udhcpc.log)"
	grep '^archdsp-init:' /tmp/udhcpc.log
fi

# ------------------------------------------------------------------ JACK ---

export JACK_NO_AUDIO_RESERVATION=1 JACK_NO_START_SERVER=1 HOME=/root USER=root
JACKD_LOG=/tmp/jackd.log
DSP_LOG=/tmp/dsp.log
THRU=archdsp_thru
JACKD_PID=
THRU_PID=

start_jackd() {
	# -R realtime; the net backend names the master by unicast IP (-a), so
	# no multicast is sent.  MIDI off: the loop is audio only.
	sync_flag=
	[ "$SYNC" = 1 ] && sync_flag=-S
	set -- jackd -R -P "$RTPRIO" $sync_flag -d net -a "$MASTER" -p "$PORT" -n "$NAME" -l "$LATENCY" \
		-C "$CHANNELS" -P "$CHANNELS" -i 0 -o 0
	log "starting: $*"
	if [ "$DEBUG" = 1 ]; then
		"$@" &
	else
		"$@" >>"$JACKD_LOG" 2>&1 &
	fi
	JACKD_PID=$!
}

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# wait_gone TENTHS PID...: until every PID has exited, at most TENTHS tenths
# of a second; then SIGKILL for those left (a JACK client whose server went
# away can hang in its goodbye to it)
wait_gone() {
	local n=$1 i=0 p left
	shift
	while [ $i -lt "$n" ]; do
		left=0
		for p in "$@"; do alive "$p" && left=1; done
		[ $left = 0 ] && return 0
		usleep 100000
		i=$((i + 1))
	done
	for p in "$@"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
	return 0
}

# The virtio IRQ threads (PREEMPT_RT threads every IRQ) above jackd: a packet
# is taken in even while the DSP computes.  No-op without chrt or threaded IRQs.
irq_priorities() {
	command -v chrt >/dev/null 2>&1 || return 0
	for d in /proc/[0-9]*; do
		case "$(cat "$d/comm" 2>/dev/null)" in
		irq/*virtio*) chrt -f -p $((RTPRIO + 5)) "${d#/proc/}" >/dev/null 2>&1 ;;
		esac
	done
}

# restart_requested: /run/archdsp-restart holds "LATENCY=N SYNC=0|1" (tune)
restart_requested() {
	[ -f /run/archdsp-restart ] || return 1
	req=$(cat /run/archdsp-restart)
	rm -f /run/archdsp-restart
	for kv in $req; do
		case "$kv" in
		LATENCY=*) v=${kv#*=}; is_uint "$v" && [ "$v" -le 64 ] && LATENCY=$v ;;
		SYNC=*) v=${kv#*=}; case "$v" in 0 | 1) SYNC=$v ;; esac ;;
		DELAY=*) v=${kv#*=}; is_uint "$v" && [ "$v" -le 30 ] && RESTART_DELAY=$v ;;
		esac
	done
	log "restart requested: latency=$LATENCY sync=$SYNC"
	echo "RESTARTING latency=$LATENCY sync=$SYNC" >"$STATE_FILE"
	return 0
}

# the DSP loop as "source destination" lines
want_pairs() {
	i=1
	while [ $i -le "$CHANNELS" ]; do
		if [ "$DSP" = thru ] && [ "$CHANNELS" -ge 2 ] && [ $i -le 2 ]; then
			echo "system:capture_$i $THRU:input_$i"
			echo "$THRU:output_$i system:playback_$i"
		else
			echo "system:capture_$i system:playback_$i"
		fi
		i=$((i + 1))
	done
}

# connected SRC DST: in the `jack_lsp -c` dump held in $LSP
connected() {
	printf '%s\n' "$LSP" | awk -v a="$1" -v b="$2" '
		/^[^ \t]/ { cur = $0; next }
		{ sub(/^[ \t]+/, ""); if (cur == a && $0 == b) found = 1 }
		END { exit !found }'
}

has_port() { printf '%s\n' "$LSP" | grep -qx "$1"; }

# master_ports: the net driver has created all system ports (it does so
# only once the master has answered)
master_ports() {
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	has_port "system:capture_$CHANNELS" && has_port "system:playback_$CHANNELS"
}

start_dsp_client() {
	[ "$DSP" = thru ] && [ "$CHANNELS" -ge 2 ] || return 0
	alive "$THRU_PID" && return 0
	jack_thru "$THRU" >>"$DSP_LOG" 2>&1 &
	THRU_PID=$!
	i=0
	while [ $i -lt 50 ]; do
		LSP=$(jack_lsp -c 2>/dev/null)
		has_port "$THRU:output_2" && return 0
		alive "$THRU_PID" || break
		usleep 200000
		i=$((i + 1))
	done
	fail_msg "DSP client jack_thru did not start: $(tail -n 2 "$DSP_LOG" | tr '\n' ' ')"
	return 1
}

# ensure_loop: make every wanted connection that is missing; true when the
# whole loop is in place
ensure_loop() {
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	missing=0
	want_pairs >/tmp/pairs
	while read -r src dst; do
		connected "$src" "$dst" && continue
		jack_connect "$src" "$dst" >/dev/null 2>&1
		missing=1
	done </tmp/pairs
	[ $missing = 0 ] && return 0
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	while read -r src dst; do
		connected "$src" "$dst" || return 1
	done </tmp/pairs
	return 0
}

# tick: wait a second without starting a process (busybox read -t on a FIFO
# nobody writes to; sleep 1 where that is not possible)
TICK_FIFO=/run/archdsp-tick
rm -f "$TICK_FIFO"
if mkfifo "$TICK_FIFO" 2>/dev/null && [ -p "$TICK_FIFO" ]; then
	exec 9<>"$TICK_FIFO"
	tick() { read -r -t 1 tick_line <&9 || :; }
else
	tick() { sleep 1; }
fi

# RX: the NIC's received-packet count (a builtin read of sysfs, no process).
# A live NETJACK master sends at least one packet a cycle (750 a second at
# 96 kHz / 128 frames, ~47 at 48 kHz / 1024); fewer than RX_MIN in a second
# means it stopped (what still comes then is ARP and ICMP, a few a second).
RX_MIN=20
rx_packets() {
	RX=0
	read -r RX <"/sys/class/net/$IFACE/statistics/rx_packets" 2>/dev/null
	case "$RX" in '' | *[!0-9]*) RX=0 ;; esac
}

# EVENTS: JACK's own notices of what changed, from a jack_evmon of ours (a
# client with no process callback, so no thread in the cycle) appending to a
# file that the watch reads with the shell's read (no process).  A port that
# goes away or a connection that breaks sets EVENT=1: the net driver drops
# and re-creates its ports when the master restarts, also when that takes
# less than a second (the receive counter misses that; PipeWire's manager
# restarts that fast).
EVMON_LOG=/run/archdsp-evmon.log
EVMON_PID=
start_events() {
	EVENT=0
	command -v jack_evmon >/dev/null 2>&1 || return 0
	: >"$EVMON_LOG"
	exec 8<"$EVMON_LOG"
	# jack_evmon's printf into a file is buffered 4 KiB at a time: stdbuf -oL
	# (coreutils) makes it a line at a time
	stdbuf -oL jack_evmon >>"$EVMON_LOG" 2>&1 &
	EVMON_PID=$!
}
stop_events() {
	alive "$EVMON_PID" && kill "$EVMON_PID" 2>/dev/null
	EVMON_PID=
}
# read_events: consume what jack_evmon wrote since the last call
read_events() {
	EVENT=0
	[ -n "$EVMON_PID" ] || return 0
	alive "$EVMON_PID" || { start_events; EVENT=1; return 0; }
	while read -r ev <&8; do
		case "$ev" in
		"Port "*unregistered | *disconnected) EVENT=1 ;;
		esac
	done
}

# dsp_client_gone: the loop wants a DSP client and its process is gone
dsp_client_gone() {
	[ "$DSP" = thru ] && [ "$CHANNELS" -ge 2 ] && ! alive "$THRU_PID"
}

ready_line() {
	echo "$MARKER name=$NAME master=$MASTER port=$PORT"
	echo "READY latency=$LATENCY sync=$SYNC" >"$STATE_FILE"
}

trim_logs() {
	for f in "$JACKD_LOG" "$DSP_LOG" "$EVMON_LOG"; do
		[ -f "$f" ] && [ "$(stat -c %s "$f" 2>/dev/null || echo 0)" -gt 1048576 ] && : >"$f"
	done
	# read on from the start of a log that was cut
	[ -n "$EVMON_PID" ] && [ ! -s "$EVMON_LOG" ] && exec 8<"$EVMON_LOG"
}

# bring_up: wait (bounded) for jackd and the master, start the DSP client,
# connect the loop; prints the marker or ARCHDSP-FAILED.  0 = ready.
bring_up() {
	t0=$(cut -d. -f1 /proc/uptime)
	server_up=0
	while :; do
		alive "$JACKD_PID" || {
			fail_msg "jackd exited: $(tail -n 3 "$JACKD_LOG" 2>/dev/null | tr '\n' ' ')"
			return 2
		}
		if master_ports; then
			break
		elif [ $server_up = 0 ] && [ -n "$LSP" ]; then
			server_up=1
			log "jackd is up, waiting for the master at $MASTER:$PORT"
		fi
		now=$(cut -d. -f1 /proc/uptime)
		if [ $((now - t0)) -ge "$TIMEOUT" ]; then
			if [ $server_up = 1 ]; then
				fail_msg "no NETJACK master answered at $MASTER:$PORT within ${TIMEOUT}s"
			else
				# jackd -d net only opens its server once a master has
				# answered: a live jackd that is not up is still waiting
				fail_msg "no NETJACK master answered at $MASTER:$PORT within ${TIMEOUT}s (jackd is waiting for it)"
			fi
			return 1
		fi
		sleep 1
	done
	start_dsp_client || return 1
	i=0
	while [ $i -lt 10 ]; do
		if ensure_loop; then
			ready_line
			return 0
		fi
		sleep 1
		i=$((i + 1))
	done
	fail_msg "cannot connect the DSP loop ($(want_pairs | tr '\n' ',' | sed 's/,$//'))"
	return 1
}

MAX_RESTARTS=10
restarts=0
while :; do
	start_jackd
	irq_priorities
	bring_up
	rc=$?
	state=$rc # 0 ready, 1 not ready (jackd running), 2 jackd gone
	# Watch every second, quietly, announcing transitions only.  While the loop
	# is healthy nothing here opens a JACK client (each one is a process start,
	# a client open and a graph reorder in the slave, and cost a burst of
	# xruns on a TCG guest every time): jackd and the DSP client are checked by
	# PID, the master by the NIC's receive counter, ports and connections by
	# JACK's own notices (jack_evmon, see EVENTS).  Only when those say
	# something changed, or while the loop is down, are the ports looked at
	# with jack_lsp and a lost loop re-made (the net driver drops and
	# re-creates its ports when the master goes away and comes back).
	requested=0
	start_events
	rx_packets
	rx_last=$RX
	ticks=0
	last_look=0
	while [ $state != 2 ]; do
		tick
		ticks=$((ticks + 1))
		if restart_requested; then
			requested=1
			# the clients first, while jackd still answers their goodbye (2 s), then jackd (5 s)
			thru=$THRU_PID evmon=$EVMON_PID
			alive "$thru" && kill "$thru" 2>/dev/null
			stop_events
			wait_gone 20 $thru $evmon
			kill "$JACKD_PID" 2>/dev/null
			wait_gone 50 "$JACKD_PID"
			break
		fi
		if ! alive "$JACKD_PID"; then
			fail_msg "jackd exited: $(tail -n 3 "$JACKD_LOG" 2>/dev/null | tr '\n' ' ')"
			state=2
			break
		fi
		[ $((ticks % 60)) = 0 ] && trim_logs
		rx_packets
		rx_new=$((RX - rx_last))
		rx_last=$RX
		since=$((ticks - last_look))
		if [ $state = 0 ]; then
			look=0
			# fewer packets than a live master sends: look (at most every 3 s)
			[ $rx_new -lt $RX_MIN ] && [ $since -ge 3 ] && look=1
			read_events
			[ $EVENT = 1 ] && look=1
			dsp_client_gone && look=1
			[ $look = 1 ] || continue
		else
			[ $since -ge 5 ] || continue
		fi
		last_look=$ticks
		if master_ports; then
			start_dsp_client >/dev/null 2>&1
			if ensure_loop; then
				[ $state = 0 ] || ready_line
				state=0
				read_events # what our own look made (a client, connections)
				continue
			fi
		fi
		[ $state = 0 ] && log "DSP loop lost (master gone?); waiting for it to come back"
		state=1
	done
	thru=$THRU_PID evmon=$EVMON_PID
	alive "$thru" && kill "$thru" 2>/dev/null
	THRU_PID=
	stop_events
	wait_gone 20 $thru $evmon
	if [ $requested = 1 ]; then
		# Let the master drop the old slave first: a stale master keeps sending it
		# audio, and a new slave that binds the port meanwhile spins on those packets.
		sleep "${RESTART_DELAY:-1}"
		continue
	fi
	restarts=$((restarts + 1))
	if [ $restarts -ge $MAX_RESTARTS ]; then
		fail "jackd failed $restarts times, giving up"
	fi
	log "restarting jackd ($restarts/$MAX_RESTARTS)"
	sleep 2
done
hold
