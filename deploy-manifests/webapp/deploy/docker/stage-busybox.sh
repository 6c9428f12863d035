#!/bin/sh
# The example's images are FROM scratch (no registry is needed): stage a
# static busybox in the build context. Real applications use real base images.
set -e
cp "$(command -v busybox 2>/dev/null || echo /bin/busybox)" deploy/docker/busybox
