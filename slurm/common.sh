# shellcheck shell=bash
# slurm/common.sh -- sourced (not run) by slurm/train.sbatch and slurm/train_tasks.sbatch.
#
# What both launch modes share: the job header (rendezvous endpoint, run folder, restart count),
# and the preemption logic: run the srun step in the background, forward a preemption signal that
# reaches the batch shell to the training processes, then requeue the job if training saved a
# checkpoint and left `<run_dir>/PREEMPTED` (the contract in dist_gru/train/checkpoint.py).
#
#   source slurm/common.sh                 # the sbatch scripts find it next to themselves
#   dg_setup "$@"                          # the dist-gru train arguments: --config FILE k=v ...
#   dg_run_and_requeue srun ...            # the training step
#
# Environment (all optional):
#   PYTHON        the Python that has dist_gru installed               (default: python3)
#   RDZV_HOST     rendezvous / MASTER_ADDR host (default: the first node of the allocation, where
#                 the batch shell runs)
#   RDZV_PORT     rendezvous / MASTER_PORT port (default: chosen by dg_rdzv_port below: the lowest port
#                 from RDZV_PORT_MIN (20000) that no other job on this node holds and nothing listens on;
#                 below Linux's ephemeral ports (32768-60999), which outgoing connections take)
#   DIST_GRU_LOCK_DIR  node-local folder for the port locks (default: /tmp)
#   MAX_REQUEUES  requeue at most this many times (SLURM_RESTART_COUNT) (default: 5)
#
# When the job requeues itself: training left a PREEMPTED marker, the batch shell got no SIGTERM
# (SIGTERM means Slurm is ending the job: scancel, the time limit itself, or preemption, where Slurm
# requeues by itself if the site says so), and SLURM_RESTART_COUNT < MAX_REQUEUES.
# Exit codes of the batch job: 0 finished, or preempted and requeued (the job continues later);
# 75 preempted with a checkpoint but not requeued (see above, or the requeue failed);
# 2 bad config; anything else: training failed (srun's exit code), never requeued.

# Same as dist_gru.train.checkpoint.EXIT_PREEMPTED / PREEMPTED.
DG_EXIT_PREEMPTED=75
DG_PREEMPTED_FILE=PREEMPTED

dg_log() { echo "dist-gru slurm: $*"; }

# The run folder and resume mode of `dist-gru train ARGS`, from dist_gru's own config loader (a bad
# config fails here, before any node starts). The arguments as dist_gru.train.trainer.parse_args reads them;
# importing the trainer itself would load torch (2-8 s here). Prints "run_dir<TAB>resume".
dg_resolve_config() {
    "$PYTHON" - "$@" <<'EOF'
import argparse, sys
from dist_gru.config import ConfigError, load_config
parser = argparse.ArgumentParser(prog="dist-gru train")
parser.add_argument("--config")
parser.add_argument("--quiet", action="store_true")
parser.add_argument("overrides", nargs="*")
args = parser.parse_intermixed_args(sys.argv[1:])
try:
    cfg = load_config(args.config, args.overrides)
except ConfigError as exc:
    sys.exit(f"error: {exc}")
print(f"{cfg.train.run_dir}\t{cfg.train.resume}")
EOF
}

