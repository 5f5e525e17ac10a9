#!/bin/bash
# The default scenario's VMs on the controller: qemu with direct kernel boot, a qcow2 overlay
# per VM over one cached base image, taps on a bridge inside a dedicated network namespace and a
# veth from the host into that bridge (the host reaches the VMs at their addresses).
#
# Nothing may outlive an interrupted run: each VM is a child of one keeper process, and dies
# with it (PR_SET_PDEATHSIG); the keeper tears the whole lab down when its lease ends, i.e.
# when the molecule process that booted the VMs exits before `settle` released the lease
# (`molecule test` keeps it until the end, so Ctrl-C or a killed run leaves nothing behind).
# The image build holds the same lease.
#
#   vm.sh build       CACHE_DIR IMAGE_DIR ROOTFS MIRROR RECIPE    (starts in the background)
#   vm.sh build-wait  IMAGE_DIR SECONDS TIMEOUT
#   vm.sh accel       IMAGE_DIR auto|kvm|tcg
#   vm.sh up          STATE NETNS HOST_IF HOST_CIDR IMAGE_DIR ACCEL MEMORY_MB NAME=ADDRESS...
#   vm.sh wait        STATE SECONDS TIMEOUT
#   vm.sh settle      STATE
#   vm.sh down        STATE NETNS HOST_IF CONTROL_PATH_DIR
#   vm.sh prune       CACHE_DIR KEEP_IMAGE_DIR
# Prints "changed: ..." when it changed something. Exit status of the waits: 0 done, 3 not
# yet, anything else failed.
set -euo pipefail

self=$(readlink -f "$0")
lab_sh=$(dirname "$self")/../../../roles/pgvpn_lab/files/lab.sh
bridge=br0

# "PID STARTTIME" of the molecule process running this playbook (else of ansible-playbook):
# the start time guards against a recycled PID.
lease_of_caller() {
    local pid=$$ found= args
    while [ "$pid" -gt 1 ]; do
        args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        case " $args" in
            *"/molecule "* | *" molecule "*) found=$pid; break ;;
            *ansible-playbook*) found=$pid ;;
        esac
        pid=$(awk '{print $4}' "/proc/$pid/stat")
    done
    if [ -n "$found" ]; then echo "$found $(awk '{print $22}' "/proc/$found/stat")"; fi
}

lease_alive() {
    local pid start
    read -r pid start <<<"$1"
    [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $22}' "/proc/$pid/stat" 2>/dev/null)" = "$start" ]
}

# The PID in FILE if that process is alive and its command line contains PATTERN.
pid_of() {
    local file=$1 pattern=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" && echo "$pid"
}

netns_exists() {
    ip netns list | awk '{print $1}' | grep -qxF "$1"
}

# --- image -----------------------------------------------------------------------------------

build() {
    local cache=$1 image=$2 rootfs=$3 mirror=$4 recipe=$5 lease
    [ -d "$image" ] && return 0
    if pid_of "$image.pid" "vm.sh build-run" >/dev/null; then return 0; fi
    lease=$(lease_of_caller)
    mkdir -p "$cache"
    rm -f "$image.rc"
    date +%s >"$image.started"
    setsid bash "$self" build-run "$cache" "$image" "$rootfs" "$mirror" "$recipe" "$lease" \
        </dev/null >"$image.log" 2>&1 &
    echo $! >"$image.pid"
    echo "changed: building $image in the background, log $image.log"
}

build_run() {
    local cache=$1 image=$2 rootfs=$3 mirror=$4 recipe=$5 lease=$6 child rc=0 stop=
    exec 9>"$cache/.vm-build.lock"
    flock 9
    if [ ! -d "$image" ]; then
        rm -rf "$image.tmp"
        setsid sh "$recipe" "$rootfs" "$image.tmp" "$mirror" &
        child=$!
        trap 'stop="stopped (SIGTERM)"' TERM
        while kill -0 "$child" 2>/dev/null; do
            if [ -z "$stop" ] && ! lease_alive "$lease"; then
                stop="the run that started it ended"
            fi
            if [ -n "$stop" ]; then
                echo "== $stop: stopping the build"
                kill -TERM -- "-$child" 2>/dev/null || true
                sleep 3
                kill -KILL -- "-$child" 2>/dev/null || true
            fi
            sleep 1
        done
        wait "$child" || rc=$?
        [ -n "$stop" ] && [ "$rc" = 0 ] && rc=143
        awk -v dir="$image.tmp/" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
        if [ "$rc" = 0 ]; then mv "$image.tmp" "$image"; else rm -rf "$image.tmp"; fi
    fi
    echo "$rc" >"$image.rc"
    rm -f "$image.pid"
}

