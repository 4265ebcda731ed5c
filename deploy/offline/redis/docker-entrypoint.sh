#!/bin/sh
# OFFLINE CI ONLY: like the official redis image without a config file, listen on every interface
# with protected mode off (the container network is the boundary; protected mode would refuse the
# other containers), then run as `redis`. The command's own arguments come last and win.
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    exec setpriv --reuid=redis --regid=redis --init-groups redis-server --bind '* -::*' --protected-mode no "$@"
fi
exec "$@"
