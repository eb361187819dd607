#!/bin/bash
# A real three-node SLURM cluster on this host, for tests and CI (Debian slurm-wlm + munge, root).
#
#   tests/slurm/cluster.sh up     start munged (if none runs), slurmctld, slurmd n1, n2 and n3
#   tests/slurm/cluster.sh down   cancel jobs, stop what `up` started
#   tests/slurm/cluster.sh env    print `export SLURM_CONF=...` for client commands
#
# All nodes run on this host (Debian's slurmd is built with multiple-slurmd): n1, n2 and n3,
# NodeAddr 127.0.0.1, 2 CPUs each, one partition `debug` holding them. Three nodes, because a
# Ray sweep's worker step then has 2 tasks (a 2-node allocation gives 1, which hid rank
# detection mistaking a Ray worker for a rank). Nothing is isolated: the emulated nodes share
# the machine's cores.
# Install first: apt-get install -y --no-install-recommends slurm-wlm munge
set -euo pipefail
D=${BIGBATCH_SLURM_DIR:-/tmp/bigbatch-slurm-cluster}
CONF=$D/slurm.conf
NODES=3
export SLURM_CONF=$CONF

need() { command -v "$1" >/dev/null || { echo "cluster.sh: $1 not found; install: apt-get install -y --no-install-recommends slurm-wlm munge" >&2; exit 2; }; }

running() { [ -f "$CONF" ] && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; }

up() {
  need slurmctld; need slurmd; need munged; need sinfo
  if running; then echo "cluster.sh: already running ($CONF)"; return 0; fi
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: must run as root (SlurmUser=root)" >&2; exit 2; }
  local host mem
  host=$(hostname -s)
  # RealMemory must not exceed what slurmd -C reports, else the node drains.
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p'); mem=$(( mem / 4 ))
  rm -rf "$D/state" "$D/spool"
  mkdir -p "$D/state" "$D/spool" "$D/log"
  cat > "$CONF" <<CONF
ClusterName=bigbatch
SlurmctldHost=$host
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
KillWait=30
JobRequeue=1
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=n3 NodeHostname=$host NodeAddr=127.0.0.1 Port=17003 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2,n3 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  if ! pgrep -x munged >/dev/null; then
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$D/munged.ours"
  fi
  /usr/sbin/slurmctld
  /usr/sbin/slurmd -N n1
  /usr/sbin/slurmd -N n2
  /usr/sbin/slurmd -N n3
  for _ in $(seq 100); do
    [ "$(sinfo -h -o '%D %T' 2>/dev/null | awk '$2=="idle"{s+=$1} END{print s+0}')" = "$NODES" ] && break
    sleep 0.2
  done
  sinfo -h -o '%D %T' | awk '$2=="idle"{s+=$1} END{exit !(s=='"$NODES"')}' || { echo "cluster.sh: nodes did not come up; see $D/log" >&2; sinfo >&2; exit 1; }
  echo "cluster.sh: up: export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local f=$1 p
  [ -f "$f" ] || return 0
  p=$(cat "$f"); kill "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  rm -f "$f"
}

down() {
  [ -f "$CONF" ] || { echo "cluster.sh: not running"; return 0; }
  # slurmstepd outlives slurmd: cancel jobs first and give their steps a moment to end.
  if timeout 5 squeue -h -o %i 2>/dev/null | grep -q .; then
    scancel --full --signal=KILL "$(squeue -h -o %i | tr '\n' ',' | sed 's/,$//')" 2>/dev/null || true
    timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do timeout 5 squeue -h -o %i 2>/dev/null | grep -q . || break; sleep 0.2; done
  fi
  for n in n1 n2 n3; do stop_pidfile "$D/slurmd-$n.pid"; done; stop_pidfile "$D/slurmctld.pid"
  if [ -f "$D/munged.ours" ]; then stop_pidfile /run/munge/munged.pid; rm -f "$D/munged.ours"; fi
  rm -f "$CONF"
  echo "cluster.sh: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
