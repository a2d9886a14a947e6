#!/usr/bin/env bash
# Keep the embedded model (example/model/CKPT+*, 35 MiB) out of what a lent-machine call sends, for a lease.
#
# Why: every call sends the checkout's tracked files, and at most 64 MiB travel per call. The embedded model
# alone is 35 MiB, which leaves too little for the speedrun's carried folders (.carry 42 MiB, .kernels 37 MiB,
# .neural 33 MiB); the speedrun never reads it. `hide` takes it out of the index and ignores it (the files stay
# on disk), `restore` puts both back. Commit nothing between the two: a commit would delete the model.
#
#   bash scripts/lease_tree.sh hide      # before the lease's first call
#   bash scripts/lease_tree.sh restore   # after its last (git status is then as before)
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude)
PATTERN='/example/model/CKPT+*/'
case "${1:-}" in
  hide)
    git rm -r -q --cached -- 'example/model/CKPT+*'
    grep -qxF "$PATTERN" "$EXCLUDE" 2>/dev/null || echo "$PATTERN" >> "$EXCLUDE"
    echo "lease_tree: example/model/CKPT+* hidden from the calls ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked); run 'restore' after the lease" ;;
  restore)
    git reset -q -- example/model
    grep -vxF "$PATTERN" "$EXCLUDE" > "$EXCLUDE.tmp" || true
    mv "$EXCLUDE.tmp" "$EXCLUDE"
    git diff --quiet -- example/model && echo "lease_tree: example/model restored" ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
