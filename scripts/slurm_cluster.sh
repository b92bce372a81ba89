#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (controller and compute node on the same host).
#
# What for:
#   * the tests marked `slurm` (pytest -m slurm), which submit real jobs with sbatch / submitit;
#   * trying the SLURM path of chat-runner on a laptop or a VM without a cluster, e.g.
#       python -m runner -m hydra/launcher=slurm hydra.launcher.partition=debug \
#         hydra.launcher.gpus_per_node=0 hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 ...
#     (the preset in conf/hydra/launcher/slurm.yaml asks for a GPU, 8 CPUs and 64 GB, which a
#     laptop node does not have: such jobs stay pending or are refused, so scale them down).
#
# What it needs:
#   * Debian or Ubuntu (apt-get), root or sudo. Missing daemons are installed from the distribution:
#     `slurm-wlm` (slurmctld, slurmd, client tools) and `munge` (authentication).
#   * No systemd: the daemons are started directly in the background. Nothing is enabled at boot;
#     run `start` again after a reboot.
#
# Usage:
#   bash scripts/slurm_cluster.sh [start]   install if needed, configure, start, wait until the node is idle
#   bash scripts/slurm_cluster.sh stop      stop slurmd and slurmctld (munged is left running: it is
#                                           harmless, other software may use it, and `start` reuses it)
#   bash scripts/slurm_cluster.sh status    print sinfo; exit 0 when the cluster is up, 1 otherwise
#
# `start` is idempotent: when the controller answers and the node is usable it only says so.
# Jobs queued or running survive `stop` + `start` (state is kept in /var/spool/slurmctld).
#
# The cluster: one node named after `hostname -s` (reached at 127.0.0.1, so a changing LAN address or
# an unresolvable hostname do not matter), CPUs = nproc, RealMemory = MemTotal minus some headroom,
# one partition `debug` (default, no time limit). Cores and memory are consumable (cons_tres,
# CR_Core_Memory), so two `-c 1` jobs run at once on a 2-CPU machine; a job without --mem gets
# DefMemPerCPU (RealMemory / CPUs per CPU) rather than the whole node. Limits are only bookkeeping:
# there are no cgroups, so a job can use more memory or CPU than it asked for. No accounting
# database: `sacct` does not work (use squeue / scontrol show job, as chat-runner's launcher does
# here). Daemons run as root (SlurmUser=root); jobs run as the user who submitted them, root
# included.
#
# Files: /etc/slurm/slurm.conf (written by this script; a different existing one is backed up),
#        /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log,
#        /var/spool/slurmctld (controller state), /var/spool/slurmd, /run/slurm (pid files).
#
# Environment (optional):
#   SLURM_CLUSTER_NAME      cluster name (default: localcluster)
#   SLURM_MEM_HEADROOM_MB   memory kept back from RealMemory (default: 10% of MemTotal, 512..2048 MB)
#   SLURM_START_TIMEOUT     seconds to wait for the node to become idle (default: 60)
set -euo pipefail

# Daemons and admin tools live in sbin, which a non-root PATH often lacks.
export PATH="$PATH:/usr/sbin:/sbin"

CLUSTER_NAME=${SLURM_CLUSTER_NAME:-localcluster}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
PARTITION=debug
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
PID_DIR=/run/slurm
CTLD_PID=$PID_DIR/slurmctld.pid
SLURMD_PID=$PID_DIR/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_LOG=/var/log/munge/munged.log
MARKER="# Written by chat-runner scripts/slurm_cluster.sh"

NODE=$(hostname -s)

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
else
  if ! command -v sudo >/dev/null 2>&1; then
    echo "slurm_cluster.sh: needs root or sudo (to install packages, write $CONF and start daemons)" >&2
    exit 1
  fi
  SUDO=(sudo)
fi

log() { echo "slurm_cluster.sh: $*"; }
die() { echo "slurm_cluster.sh: ERROR: $*" >&2; exit 1; }
as_root() { "${SUDO[@]}" "$@"; }

show_logs() {
  local f
  for f in "$CTLD_LOG" "$SLURMD_LOG"; do
    echo "----- last lines of $f -----" >&2
    as_root tail -n 25 "$f" >&2 2>/dev/null || echo "(no $f)" >&2
  done
}

# ---------------------------------------------------------------- queries

# Is the controller answering?
ctld_up() {
  scontrol ping 2>/dev/null | grep -q 'is UP'
}

# The node's state as sinfo prints it (idle, mixed, allocated, down*, drained, ...), or empty.
node_state() {
  sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true
}

