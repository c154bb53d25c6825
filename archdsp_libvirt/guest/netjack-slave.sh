#!/bin/sh
# netjack-slave: this guest's NETJACK slave (JACK2's jackd -d net) on the link to the
# archdsp-libvirt host, started by archdsp-netjack.service. POSIX sh.
#
# The link's settings are in the domain itself, not in this file
# (docs/guest-contract.md): the SMBIOS type 11 OEM string
#   io.systemd.credential:archdsp.netjack=v=1 master=IP port=N name=S latency=N
#       channels=N sync=0|1 dsp=thru|direct rate=N period=N [ip=A.B.C.D/N]
# read at every start, the first found of:
#   $CREDENTIALS_DIRECTORY/archdsp.netjack  systemd >= 252 imports the OEM string
#       as a system credential; the unit passes it on (ImportCredential=,
#       LoadCredential=)
#   /sys/firmware/dmi/entries/11-*/raw       the raw OEM strings, on any kernel
#       with CONFIG_DMI_SYSFS (module dmi_sysfs; root only)
# rate and period are the master's (a slave takes them from it); ip= is left to
# the guest's own network configuration.
#
# It runs
#   jackd -R -P RTPRIO [-S] -d net -a MASTER -p PORT -n NAME -l LATENCY
#         -C CHANNELS -P CHANNELS -i 0 -o 0
# (-S for sync=1; the master named by its unicast address, so no multicast is
# ever sent), then, once the master has answered, the DSP loop:
#   dsp=thru    JACK2's jack_thru as a pass-through client for channels 1-2
#               (further channels direct)
#   dsp=direct  system:capture_N -> system:playback_N
# and makes the loop again whenever JACK says a port or connection went away
# (the net driver re-creates its ports when the master restarts).
#
# Environment (the unit sets them; none of them is a link setting):
#   ARCHDSP_RTPRIO=70               jackd's real-time priority (1-89)
#   ARCHDSP_DSP_CLIENT=archdsp_thru the pass-through client's JACK name
#   ARCHDSP_DMI_ENTRIES=/sys/firmware/dmi/entries
# Exit status: 78 when the settings are missing or not in a form this script
# reads (the unit does not restart it then: RestartPreventExitStatus=78);
# 1 when jackd exits (the unit restarts it); 0 on SIGTERM.

set -u

CRED=archdsp.netjack
CRED_PREFIX=io.systemd.credential:$CRED=
RTPRIO=${ARCHDSP_RTPRIO:-70}
THRU=${ARCHDSP_DSP_CLIENT:-archdsp_thru}
DMI_ENTRIES=${ARCHDSP_DMI_ENTRIES:-/sys/firmware/dmi/entries}
EX_CONFIG=78
export JACK_NO_AUDIO_RESERVATION=1 JACK_NO_START_SERVER=1

