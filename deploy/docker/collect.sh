#!/usr/bin/env bash
# Copies convd and convctl from a build directory into DEST/bin, and into DEST/lib every shared
# library they load that a CUDA runtime image does not already carry (gRPC, protobuf-c, libuv,
# oneDNN, xxhash and what those pull in). usage: collect.sh BUILD_DIR DEST
set -euo pipefail
build=$1 dest=$2
mkdir -p "$dest/bin" "$dest/lib"
cp "$build/convd" "$build/convctl" "$dest/bin/"
for bin in "$dest/bin/convd" "$dest/bin/convctl"; do
  ldd "$bin" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      # the C library, the loader and the CUDA libraries come from the runtime image
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libcuda.so*|libcudart.so*|libcudnn*) ;;
      *) cp -Ln "$lib" "$dest/lib/" ;;
    esac
  done
done
echo "collect: $(ls "$dest/lib" | wc -l) libraries into $dest/lib"
