#!/usr/bin/env bash
# The Debian packages (cmake/package.cmake) as a user gets them: `cpack -G DEB` on this build
# into a scratch directory; both packages' control fields and file lists; dpkg-shlibdeps'
# Depends checked against what the programs load; both extracted with `dpkg -x` into a scratch
# root, then the extracted convd run on 127.0.0.1 port 0 (started and stopped by its PID), the
# extracted convctl's `health` and every golden case through it, compared element by element
# with the golden tolerance, and a client built from the extracted -dev package with pkg-config
# alone. Fails on any error. tests/CMakeLists.txt runs it (ctest: package):
#   check_deb.sh CPACK BUILD_DIR SCRATCH_DIR SOURCE_DIR VERSION GOLDEN_CHECK PKG_CONFIG CC [CFLAGS...]
set -euo pipefail
cpack=$1 build=$2 scratch=$3 src=$4 version=$5 golden_check=$6 pkgconfig=$7 cc=$8
shift 8
golden=$src/tests/golden
for tool in dpkg dpkg-deb dpkg-shlibdeps file readelf; do
  command -v "$tool" > /dev/null || { echo "$tool is missing: run deploy/install-deps.sh"; exit 1; }
done
rm -rf "$scratch"
mkdir -p "$scratch"
pid=
cleanup() { if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
fail() { echo "FAILED: $*"; exit 1; }

# ---- build: this build's install rules, CPack's staging and output under the scratch dir ----
(cd "$scratch" && "$cpack" -G DEB --config "$build/CPackConfig.cmake" -B "$scratch/packages") \
  > "$scratch/cpack.log" 2>&1 || { cat "$scratch/cpack.log"; fail "cpack -G DEB"; }
arch=$(dpkg --print-architecture)
deb=$scratch/packages/convd_${version}_${arch}.deb
dev=$scratch/packages/libconvd-client-dev_${version}_${arch}.deb
for f in "$deb" "$dev"; do
  [ -f "$f" ] || { cat "$scratch/cpack.log"; ls -l "$scratch/packages"; fail "cpack wrote no $f"; }
done
echo "built $(basename "$deb") ($(stat -c %s "$deb") bytes), $(basename "$dev") ($(stat -c %s "$dev") bytes)"

# ---- control fields ------------------------------------------------------------------------
field() { dpkg-deb -f "$1" "$2"; }
for f in "$deb" "$dev"; do
  [ "$(field "$f" Version)" = "$version" ] || fail "$f: Version '$(field "$f" Version)', expected $version"
  [ "$(field "$f" Architecture)" = "$arch" ] || fail "$f: Architecture '$(field "$f" Architecture)'"
  for name in Maintainer Description Section Priority; do
    [ -n "$(field "$f" "$name")" ] || fail "$f: no $name field"
  done
done
[ "$(field "$deb" Package)" = convd ] || fail "Package '$(field "$deb" Package)', expected convd"
[ "$(field "$dev" Package)" = libconvd-client-dev ] || fail "Package '$(field "$dev" Package)'"
depends=$(field "$deb" Depends)
[[ $depends == *libgrpc* ]] || fail "convd's Depends '$depends' does not name libgrpc"
[[ $depends == *libc6* ]] || fail "convd's Depends '$depends' does not name libc6"
[ "$(field "$dev" Depends)" = "convd (= $version)" ] || fail "the -dev package's Depends: '$(field "$dev" Depends)'"
dpkg-deb -I "$deb" conffiles | grep -qx /etc/default/convd || fail "/etc/default/convd is not a conffile"
dpkg-deb -I "$deb" shlibs | grep -qx "libconvd_client [0-9.]* convd (>= $version)" ||
  fail "convd's shlibs: '$(dpkg-deb -I "$deb" shlibs)'"
echo "control: Package convd, libconvd-client-dev; Version $version; Architecture $arch; Depends: $depends"

# ---- file lists ----------------------------------------------------------------------------
dpkg-deb -c "$deb" > "$scratch/convd.list"
dpkg-deb -c "$dev" > "$scratch/dev.list"
files() { awk '{ print $6 }' "$1" | sed 's|^\./|/|' | grep -v '/$' | sort; }
files "$scratch/convd.list" > "$scratch/convd.files"
files "$scratch/dev.list" > "$scratch/dev.files"
lib=$(grep -E '/libconvd_client\.so\.[0-9.]+$' "$scratch/convd.files" | head -n 1)
[ -n "$lib" ] || fail "no libconvd_client.so.* in convd"
libdir=$(dirname "$lib")
for f in /usr/bin/convd /usr/bin/convctl /lib/systemd/system/convd.service /etc/default/convd \
         /usr/share/doc/convd/copyright; do
  grep -qx "$f" "$scratch/convd.files" || { cat "$scratch/convd.list"; fail "convd lacks $f"; }
done
for f in /usr/include/convd/client.h /usr/include/convd/convd_fields.h /usr/include/convd/convd_version.h \
         "$libdir/libconvd_client.so" "$libdir/pkgconfig/convd-client.pc" /usr/share/doc/libconvd-client-dev/copyright; do
  grep -qx "$f" "$scratch/dev.files" || { cat "$scratch/dev.list"; fail "libconvd-client-dev lacks $f"; }
done
both=$(comm -12 "$scratch/convd.files" "$scratch/dev.files")
[ -z "$both" ] || fail "files in both packages (dpkg would refuse the second): $both"
awk '$2 != "root/root" { bad = 1; print } END { exit bad }' "$scratch/convd.list" "$scratch/dev.list" ||
  fail "files not owned by root"
echo "files: convd $(wc -l < "$scratch/convd.files"), libconvd-client-dev $(wc -l < "$scratch/dev.files"); library in $libdir"

# ---- extracted: the files are the tree's ---------------------------------------------------
root=$scratch/root
dpkg -x "$deb" "$root"
dpkg -x "$dev" "$root"
cmp "$root/usr/share/doc/convd/copyright" "$src/LICENSE" || fail "copyright is not LICENSE"
cmp "$root/usr/share/doc/libconvd-client-dev/copyright" "$src/LICENSE" || fail "the -dev copyright is not LICENSE"
unit=$root/lib/systemd/system/convd.service
cmp "$unit" "$src/deploy/systemd/convd.service" || fail "the packaged unit is not deploy/systemd/convd.service"
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
[ "$exec_start" = /usr/bin/convd ] && [ -x "$root$exec_start" ] || fail "the unit's ExecStart $exec_start is not the packaged convd"
grep -qx 'EnvironmentFile=-/etc/default/convd' "$unit" || fail "the unit does not read /etc/default/convd"
# The defaults file: all comments (nothing set by installing it), its example the unit's.
if grep -vE '^(#.*)?$' "$root/etc/default/convd"; then fail "/etc/default/convd sets something"; fi
unit_example=$(grep -o 'CONVD_ARGS="[^"]*"' "$unit" | head -n 1)
grep -qx "#$unit_example" "$root/etc/default/convd" || fail "/etc/default/convd lacks the unit's example #$unit_example"
echo "extracted: copyright = LICENSE, the unit = deploy/systemd/convd.service (ExecStart $exec_start), /etc/default/convd has #$unit_example"

# ---- Depends covers what the programs load -------------------------------------------------
# Each NEEDED library of each packaged ELF file is in the package, or comes from a Debian
# package named in Depends; one that no package owns (a CUDA toolkit unpacked by hand) is noted.
owner() { # the package that owns library $1 (merged /usr: dpkg may know it under either path)
  local p=$1 alt
  case $p in /usr/*) alt=${p#/usr} ;; *) alt=/usr$p ;; esac
  { dpkg -S "$p" 2>/dev/null || dpkg -S "$alt" 2>/dev/null || true; } | head -n 1 | sed 's/:.*//'
}
dep_names=" $(echo "$depends" | sed 's/([^)]*)//g; s/[,|]/ /g' | tr -s ' ') "
unowned=()
for elf in "$root/usr/bin/convd" "$root/usr/bin/convctl" "$root$lib"; do
  while read -r name path; do
    case $path in "$root"/*) continue ;; esac
    [ -n "$path" ] && [ "$path" != "not" ] || fail "$(basename "$elf"): $name is not found"
    pkg=$(owner "$path")
    if [ -z "$pkg" ]; then
      unowned+=("$name")
    elif [[ $dep_names != *" $pkg "* ]]; then
      fail "$(basename "$elf") loads $name from package $pkg, which Depends ($depends) does not name"
    fi
  done < <(LD_LIBRARY_PATH=$root$libdir ldd "$elf" |
           awk 'NR == FNR { need[$0] = 1; next } ($1 in need) { print $1, $3 }' \
             <(readelf -d "$elf" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p') -)
done
if [ ${#unowned[@]} -gt 0 ]; then
  echo "note: loaded from no Debian package, so not in Depends: $(printf '%s\n' "${unowned[@]}" | sort -u | tr '\n' ' ')"
fi
# convctl finds the packaged library through its run path, with no LD_LIBRARY_PATH.
found=$(env -u LD_LIBRARY_PATH ldd "$root/usr/bin/convctl" | awk '$1 ~ /^libconvd_client/ { print $3 }')
[ -n "$found" ] && [ "$(realpath "$found")" = "$(realpath "$root$lib")" ] ||
  fail "the extracted convctl loads libconvd_client from '$found', not from the package"
echo "Depends covers every library the programs load from a Debian package"

# ---- run the extracted programs ------------------------------------------------------------
export LD_LIBRARY_PATH=$root$libdir
while read -r v; do unset "$v"; done < <(env | sed -n 's/^\(CONVD_[A-Z0-9_]*\)=.*/\1/p')
for prog in convd convctl; do
  got=$("$root/usr/bin/$prog" --version)
  [ "$got" = "$prog $version" ] || fail "$prog --version says '$got', expected '$prog $version'"
done
"$root/usr/bin/convd" --listen 127.0.0.1:0 --log-level warn > "$scratch/convd.out" 2> "$scratch/convd.log" &
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
  cat "$scratch/convd.out" "$scratch/convd.log"
  fail "the extracted convd did not report a loopback port"
fi
echo "the extracted convd (PID $pid) listens on $target"
"$root/usr/bin/convctl" health --server "$target" --timeout 10

cases=$("$golden_check" list "$golden")
n=0
for c in $cases; do
  mapfile -t args < <("$golden_check" args "$golden" "$c")
  out=$scratch/out-$c.npy
  "$root/usr/bin/convctl" "${args[@]}" --server "$target" --timeout 120 --output "$out" \
    > "$scratch/convctl.out" 2> "$scratch/convctl.err" ||
    { cat "$scratch/convctl.err"; fail "convctl ${args[0]} on $c"; }
  "$golden_check" compare "$golden" "$c" "$out" || fail "golden case $c through the packaged convctl"
  n=$((n + 1))
done
[ "$n" -gt 0 ] || fail "no golden case ran"
echo "$n golden cases through the extracted convctl match their expected outputs"

# A client built from the extracted -dev package alone (its .pc file is relocatable).
export PKG_CONFIG_PATH=$root$libdir/pkgconfig
flags=$("$pkgconfig" --cflags --libs convd-client)
inc=$("$pkgconfig" --cflags-only-I convd-client | sed 's/^ *-I//; s/ *$//')
[ "$(realpath "$inc")" = "$(realpath "$root/usr/include")" ] || fail "pkg-config --cflags from the package: $flags"
"$cc" -std=c11 -pedantic -Wall -Wextra -Werror "$@" -o "$scratch/hello_client" \
  "$src/tests/install/hello_client.c" $flags
"$scratch/hello_client" "$target"

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
if [ "$rc" != 0 ] || grep -qE "Sanitizer|runtime error" "$scratch/convd.log"; then
  cat "$scratch/convd.log"
  fail "the extracted convd exited with $rc"
fi
echo "package check passed"
