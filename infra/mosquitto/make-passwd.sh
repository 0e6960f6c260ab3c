#!/usr/bin/env sh
# Write Mosquitto's password file for the stack's users from environment variables.
#
#   MQTT_SIM_PASSWORD=... MQTT_INGEST_PASSWORD=... MQTT_SERVE_PASSWORD=... \
#   MQTT_OPERATOR_PASSWORD=... MQTT_CAMPAIGN_PASSWORD=... infra/mosquitto/make-passwd.sh /path/to/passwd
#
# Users (the ACL in infra/mosquitto/acl grants each its topics): sim, ingest, serve, operator,
# campaign.
# A user whose variable is unset or empty is left out (it cannot log in).
#
# Why this shape: `mosquitto_passwd -b file user password` would put the password on the
# command line, visible to every local user in `ps`.  Instead the plain "user:password" lines
# go to a file only its owner can read, and `mosquitto_passwd -U` hashes that file in place
# (PBKDF2-SHA512), so no plain password is ever left on disk.
set -eu

out="${1:?usage: make-passwd.sh OUTPUT_FILE}"
command -v mosquitto_passwd >/dev/null 2>&1 || {
  echo "make-passwd.sh: mosquitto_passwd not found (Debian: apt-get install -y mosquitto)" >&2; exit 1; }

umask 077
tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
count=0
for user in sim ingest serve operator campaign; do
  var="MQTT_$(echo "$user" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  eval "pw=\${$var:-}"
  if [ -z "$pw" ]; then
    echo "make-passwd.sh: $var is not set; user '$user' left out" >&2
    continue
  fi
  case "$pw" in *:*|*"
"*) echo "make-passwd.sh: $var must not contain ':' or a newline" >&2; exit 1 ;; esac
  printf '%s:%s\n' "$user" "$pw" >> "$tmp"
  count=$((count + 1))
done
[ "$count" -gt 0 ] || { echo "make-passwd.sh: no password variables set, nothing written" >&2; exit 1; }
mosquitto_passwd -U "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "make-passwd.sh: wrote $count users to $out" >&2
