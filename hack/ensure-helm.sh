#!/usr/bin/env bash
# Prints the path of a helm binary of the pinned version, building it on first use.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
go_install_cached helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
