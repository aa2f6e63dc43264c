#!/usr/bin/env bash
# Tears the compose network down: containers, network and volumes (the
# nodes' identities and state go with them). Project: $COMPOSE_PROJECT_NAME,
# default "servent".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/compose.sh" down --volumes --remove-orphans --timeout 5