build_wait() {
    local image=$1 seconds=$2 timeout=$3 i=0 started rc
    started=$(cat "$image.started" 2>/dev/null || date +%s)
    while [ ! -s "$image.rc" ] && pid_of "$image.pid" "vm.sh build-run" >/dev/null && [ "$i" -lt "$seconds" ]; do
        sleep 1
        i=$((i + 1))
    done
    echo "$(($(date +%s) - started)) s building $image (log $image.log):"
    tail -n 3 "$image.log" 2>/dev/null | cut -c1-160 | sed 's/^/  /'
    if [ -d "$image" ]; then return 0; fi
    rc=$(cat "$image.rc" 2>/dev/null || true)
    if [ -n "$rc" ] || ! pid_of "$image.pid" "vm.sh build-run" >/dev/null; then
        echo "The image build failed (exit ${rc:-?}); see $image.log"
        return 1
    fi
    if [ $(($(date +%s) - started)) -ge "$timeout" ]; then
        kill -TERM "$(cat "$image.pid")" 2>/dev/null || true
        echo "The image build took longer than $timeout s and was stopped; see $image.log"
        return 1
    fi
    return 3
}

prune() {
    local cache=$1 keep=$2 dir
    for dir in "$cache"/vm-*; do
        [ -d "$dir" ] || continue
        case $dir in "$keep" | "$keep".*) continue ;; esac
        case $dir in *.tmp) pid_of "${dir%.tmp}.pid" "vm.sh build-run" >/dev/null && continue ;; esac
        # Still the base of a running VM (of another state directory)?
        if find /proc/[0-9]*/fd -lname "$dir/*" 2>/dev/null | grep -q .; then continue; fi
        rm -rf "$dir" "$dir".log "$dir".pid "$dir".rc "$dir".started
        echo "changed: removed $dir"
    done
}

# KVM only where it works: /dev/kvm may exist and still hang a guest (it does on the CI host).
# The guest kernel without a root disk panics within a second or two under KVM.
accel() {
    local image=$1 wanted=$2 log
    case $wanted in kvm | tcg) echo "$wanted"; return 0 ;; esac
    log=$(mktemp)
    if [ -w /dev/kvm ] && timeout 15 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults \
        -no-user-config -display none -no-reboot -serial "file:$log" \
        -kernel "$image/vmlinuz" -append 'console=ttyS0 panic=-1' >/dev/null 2>&1 &&
        grep -q 'Kernel panic' "$log"; then
        echo kvm
    else
        echo tcg
    fi
    rm -f "$log"
}

# --- VMs -------------------------------------------------------------------------------------

