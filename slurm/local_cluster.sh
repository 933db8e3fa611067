#!/usr/bin/env bash
# A real SLURM cluster (slurmctld + slurmd + munged) on this one machine, for the
# project's tests and for trying the SLURM path on a laptop.
#
#   sudo bash slurm/local_cluster.sh start [--nodes N]   # N >= 1, default 1
#   sudo bash slurm/local_cluster.sh stop
#   bash slurm/local_cluster.sh status                 # exit 0 = up and healthy
#   export SLURM_CONF=/var/tmp/radiodiff_resume-slurm/slurm.conf   # for sbatch/srun/squeue
#
# Everything lives under ${RADIODIFF_SLURM_ROOT:-/var/tmp/radiodiff_resume-slurm}:
# slurm.conf, munge key and socket, spool, state, logs, pid files, hosts file.
# /etc/slurm and the system's munge setup are never read or written: the daemons
# get every path on the command line or through our own slurm.conf, and use
# non-default ports so that a system Slurm on the same machine is not disturbed.
#
# Findings behind the choices below: the design note shared/design/SLURM_LOCAL.md
# (measured with Debian 12, Slurm 22.05.8, munge 0.5.15).
set -euo pipefail

ROOT=${RADIODIFF_SLURM_ROOT:-/var/tmp/radiodiff_resume-slurm}
CONF=$ROOT/slurm.conf
RUN=$ROOT/run
LOG=$ROOT/log
MUNGE_DIR=$ROOT/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
HOSTS=$ROOT/hosts
NODES_FILE=$ROOT/nodes
# Tag put into every daemon's environment. slurmd passes its environment on to the
# slurmstepd processes it starts, so `stop` can find leftover step daemons of THIS
# cluster (and only of this cluster) by reading /proc/<pid>/environ.
TAG="RADIODIFF_SLURM_CLUSTER=$ROOT"

BRIDGE=br-rr
NET_PREFIX=10.200.0
CTL_IP=$NET_PREFIX.1
NS_PREFIX=rr-node          # network namespaces rr-node1, rr-node2, ...
CTL_PORT=16817             # not 6817/6818: a system Slurm may already use those
SLURMD_PORT=16818
START_TIMEOUT=${RADIODIFF_SLURM_START_TIMEOUT:-60}
NODE_CPUS=16               # declared CPUs per node (see write_conf)
PREEMPT_GRACE_S=60         # GraceTime of partition "preemptible"

export SLURM_CONF=$CONF
# Debian installs the daemons in /usr/sbin, which is not on a non-root PATH.
export PATH=$PATH:/usr/sbin:/sbin

usage() {
    cat <<EOF
usage: $0 start [--nodes N] | stop | status | -h

  start [--nodes N]  start a local SLURM cluster with N nodes (default 1; root only).
                     N = 1: one slurmd on this host. N >= 2: each node is its own
                     host (network namespace $NS_PREFIX<i>, hostname node<i>,
                     IP $NET_PREFIX.(10+i)) on the bridge $BRIDGE ($CTL_IP/24).
                     Idempotent; restarts the cluster if the node count differs.
  stop               stop daemons, delete namespaces and bridge (root only);
                     keeps $ROOT (logs) in place. Idempotent.
  status             node count and sinfo; exit 0 when up and all nodes respond.

State folder: \$RADIODIFF_SLURM_ROOT (now $ROOT).
Clients need: export SLURM_CONF=$CONF
EOF
}

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
say() { echo "local_cluster.sh: $*"; }

