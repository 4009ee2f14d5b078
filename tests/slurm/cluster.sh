#!/usr/bin/env bash
# A single-node SLURM cluster on 127.0.0.1 for kdbench's integration tests.
#
#   tests/slurm/cluster.sh up       install (apt, Debian) and start munge, MariaDB, slurmdbd,
#                                   slurmctld and slurmd; idempotent
#   tests/slurm/cluster.sh down     stop the daemons this script started (by pid), nothing else
#   tests/slurm/cluster.sh status   say whether the cluster answers and which status mode is active
#
# Needs root on Debian (no systemd required). The configuration goes where every SLURM client
# and job looks for it, /etc/slurm (slurm.conf, gres.conf, slurmdbd.conf; never over files that
# this script did not write, and removed again by `down`); state, logs, pids and the database
# live in $KDBENCH_SLURM_DIR (default /var/tmp/kdbench-slurm). The node is made to fit the production profile on a 2-core
# machine: SlurmdParameters=config_overrides lets it declare more CPUs and memory than it has,
# and a fake GPU (gres.conf File=/dev/null) makes `gpu: 1` requests really be submitted and
# scheduled. Accounting runs through slurmdbd and MariaDB so that `sacct` works (status mode
# "sacct"); if the database cannot start, the cluster runs without accounting and with a large
# MinJobAge, so that `squeue` can follow finished jobs (status mode "squeue").
set -euo pipefail

DIR=${KDBENCH_SLURM_DIR:-/var/tmp/kdbench-slurm}
# the profile's default partitions (training jobs / analysis jobs), both on the one node
GPU_PARTITION=${KDBENCH_SLURM_GPU_PARTITION:-gpu}
CPU_PARTITION=${KDBENCH_SLURM_PARTITION:-cpu}
CPUS=${KDBENCH_SLURM_TEST_CPUS:-16}             # what the node declares (config_overrides)
MEM_MB=${KDBENCH_SLURM_TEST_MEM_MB:-128000}
GPUS=${KDBENCH_SLURM_TEST_GPUS:-2}              # fake GPUs: File=/dev/null and /dev/zero
DB_PORT=${KDBENCH_SLURM_TEST_DB_PORT:-3307}
CLUSTER=kdbench
NODE=kdnode
WAIT=${KDBENCH_SLURM_TEST_WAIT:-60}             # seconds any one wait may take

ETC=/etc/slurm
CONF=$ETC/slurm.conf
MARK="# Written by tests/slurm/cluster.sh"
unset SLURM_CONF
HOST=$(hostname -s)