log() { printf 'archdsp-netjack: %s\n' "$*" >&2; }
refuse() {
	log "$*"
	exit $EX_CONFIG
}
is_uint() {
	case "$1" in '' | *[!0-9]*) return 1 ;; esac
	[ ${#1} -le 9 ]
}

# ----------------------------------------------------- the guest contract ---

# oem_contract DIR: the value of the first archdsp.netjack OEM string under
# DIR. DIR/11-N/raw is one SMBIOS type 11 structure: a header (type 11, its
# length -- 5: the 4-byte header and the string count --, a 2-byte handle),
# the count byte, then the strings, each ended by a NUL, the set by one more.
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

# read_contract: VALUE and SOURCE, from the credential or else the DMI tables
read_contract() {
	VALUE=
	if [ -n "${CREDENTIALS_DIRECTORY:-}" ] && [ -r "$CREDENTIALS_DIRECTORY/$CRED" ]; then
		VALUE=$(head -n 1 "$CREDENTIALS_DIRECTORY/$CRED")
		SOURCE="the credential $CRED"
	fi
	if [ -z "$VALUE" ]; then
		VALUE=$(oem_contract "$DMI_ENTRIES")
		SOURCE="the SMBIOS OEM string in $DMI_ENTRIES"
	fi
	[ -n "$VALUE" ] && return 0
	if [ -d "$DMI_ENTRIES" ]; then
		refuse "no link settings: neither the credential $CRED nor an OEM string ${CRED_PREFIX}... in" \
			"$DMI_ENTRIES (render the domain with archdsp-virt from a config with [archibaldos.netjack] enable = true;" \
			"reading $DMI_ENTRIES needs root)"
	fi
	refuse "no link settings: no credential $CRED (systemd >= 252 imports it) and no $DMI_ENTRIES" \
		"(a kernel without CONFIG_DMI_SYSFS: load the dmi_sysfs module)"
}

# parse_contract VALUE: the link settings of a v=1 value (space-separated
# key=value words); keys it does not know are ignored (rate, period, ip and
# later ones of v=1). False when the value is not v=1.
parse_contract() {
	V='' MASTER='' PORT='' NAME='' LATENCY='' CHANNELS='' DSP='' SYNC=''
	set -f
	for kv in $1; do
		case "$kv" in
		v=*) V=${kv#*=} ;;
		master=*) MASTER=${kv#*=} ;;
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

is_ipv4() {
	case "$1" in *[!0-9.]* | *..* | .* | *.) return 1 ;; esac
	old_ifs=$IFS
	IFS=.
	set -f
	# shellcheck disable=SC2086 # split on the dots
	set -- $1
	set +f
	IFS=$old_ifs
	[ $# -eq 4 ] || return 1
	for o in "$@"; do is_uint "$o" && [ "$o" -le 255 ] || return 1; done
	return 0
}

check_settings() {
	[ -n "$MASTER" ] || refuse "no master= in $SOURCE (the NETJACK master's unicast IPv4 address is required)"
	is_ipv4 "$MASTER" || refuse "master=$MASTER in $SOURCE is not an IPv4 address"
	first_octet=${MASTER%%.*}
	if [ "$first_octet" -ge 224 ] || [ "$first_octet" = 0 ] || [ "$MASTER" = 255.255.255.255 ]; then
		refuse "master=$MASTER in $SOURCE is not a unicast address (multicast would follow the default route out)"
	fi
	is_uint "$PORT" && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || refuse "bad port=$PORT in $SOURCE"
	is_uint "$LATENCY" && [ "$LATENCY" -le 64 ] || refuse "bad latency=$LATENCY in $SOURCE"
	is_uint "$CHANNELS" && [ "$CHANNELS" -ge 1 ] && [ "$CHANNELS" -le 64 ] || refuse "bad channels=$CHANNELS in $SOURCE"
	case "$NAME" in '' | *[!A-Za-z0-9_.-]*) refuse "bad name=$NAME in $SOURCE (letters, digits, . _ - only)" ;; esac
	case "$DSP" in thru | direct) ;; *) refuse "bad dsp=$DSP in $SOURCE (thru or direct)" ;; esac
	case "$SYNC" in 0 | 1) ;; *) refuse "bad sync=$SYNC in $SOURCE (0 or 1)" ;; esac
	is_uint "$RTPRIO" && [ "$RTPRIO" -ge 1 ] && [ "$RTPRIO" -le 89 ] || refuse "bad ARCHDSP_RTPRIO=$RTPRIO (1-89)"
	case "$THRU" in '' | *[!A-Za-z0-9_-]*) refuse "bad ARCHDSP_DSP_CLIENT=$THRU (letters, digits, _ - only)" ;; esac
}

# ------------------------------------------------------------------ JACK ---

MADE=0
STARTED=0
JACKD_PID=
THRU_PID=
EVMON_PID=
EVMON_LOG=

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

