#!/usr/bin/env bash
# The book in docs/ builds and nothing in it or in README.md, ARCHITECTURE.md and
# BENCHMARKS.md links to a missing file or heading. Installs mdbook (pinned, without
# its serve/watch/search features: about 3.5 minutes on two cores, once; it stays in
# ~/.cargo/bin) when it is missing. Any warning or error of `mdbook build` fails.
# The configuration reference is checked by `cargo test` (src/config/reference_doc.rs)
# and the examples are run by scripts/docs-examples.sh (from scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

MDBOOK_VERSION=0.5.4
if [[ $(mdbook --version 2>/dev/null) != "mdbook v$MDBOOK_VERSION" ]]; then
  echo "installing mdbook $MDBOOK_VERSION (cargo install, once)"
  # Its own target dir: the project's CARGO_TARGET_DIR is not mdbook's to fill.
  CARGO_TARGET_DIR="$(mktemp -d)" cargo install mdbook --locked --version "$MDBOOK_VERSION" \
    --no-default-features --quiet
fi

out=$(mdbook build docs 2>&1) || { printf '%s\n' "$out" >&2; echo "mdbook build failed" >&2; exit 1; }
if grep -E '(WARN|ERROR)' <<<"$out" >&2; then
  echo "mdbook build warned: fix the book" >&2
  exit 1
fi
echo "book: built in docs/book"
python3 scripts/check_links.py