say() { echo "cluster.sh: $*"; }
die() {
    echo "cluster.sh: error: $*" >&2
    exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds, at most SECONDS.
wait_for() {
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
    say "$what is up"
}

pid_alive() { [ -f "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

install_packages() {
    local need=()
    command -v munged >/dev/null || need+=(munge)
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v slurmdbd >/dev/null || need+=(slurmdbd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v mariadbd >/dev/null || need+=(mariadb-server)
    [ ${#need[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "not root: cannot install ${need[*]} (run as root, or install them)"
    command -v apt-get >/dev/null || die "no apt-get: install ${need[*]} by hand"
    say "installing ${need[*]}"
    apt-get update -qq
    # policy-rc.d stops the packages from starting their own daemons
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >"$DIR/log/apt.log" 2>&1 || die "apt-get install failed (see $DIR/log/apt.log)"
}

start_munge() {
    if pid_alive munged; then return 0; fi
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munge: using the munged already running"
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key; else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    munged --force --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log"
    wait_for "$WAIT" munge sh -c 'munge -n </dev/null | unmunge' || die "munged did not start ($DIR/log/munged.log)"
}

# MariaDB on 127.0.0.1:$DB_PORT with its data in $DIR/db; returns non-zero if it cannot start.
start_mariadb() {
    if pid_alive mariadbd; then return 0; fi
    if [ ! -d "$DIR/db/mysql" ]; then
        mariadb-install-db --user=root --datadir="$DIR/db" --auth-root-authentication-method=normal \
            >"$DIR/log/mariadb-install.log" 2>&1 || return 1
    fi
    mariadbd --no-defaults --user=root --datadir="$DIR/db" --socket="$DIR/run/mysqld.sock" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=128M \
        --innodb-lock-wait-timeout=900 >>"$DIR/log/mariadbd.log" 2>&1 &
    disown
    wait_for "$WAIT" MariaDB mariadb --no-defaults -uroot --socket="$DIR/run/mysqld.sock" -e 'select 1' || return 1
    mariadb --no-defaults -uroot --socket="$DIR/run/mysqld.sock" <<SQL || return 1
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'kdbench';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'kdbench';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

start_slurmdbd() {
    if pid_alive slurmdbd; then return 0; fi
    cat >"$ETC/slurmdbd.conf" <<EOF
$MARK: accounting of the test cluster
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=kdbench
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    write_slurm_conf sacct # sacctmgr finds slurmdbd through slurm.conf
    slurmdbd || return 1
    wait_for "$WAIT" slurmdbd sacctmgr -i list cluster || return 1
}

write_slurm_conf() {
    local accounting=$1 gres="" files=(/dev/null /dev/zero /dev/full /dev/random)
    [ "$GPUS" -le ${#files[@]} ] || die "at most ${#files[@]} fake GPUs"
    echo "$MARK: fake GPUs of the test node" >"$ETC/gres.conf"
    for ((i = 0; i < GPUS; i++)); do
        echo "NodeName=$NODE Name=gpu File=${files[$i]}" >>"$ETC/gres.conf"
    done
    [ "$GPUS" -gt 0 ] && gres="Gres=gpu:$GPUS"
    cat >"$CONF" <<EOF
$MARK: a single-node test cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
# squeue must still see a job some minutes after it ended (the "squeue" status mode)
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
JobRequeue=1
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
EOF
    if [ "$accounting" = sacct ]; then
        cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageTRES=gres/gpu
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
EOF
    else
        echo "AccountingStorageType=accounting_storage/none" >>"$CONF"
    fi
    cat >>"$CONF" <<EOF
NodeName=$NODE NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB $gres State=UNKNOWN
PartitionName=$GPU_PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$CPU_PARTITION" != "$GPU_PARTITION" ]; then
        echo "PartitionName=$CPU_PARTITION Nodes=$NODE MaxTime=INFINITE State=UP" >>"$CONF"
    fi
    echo "$accounting" >"$DIR/mode"
}

node_idle() { sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

up() {
    mkdir -p "$DIR"/{spool/ctld,spool/d,log,run,db} "$ETC"
    local f
    for f in slurm.conf gres.conf slurmdbd.conf; do
        if [ -s "$ETC/$f" ] && ! grep -q "^$MARK" "$ETC/$f"; then
            die "$ETC/$f belongs to another SLURM set-up: not touching it"
        fi
    done
    install_packages
    if pid_alive slurmctld && pid_alive slurmd && node_idle; then
        say "already up (status mode: $(cat "$DIR/mode"))"
        return 0
    fi
    start_munge
    local mode=squeue
    if start_mariadb && start_slurmdbd; then
        mode=sacct
    else
        say "accounting database unavailable (see $DIR/log): running without slurmdbd"
    fi
    write_slurm_conf "$mode"
    if ! pid_alive slurmctld; then
        slurmctld -i || die "slurmctld did not start ($DIR/log/slurmctld.log)"
    fi
    wait_for "$WAIT" slurmctld scontrol ping || die "slurmctld does not answer ($DIR/log/slurmctld.log)"
    if ! pid_alive slurmd; then
        slurmd -N "$NODE" || die "slurmd did not start ($DIR/log/slurmd.log)"
    fi
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for "$WAIT" "node $NODE" node_idle || die "node $NODE is not idle: $(sinfo -h -n $NODE -o '%t %E')"
    if [ "$mode" = sacct ]; then
        wait_for "$WAIT" accounting sh -c "sacctmgr -n list cluster format=cluster | grep -qw $CLUSTER" ||
            say "warning: cluster $CLUSTER is not registered with slurmdbd yet"
    fi
    say "up: partitions $GPU_PARTITION and $CPU_PARTITION, $CPUS CPUs, $GPUS fake GPUs, status mode: $mode"
}

stop_pid() {
    local name=$1
    pid_alive "$name" || {
        rm -f "$DIR/run/$name.pid"
        return 0
    }
    local pid
    pid=$(cat "$DIR/run/$name.pid")
    kill "$pid" 2>/dev/null || true
    local end=$((SECONDS + WAIT))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) ignored SIGTERM: killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$name.pid"
    say "stopped $name"
}

down() {
    [ -d "$DIR" ] || {
        say "nothing to stop"
        return 0
    }
    # jobs first, so that slurmd has nothing left to clean up
    if pid_alive slurmctld; then scancel --nodelist="$NODE" >/dev/null 2>&1 || true; fi
    for name in slurmd slurmctld slurmdbd mariadbd munged; do stop_pid "$name"; done
    local f
    for f in slurm.conf gres.conf slurmdbd.conf; do
        if [ -f "$ETC/$f" ] && grep -q "^$MARK" "$ETC/$f"; then rm -f "$ETC/$f"; fi
    done
}

status() {
    if [ ! -f "$CONF" ]; then
        say "down (no $CONF)"
        return 3
    fi
    local name
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid_alive "$name"; then echo "$name: running ($(cat "$DIR/run/$name.pid"))"; else echo "$name: not running"; fi
    done
    if scontrol ping >/dev/null 2>&1 && node_idle; then
        echo "status mode: $(cat "$DIR/mode")"
        sinfo
        return 0
    fi
    say "down (slurmctld does not answer or the node is not up)"
    return 3
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
