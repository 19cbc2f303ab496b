#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian packages, no systemd): slurmctld,
# slurmd, slurmdbd on MariaDB for accounting (submitit polls sacct), munge for authentication.
#
#   slurm/cluster.sh install   apt-get the packages (root; daemons are not auto-started)
#   slurm/cluster.sh start     install if needed, write configs, start all daemons, wait for the node
#   slurm/cluster.sh status    sinfo + a 1-second test job
#   slurm/cluster.sh stop      stop the daemons by their pid files and delete state + database
#
# State lives in $VITNQS_SLURM_DIR (default /tmp/vitnqs-slurm); slurm.conf is written to
# /etc/slurm/slurm.conf, where the SLURM client commands look by default. MpiDefault=pmi2, which is
# what the project's MPICH wheel needs under srun.
set -euo pipefail
DIR="${VITNQS_SLURM_DIR:-/tmp/vitnqs-slurm}"
ETC=/etc/slurm
NODE="$(hostname -s)"
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

log() { echo "[cluster] $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
     && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    return
  fi
  log "installing ${PKGS[*]}"
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d   # keep apt from starting daemons
  chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PKGS[@]}" >/dev/null
}

stop_pid() {  # stop_pid NAME PIDFILE
  local pidfile="$2"
  [ -f "$pidfile" ] || return 0
  local pid; pid="$(cat "$pidfile" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop() {
  stop_pid slurmd "$DIR/run/slurmd.pid"
  stop_pid slurmctld "$DIR/run/slurmctld.pid"
  stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
  stop_pid mariadbd "$DIR/run/mariadbd.pid"
  stop_pid munged "$DIR/munge/munged.pid"
  rm -rf "$DIR"  # state and accounting database together, or job ids collide
  log "stopped"
}

write_configs() {
  local cpus mem
  cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')"
  mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  mem=$(( mem * 9 / 10 ))
  mkdir -p "$ETC" "$DIR"/{run,log,state,spool,mysql}
  cat > "$ETC/slurm.conf" <<CONF
# written by vitnqs slurm/cluster.sh: a single-node test cluster
ClusterName=vitnqs
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=pmi2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=root
StorageLoc=vitnqs_acct_db
CONF
  chmod 600 "$ETC/slurmdbd.conf"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t="$1" what="$2"; shift 2
  for _ in $(seq $(( t * 10 ))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "timed out waiting for $what"; return 1
}

start() {
  install
  if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already running"; return 0
  fi
  stop >/dev/null 2>&1 || true
  write_configs
  # munge: its own key and socket directory, run as the munge user (it refuses a root-owned key)
  # The socket is at munge's default path, where every SLURM client command looks for it.
  local M="$DIR/munge"
  mkdir -p "$M" /run/munge
  chown munge:munge /run/munge
  mungekey --create --force --keyfile="$M/munge.key" >/dev/null 2>&1 || \
    dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 2>/dev/null
  chown -R munge:munge "$M"; chmod 755 "$M"; chmod 400 "$M/munge.key"
  runuser -u munge -- munged --key-file="$M/munge.key" --socket=/run/munge/munge.socket.2 \
    --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/seed"
  wait_for 10 munge test -S /run/munge/munge.socket.2
  # MariaDB for accounting, on its own data directory and a TCP port on loopback only
  mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
    >"$DIR/log/mariadb-install.log" 2>&1
  mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysqld.sock" \
    --pid-file="$DIR/run/mariadbd.pid" --port=3306 --bind-address=127.0.0.1 \
    --log-error="$DIR/log/mariadbd.log" </dev/null >/dev/null 2>&1 &
  disown
  wait_for 30 mariadb mariadb --protocol=tcp -h 127.0.0.1 -u root -e "select 1"
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster vitnqs >/dev/null 2>&1 || true
  slurmctld
  slurmd
  wait_for 30 "the node to be idle" bash -c "sinfo -h -o %t | grep -q idle"
  log "running: $(sinfo -h -o '%P %D %t %c CPUs')"
}

status() {
  sinfo
  srun -N1 -n1 -t 1 hostname
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
