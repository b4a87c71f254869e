#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build cdp: the C/C++
# toolchain pieces for librdkafka (cmake, curl, sasl) and RocksDB (libclang
# for bindgen). Safe to run again: installs only what is missing.
set -euo pipefail
packages=(cmake libcurl4-openssl-dev libsasl2-dev libssl-dev zlib1g-dev libclang-dev clang g++ pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
