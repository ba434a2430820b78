#!/usr/bin/env bash
# slurm/cluster.sh -- a real Slurm cluster on this machine, for CI and developers: one node (the
# fast path) or several nodes, each in network, UTS and mount namespaces of its own.
#
# Usage (as root, Debian 12; no systemd needed):
#   bash slurm/cluster.sh up              # one node at 127.0.0.1: install slurm-wlm + munge if
#                                         # missing, write the config, start munged, slurmctld,
#                                         # slurmd; wait until the node is idle.
#   bash slurm/cluster.sh up --nodes 2    # node1, node2, ... each with its own network stack,
#                                         # address, hostname and /etc/hosts (see below).
#   bash slurm/cluster.sh down            # cancel all jobs, stop every daemon of either mode,
#                                         # remove the namespaces, veths and the bridge.
#   bash slurm/cluster.sh status          # print sinfo/squeue; exit 0 if every node is usable.
# All three are idempotent: `up` exits 0 at once when the cluster asked for is already usable
# and restarts a daemon that died; `down` on a machine without a cluster does nothing.
# `up` in one mode while the other mode's daemons run is refused: `down` first.
#
# Each mode keeps its state in folders of its own (never /var/spool/slurmctld, which another
# cluster on the machine may own: two clusters on one StateSaveLocation corrupt each other):
#   /var/lib/dist-gru-slurm/<mode>/   StateSaveLocation, slurmd spool folders, hosts files
#   /run/dist-gru-slurm/<mode>/       pid files, munged's socket (its own munged per mode)
#   /var/log/dist-gru-slurm/<mode>/   slurmctld.log, slurmd-<node>.log, munged.log
# and ports of its own (single: 6917/6918, nodes: 6927/6928). <mode> is "single" or "nodes".
# The active mode's config is /etc/slurm/slurm.conf (clients read it; a config we did not write
# is backed up first; ours starts with the marker line below). No slurmdbd: `sacct` does not
# work; use `scontrol show job ID` (a finished job's record stays ~8-12 s: MinJobAge=4).
#
# Several nodes: a bridge ($BRIDGE) in the root namespace holds $SUBNET.1; node i is the network
# namespace /run/netns/$NETNS_PREFIX<i> with lo and a veth named veth0 inside (the same name on
# every node, so one GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME serves all) at $SUBNET.(10+i), the
# other end on the bridge; no default route, so nothing leaves the /24. slurmd runs under
# `nsenter --net=...` (`ip netns exec` remounts /sys, and slurmd then finds no cgroup folder)
# inside `unshare --uts --mount`: its hostname is its NodeName, and a private hosts file naming
# every node and the controller is bind-mounted over /etc/hosts in that mount namespace only
# (job steps inherit both; torch's c10d rendezvous resolves gethostname()). The machine's
# /etc/hosts is never touched. slurmctld and munged run in the root namespace.
#
# Environment knobs: SLURM_UP_TIMEOUT (seconds to wait for the nodes, default 60),
#   SLURM_DEF_MEM_PER_CPU (MB, default 2048), SLURM_CRED_EXPIRE (s; a requeued job restarts
#   after this + 1 s; default 30 for one node, 10 for several), DIST_GRU_SLURM_SUBNET (the
#   first three octets of the nodes' private /24, default 10.213.97).
set -euo pipefail

