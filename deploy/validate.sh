#!/usr/bin/env bash
# Validates every Kubernetes manifest in deploy/kustomize offline with
# `kubernetes-validate --strict` (PyPI), and the rendered overlays when kubectl or kustomize
# is at hand. Usage: deploy/validate.sh [KUBERNETES_VERSION]
set -euo pipefail
cd "$(dirname "$0")/kustomize"
version="${1:-1.37.0}"
mapfile -t files < <(find . -name '*.yaml' ! -name kustomization.yaml | sort)
kubernetes-validate --strict --quiet -k "$version" "${files[@]}"
render=""
if command -v kustomize >/dev/null; then render="kustomize build"; elif command -v kubectl >/dev/null; then render="kubectl kustomize"; fi
if [ -n "$render" ]; then
  for overlay in overlays/*/; do
    rendered="$(mktemp)"
    $render "$overlay" > "$rendered"
    kubernetes-validate --strict --quiet -k "$version" "$rendered"
    rm -f "$rendered"
    echo "rendered and validated $overlay"
  done
else
  echo "no kustomize or kubectl: validated the resource files, not the rendered overlays"
fi
echo "all manifests valid against Kubernetes $version"
