#!/usr/bin/env bash
# slurm/cluster.sh -- a real single-node Slurm cluster on this machine, for CI and developers.
#
# Usage (as root, Debian 12; no systemd needed):
#   bash slurm/cluster.sh up      # install slurm-wlm + munge if missing, write the config,
#                                 # start munged, slurmctld, slurmd; wait until the node is idle.
#                                 # Idempotent: exits 0 at once if the node is already usable.
#   bash slurm/cluster.sh down    # cancel all jobs, stop slurmd, slurmctld, munged. Idempotent.
#   bash slurm/cluster.sh status  # print sinfo/squeue; exit 0 if the node is idle/mixed/allocated.
#
# One node (this host, at 127.0.0.1), one default partition "debug", cluster "distgru".
# Jobs run as the submitting user; SlurmUser is root. Config: /etc/slurm/slurm.conf (a config we
# did not write is backed up first; ours carries the marker line below). Logs:
# /var/log/slurm/{slurmctld,slurmd}.log. No slurmdbd: `sacct` does not work; use
# `scontrol show job ID` (a finished job's record stays ~8-12 s: MinJobAge=4; see README-cluster.md).
# To apply a changed config to a running cluster: `down` then `up`.
#
# Environment knobs: SLURM_UP_TIMEOUT (seconds to wait for the node, default 60),
#                    SLURM_DEF_MEM_PER_CPU (MB, default 2048),
#                    SLURM_CRED_EXPIRE (s, default 30; a requeued job restarts after this + 1 s).
set -euo pipefail

MARKER="# written by dist-gru slurm/cluster.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
UP_TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
DEF_MEM_PER_CPU="${SLURM_DEF_MEM_PER_CPU:-2048}"
CRED_EXPIRE="${SLURM_CRED_EXPIRE:-30}"
HOST="$(hostname -s)"

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root"; }

# ---------------------------------------------------------------- state queries
# Node state as sinfo prints it (e.g. idle, idle*, down*, drained, mixed), "" if no answer.
# Without a local slurmctld, sinfo/squeue retry for ~9 s before they give up: skip them when the
# controller is ours (this host) and not running.
our_ctld_down() { grep -qxF "$MARKER" "$CONF" 2>/dev/null && ! pgrep -x slurmctld >/dev/null 2>&1; }

node_state() {
    command -v sinfo >/dev/null 2>&1 || return 0
    our_ctld_down && return 0
    timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true
}

node_usable() {
    # Our local cluster also needs its slurmd and munged (slurmctld notices a dead slurmd only later).
    if grep -qxF "$MARKER" "$CONF" 2>/dev/null; then
        pid_alive "$SLURMD_PID" slurmd && munge_ok || return 1
    fi
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

pid_alive() {  # pid_alive PIDFILE NAME -> 0 if the pid in PIDFILE is a live process named NAME
    local pf="$1" name="$2" pid
    [[ -s "$pf" ]] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

munge_ok() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---------------------------------------------------------------- install
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    local apt_log=/tmp/dist-gru-slurm-apt.log
    local install=(apt-get install -y -qq --no-install-recommends slurm-wlm munge)
    if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
        apt-get update -qq >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; die "apt-get update failed"; }
    fi
    if ! "${install[@]}" >"$apt_log" 2>&1; then
        log "install failed; running apt-get update and retrying"
        apt-get update -qq >>"$apt_log" 2>&1 || true
        "${install[@]}" >>"$apt_log" 2>&1 || { tail -n 30 "$apt_log" >&2; die "apt-get install failed"; }
    fi
    command -v slurmctld >/dev/null || die "slurmctld still missing after install"
}

# ---------------------------------------------------------------- munge
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
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
    if munge_ok; then return 0; fi
    log "starting munged"
    runuser -u munge -- munged --force
    for _ in $(seq 1 50); do munge_ok && return 0; sleep 0.1; done
    tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
    die "munged did not come up"
}

# ---------------------------------------------------------------- config
render_conf() {
    local hw cpus boards sockets cores threads mem
    hw="$(slurmd -C 2>/dev/null | head -n1)"
    [[ -n "$hw" ]] || die "slurmd -C printed nothing"
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus="$(field CPUs)"; boards="$(field Boards)"; sockets="$(field SocketsPerBoard)"
    cores="$(field CoresPerSocket)"; threads="$(field ThreadsPerCore)"; mem="$(field RealMemory)"
    # Leave ~5 % (at least 256 MB) to the OS: a RealMemory above what slurmd finds drains the node.
    local reserve=$(( mem / 20 )); (( reserve < 256 )) && reserve=256
    mem=$(( mem - reserve )); (( mem < 512 )) && mem=512
    cat <<EOF
$MARKER
# Single-node test cluster; regenerate with: bash slurm/cluster.sh down && bash slurm/cluster.sh up
ClusterName=distgru
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire+1 s before they can start again (default 120 s).
AuthInfo=cred_expire=${CRED_EXPIRE}
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
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
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} Boards=${boards} SocketsPerBoard=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
}