MARKER="# written by dist-gru slurm/cluster.sh"
MODE_LINE="# dist-gru cluster mode:"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MUNGE_KEY=/etc/munge/munge.key
UP_TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
DEF_MEM_PER_CPU="${SLURM_DEF_MEM_PER_CPU:-2048}"
SUBNET="${DIST_GRU_SLURM_SUBNET:-10.213.97}"
BRIDGE=dgbr0
NETNS_PREFIX=dist-gru-
HOST="$(hostname -s)"
MODES=(single nodes)

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# ---------------------------------------------------------------- per-mode layout
# set_mode MODE: the paths, ports and node list of one mode.
set_mode() {
    MODE="$1"
    STATE="/var/lib/dist-gru-slurm/$MODE"
    RUN="/run/dist-gru-slurm/$MODE"
    LOGS="/var/log/dist-gru-slurm/$MODE"
    CTLD_PID="$RUN/slurmctld.pid"
    CTLD_LOG="$LOGS/slurmctld.log"
    MUNGE_DIR="$RUN/munge"
    MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
    MUNGE_PID="$MUNGE_DIR/munged.pid"
    if [[ $MODE == single ]]; then
        CTLD_PORT=6917; SLURMD_PORT=6918; CRED_EXPIRE="${SLURM_CRED_EXPIRE:-30}"
    else
        CTLD_PORT=6927; SLURMD_PORT=6928; CRED_EXPIRE="${SLURM_CRED_EXPIRE:-10}"
    fi
}

# The nodes of the mode: NODES=(names) for `single` (this host) or node1..nodeN.
set_nodes() {  # set_nodes COUNT
    NODES=()
    if [[ $MODE == single ]]; then
        NODES=("$HOST")
    else
        local i
        for ((i = 1; i <= $1; i++)); do NODES+=("node$i"); done
    fi
}

slurmd_pid() { echo "$RUN/slurmd-$1.pid"; }
slurmd_log() { echo "$LOGS/slurmd-$1.log"; }
node_index() { echo "${1#node}"; }
node_addr() { echo "$SUBNET.$((10 + $(node_index "$1")))"; }
netns_of() { echo "$NETNS_PREFIX$1"; }

# The mode and node count of the installed config ("" if it is not ours).
conf_mode() { sed -n "s/^$MODE_LINE \([a-z]*\) .*/\1/p" "$CONF" 2>/dev/null | head -n1; }
conf_nodes() { sed -n "s/^$MODE_LINE [a-z]* nodes=\([0-9]*\).*/\1/p" "$CONF" 2>/dev/null | head -n1; }
ours() { grep -qxF "$MARKER" "$CONF" 2>/dev/null; }

pid_alive() {  # pid_alive PIDFILE NAME -> 0 if the pid in PIDFILE is a live process named NAME
    local pf="$1" name="$2" pid
    [[ -s "$pf" ]] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

munge_ok() {
    command -v munge >/dev/null 2>&1 &&
        timeout 10 munge --socket="$MUNGE_SOCKET" -n 2>/dev/null |
        timeout 10 unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1
}

# Daemons of a mode still running (by their pid files): non-empty output = the mode is up.
mode_daemons() {  # mode_daemons MODE
    local saved="${MODE:-}" f out=""
    set_mode "$1"
    for f in "$CTLD_PID" "$RUN"/slurmd-*.pid; do
        [[ -e $f ]] || continue
        case "$f" in
            *slurmctld.pid) pid_alive "$f" slurmctld && out+=" slurmctld" ;;
            *) pid_alive "$f" slurmd && out+=" $(basename "$f" .pid)" ;;
        esac
    done
    [[ -n $saved ]] && set_mode "$saved"
    echo "${out# }"
}

# ---------------------------------------------------------------- state queries
# Node state as sinfo prints it (idle, idle*, down*, drained, mixed ...), "" if no answer. Without
# a running slurmctld, sinfo retries for ~9 s before it gives up: skip it then.
node_state() {  # node_state NODE
    command -v sinfo >/dev/null 2>&1 || return 0
    pid_alive "$CTLD_PID" slurmctld || return 0
    timeout 10 sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n1 || true
}

