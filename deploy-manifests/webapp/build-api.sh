#!/bin/sh
# The API's "build": record what was built and when, in the release and in a
# log outside it (the tests count builds with it).
set -e
echo "built api from $MOORLINE_COMMIT" > services/api/BUILD
echo "$MOORLINE_COMMIT" >> "${MOORLINE_BUILD_LOG:-/dev/null}"
echo "api build done"