# Can the node take jobs? (idle, mixed, allocated, completing; a trailing * means "not responding")
node_usable() {
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

# Is the daemon of this pid file running? (pid files are world-readable; no root needed)
pid_alive() {  # pid file, daemon name
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# slurmctld notices a dead slurmd only after SlurmdTimeout, so look at the process too.
cluster_up() {
  ctld_up && pid_alive "$SLURMD_PID" slurmd && node_usable
}

munge_works() {
  command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

summary() {
  local cpus mem
  cpus=$(sinfo -h -n "$NODE" -o %c 2>/dev/null | head -n 1)
  mem=$(sinfo -h -n "$NODE" -o %m 2>/dev/null | head -n 1)
  echo "SLURM cluster '$CLUSTER_NAME' is up: node $NODE ($(node_state)), CPUs=$cpus," \
    "RealMemory=${mem}MB, partition $PARTITION (default)"
}

# ---------------------------------------------------------------- steps

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(sbatch)
  command -v munged >/dev/null 2>&1 || missing+=(munged)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and there is no apt-get: install SLURM and munge with your package manager"
  log "installing slurm-wlm and munge (missing: ${missing[*]}) ..."
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
    die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    slurm-wlm munge >/dev/null ||
    die "apt-get install slurm-wlm munge failed (run it by hand to see why)"
  local tool
  for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 ||
      die "slurm-wlm and munge were installed but $tool is still not on PATH"
  done
}

start_munge() {
  if munge_works; then
    return 0
  fi
  as_root mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
  if ! as_root test -s "$MUNGE_KEY"; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
      as_root mungekey --create --keyfile="$MUNGE_KEY"
    else
      as_root dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
  fi
  # munged insists on a key readable by its own user only, and on directories nobody else can write.
  local user=root
  if id munge >/dev/null 2>&1; then
    user=munge
  fi
  as_root chown "$user:$user" "$MUNGE_KEY" /etc/munge /var/log/munge /var/lib/munge /run/munge
  as_root chmod 0400 "$MUNGE_KEY"
  as_root chmod 0700 /etc/munge /var/log/munge /var/lib/munge
  as_root chmod 0755 /run/munge
  log "starting munged (as $user)"
  if [ "$user" = root ]; then
    as_root munged --force
  else
    as_root runuser -u munge -- munged
  fi
  local i
  for i in $(seq 1 20); do
    munge_works && return 0
    sleep 0.5
    : "$i"
  done
  as_root tail -n 20 "$MUNGE_LOG" >&2 2>/dev/null || true
  die "munged does not answer (munge -n | unmunge fails); see $MUNGE_LOG"
}

# The slurm.conf this script wants, on stdout.
render_conf() {
  local cpus mem_kb total_mb headroom real_mb def_mem
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  total_mb=$((mem_kb / 1024))
  headroom=${SLURM_MEM_HEADROOM_MB:-$((total_mb / 10))}
  if [ -z "${SLURM_MEM_HEADROOM_MB:-}" ]; then
    if [ "$headroom" -lt 512 ]; then headroom=512; fi
    if [ "$headroom" -gt 2048 ]; then headroom=2048; fi
  fi
  real_mb=$((total_mb - headroom))
  if [ "$real_mb" -lt 256 ]; then
    die "too little memory for a node: MemTotal ${total_mb}MB minus headroom ${headroom}MB"
  fi
  def_mem=$((real_mb / cpus))
  cat <<EOF
$MARKER
# One-node cluster for local tests (node $NODE: CPUs=$cpus RealMemory=${real_mb}MB)
# Rewritten by the script when the machine changes; edits here are overwritten.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 seconds before it can start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain process tracking, no task binding or containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
JobRequeue=1
ReturnToService=2
# Short timers, so that tests see state changes quickly.
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

conf_current() {  # is $CONF what render_conf writes?
  [ -f "$CONF" ] && render_conf | cmp -s - "$CONF"
}

# Writes slurm.conf when its content differs; sets CONF_CHANGED=1 when it did.
CONF_CHANGED=0
write_conf() {
  local tmp summary_line
  if conf_current; then
    return 0
  fi
  tmp=$(mktemp)
  render_conf >"$tmp"
  as_root mkdir -p "$CONF_DIR"
  if as_root test -f "$CONF" && ! as_root grep -qF "$MARKER" "$CONF"; then
    local backup
    backup="$CONF.bak.$(date +%Y%m%d%H%M%S)"
    log "an existing $CONF was not written by this script: moved to $backup"
    as_root mv "$CONF" "$backup"
  fi
  as_root install -m 0644 "$tmp" "$CONF"
  summary_line=$(sed -n 2p "$tmp")
  summary_line=${summary_line#* (}
  rm -f "$tmp"
  log "wrote $CONF: ${summary_line%)}"
  CONF_CHANGED=1
}

make_dirs() {
  as_root mkdir -p "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR" "$PID_DIR"
  as_root chmod 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR" "$PID_DIR"
}

stop_daemon() {  # name pidfile
  local name=$1 pidfile=$2 pid i
  pid_alive "$pidfile" "$name" || return 0
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  as_root kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    as_root kill -0 "$pid" 2>/dev/null || { as_root rm -f "$pidfile"; return 0; }
    sleep 0.25
    : "$i"
  done
  log "$name (pid $pid) did not stop after 10 s: killing it"
  as_root kill -KILL "$pid" 2>/dev/null || true
  as_root rm -f "$pidfile"
}

start_daemons() {
  if ! ctld_up; then
    if pid_alive "$CTLD_PID" slurmctld; then
      stop_daemon slurmctld "$CTLD_PID"
    fi
    log "starting slurmctld (log: $CTLD_LOG)"
    as_root slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start; see $CTLD_LOG"; }
    local i
    for i in $(seq 1 40); do
      ctld_up && break
      sleep 0.5
      : "$i"
    done
    ctld_up || { show_logs; die "slurmctld does not answer 'scontrol ping'; see $CTLD_LOG"; }
  fi
  if ! pid_alive "$SLURMD_PID" slurmd; then
    log "starting slurmd (log: $SLURMD_LOG)"
    SLURMD_STARTED_AT=$(date +%s)
    as_root slurmd -f "$CONF" || { show_logs; die "slurmd failed to start; see $SLURMD_LOG"; }
  fi
}

# Has the slurmd started at $SLURMD_STARTED_AT registered with slurmctld? (Until a dead slurmd
# misses SlurmdTimeout, slurmctld still shows the node idle from the last registration.)
SLURMD_STARTED_AT=0
slurmd_registered() {
  local started
  [ "$SLURMD_STARTED_AT" -eq 0 ] && return 0
  started=$(scontrol -o show node "$NODE" 2>/dev/null | tr ' ' '\n' | sed -n 's/^SlurmdStartTime=//p')
  [ -n "$started" ] && [ "$started" != None ] &&
    [ "$(date -d "$started" +%s 2>/dev/null || echo 0)" -ge $((SLURMD_STARTED_AT - 1)) ]
}

wait_for_node() {
  local deadline state resumed=0
  deadline=$((SECONDS + START_TIMEOUT))
  while [ $SECONDS -lt "$deadline" ]; do
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated | completing)
        if slurmd_registered; then
          return 0
        fi
        ;;
      down* | drain* | fail*)
        if [ $resumed -eq 0 ] || [ $((SECONDS % 10)) -eq 0 ]; then
          log "node $NODE is '$state' ($(sinfo -h -R -n "$NODE" -o %E 2>/dev/null | head -n 1)): resuming it"
          as_root scontrol update nodename="$NODE" state=resume 2>/dev/null || true
          resumed=1
        fi
        ;;
    esac
    pid_alive "$SLURMD_PID" slurmd || { show_logs; die "slurmd exited; see $SLURMD_LOG"; }
    sleep 1
  done
  show_logs
  die "node $NODE is not idle after ${START_TIMEOUT}s (state: '$(node_state)'); see $CTLD_LOG and $SLURMD_LOG"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  if command -v scontrol >/dev/null 2>&1 && cluster_up; then
    if ! conf_current; then
      log "note: $CONF differs from what this script writes now; run 'stop' then 'start' to apply it"
    fi
    summary
    return 0
  fi
  install_packages
  start_munge
  make_dirs
  write_conf
  if [ "$CONF_CHANGED" -eq 1 ]; then
    # The node layout changed: running daemons would still use the old one.
    if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then
      log "configuration changed: restarting the daemons"
      stop_daemon slurmd "$SLURMD_PID"
      stop_daemon slurmctld "$CTLD_PID"
    fi
  fi
  start_daemons
  wait_for_node
  summary
}

cmd_stop() {
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$CTLD_PID"
  log "stopped (munged left running)"
}

cmd_status() {
  if ! command -v sinfo >/dev/null 2>&1; then
    echo "SLURM is not installed (run: bash scripts/slurm_cluster.sh start)"
    return 1
  fi
  if ! ctld_up; then
    echo "slurmctld is not running or does not answer (scontrol ping); see $CTLD_LOG"
    return 1
  fi
  sinfo
  if ! pid_alive "$SLURMD_PID" slurmd; then
    echo "slurmd is not running; see $SLURMD_LOG"
    return 1
  fi
  if node_usable; then
    return 0
  fi
  echo "node $NODE is '$(node_state)'; see $SLURMD_LOG"
  return 1
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *)
    echo "usage: bash scripts/slurm_cluster.sh [start|stop|status]" >&2
    exit 2
    ;;
esac
