#!/usr/bin/env bash
# Prints the path of this package's binary for a cargo profile (default: release), wherever the target
# directory is (CARGO_TARGET_DIR included). Names come from `cargo metadata`, so nothing here changes
# when the package is renamed. Usage: scripts/binary-path.sh [release|dev]
set -euo pipefail
profile=${1:-release}
[ "$profile" = dev ] && profile=debug
cargo metadata --no-deps --format-version 1 --manifest-path "$(dirname "$0")/../Cargo.toml" |
  python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(meta["target_directory"] + "/" + sys.argv[1] + "/" + meta["packages"][0]["name"])
' "$profile"