start_jackd() {
	set -- jackd -R -P "$RTPRIO"
	[ "$SYNC" = 1 ] && set -- "$@" -S
	set -- "$@" -d net -a "$MASTER" -p "$PORT" -n "$NAME" -l "$LATENCY" -C "$CHANNELS" -P "$CHANNELS" -i 0 -o 0
	log "starting: $*"
	"$@" &
	JACKD_PID=$!
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

# connected SRC DST: in the `jack_lsp -c` dump held in LSP
connected() {
	printf '%s\n' "$LSP" | awk -v a="$1" -v b="$2" '
		/^[^ \t]/ { cur = $0; next }
		{ sub(/^[ \t]+/, ""); if (cur == a && $0 == b) found = 1 }
		END { exit !found }'
}

has_port() { printf '%s\n' "$LSP" | grep -qx "$1"; }

# master_ports: the net driver has made every system port (it does so only
# once the master has answered)
master_ports() {
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	has_port "system:capture_$CHANNELS" && has_port "system:playback_$CHANNELS"
}

wants_client() { [ "$DSP" = thru ] && [ "$CHANNELS" -ge 2 ]; }

# start_dsp_client: jack_thru, unless it runs (STARTED=1 when it was started);
# true once its ports are there
start_dsp_client() {
	STARTED=0
	wants_client || return 0
	alive "$THRU_PID" && return 0
	STARTED=1
	jack_thru "$THRU" &
	THRU_PID=$!
	i=0
	while [ $i -lt 10 ]; do
		LSP=$(jack_lsp -c 2>/dev/null)
		has_port "$THRU:output_2" && return 0
		alive "$THRU_PID" || break
		sleep 1
		i=$((i + 1))
	done
	log "the DSP client jack_thru did not start"
	return 1
}

# ensure_loop: make every wanted connection that is missing (MADE=1 when one
# was); true when the whole loop is in place
ensure_loop() {
	MADE=0
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	pairs=$(want_pairs)
	missing=0
	while read -r src dst; do
		connected "$src" "$dst" && continue
		jack_connect "$src" "$dst" >/dev/null 2>&1
		missing=1
	done <<EOF
$pairs
EOF
	[ $missing = 0 ] && return 0
	MADE=1
	LSP=$(jack_lsp -c 2>/dev/null) || return 1
	while read -r src dst; do
		connected "$src" "$dst" || return 1
	done <<EOF
$pairs
EOF
	return 0
}

# EVENTS: JACK's own notices of what changed, from a jack_evmon of ours (a
# client with no process callback) appending to a file read here with the
# shell's read, so that a healthy loop is not looked at with a new JACK client
# every second. A port that goes away or comes, or a connection that breaks,
# sets EVENT=1. jack_evmon writes with stdio's printf: into a file that is
# buffered 4 KiB at a time, so it runs under coreutils' stdbuf -oL (a line at
# a time). Without jack_evmon or stdbuf the loop is looked at every 5 seconds;
# with them, every 30 seconds as well (a jack_evmon the server has dropped
# still runs, and says nothing).
LOOK_EVERY=5
start_events() {
	EVENT=0
	command -v jack_evmon >/dev/null 2>&1 || return 0
	command -v stdbuf >/dev/null 2>&1 || return 0
	[ -n "$EVMON_LOG" ] || EVMON_LOG=$(mktemp "${RUNTIME_DIRECTORY:-/tmp}/archdsp-evmon.XXXXXX") || return 0
	: >"$EVMON_LOG"
	exec 8<"$EVMON_LOG"
	stdbuf -oL jack_evmon >>"$EVMON_LOG" 2>&1 &
	EVMON_PID=$!
	LOOK_EVERY=30
}
stop_events() {
	alive "$EVMON_PID" && kill "$EVMON_PID" 2>/dev/null
	EVMON_PID=
}
# read_events: consume what jack_evmon wrote since the last call
read_events() {
	EVENT=0
	[ -n "$EVMON_PID" ] || return 0
	alive "$EVMON_PID" || {
		start_events
		EVENT=1
		return 0
	}
	while read -r ev <&8; do
		case "$ev" in
		"Port "*registered | *disconnected) EVENT=1 ;;
		esac
	done
}

