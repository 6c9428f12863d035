#!/bin/sh
# Healthy once the worker has written a heartbeat for this release.
test "$(cat "${XDG_RUNTIME_DIR:-/tmp}/app-worker/heartbeat" 2>/dev/null)" = "$MOORLINE_COMMIT"