up() {
    local state=$1 netns=$2 host_if=$3 host_cidr=$4 image=$5 accel=$6 memory=$7
    shift 7
    local prefixlen=${host_cidr#*/} vm name address hosts= keeper
    if keeper=$(pid_of "$state/keeper.pid" "vm.sh keeper"); then
        return 0
    fi
    # State directory, SSH key, namespace with its bridge, host link: as for the nspawn lab.
    sh "$lab_sh" prepare "$netns" "$bridge" "$host_if" "$host_cidr" "$state" pgvpn-molecule-vm
    # qemu creates each tap (gone when qemu exits) and runs this to put it on the bridge.
    printf '#!/bin/sh\nexec ip link set "$1" master %s up\n' "$bridge" >"$state/tap-up"
    chmod 0755 "$state/tap-up"

    for vm in "$@"; do hosts="$hosts${vm#*=} ${vm%%=*}"$'\n'; done
    {
        printf 'netns=%q\nhost_if=%q\nimage=%q\naccel=%q\nmemory=%q\n' \
            "$netns" "$host_if" "$image" "$accel" "$memory"
        printf 'vms=%q\n' "$*"
    } >"$state/lab.conf"
    for vm in "$@"; do
        name=${vm%%=*} address=${vm#*=}
        mkdir -p "$state/$name/seed/etc/systemd/network" "$state/$name/seed/root/.ssh"
        echo "$name" >"$state/$name/seed/etc/hostname"
        printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s' "$hosts" \
            >"$state/$name/seed/etc/hosts"
        printf '[Match]\nMACAddress=%s\n\n[Network]\nAddress=%s/%s\nLinkLocalAddressing=ipv6\n' \
            "$(mac_of "$address")" "$address" "$prefixlen" \
            >"$state/$name/seed/etc/systemd/network/10-vm.network"
        chmod 0700 "$state/$name/seed/root/.ssh"
        install -m 0600 "$state/id_ed25519.pub" "$state/$name/seed/root/.ssh/authorized_keys"
        tar -C "$state/$name/seed" --owner=0 --group=0 -cf "$state/$name/seed.tar" etc root
        rm -f "$state/$name/disk.qcow2"
        qemu-img create -q -f qcow2 -F qcow2 -b "$image/base.qcow2" "$state/$name/disk.qcow2"
    done
    lease_of_caller >"$state/lease"
    date +%s >"$state/started"
    setsid bash "$self" keeper "$state" </dev/null >"$state/keeper.log" 2>&1 &
    echo $! >"$state/keeper.pid"
    for vm in "$@"; do
        until [ -s "$state/${vm%%=*}/pid" ] || ! kill -0 "$(cat "$state/keeper.pid")" 2>/dev/null; do
            sleep 0.1
        done
        echo "changed: ${vm%%=*} booting at ${vm#*=} ($accel, $memory MiB)"
    done
}

mac_of() {
    local IFS=.
    # shellcheck disable=SC2086
    set -- $1
    printf '52:54:00:%02x:%02x:%02x' "$2" "$3" "$4"
}

# Parent of every qemu: they get SIGTERM when it exits, however it exits.
keeper() {
    local state=$1 vm name address netns host_if image accel memory vms
    # shellcheck disable=SC1091
    . "$state/lab.conf"
    # TCG: the baseline CPU boots faster than "max" (fewer drivers probe), runs Python as fast,
    # and a 256 MiB translation cache keeps qemu near the guest's size (the default is 1 GiB).
    local opts=tcg,tb-size=256 cpu=qemu64,-svm
    [ "$accel" = kvm ] && opts=kvm cpu=host
    # Never pinned: inherit every CPU even if whoever started us was pinned.
    taskset -a -p -c "0-$(($(nproc --all) - 1))" $$ >/dev/null 2>&1 || true
    for vm in $vms; do
        name=${vm%%=*} address=${vm#*=}
        setpriv --pdeathsig TERM -- nsenter --net="/run/netns/$netns" \
            qemu-system-x86_64 -name "$name" -accel "$opts" -cpu "$cpu" -smp 1 -m "$memory" \
            -nodefaults -no-user-config -display none -vga none \
            -serial "file:$state/$name/console.log" \
            -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
            -append "root=/dev/vda rw console=ttyS0 net.ifnames=0" \
            -drive "file=$state/$name/disk.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap" \
            -drive "file=$state/$name/seed.tar,if=virtio,format=raw,readonly=on" \
            -netdev "tap,id=net0,ifname=tap-$name,script=$state/tap-up,downscript=no" \
            -device "virtio-net-pci,netdev=net0,mac=$(mac_of "$address")" \
            -device virtio-rng-pci \
            </dev/null >"$state/$name/qemu.log" 2>&1 &
        echo $! >"$state/$name/pid"
    done
    trap 'exit 0' TERM INT HUP
    while sleep 2; do
        lease=$(cat "$state/lease" 2>/dev/null || true)
        if [ -n "$lease" ] && ! lease_alive "$lease"; then
            echo "$(date -Is) the run holding the lease ($lease) ended: tearing the lab down"
            down "$state" "$netns" "$host_if" ""
            exit 0
        fi
    done
}

# The last N non-blank lines of a console log, without terminal escapes.
console_tail() {
    tail -n 40 "$1" 2>/dev/null | sed 's/\x1b\[[0-9;]*[A-Za-z]//g; s/\x1b[A-Z]//g; s/\r//g' |
        grep -v '^[[:space:]]*$' | tail -n "$2"
}

wait_ssh() {
    local state=$1 seconds=$2 timeout=$3 started now deadline vm name address waiting
    # shellcheck disable=SC1091
    . "$state/lab.conf"
    started=$(cat "$state/started")
    deadline=$(($(date +%s) + seconds))
    while :; do
        waiting=
        for vm in $vms; do
            name=${vm%%=*} address=${vm#*=}
            if ! pid_of "$state/$name/pid" qemu-system >/dev/null; then
                echo "VM $name is not running: $(tail -c 300 "$state/$name/qemu.log" 2>/dev/null)"
                echo "Console log $state/$name/console.log ends with:"
                console_tail "$state/$name/console.log" 15 | sed 's/^/  /'
                return 1
            fi
            if ! timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/22" && head -c 4 <&3' "$address" 2>/dev/null |
                grep -q '^SSH-'; then
                waiting="$waiting $vm"
            fi
        done
        now=$(date +%s)
        if [ -z "$waiting" ] || [ "$now" -ge "$deadline" ] || [ $((now - started)) -ge "$timeout" ]; then
            break
        fi
        sleep 2
    done
    echo "$((now - started)) s since boot ($accel, $memory MiB; console logs $state/*/console.log):"
    for vm in $vms; do
        name=${vm%%=*}
        case "$waiting " in
            *" $vm "*) echo "  $name: booting | $(console_tail "$state/$name/console.log" 1 | cut -c1-120)" ;;
            *) echo "  $name: SSH up" ;;
        esac
    done
    [ -z "$waiting" ] && return 0
    if [ $((now - started)) -ge "$timeout" ]; then
        echo "Timed out after $timeout s waiting for SSH on:$waiting"
        for vm in $waiting; do
            name=${vm%%=*}
            echo "Console log $state/$name/console.log ends with:"
            console_tail "$state/$name/console.log" 15 | sed 's/^/  /'
        done
        return 1
    fi
    return 3
}

# After a successful create: `molecule test` keeps the lease (its destroy step, or the keeper
# if the run dies, removes the VMs); any other command releases it and the VMs stay up.
settle() {
    local state=$1 lease pid sub= destroy=always a prev=
    lease=$(cat "$state/lease" 2>/dev/null || true)
    [ -n "$lease" ] || return 0
    read -r pid _ <<<"$lease"
    while IFS= read -r a; do
        case $a in
            test | create | converge | idempotence | verify | prepare | side-effect | check)
                [ -z "$sub" ] && sub=$a ;;
            --destroy=*) destroy=${a#--destroy=} ;;
        esac
        [ "$prev" = --destroy ] && destroy=$a
        prev=$a
    done < <(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null || true)
    if [ "$sub" = test ] && [ "$destroy" != never ]; then
        echo "The VMs go away when this molecule test ends, however it ends."
    else
        : >"$state/lease"
        echo "changed: the VMs stay up after molecule ${sub:-?} (molecule destroy removes them)."
    fi
}

down() {
    local state=$1 netns=$2 host_if=$3 cpdir=$4 pid pids= vm i=0 hash
    if [ -d "$state" ]; then
        if pid=$(pid_of "$state/keeper.pid" "vm.sh keeper") && [ "$pid" != $$ ]; then
            kill -TERM "$pid"
            echo "changed: stopped the keeper ($pid)"
        fi
        for vm in "$state"/*/; do
            if pid=$(pid_of "$vm/pid" qemu-system); then
                kill -TERM "$pid"
                pids="$pids $pid"
                echo "changed: stopped $(basename "$vm") (qemu $pid)"
            fi
        done
    fi
    # A create that died between starting qemu and writing its pid: whatever runs in the netns.
    if netns_exists "$netns"; then
        for pid in $(ip netns pids "$netns"); do
            case " $pids " in *" $pid "*) continue ;; esac
            if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q qemu-system; then
                kill -TERM "$pid" 2>/dev/null && pids="$pids $pid" && echo "changed: stopped qemu $pid"
            fi
        done
    fi
    for pid in $pids; do
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        kill -KILL "$pid" 2>/dev/null || true
    done
    # Ansible's SSH masters (ControlPersist) to the VMs would linger for minutes.
    if [ -n "$cpdir" ] && [ -f "$state/lab.conf" ]; then
        for vm in $(. "$state/lab.conf" && echo "$vms"); do
            hash=$(printf '%s-22-root' "${vm#*=}" | sha1sum | cut -c1-10)
            if [ -S "$cpdir/$hash" ]; then
                ssh -o ControlPath="$cpdir/$hash" -O exit "${vm#*=}" 2>/dev/null || true
                echo "changed: closed the SSH master to ${vm%%=*}"
            fi
        done
    fi
    if netns_exists "$netns"; then
        ip netns del "$netns"
        echo "changed: removed network namespace $netns (bridge, taps)"
    fi
    if ip link show "$host_if" >/dev/null 2>&1; then
        ip link del "$host_if"
        echo "changed: removed host link $host_if"
    fi
    if [ -d "$state" ]; then
        rm -rf "$state"
        echo "changed: removed $state"
    fi
}

cmd=$1
shift
case $cmd in
    build) build "$@" ;;
    build-run) build_run "$@" ;;
    build-wait) build_wait "$@" ;;
    prune) prune "$@" ;;
    accel) accel "$@" ;;
    up) up "$@" ;;
    keeper) keeper "$@" ;;
    wait) wait_ssh "$@" ;;
    settle) settle "$@" ;;
    down) down "$@" ;;
    *) echo "usage: $0 build|build-wait|prune|accel|up|wait|settle|down ..." >&2; exit 2 ;;
esac