# wait_gone SECONDS PID...: until every PID has exited, at most SECONDS; then
# SIGKILL for those left
wait_gone() {
	n=$(($1 * 5))
	shift
	while [ $n -gt 0 ]; do
		left=0
		for p in "$@"; do alive "$p" && left=1; done
		[ $left = 0 ] && return 0
		sleep 0.2
		n=$((n - 1))
	done
	for p in "$@"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
	return 0
}

# stop_all: the clients first, while jackd still answers their goodbye, then
# jackd. `systemctl stop` signals every process of the unit at once: a client
# whose jackd went first hangs in its goodbye for good (JACK2 1.9.21), so each
# one is given a bounded time and then killed, and no wait here is unbounded.
stop_all() {
	evmon=$EVMON_PID
	alive "$THRU_PID" && kill "$THRU_PID" 2>/dev/null
	stop_events
	wait_gone 2 "$THRU_PID" "$evmon"
	alive "$JACKD_PID" && kill "$JACKD_PID" 2>/dev/null
	wait_gone 5 "$JACKD_PID"
	wait
	[ -z "$EVMON_LOG" ] || rm -f "$EVMON_LOG"
}

# ------------------------------------------------------------------ main ---

read_contract
parse_contract "$VALUE" || refuse "$SOURCE is version v=$V; this slave reads v=1 (print a newer one with archdsp-virt guest unit)"
# archdsp-virt tune's run-time override (docs/guest-contract.md, "Changing the settings"): LATENCY= and
# SYNC= lines in /run/archdsp/netjack.override, over the credential's; gone at the next boot.
OVERRIDE=${ARCHDSP_NETJACK_OVERRIDE:-/run/archdsp/netjack.override}
if [ -r "$OVERRIDE" ]; then
	while IFS='=' read -r key value; do
		case "$key" in
		LATENCY) LATENCY=$value ;;
		SYNC) SYNC=$value ;;
		esac
	done <"$OVERRIDE"
	SOURCE="$SOURCE with $OVERRIDE"
fi
check_settings
log "link settings from $SOURCE: $VALUE"

trap 'stop_all; exit 0' TERM INT
start_jackd

# state: up (the loop is in place) or down (no master yet, or it went away)
state=down
said_waiting=0
ticks=0
last_look=0
while alive "$JACKD_PID"; do
	if [ $state = up ]; then
		look=
		read_events
		[ "$EVENT" = 1 ] && look="a JACK notice"
		wants_client && ! alive "$THRU_PID" && look="the DSP client exited"
		[ -z "$look" ] && [ $((ticks - last_look)) -ge $LOOK_EVERY ] && look="a periodic look"
		if [ -z "$look" ]; then
			sleep 1
			ticks=$((ticks + 1))
			continue
		fi
	fi
	last_look=$ticks
	if master_ports && start_dsp_client && ensure_loop; then
		if [ $state = down ]; then
			log "ready: $NAME joined the master at $MASTER:$PORT ($(want_pairs | tr '\n' ',' | sed 's/,$//'))"
			[ -n "$EVMON_PID" ] || start_events
		elif [ $MADE = 1 ] || [ $STARTED = 1 ]; then
			log "DSP loop made again (after $look)"
		fi
		state=up
		read_events # what our own look made (a client, connections)
	else
		if [ $state = up ]; then
			log "DSP loop lost (master gone?); waiting for it to come back"
		elif [ $said_waiting = 0 ]; then
			log "waiting for the NETJACK master at $MASTER:$PORT"
			said_waiting=1
		fi
		state=down
	fi
	sleep 1
	ticks=$((ticks + 1))
done
wait "$JACKD_PID"
rc=$?
log "jackd exited (status $rc)"
stop_all
exit 1
