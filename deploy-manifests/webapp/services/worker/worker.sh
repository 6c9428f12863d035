#!/bin/sh
# Example worker: consumes nothing, proves it is alive with a heartbeat file
# in its state directory (not in the release, which is replaced per deploy).
state="${XDG_RUNTIME_DIR:-/tmp}/app-worker"
mkdir -p "$state"
while true; do
  echo "$MOORLINE_COMMIT" > "$state/heartbeat"
  sleep 1
done
