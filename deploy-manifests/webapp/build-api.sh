#!/bin/sh
# The API's "build": record what was built (in the release and in a log
# outside it, which the tests count builds with), and stage what its Docker
# form serves: /health answering "ok <version>".
set -e
echo "built api from $MOORLINE_COMMIT" > services/api/BUILD
echo "$MOORLINE_COMMIT" >> "${MOORLINE_BUILD_LOG:-/dev/null}"
mkdir -p deploy/docker/api-www
echo "ok $(cat services/api/VERSION)" > deploy/docker/api-www/health
./deploy/docker/stage-busybox.sh
echo "api build done"
