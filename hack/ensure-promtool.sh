#!/usr/bin/env bash
# Prints the path of a promtool binary of the pinned version, building it on first use.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
go_install_cached promtool "$PROMTOOL_VERSION" github.com/prometheus/prometheus/cmd/promtool