# Resolve and export what every srun task needs; print the job header. Arguments: dist-gru train's.
dg_setup() {
    : "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
    export PYTHON=${PYTHON:-python3}
    local resolved resume
    resolved=$(dg_resolve_config "$@") || exit 2
    RUN_DIR=${resolved%%$'\t'*}
    resume=${resolved#*$'\t'}
    # Relative run folders are relative to the job's working directory, the same after a requeue.
    [[ $RUN_DIR == /* ]] || RUN_DIR=$PWD/$RUN_DIR
    export RDZV_HOST=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    if [[ -z ${RDZV_PORT:-} ]]; then
        dg_rdzv_port || { dg_log "error: no free rendezvous port in $_dg_port_range (set RDZV_PORT)"; exit 2; }
    fi
    export RDZV_PORT
    # Slurm 22.05's srun does not inherit --cpus-per-task from the job (a bound step would get 1 CPU).
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    MAX_REQUEUES=${MAX_REQUEUES:-5}
    dg_log "job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-1} node(s) ($SLURM_JOB_NODELIST)," \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} (max requeues $MAX_REQUEUES)"
    dg_log "rendezvous endpoint: $RDZV_HOST:$RDZV_PORT${_dg_port_skipped:+ (skipped, in use:$_dg_port_skipped)}"
    dg_log "run folder: $RUN_DIR (train.resume=$resume)"
    if [[ $resume != auto ]]; then
        dg_log "warning: train.resume=$resume: a requeued job will not continue from its own checkpoint"
    fi
}

# True when nothing on this node holds PORT (bound or listening, on any address).
dg_port_free() {
    "$PYTHON" -c 'import socket, sys; socket.socket().bind(("", int(sys.argv[1])))' "$1" 2>/dev/null
}

# Choose this job's rendezvous port and keep it: sets RDZV_PORT. Jobs that share a node must never
# pick the same port, and a port only becomes busy when torchrun (or rank 0) binds it seconds later:
# a free-port probe alone would let two jobs starting together take the same one. So each candidate
# is also claimed with an flock on DIST_GRU_LOCK_DIR/dist-gru-rdzv-PORT.lock, held by this shell's
# open file until the job ends (the batch shell outlives its steps). Skipped ports are listed in
# _dg_port_skipped. Call it directly, not in $(...): a subshell would drop the lock when it exits.
dg_rdzv_port() {
    local min=${RDZV_PORT_MIN:-20000} count=${RDZV_PORT_COUNT:-1000} dir=${DIST_GRU_LOCK_DIR:-/tmp} port lock fd
    _dg_port_range="$min-$((min + count - 1))"
    _dg_port_skipped=""
    for ((port = min; port < min + count; port++)); do
        lock=$dir/dist-gru-rdzv-$port.lock
        # Readable by every user: a lock needs only a read-only descriptor.
        [[ -e $lock ]] || (umask 0 && : >>"$lock") 2>/dev/null
        if exec {fd}<"$lock"; then
            if flock -n "$fd" && dg_port_free "$port"; then
                RDZV_PORT=$port
                _dg_port_fd=$fd
                return 0
            fi
            exec {fd}<&-
        fi 2>/dev/null
        _dg_port_skipped+=" $port"
    done
    return 1
}

# Local tasks on this node from Slurm's compressed per-node list ("2(x3),1"): for LOCAL_WORLD_SIZE
# when --ntasks-per-node was not given. Runs inside a task (exported with export -f).
dg_tasks_on_node() {
    local list=${SLURM_STEP_TASKS_PER_NODE:-$SLURM_TASKS_PER_NODE} node=${SLURM_NODEID:-0} item count reps
    local -a item_list
    IFS=, read -ra item_list <<<"$list"
    for item in "${item_list[@]}"; do
        count=${item%%(*}
        reps=1
        [[ $item == *'(x'* ]] && reps=${item#*(x} && reps=${reps%)}
        if ((node < reps)); then
            echo "$count"
            return
        fi
        node=$((node - reps))
    done
    echo 1
}

# Trap handler: a preemption notice (USR1: --signal=B:USR1@T, scancel --signal=USR1 --batch) or the
# end of the job (TERM: scancel, time limit, preemption by Slurm) reached the batch shell. Forward
# it once, as USR1, to the job's steps on every node. Slurm delivers it to every process of
# a step (measured: also to torchrun's workers, which run in sessions of their own, and to W&B's
# wandb-core service). USR1, not TERM: wandb-core dies on TERM (the attempt's .wandb file is then
# left empty, 7 bytes) and ignores USR1; the training processes catch both; the torchrun agent,
# which would die on USR1 (it does not forward it), ignores it (train.sbatch). The workers save a
# checkpoint and exit 75; rank 0 writes <run_dir>/PREEMPTED.
_dg_on_signal() {
    dg_log "batch shell got SIG$1 at $(date +%T)"
    [[ $1 == TERM ]] && _dg_terminated=1
    if [[ -n ${_dg_forwarded:-} ]]; then
        return
    fi
    _dg_forwarded=1
    if [[ -z ${_dg_pid:-} ]] || ((SECONDS - _dg_step_start < ${DG_STEP_GRACE_S:-5})); then
        # The step's tasks may not have reached their `trap "" USR1` yet (the first line of each
        # task's shell): a USR1 now would kill them. The loop in dg_run_and_requeue sends it.
        dg_log "the training step is starting: the notice goes to it in ${DG_RENOTIFY_S:-10} s"
        return
    fi
    dg_log "forwarding SIGUSR1 to the training processes: scancel --signal=USR1 $SLURM_JOB_ID"
    scancel --signal=USR1 "$SLURM_JOB_ID" || kill -s USR1 "$_dg_pid"
}

# dg_run_and_requeue CMD...: run CMD (the srun step) in the background, wait for it while
# preemption notices are forwarded, then requeue or exit (the exit codes are above).
dg_run_and_requeue() {
    # A marker from an earlier attempt must not be taken for this one's.
    rm -f "$RUN_DIR/$DG_PREEMPTED_FILE"
    # Traps run promptly only while bash waits on a background child, not during a foreground one.
    _dg_step_start=$SECONDS
    "$@" &
    _dg_pid=$!
    local rc=0 late sleeper done_pid
    # A trap interrupts `wait` (status 128+n) while srun runs on: wait again.
    while kill -0 "$_dg_pid" 2>/dev/null; do
        if [[ -z ${_dg_forwarded:-} ]]; then
            wait "$_dg_pid"
            rc=$?
            continue
        fi
        # After a notice: training processes still starting up ignore USR1 until their handler is
        # installed (the tasks' `trap "" USR1`), so a notice may be lost; repeat it every
        # DG_RENOTIFY_S seconds until the checkpoint is marked or the step ends (a process that
        # has the notice already just keeps it).
        sleep "${DG_RENOTIFY_S:-10}" &
        sleeper=$!
        done_pid=""
        wait -n -p done_pid "$_dg_pid" "$sleeper"
        late=$?
        kill "$sleeper" 2>/dev/null
        wait "$sleeper" 2>/dev/null
        if [[ $done_pid == "$_dg_pid" ]]; then
            rc=$late
        elif [[ $done_pid == "$sleeper" ]] && kill -0 "$_dg_pid" 2>/dev/null &&
            [[ ! -e $RUN_DIR/$DG_PREEMPTED_FILE ]]; then
            dg_log "repeating the preemption notice: scancel --signal=USR1 $SLURM_JOB_ID"
            scancel --signal=USR1 "$SLURM_JOB_ID" || kill -s USR1 "$_dg_pid"
        fi
    done
    # srun may have ended between an interrupted wait and kill -0: collect its real status (127 if taken).
    wait "$_dg_pid" 2>/dev/null
    late=$?
    ((late != 127)) && rc=$late
    trap - USR1 TERM
    dg_log "training step exited with code $rc at $(date +%T)"
    if [[ -f $RUN_DIR/$DG_PREEMPTED_FILE ]]; then
        dg_log "preempted, checkpoint saved: $(tr -d '\n' <"$RUN_DIR/$DG_PREEMPTED_FILE" | tr -s ' ')"
        if [[ -n ${_dg_terminated:-} ]]; then
            # Cancelled, out of time, or preempted: Slurm ends (or itself requeues) the job. A
            # requeue here would bring back a job its user cancelled.
            dg_log "not requeuing: Slurm is ending the job (SIGTERM); resubmit or requeue it to resume"
            exit "$DG_EXIT_PREEMPTED"
        fi
        if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
            dg_log "not requeuing: already requeued ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$MAX_REQUEUES)"
            exit "$DG_EXIT_PREEMPTED"
        fi
        # Said first: the requeue ends this shell (TERM) before the next line may run.
        dg_log "requeuing job $SLURM_JOB_ID: it resumes from the checkpoint (train.resume=auto)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        dg_log "scontrol requeue failed: resubmit the same command to resume"
        exit "$DG_EXIT_PREEMPTED"
    fi
    if [[ -n ${_dg_forwarded:-} ]]; then
        # The notice came, but no checkpoint was marked: training had ended (finished or failed)
        # before it reached the step boundary, or it failed while saving.
        dg_log "a preemption notice was forwarded but training left no $DG_PREEMPTED_FILE marker"
    fi
    if ((rc != 0)); then
        dg_log "training failed (exit $rc, no $DG_PREEMPTED_FILE marker): not requeuing"
    fi
    exit "$rc"
}

export -f dg_tasks_on_node

# From the moment this file is sourced (the first lines of the batch script): a notice that comes
# while the job is still setting up would otherwise kill the batch shell (USR1's default action).
# It is remembered (_dg_forwarded) and repeated to the training processes once they run.
trap '_dg_on_signal USR1' USR1
trap '_dg_on_signal TERM' TERM
