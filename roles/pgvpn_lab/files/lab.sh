#!/bin/sh
# The lab's machinery on the controller, one call per step so that Ansible pays one module
# run per machine rather than one per file. Prints "changed: ..." when it changed something.
#
#   lab.sh prepare    NETNS BRIDGE HOST_IF HOST_CIDR STATE_DIR LAB_NAME
#   lab.sh machine-up NETNS BRIDGE STATE_DIR LAB_NAME ROOTFS PREFIXLEN NAME ADDRESS HOSTS_LINES
#   lab.sh down       NETNS HOST_IF STATE_DIR LAB_NAME
#   lab.sh prune      CACHE_DIR KEEP_ROOTFS
set -eu

netns_exists() {
    ip netns list | awk '{print $1}' | grep -qxF "$1"
}

nspawn_pid() {
    [ -s "$1/pid" ] || return 1
    pid=$(cat "$1/pid")
    kill -0 "$pid" 2>/dev/null && grep -qa systemd-nspawn "/proc/$pid/cmdline" && echo "$pid"
}

prepare() {
    netns=$1 bridge=$2 host_if=$3 host_cidr=$4 state=$5 lab=$6
    if [ ! -d "$state" ]; then
        install -d -m 0700 "$state"
        echo "changed: state directory $state"
    fi
    if [ ! -f "$state/id_ed25519" ]; then
        ssh-keygen -q -t ed25519 -N '' -C "$lab" -f "$state/id_ed25519"
        echo "changed: SSH key $state/id_ed25519"
    fi
    # The host's /dev/net/tun may be 0600; the agent opens it as an unprivileged user, as on
    # any Debian host (where the node is 0666): the machines get a node of their own.
    if [ ! -c "$state/dev-net-tun" ]; then
        mknod -m 0666 "$state/dev-net-tun" c 10 200
        echo "changed: TUN device node"
    fi
    if ! netns_exists "$netns"; then
        ip netns add "$netns"
        ip -n "$netns" link set lo up
        ip -n "$netns" link add "$bridge" type bridge
        ip -n "$netns" link set "$bridge" up
        echo "changed: network namespace $netns"
    fi
    if ! ip link show "$host_if" >/dev/null 2>&1; then
        ip link add "$host_if" type veth peer name vb-host netns "$netns"
        ip -n "$netns" link set vb-host master "$bridge" up
        ip addr add "$host_cidr" dev "$host_if"
        ip link set "$host_if" up
        echo "changed: host link $host_if $host_cidr"
    fi
}

machine_up() {
    netns=$1 bridge=$2 state=$3 lab=$4 rootfs=$5 prefixlen=$6 name=$7 address=$8 hosts=$9
    tun=$state/dev-net-tun
    pubkey=$state/id_ed25519.pub
    dir=$state/$name
    veth=$(printf 've-%s' "$name" | cut -c1-15)
    brport=$(printf 'vb-%s' "$name" | cut -c1-15)

    if nspawn_pid "$dir" >/dev/null; then
        return 0
    fi
    mkdir -p "$dir/upper" "$dir/work" "$dir/root"
    if ! mountpoint -q "$dir/root"; then
        mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$dir/upper,workdir=$dir/work" "$dir/root"
    fi
    root=$dir/root
    echo "$name" >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s\n' "$hosts" >"$root/etc/hosts"
    printf '[Match]\nName=%s\n\n[Network]\nAddress=%s/%s\nLinkLocalAddressing=ipv6\n' \
        "$veth" "$address" "$prefixlen" >"$root/etc/systemd/network/10-lab.network"
    install -d -m 0700 "$root/root/.ssh"
    install -m 0600 "$pubkey" "$root/root/.ssh/authorized_keys"

    if ! ip -n "$netns" link show "$brport" >/dev/null 2>&1; then
        ip -n "$netns" link add "$veth" type veth peer name "$brport"
        ip -n "$netns" link set "$brport" master "$bridge" up
    fi
    # A machine killed with its link down (molecule/ha's power-off) leaves the pair behind.
    ip -n "$netns" link set "$brport" up

    # nspawn runs inside the lab's network namespace (so it can move the veth in) and in a
    # private mount namespace where /sys is read-only: with no udev on the host, a writable
    # /sys makes it wait for udev to initialise the interface. `ip netns exec` would mount a
    # fresh sysfs that hides /sys/fs/cgroup, hence nsenter + unshare.
    setsid nsenter --net="/run/netns/$netns" unshare --mount --propagation private \
        sh -c 'mount -o remount,bind,ro /sys && echo $$ >"$0/pid" && exec systemd-nspawn "$@"' "$dir" \
        --boot --register=no --keep-unit --console=read-only \
        --machine="$lab-$name" --hostname="$name" --directory="$root" \
        --network-interface="$veth" --bind="$tun:/dev/net/tun" --capability=CAP_NET_ADMIN \
        </dev/null >"$dir/console.log" 2>&1 &
    i=0
    until [ -s "$dir/pid" ] || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
    echo "changed: machine $name booting at $address"
}

# Every machine found in the state directory, whatever the inventory says now. SIGTERM makes
# systemd-nspawn shut its machine down cleanly (all machines at once); SIGKILL after 30 s.
down() {
    netns=$1 host_if=$2 state=$3 lab=$4
    if [ -d "$state" ]; then
        pids=
        for dir in "$state"/*/; do
            [ -d "$dir" ] || continue
            if pid=$(nspawn_pid "${dir%/}"); then
                kill -TERM "$pid"
                pids="$pids $pid"
                echo "changed: stopping $(basename "$dir")"
            fi
        done
        i=0
        for pid in $pids; do
            while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; sleep 1; fi
        done
        for dir in "$state"/*/; do
            [ -d "$dir" ] || continue
            dir=${dir%/}
            if mountpoint -q "$dir/root"; then
                umount "$dir/root" 2>/dev/null || umount -l "$dir/root"
            fi
            rm -rf "/run/systemd/nspawn/propagate/$lab-$(basename "$dir")"
        done
        rm -rf "$state"
        echo "changed: removed $state"
    fi
    if ip link show "$host_if" >/dev/null 2>&1; then
        ip link del "$host_if"
        echo "changed: removed host link $host_if"
    fi
    if netns_exists "$netns"; then
        ip netns del "$netns"
        echo "changed: removed network namespace $netns"
    fi
}

# Root filesystems of older recipes, unless a running lab still has one as its lower layer.
prune() {
    cache=$1 keep=$2
    for rootfs in "$cache"/rootfs-*; do
        [ -e "$rootfs" ] || continue
        case $rootfs in "$keep" | "$keep.log") continue ;; esac
        if ! grep -qsF "lowerdir=${rootfs%.log}," /proc/mounts; then
            rm -rf "$rootfs"
            echo "changed: removed $rootfs"
        fi
    done
}

cmd=$1
shift
case $cmd in
    prepare) prepare "$@" ;;
    machine-up) machine_up "$@" ;;
    down) down "$@" ;;
    prune) prune "$@" ;;
    *) echo "usage: $0 prepare|machine-up|down|prune ..." >&2; exit 2 ;;
esac
