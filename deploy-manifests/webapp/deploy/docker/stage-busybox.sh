#!/bin/sh
# The example's images are FROM scratch (no registry is needed): stage a
# static busybox in the build context. Real applications use real base images.
# Without busybox (a host running only the native forms) there is nothing
# to stage, and only the Docker forms could not be built.
set -e
busybox=$(command -v busybox 2>/dev/null || echo /bin/busybox)
if [ -x "$busybox" ]; then
  cp "$busybox" deploy/docker/busybox
else
  echo "stage-busybox: no busybox on this host; the Docker forms cannot be built" >&2
fi
