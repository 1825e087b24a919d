#!/usr/bin/env bash
# Prints the path of the service's binary for a cargo profile (default: release), wherever the target
# directory is (CARGO_TARGET_DIR included). Names come from `cargo metadata`, so nothing here changes
# when the package is renamed: the binary is the one `bin` target of the workspace (the service crate
# at the root; platform/ is a library). Usage: scripts/binary-path.sh [release|dev]
set -euo pipefail
profile=${1:-release}
[ "$profile" = dev ] && profile=debug
cargo metadata --no-deps --format-version 1 --manifest-path "$(dirname "$0")/../Cargo.toml" |
  python3 -c '
import json, sys
meta = json.load(sys.stdin)
binaries = [target["name"] for package in meta["packages"] for target in package["targets"]
            if "bin" in target["kind"]]
if len(binaries) != 1:
    sys.exit(f"binary-path: expected one binary in the workspace, found {binaries}")
print(meta["target_directory"] + "/" + sys.argv[1] + "/" + binaries[0])
' "$profile"