node_usable() {  # node_usable NODE: its slurmd alive, munged answering, sinfo says it can run jobs
    pid_alive "$(slurmd_pid "$1")" slurmd && munge_ok || return 1
    case "$(node_state "$1")" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

cluster_usable() {
    ours && [[ "$(conf_mode)" == "$MODE" ]] && [[ "$(conf_nodes)" == "${#NODES[@]}" ]] || return 1
    [[ $MODE == single ]] || net_ok || return 1
    local n
    for n in "${NODES[@]}"; do node_usable "$n" || return 1; done
}

# ---------------------------------------------------------------- install
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    local apt_log=/tmp/dist-gru-slurm-apt.log
    local install=(timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge)
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
        timeout 300 apt-get update -qq >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; die "apt-get update failed"; }
    fi
    if ! "${install[@]}" >"$apt_log" 2>&1; then
        log "install failed; running apt-get update and retrying"
        timeout 300 apt-get update -qq >>"$apt_log" 2>&1 || true
        "${install[@]}" >>"$apt_log" 2>&1 || { tail -n 30 "$apt_log" >&2; die "apt-get install failed"; }
    fi
    command -v slurmctld >/dev/null || die "slurmctld still missing after install"
}

# ---------------------------------------------------------------- munge (one munged per mode)
start_munge() {
    install -d -m 0700 -o munge -g munge /etc/munge
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    install -d -m 0755 /run/dist-gru-slurm "$RUN"
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
    install -d -m 0700 -o munge -g munge "$STATE/munge" "$LOGS/munge"
    if munge_ok; then return 0; fi
    stop_pidfile "$MUNGE_PID" munged
    log "starting munged ($MUNGE_SOCKET)"
    runuser -u munge -- munged --force --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
        --log-file="$LOGS/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
    for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
    tail -n 20 "$LOGS/munge/munged.log" >&2 2>/dev/null || true
    die "munged did not come up"
}

# ---------------------------------------------------------------- network (several nodes)
# The nodes' /24 must be ours alone: refuse when an interface we did not create has an address there.
check_subnet_free() {
    local line dev
    while read -r line; do
        dev="$(awk '{print $2}' <<<"$line")"
        dev="${dev%%@*}"
        [[ $dev == "$BRIDGE" ]] && continue
        die "$SUBNET.0/24 is already used on this machine ($dev); choose another: DIST_GRU_SLURM_SUBNET=a.b.c"
    done < <(ip -o -4 addr show | grep -F " $SUBNET." || true)
}

net_ok() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
    local n
    for n in "${NODES[@]}"; do
        [[ -e /run/netns/$(netns_of "$n") ]] || return 1
        ip -n "$(netns_of "$n")" -o -4 addr show dev veth0 2>/dev/null | grep -qF " $(node_addr "$n")/" || return 1
    done
}

net_up() {
    check_subnet_free
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip -4 addr show dev "$BRIDGE" | grep -qF " $SUBNET.1/24" || ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local n ns i veth
    for n in "${NODES[@]}"; do
        ns="$(netns_of "$n")"; i="$(node_index "$n")"; veth="dgveth$i"
        [[ -e /run/netns/$ns ]] || ip netns add "$ns"
        if ! ip -n "$ns" link show veth0 >/dev/null 2>&1; then
            ip link del "$veth" >/dev/null 2>&1 || true
            ip link add "$veth" type veth peer name veth0 netns "$ns"
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" -4 addr show dev veth0 | grep -qF " $(node_addr "$n")/" ||
            ip -n "$ns" addr add "$(node_addr "$n")/24" dev veth0
        ip -n "$ns" link set veth0 up
    done
}