lock() {  # one start/stop at a time: test processes may call start concurrently
    mkdir -p "$ROOT"
    # Every daemon is started with 9>&-: an inherited descriptor would keep the
    # lock held for as long as the daemon (and its slurmstepd children) live.
    exec 9>"$ROOT/lock"
    flock -w 300 9 || die "another local_cluster.sh start/stop holds $ROOT/lock for 300 s"
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (network namespaces, daemons running as root); try: sudo bash $0 $1"
}

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=()
    for bin in slurmctld slurmd munged; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    if ((${#missing[@]} == 0)); then return 0; fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${missing[*]} and no apt-get to install slurm-wlm and munge; install Slurm (>= 22.05) and munge yourself"
    say "installing slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$LOG/apt.log" 2>&1 ||
        { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install slurm-wlm munge failed (log: $LOG/apt.log)"; }
    for bin in slurmctld slurmd munged; do
        command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after installing slurm-wlm munge"
    done
}

# ---------------------------------------------------------------- helpers
alive() {  # alive PIDFILE -> 0 if the daemon named by PIDFILE (slurmd-node1.pid: slurmd) runs
    local pid name comm
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    name=${1##*/}
    name=${name%.pid}
    name=${name%%-*}
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # /proc, not kill -0: 'status' also runs as a normal user (EPERM on root's daemons).
    # The name check: after a reboot a stale pid file may name an unrelated process.
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}

configured_nodes() { [[ -s $NODES_FILE ]] && cat "$NODES_FILE" || echo 0; }

# Prints "<name> <state>" per node; empty if the controller does not answer.
node_states() { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true; }

# healthy N: controller answers, exactly N nodes, all responding and usable.
healthy() {
    local n=$1 states count bad
    alive "$RUN/slurmctld.pid" || return 1
    alive "$RUN/munged.pid" || return 1
    states=$(node_states)
    [[ -n $states ]] || return 1
    count=$(wc -l <<<"$states")
    [[ $count -eq $n ]] || return 1
    # A trailing '*' means "not responding"; down/drain/fail/inval need a restart.
    bad=$(awk '$2 ~ /\*|down|drain|fail|inval|unknown|future/' <<<"$states")
    [[ -z $bad ]]
}

fail_start() {  # fail_start MESSAGE: log tails, tear down the half-started cluster, exit 1
    log_tail
    do_stop >/dev/null 2>&1 || true
    die "start failed: $* (logs: $LOG)"
}

net() {  # net CMD...: one network setup step; a failure stops the start with a clear message
    "$@" || fail_start "network setup failed at '$*' (needs root with CAP_NET_ADMIN, veth and bridge support)"
}

log_tail() {  # the last lines of this start's logs, without the known harmless noise
    local f
    for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd-node*.log; do
        [[ -f $f ]] || continue
        echo "---- tail $f" >&2
        grep -vE 'pmix|MPI: Cannot create context|Unauthorized credential|state file|Jobs may be lost|Reservations may be lost' "$f" |
            tail -n 15 >&2 || true
    done
}

# ---------------------------------------------------------------- stop
kill_pidfiles() {  # kill_pidfiles FILE...: TERM all at once, KILL what is left after 10 s
    local f pid i pids=()
    for f in "$@"; do
        if alive "$f"; then pids+=("$(<"$f")"); fi
    done
    if ((${#pids[@]} == 0)); then rm -f "$@"; return 0; fi
    # All together: each daemon takes ~2 s to shut down, one after the other 6 s.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "${pids[@]}" 2>/dev/null || break   # fails only when none is left
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    rm -f "$@"  # after the daemons: they remove their own pid file on exit
}

tagged_pids() {  # processes started by this cluster's daemons (slurmstepd, ...) and their descendants
    local p
    local -a tagged=()
    for p in /proc/[0-9]*; do
        if grep -qzxF "$TAG" "$p/environ" 2>/dev/null; then tagged+=("${p#/proc/}"); fi
    done
    ((${#tagged[@]})) || return 0
    # The job processes under a slurmstepd carry the job's environment, not the tag.
    ps -e -o pid=,ppid= | awk -v roots="${tagged[*]}" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
            for (p in keep) print p
        }'
}

do_stop() {
    local n f i pids jobs
    n=$(configured_nodes)
    # 1. End running jobs first: killing slurmd does not end its slurmstepd
    #    processes nor the jobs under them. KILL rather than a plain scancel,
    #    which would wait KillWait=30 s per job.
    if alive "$RUN/slurmctld.pid"; then
        mapfile -t jobs < <(timeout 10 squeue -h -t RUNNING,SUSPENDED,COMPLETING -o %A 2>/dev/null || true)
        if ((${#jobs[@]})); then
            timeout 10 scancel -f -s KILL "${jobs[@]}" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [[ -z $(timeout 5 squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    # 2. Daemons by their pid files.
    kill_pidfiles "$RUN"/*.pid
    # 3. Whatever is left: step daemons of this cluster (tagged environment), and
    #    every process inside our node namespaces (jobs included).
    mapfile -t pids < <(tagged_pids)
    if [[ -d /run/netns ]]; then
        for f in /run/netns/"$NS_PREFIX"*; do
            [[ -e $f ]] || continue
            mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "${f##*/}" 2>/dev/null || true)
        done
    fi
    if ((${#pids[@]})); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    # 4. Network: namespaces (their veth ends go with them) and the bridge.
    if [[ -d /run/netns ]]; then
        for f in /run/netns/"$NS_PREFIX"*; do
            if [[ -e $f ]]; then ip netns delete "${f##*/}" 2>/dev/null || true; fi
        done
    fi
    # Namespace teardown is asynchronous: wait (max 5 s) for the host-side veth
    # ends to go, else a quick restart fails on "veth-rr1: File exists".
    for ((i = 0; i < 50; i++)); do
        compgen -G '/sys/class/net/veth-rr*' >/dev/null || break
        sleep 0.1
    done
    for f in /sys/class/net/veth-rr*; do
        if [[ -e $f ]]; then ip link delete "${f##*/}" 2>/dev/null || true; fi
    done
    if [[ -e /sys/class/net/$BRIDGE ]]; then
        ip link delete "$BRIDGE" 2>/dev/null || true
    fi
    # The FORWARD rule setup_network added for the bridge (every copy of it).
    if command -v iptables >/dev/null 2>&1; then
        while iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null; do :; done
    fi
    rm -f "$NODES_FILE"
    if [[ $n != 0 ]]; then say "stopped ($n node(s)); logs kept in $LOG"; else say "not running"; fi
}

# ---------------------------------------------------------------- start
write_conf() {
    local n=$1 host ctl_addr mem_mb mem i
    host=$(hostname -s)
    # Nodes share the host's memory; select/cons_tres with CR_Core does not
    # consume memory, RealMemory only bounds --mem. Half the host, at most 4 GB.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mem=$((mem_mb / 2))
    if ((mem > 4096)); then mem=4096; fi
    # One node: on the host itself, no namespace. This works wherever the daemons
    # run (also in containers without CAP_NET_ADMIN), and a single node needs no
    # own hostname/IP. Several nodes: each a namespace with its own IP, so that
    # srun -N2 and torch.distributed really talk over a network.
    if ((n == 1)); then ctl_addr=127.0.0.1; else ctl_addr=$CTL_IP; fi
    {
        cat <<EOF
# Written by slurm/local_cluster.sh; rewritten on every start.
ClusterName=radiodiff
# slurmctld checks that its own short hostname is listed here.
SlurmctldHost=$host($ctl_addr)
SlurmctldPort=$CTL_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged socket (its folder must be mode 755). cred_expire=10 (default
# 120): a requeued job may start only cred_expire+1 s after the requeue.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$ROOT/state
# %n = node name: several slurmd share this filesystem.
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: they may be absent or read-only (containers, namespaces).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the CPUs/RealMemory below even where the hardware has fewer (nodes
# share this machine's cores); otherwise a node is set INVALID.
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
# A node that was down comes back by itself as soon as its slurmd registers.
ReturnToService=2
# A requeued job gets BeginTime = requeue + cred_expire + 1 s. When that time
# passes no event wakes the scheduler, and backfill skips its cycle when no job or
# node changed: with bf_interval alone the job waited for the main loop (every
# sched_interval, default 60 s): 55-59 s measured. sched_interval=2: 11-12 s.
SchedulerParameters=bf_interval=2,sched_interval=2
# No accounting (sacct does not work): finished jobs must stay in slurmctld's
# memory, visible to 'scontrol show job', for an hour: a test session that runs
# longer than 10 minutes checks some jobs more than 10 minutes after they ended.
MinJobAge=3600
# Default 30 s SIGTERM -> SIGKILL grace; the tests rely on it.
KillWait=30
InactiveLimit=0
# Real preemption (docs/slurm.md, tests/slurm/test_preemption.py): a job in a partition of a
# higher PriorityTier preempts jobs of partition "preemptible" that hold resources it needs.
# The partition's PreemptMode=REQUEUE and GraceTime below apply; the default partition "debug"
# is never preempted (PreemptMode=OFF there). The cluster-wide PreemptMode must not be OFF
# when PreemptType is not preempt/none.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# "slot": one per node, requested by nobody but the preemption tests. A job that holds a
# node's slot in "preemptible" blocks a job of "urgent" that asks for the same node's slot,
# whatever else runs there: the urgent job can start only by preempting it (CPUs are not
# scarce here: 16 slots per node, see below). Without a gres.conf, slurmd takes the count
# from the Gres= of its NodeName line.
GresTypes=slot
# No mail on this machine; the default /usr/bin/mail is missing and logs an error.
MailProg=/bin/true
Waittime=0
EOF
        # CPUs: slots, not cores (config_overrides above). The project's tests submit all their
        # jobs at once (tests/slurm/scenarios.py), a dozen 1-CPU tasks that mostly sleep (paced
        # training steps): every one of them must start at once, on 2 cores or on 64.
        for ((i = 1; i <= n; i++)); do
            if ((n == 1)); then
                echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$mem Gres=slot:1 State=UNKNOWN"
            else
                echo "NodeName=node$i NodeHostname=node$i NodeAddr=$NET_PREFIX.$((10 + i)) CPUs=$NODE_CPUS RealMemory=$mem Gres=slot:1 State=UNKNOWN"
            fi
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF"
        # Preemption: on the same nodes; GraceTime = seconds between the preemption's SIGTERM
        # and the requeue (which ends the job's processes: SIGTERM, then SIGKILL after KillWait).
        echo "PartitionName=preemptible Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$PREEMPT_GRACE_S"
        echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
    } >"$CONF"
    chmod 644 "$CONF"
}

setup_network() {
    local n=$1 host i ns
    host=$(hostname -s)
    # Mounted over /etc/hosts inside each node: node names and the controller
    # resolve to bridge addresses (torch/gloo resolves its own hostname).
    {
        echo "127.0.0.1 localhost"
        echo "$CTL_IP $host"
        for ((i = 1; i <= n; i++)); do echo "$NET_PREFIX.$((10 + i)) node$i"; done
    } >"$HOSTS"
    chmod 644 "$HOSTS"
    net ip link add "$BRIDGE" type bridge
    net ip addr add "$CTL_IP/24" dev "$BRIDGE"
    net ip link set "$BRIDGE" up
    # With br_netfilter loaded, bridged frames pass iptables FORWARD; a DROP policy
    # there (Docker sets one) would cut the nodes off each other.
    if [[ -r /proc/sys/net/bridge/bridge-nf-call-iptables ]] &&
        [[ $(</proc/sys/net/bridge/bridge-nf-call-iptables) == 1 ]] && command -v iptables >/dev/null 2>&1; then
        iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null ||
            iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
    fi
    for ((i = 1; i <= n; i++)); do
        ns=$NS_PREFIX$i
        net ip netns add "$ns"
        net ip link add "veth-rr$i" type veth peer name "vrr$i-in"
        net ip link set "vrr$i-in" netns "$ns"
        net ip link set "veth-rr$i" master "$BRIDGE" up
        net ip -n "$ns" link set "vrr$i-in" name eth0
        net ip -n "$ns" addr add "$NET_PREFIX.$((10 + i))/24" dev eth0
        net ip -n "$ns" link set eth0 up
        # gloo, srun and slurmstepd also talk to themselves over loopback.
        net ip -n "$ns" link set lo up
    done
}

start_munged() {
    # Our own key and socket; never /etc/munge. munged refuses group/other
    # access to the key, and a socket folder other than mode 755.
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged's ownership/permission checks on the key, socket and log
    # paths would refuse some RADIODIFF_SLURM_ROOT locations (e.g. below a
    # group-writable folder); this is a throw-away test cluster.
    env "$TAG" munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munge.seed" 9>&- ||
        fail_start "munged did not start"
}

do_start() {
    local n=$1 cur i waited states ns f
    mkdir -p "$ROOT" "$RUN" "$LOG"
    chmod 755 "$ROOT"
    ensure_packages
    cur=$(configured_nodes)
    if [[ $cur == "$n" ]] && healthy "$n"; then
        say "already up with $n node(s) and healthy"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if [[ $cur != 0 ]] && alive "$RUN/slurmctld.pid" &&
        [[ -n $(timeout 10 squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %A 2>/dev/null || true) ]]; then
        die "the running cluster ($cur node(s)) has jobs; a start with $n node(s) would end them: wait for them, or run stop first"
    fi
    if [[ $cur != 0 ]] || ls "$RUN"/*.pid >/dev/null 2>&1 || [[ -e /sys/class/net/$BRIDGE ]]; then
        say "stopping the running cluster (had $cur node(s), want $n)"
        do_stop
    fi
    # Fresh controller state and spool every start: jobs of an earlier cluster
    # (maybe with other nodes) must not be recovered onto this one.
    rm -rf "$ROOT/state" "$ROOT/spool"
    mkdir -p "$ROOT/state"
    for ((i = 1; i <= n; i++)); do mkdir -p "$ROOT/spool/node$i"; done  # slurmd won't create it
    # Keep the previous run's logs as *.prev, so that tails show this start only.
    for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd-*.log; do
        if [[ -f $f ]]; then mv -f "$f" "$f.prev"; fi
    done
    write_conf "$n"
    echo "export SLURM_CONF=$CONF" >"$ROOT/env"
    if ((n > 1)); then setup_network "$n"; fi
    echo "$n" >"$NODES_FILE"
    start_munged
    # -c: cold start, no job/node state from a previous run.
    env "$TAG" slurmctld -c -f "$CONF" 9>&- || fail_start "slurmctld did not start"
    for ((i = 1; i <= n; i++)); do
        if ((n == 1)); then
            env "$TAG" slurmd -f "$CONF" -N "node$i" 9>&- || fail_start "slurmd node$i did not start"
        else
            ns=$NS_PREFIX$i
            # Not 'ip netns exec': it remounts /sys, hiding /sys/fs/cgroup, and slurmd
            # 22.05 then fails to initialise. nsenter only joins the network namespace;
            # unshare gives the node its own hostname and a private /etc/hosts.
            env "$TAG" nsenter --net=/run/netns/"$ns" unshare --uts --mount \
                sh -c "hostname node$i && mount --bind '$HOSTS' /etc/hosts && exec slurmd -f '$CONF' -N node$i" 9>&- ||
                fail_start "slurmd node$i did not start"
        fi
    done
    # Wait for every node to register and be idle.
    waited=0
    while :; do
        states=$(node_states)
        if [[ -n $states ]] && [[ $(wc -l <<<"$states") -eq $n ]] &&
            [[ -z $(awk '$2 != "idle"' <<<"$states") ]]; then
            break
        fi
        if ((waited >= START_TIMEOUT * 10)); then
            echo "node states after ${START_TIMEOUT}s:" >&2
            echo "${states:-<controller not answering>}" >&2
            fail_start "nodes not idle after ${START_TIMEOUT}s"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "up with $n node(s) (state: $ROOT)"
    echo "export SLURM_CONF=$CONF"
}

do_status() {
    local n
    n=$(configured_nodes)
    echo "nodes=$n"
    echo "SLURM_CONF=$CONF"
    if [[ $n == 0 ]] || ! alive "$RUN/slurmctld.pid"; then
        echo "not running"
        return 1
    fi
    timeout 10 sinfo -N -o '%N %T %c %m %o' || true
    healthy "$n"
}

# ---------------------------------------------------------------- main
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
cmd=$1
shift
case $cmd in
    -h | --help | help)
        usage
        ;;
    start)
        nodes=1
        while [[ $# -gt 0 ]]; do
            case $1 in
                --nodes) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; nodes=$2; shift 2 ;;
                --nodes=*) nodes=${1#--nodes=}; shift ;;
                -h | --help) usage; exit 0 ;;
                *) usage >&2; exit 2 ;;
            esac
        done
        if ! [[ $nodes =~ ^[1-9][0-9]*$ ]] || ((nodes > 50)); then
            die "--nodes must be 1..50, got '$nodes'"
        fi
        need_root start
        lock
        do_start "$nodes"
        ;;
    stop)
        [[ $# -eq 0 ]] || { usage >&2; exit 2; }
        need_root stop
        lock
        do_stop
        ;;
    status)
        [[ $# -eq 0 ]] || { usage >&2; exit 2; }
        do_status
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
