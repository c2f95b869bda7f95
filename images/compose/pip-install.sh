#!/bin/sh
# pip install "$@" into /opt/venv, trusting the extra CA certificates passed as the EXTRA_CA_CERT build arg
# (a host behind a TLS-inspecting proxy) for this one command only: the bundle is deleted afterwards, so
# the image keeps Debian's trust store unchanged.
set -eu
if [ -n "${EXTRA_CA_CERT:-}" ]; then
  bundle=$(mktemp)
  cat /etc/ssl/certs/ca-certificates.crt > "$bundle"
  printf '%s\n' "$EXTRA_CA_CERT" >> "$bundle"
  PIP_CERT="$bundle" /opt/venv/bin/pip install "$@" || { rc=$?; rm -f "$bundle"; exit $rc; }
  rm -f "$bundle"
else
  /opt/venv/bin/pip install "$@"
fi
