#!/usr/bin/env bash
# The installed tree used as an outside project would: `cmake --install` into a scratch prefix,
# tests/install/hello_client.c built with nothing but `pkg-config --cflags --libs convd-client`,
# and run against the installed daemon, which listens on 127.0.0.1 port 0 and is started and
# stopped by its PID. Fails on any error. tests/CMakeLists.txt runs it (ctest: install):
#   check_install.sh CMAKE BUILD_DIR SCRATCH_DIR LIBDIR PKG_CONFIG CC [CFLAGS...]
set -euo pipefail
cmake=$1 build=$2 scratch=$3 libdir=$4 pkgconfig=$5 cc=$6
shift 6
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$scratch"
mkdir -p "$scratch"
prefix=$scratch/prefix
pid=
cleanup() { if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

"$cmake" --install "$build" --prefix "$prefix" > "$scratch/install.log"
for f in bin/convd bin/convctl include/convd/client.h include/convd/convd_fields.h include/convd/convd_version.h \
         "$libdir/libconvd_client.so" "$libdir/pkgconfig/convd-client.pc" share/doc/convd/copyright; do
  [ -e "$prefix/$f" ] || { echo "not installed: $prefix/$f"; cat "$scratch/install.log"; exit 1; }
done
# The package's files at absolute paths (the systemd unit, /etc/default/convd) are not for a
# prefix install: nothing may land outside the prefix, even when this runs as root.
outside=$(sed -n 's/^-- \(Installing\|Up-to-date\|Set runtime path of\): //p' "$scratch/install.log" |
          sed 's/"//g' | grep -v "^$prefix/" || true)
[ -z "$outside" ] || { echo "installed outside $prefix: $outside"; exit 1; }
echo "installed under $prefix: $(cd "$prefix" && find . -type f -o -type l | sort | tr '\n' ' ')"

# Only the installed files: no include path or library of the source or build tree.
export PKG_CONFIG_PATH=$prefix/$libdir/pkgconfig
flags=$("$pkgconfig" --cflags --libs convd-client)
version=$("$pkgconfig" --modversion convd-client)
echo "pkg-config convd-client $version: $flags"
"$cc" -std=c11 -pedantic -Wall -Wextra -Werror "$@" -o "$scratch/hello_client" "$here/hello_client.c" \
  $flags -Wl,-rpath,"$prefix/$libdir"

# Both programs report the one version.
for prog in convd convctl; do
  got=$("$prefix/bin/$prog" --version)
  [ "$got" = "$prog $version" ] || { echo "$prog --version says '$got', expected '$prog $version'"; exit 1; }
done

"$prefix/bin/convd" --listen 127.0.0.1:0 --log-level warn > "$scratch/convd.out" 2> "$scratch/convd.log" &
pid=$!
target=
for _ in $(seq 300); do
  line=$(head -n 1 "$scratch/convd.out")
  if [[ $line =~ ^convd\ listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
    target=127.0.0.1:${BASH_REMATCH[1]}
    break
  fi
  kill -0 "$pid" 2> /dev/null || break
  sleep 0.1
done
if [ -z "$target" ]; then
  echo "the installed convd did not report a loopback port"
  cat "$scratch/convd.out" "$scratch/convd.log"
  exit 1
fi

"$scratch/hello_client" "$target"
"$prefix/bin/convctl" health --server "$target" --timeout 10

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
if [ "$rc" != 0 ] || grep -qE "Sanitizer|runtime error" "$scratch/convd.log"; then
  echo "the installed convd exited with $rc:"
  cat "$scratch/convd.log"
  exit 1
fi
echo "install check passed"
