#!/bin/sh
# vhost-pv metadata agent: the guest's trusted agent. Run it once at boot, before any
# application: it takes the boot's one-time token from the metadata server and keeps it
# where only root can read it (/run/metadata-token). The server gives the token to the
# first request of a boot only, so if it refuses us, something else in this guest asked
# first: the guest is not to be trusted, and it powers off.
MD="${METADATA_URL:-http://169.254.169.254/computeMetadata/v1}"
umask 077
if ! token=$(wget -qO- --header 'Metadata-Flavor: Google' "$MD/instance/boot-token") || [ -z "$token" ]; then
    echo "metadata-agent: the boot token was refused: another process took it; powering off"
    sync
    poweroff -f
    exit 1
fi
printf '%s' "$token" >/run/metadata-token
echo "metadata-agent: boot token kept in /run/metadata-token"
