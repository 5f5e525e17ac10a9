#!/bin/sh
# Builds the Debian 12 root filesystem that the nspawn machines boot.
# The pgvpn_lab role keys its cache by this file's hash and the mirror: any edit here rebuilds the image.
# Usage: build-rootfs.sh DEST MIRROR
set -eu
dest=$1
mirror=$2

# Everything the roles would install is pre-seeded: the machines have no apt access.
# etcd-server, etcd-client and patroni: the HA scenario's three database machines (docs/ha.md).
packages=systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,python3-apt,python3-psycopg2,postgresql,prometheus,iperf3,iproute2,iputils-ping,netbase,procps,sudo,acl,etcd-server,etcd-client,patroni

debootstrap --variant=minbase --include="$packages" bookworm "$dest" "$mirror"

# systemd-nspawn --boot needs a locale file; sshd and PAM are quieter with one too.
echo 'LANG=C.UTF-8' >"$dest/etc/default/locale"

# Each machine gets its own transient machine-id at boot, and its name from the lab role.
: >"$dest/etc/machine-id"
rm -f "$dest/etc/hostname"

# Static addresses come from a per-machine .network file written by create.yml.
# The agent owns its TUN device's addresses and routes: networkd must leave them alone.
systemctl --root="$dest" enable systemd-networkd.service
mkdir -p "$dest/etc/systemd/networkd.conf.d"
printf '[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n' \
    >"$dest/etc/systemd/networkd.conf.d/10-pgvpn-lab.conf"

# Installed but off: the pgvpn_postgresql and pgvpn_monitoring roles enable them on the database
# machine only, pgvpn_etcd and pgvpn_patroni on the HA scenario's.
systemctl --root="$dest" disable postgresql.service prometheus.service etcd.service patroni.service

rm -rf "$dest"/var/cache/apt/archives/*.deb "$dest"/var/lib/apt/lists/*_Packages