# Writes the config; returns 0 if it changed (daemons must (re)start), 1 if unchanged.
write_conf() {
    install -d -m 0755 "$CONF_DIR"
    local new
    new="$(render_conf)"
    if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        return 1
    fi
    if [[ -f "$CONF" ]] && ! grep -qxF "$MARKER" "$CONF"; then
        local bak
        bak="$CONF.bak.$(date +%Y%m%d%H%M%S)"
        cp -p "$CONF" "$bak"
        log "backed up existing $CONF to $bak"
    fi
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    log "wrote $CONF"
    return 0
}

make_dirs() {
    install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
}

# ---------------------------------------------------------------- daemons
stop_pidfile() {  # stop_pidfile PIDFILE NAME
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
    # Fallback: a daemon whose PID file is stale or missing (exact process name only).
    if pgrep -x "$name" >/dev/null 2>&1; then
        pkill -TERM -x "$name" 2>/dev/null || true
        for _ in $(seq 1 50); do
            pgrep -x "$name" >/dev/null 2>&1 || break
            sleep 0.1
        done
        pkill -KILL -x "$name" 2>/dev/null || true
    fi
    rm -f "$pf"
}

start_daemons() {  # start_daemons RESTART(0|1)
    local restart="$1"
    if [[ "$restart" == 1 ]]; then
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi
    if ! pid_alive "$CTLD_PID" slurmctld; then
        pgrep -x slurmctld >/dev/null 2>&1 && stop_pidfile "$CTLD_PID" slurmctld
        log "starting slurmctld"
        slurmctld || { tail -n 30 "$CTLD_LOG" >&2 2>/dev/null || true; die "slurmctld failed to start"; }
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        pgrep -x slurmd >/dev/null 2>&1 && stop_pidfile "$SLURMD_PID" slurmd
        log "starting slurmd"
        slurmd || { tail -n 30 "$SLURMD_LOG" >&2 2>/dev/null || true; die "slurmd failed to start"; }
    fi
}

print_logs() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG"; do
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2 2>/dev/null || echo "(no log)" >&2
    done
}

wait_idle() {
    local deadline=$(( SECONDS + UP_TIMEOUT )) st resumed=0
    while (( SECONDS < deadline )); do
        st="$(node_state)"
        case "$st" in
            idle | mixed | allocated | completing)
                log "node $HOST is $st"
                return 0 ;;
            down* | drain* | fail*)
                # "unknown"/"*" (not responding) mean slurmd has not registered yet: keep waiting;
                # an explicitly down/drained node (e.g. "Low RealMemory", old state) is resumed.
                if [[ "$st" != *'*' ]] && (( resumed < 5 )); then
                    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
                    resumed=$(( resumed + 1 ))
                fi ;;
        esac
        sleep 0.5
    done
    log "node did not become idle within ${UP_TIMEOUT}s (state: '${st:-no answer}')"
    timeout 10 scontrol show node "$HOST" >&2 2>/dev/null || true
    print_logs
    return 1
}

cmd_up() {
    need_root
    local t0=$SECONDS
    if node_usable; then
        log "Slurm is already up: node $HOST is $(node_state)"
        return 0
    fi
    install_packages
    start_munge
    make_dirs
    local restart=0
    write_conf && restart=1
    start_daemons "$restart"
    if ! wait_idle; then
        exit 1
    fi
    log "cluster up in $(( SECONDS - t0 )) s"
}

cmd_down() {
    need_root
    if command -v squeue >/dev/null 2>&1 && pid_alive "$CTLD_PID" slurmctld; then
        local jobs
        jobs="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 60); do
                [[ -z "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    # Job step daemons left over from killed jobs (exact name only).
    if pgrep -x slurmstepd >/dev/null 2>&1; then
        pkill -KILL -x slurmstepd 2>/dev/null || true
    fi
    stop_pidfile "$MUNGE_PID" munged
    log "cluster down"
}

cmd_status() {
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "Slurm is not installed (run: bash slurm/cluster.sh up)"
        return 1
    fi
    if our_ctld_down; then
        echo "slurmctld is not running (start the cluster: bash slurm/cluster.sh up)"
        return 1
    fi
    timeout 10 sinfo 2>&1 || true
    timeout 10 squeue 2>&1 || true
    if node_usable; then
        echo "status: up ($(node_state))"
        return 0
    fi
    echo "status: not usable (node state: '$(node_state)')"
    return 1
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
