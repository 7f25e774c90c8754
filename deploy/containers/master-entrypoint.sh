#!/bin/sh
# The master image's two services:
#   serve [OPTIONS]  pumice-master serve on PUMICE_HTTP (default 0.0.0.0:8000) with its broker on
#                    PUMICE_BROKER (default tcp://*:5556); PUMICE_MASTER_OPTIONS adds options
#   site             nginx serving PUMICE_DATA/site on PUMICE_SITE_PORT (default 80)
#   anything else    run as a command (e.g. pumice-master tokens create --user admin --admin)
set -eu
data=${PUMICE_DATA:-/var/lib/pumice}
case "${1:-serve}" in
serve)
    shift || true
    # shellcheck disable=SC2086 # PUMICE_MASTER_OPTIONS is a list of options
    exec pumice-master serve --http "${PUMICE_HTTP:-0.0.0.0:8000}" --broker "${PUMICE_BROKER:-tcp://*:5556}" \
        ${PUMICE_MASTER_OPTIONS:-} "$@"
    ;;
site)
    conf=/etc/nginx/sites-enabled/pumice-site.conf
    sed -i -e "s|^\(\s*\)listen .*;|\1listen ${PUMICE_SITE_PORT:-80};|" \
        -e "s|^\(\s*\)root .*;|\1root $data/site;|" "$conf"
    [ -d "$data/site" ] || mkdir -p "$data/site" 2>/dev/null || true
    exec nginx -g 'daemon off; error_log stderr;'
    ;;
*)
    exec "$@"
    ;;
esac