net_down() {
    local ns n
    for ns in /run/netns/"$NETNS_PREFIX"node*; do
        [[ -e $ns ]] || continue
        n="$(basename "$ns")"
        kill_netns_processes "$n"
        ip netns del "$n" 2>/dev/null || true
    done
    # Deleting a namespace deletes its veth end, and with it the peer on the bridge.
    local dev
    for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^dgveth[0-9]*$' || true); do
        ip link del "$dev" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

# Every process still in a node's network namespace was started there by this cluster (slurmd,
# its job steps): end them by pid.
kill_netns_processes() {  # kill_netns_processes NETNS
    local pids
    pids="$(ip netns pids "$1" 2>/dev/null | tr '\n' ' ')"
    [[ -n ${pids// /} ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 30); do
        [[ -z "$(ip netns pids "$1" 2>/dev/null)" ]] && return 0
        sleep 0.1
    done
    pids="$(ip netns pids "$1" 2>/dev/null | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [[ -n ${pids// /} ]] && kill -KILL $pids 2>/dev/null || true
}

write_hosts() {
    local n
    {
        echo "127.0.0.1 localhost"
        # The controller's own name must resolve to its address on the bridge inside the nodes.
        echo "$SUBNET.1 $HOST"
        for n in "${NODES[@]}"; do echo "$(node_addr "$n") $n"; done
    } >"$STATE/hosts.tmp"
    mv "$STATE/hosts.tmp" "$STATE/hosts"
}

# ---------------------------------------------------------------- config
node_hw() {
    local hw cpus boards sockets cores threads mem
    hw="$(slurmd -C 2>/dev/null | head -n1)"
    [[ -n "$hw" ]] || die "slurmd -C printed nothing"
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus="$(field CPUs)"; boards="$(field Boards)"; sockets="$(field SocketsPerBoard)"
    cores="$(field CoresPerSocket)"; threads="$(field ThreadsPerCore)"; mem="$(field RealMemory)"
    # Leave ~5 % (at least 256 MB) to the OS: a RealMemory above what slurmd finds drains the node.
    local reserve=$(( mem / 20 )); (( reserve < 256 )) && reserve=256
    mem=$(( (mem - reserve) / ${#NODES[@]} )); (( mem < 512 )) && mem=512
    echo "CPUs=${cpus} Boards=${boards} SocketsPerBoard=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem}"
}

render_conf() {
    local hw ctld_addr n nodes_csv
    hw="$(node_hw)"
    if [[ $MODE == single ]]; then ctld_addr=127.0.0.1; else ctld_addr="$SUBNET.1"; fi
    nodes_csv="$(IFS=,; echo "${NODES[*]}")"
    cat <<EOF
$MARKER
$MODE_LINE $MODE nodes=${#NODES[@]}
# Regenerate with: bash slurm/cluster.sh down && bash slurm/cluster.sh up$([[ $MODE == single ]] || echo " --nodes ${#NODES[@]}")
ClusterName=distgru
SlurmctldHost=${HOST}(${ctld_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Our own munged; requeued jobs wait cred_expire+1 s before they can start again (default 120 s).
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=${CRED_EXPIRE}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Re-test pending jobs every 1 s (default 60 s main / 30 s backfill): a requeued job starts as soon
# as its BeginTime (cred_expire+1 s) has passed instead of up to 30 s later.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
JobRequeue=1
ReturnToService=2
# Keep finished job records >= 4 s (in practice 8-12 s, the purge cycle) for scontrol show job;
# sbatch --wait then polls every 2 s.
MinJobAge=4
# scancel/time limit/requeue: SIGTERM, then SIGKILL KillWait s later (a job that ignores TERM ends after ~10 s).
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
InactiveLimit=0
Waittime=0
EOF
    if [[ $MODE == single ]]; then
        echo "NodeName=${HOST} NodeAddr=127.0.0.1 ${hw} State=UNKNOWN"
    else
        for n in "${NODES[@]}"; do
            echo "NodeName=$n NodeAddr=$(node_addr "$n") ${hw} State=UNKNOWN"
        done
    fi
    if [[ $MODE == single ]]; then
        echo "PartitionName=debug Nodes=${nodes_csv} Default=YES MaxTime=INFINITE State=UP"
    else
        # The nodes share this machine's cores anyway: let up to four jobs share each core, so a test
        # stage can run its multi-node scenarios side by side (memory stays a consumable limit).
        echo "PartitionName=debug Nodes=${nodes_csv} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    fi
}

# Writes the config; returns 0 if it changed (daemons must (re)start), 1 if unchanged.
write_conf() {
    install -d -m 0755 "$CONF_DIR"
    local new
    new="$(render_conf)"
    if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        return 1
    fi
    if [[ -f "$CONF" ]] && ! ours; then
        local bak
        bak="$CONF.bak.$(date +%Y%m%d%H%M%S)"
        cp -p "$CONF" "$bak"
        log "backed up existing $CONF to $bak"
    fi
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    log "wrote $CONF ($MODE, ${#NODES[@]} node(s))"
    return 0
}

make_dirs() {
    install -d -m 0755 "$STATE" "$STATE/ctld" "$RUN" "$LOGS"
    local n
    for n in "${NODES[@]}"; do install -d -m 0755 "$STATE/spool-$n"; done
}

# ---------------------------------------------------------------- daemons
stop_pidfile() {  # stop_pidfile PIDFILE NAME: stop the process of that pid file, only that one
    local pf="$1" name="$2" pid
    if pid_alive "$pf" "$name"; then
        pid="$(cat "$pf")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.1
        done
        if [[ -d "/proc/$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pf"
}

start_ctld() {
    pid_alive "$CTLD_PID" slurmctld && return 0
    log "starting slurmctld"
    timeout 60 slurmctld || { tail -n 30 "$CTLD_LOG" >&2 2>/dev/null || true; die "slurmctld failed to start"; }
}

start_slurmd() {  # start_slurmd NODE
    local n="$1"
    pid_alive "$(slurmd_pid "$n")" slurmd && return 0
    log "starting slurmd of $n"
    if [[ $MODE == single ]]; then
        timeout 60 slurmd || { tail -n 30 "$(slurmd_log "$n")" >&2 2>/dev/null || true; die "slurmd failed to start"; }
        return 0
    fi
    # The hostname and hosts file apply inside this slurmd's own UTS and mount namespaces only.
    timeout 60 nsenter --net="/run/netns/$(netns_of "$n")" \
        unshare --uts --mount --propagation private \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd' slurmd-"$n" "$n" "$STATE/hosts" ||
        { tail -n 30 "$(slurmd_log "$n")" >&2 2>/dev/null || true; die "slurmd of $n failed to start"; }
}

print_logs() {
    local f
    for f in "$CTLD_LOG" "$LOGS"/slurmd-*.log; do
        [[ -e $f ]] || continue
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2 2>/dev/null || echo "(no log)" >&2
    done
}

# Slurmd registration time of a node as the controller saw it (epoch s), 0 if unknown.
registered_at() {
    local t
    t="$(timeout 10 scontrol show node -o "$1" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')"
    [[ -n $t && $t != None ]] || { echo 0; return; }
    date -d "$t" +%s 2>/dev/null || echo 0
}

# Wait until every node is usable. "idle" from a node whose slurmd we just restarted proves
# nothing (slurmctld keeps the old state until SlurmdTimeout): it must have registered since.
wait_idle() {  # wait_idle SINCE_EPOCH
    local since="$1" deadline=$(( SECONDS + UP_TIMEOUT )) n st pending
    local -A resumed=()
    while (( SECONDS < deadline )); do
        pending=""
        for n in "${NODES[@]}"; do
            st="$(node_state "$n")"
            case "$st" in
                idle | mixed | allocated | completing)
                    (( $(registered_at "$n") >= since )) || pending+=" $n(registering)" ;;
                down* | drain* | fail*)
                    pending+=" $n($st)"
                    # "*" (not responding) means slurmd has not registered yet: keep waiting; an
                    # explicitly down/drained node (e.g. "Low RealMemory", old state) is resumed.
                    if [[ "$st" != *'*' ]] && (( ${resumed[$n]:-0} < 5 )); then
                        timeout 10 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
                        resumed[$n]=$(( ${resumed[$n]:-0} + 1 ))
                    fi ;;
                *) pending+=" $n(${st:-no answer})" ;;
            esac
        done
        if [[ -z $pending ]]; then
            log "nodes idle: ${NODES[*]}"
            return 0
        fi
        sleep 0.5
    done
    log "nodes not usable within ${UP_TIMEOUT}s:$pending"
    timeout 10 scontrol show node >&2 2>/dev/null || true
    print_logs
    return 1
}

parse_nodes() {  # parse_nodes ARGS... -> COUNT (1 = single-node mode)
    local count=1
    while (($#)); do
        case "$1" in
            --nodes) count="${2:-}"; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) count="${1#--nodes=}"; shift ;;
            *) die "unknown option '$1' (usage: $0 up [--nodes N])" ;;
        esac
    done
    [[ $count =~ ^[1-9][0-9]?$ ]] && (( count <= 16 )) || die "--nodes must be 1..16, got '$count'"
    echo "$count"
}

cmd_up() {
    need_root
    local count t0=$SECONDS since
    count="$(parse_nodes "$@")"
    if (( count == 1 )); then set_mode single; else set_mode nodes; fi
    set_nodes "$count"
    local other running
    for other in "${MODES[@]}"; do
        [[ $other == "$MODE" ]] && continue
        running="$(mode_daemons "$other")"
        [[ -z $running ]] || die "the '$other' cluster is running ($running): run \`bash $0 down\` first"
    done
    if command -v slurmctld >/dev/null && cluster_usable && [[ "$(render_conf)" == "$(cat "$CONF")" ]]; then
        log "Slurm is already up: ${NODES[*]} usable"
        return 0
    fi
    install_packages
    make_dirs
    start_munge
    if [[ $MODE == nodes ]]; then
        net_up
        write_hosts
    fi
    since="$(date +%s)"
    if write_conf || [[ "$(conf_nodes)" != "${#NODES[@]}" ]]; then
        # A changed config (or another node count): every daemon of this mode starts afresh.
        local pf
        for pf in "$RUN"/slurmd-*.pid; do [[ -e $pf ]] && stop_pidfile "$pf" slurmd; done
        stop_pidfile "$CTLD_PID" slurmctld
    fi
    start_ctld
    local n
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_idle "$since" || exit 1
    log "cluster up in $(( SECONDS - t0 )) s ($MODE, ${#NODES[@]} node(s))"
}

cancel_jobs() {
    command -v squeue >/dev/null 2>&1 && pid_alive "$CTLD_PID" slurmctld || return 0
    local jobs
    jobs="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
    [[ -n "$jobs" ]] || return 0
    log "cancelling jobs: ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do
        [[ -z "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ]] && break
        sleep 0.5
    done
}

cmd_down() {
    need_root
    local m pf
    for m in "${MODES[@]}"; do
        set_mode "$m"
        # Jobs are cancelled while the controller that knows them (the installed config's) runs.
        [[ "$(conf_mode)" == "$m" ]] && cancel_jobs
        for pf in "$RUN"/slurmd-*.pid; do [[ -e $pf ]] && stop_pidfile "$pf" slurmd; done
        stop_pidfile "$CTLD_PID" slurmctld
        stop_pidfile "$MUNGE_PID" munged
    done
    # Job step daemons and tasks left in the nodes' namespaces, then the namespaces and the bridge.
    net_down
    log "cluster down"
}

cmd_status() {
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "Slurm is not installed (run: bash slurm/cluster.sh up)"
        return 1
    fi
    local mode count
    mode="$(conf_mode)"
    if [[ -z $mode ]]; then
        timeout 10 sinfo 2>&1 || true
        echo "status: /etc/slurm/slurm.conf is not ours (start ours: bash slurm/cluster.sh up)"
        return 1
    fi
    set_mode "$mode"
    count="$(conf_nodes)"
    set_nodes "${count:-1}"
    if ! pid_alive "$CTLD_PID" slurmctld; then
        echo "slurmctld is not running (start the cluster: bash slurm/cluster.sh up$([[ $mode == single ]] || echo " --nodes $count"))"
        return 1
    fi
    timeout 10 sinfo 2>&1 || true
    timeout 10 squeue 2>&1 || true
    if cluster_usable; then
        echo "status: up ($mode, ${#NODES[@]} node(s): ${NODES[*]})"
        return 0
    fi
    echo "status: not usable ($mode, ${#NODES[@]} node(s))"
    return 1
}

cmd="${1:-}"
shift || true
case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up [--nodes N]|down|status" >&2; exit 2 ;;
esac
