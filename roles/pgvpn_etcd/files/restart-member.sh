#!/bin/sh
# Restarts this etcd member without costing the cluster an election: a member that leads
# hands leadership to another first (etcdctl move-leader), and the restart returns only once
# the member is healthy again and the cluster has a leader. Patroni's primary demotes itself
# when etcd does not answer for retry_timeout, and an election after a leader vanishes takes
# about the election timeout.
#   restart-member.sh ETCDCTL_ARGS...   (endpoint of this member and its certificate)
set -eu
export ETCDCTL_API=3

field() {
    python3 -c 'import json, sys; s = json.load(sys.stdin)[0]["Status"]; print(s["header"]["member_id"], s["leader"])'
}

set -- "$@"
status=$(etcdctl "$@" endpoint status --write-out=json | field)
me=${status% *}
leader=${status#* }
if [ "$me" = "$leader" ]; then
    other=$(etcdctl "$@" member list --write-out=json | python3 -c '
import json, sys
me = int(sys.argv[1])
print(next(format(m["ID"], "x") for m in json.load(sys.stdin)["members"] if m["ID"] != me))' "$me")
    etcdctl "$@" move-leader "$other"
fi

systemctl restart etcd.service

i=0
until etcdctl "$@" endpoint health >/dev/null 2>&1 && [ "$(etcdctl "$@" endpoint status --write-out=json | field | cut -d' ' -f2)" != 0 ]; do
    i=$((i + 1))
    [ $i -lt 60 ] || { echo "etcd member not healthy after a restart" >&2; exit 1; }
    sleep 1
done
# Let the clients that left this member settle on another before the next member goes.
sleep 3
