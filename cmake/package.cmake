# The Debian packages, made by CPack from the install() rules: in the build directory,
# `cpack -G DEB` (or `cmake --build build --target package`) writes
#
#   convd_VERSION_ARCH.deb                /usr/bin/convd, /usr/bin/convctl, LIBDIR/libconvd_client.so.*
#                                         (the library convctl and every C client run with),
#                                         /lib/systemd/system/convd.service, /etc/default/convd
#                                         (a conffile), /usr/share/doc/convd/copyright
#   libconvd-client-dev_VERSION_ARCH.deb  /usr/include/convd/*.h, LIBDIR/libconvd_client.so (the
#                                         link), LIBDIR/pkgconfig/convd-client.pc; depends on convd
#                                         of the same version
#
# Two packages, as Debian splits a library: a server needs neither headers nor the .pc file,
# and a build machine gets them from the -dev package. The shared library stays in convd, not in
# a third package (Debian's libconvd-client0.1): convctl needs it, and before 1.0 its soname
# changes with every minor release, so a package named after it would be renamed as often.
#
# VERSION is project()'s; Depends is computed by dpkg-shlibdeps from the ELF files, so it names
# the Debian packages of the libraries this build linked (libgrpc29, libdnnl2, ...; a library
# that no package owns, such as a CUDA toolkit under /usr/local, is left out of it). LIBDIR is
# GNUInstallDirs': lib with the default prefix, lib/<multiarch triplet> when configured with
# -DCMAKE_INSTALL_PREFIX=/usr. tests/install/check_deb.sh builds, inspects, extracts and runs them.
#
# Included from the top-level CMakeLists.txt after its install() rules, when CONVD_SERVER is on.

set(CONVD_PACKAGE_MAINTAINER "convd maintainers <convd-maintainers@example.org>" CACHE STRING
    "The Maintainer field of the Debian packages: Name <address>")

# Files at absolute paths belong to the package only: they would fail an unprivileged `cmake
# --install --prefix DIR`, and a unit under DIR means nothing to systemd. EXCLUDE_FROM_ALL
# installs them only when their component is named, which CPack does for each package (`cmake
# --install build --prefix /usr --component convd`, as root, would too). The unit's ExecStart
# is /usr/bin/convd, hence the fixed packaging prefix.
install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/convd.service DESTINATION /lib/systemd/system
        COMPONENT convd EXCLUDE_FROM_ALL)
install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/convd.default DESTINATION /etc/default
        RENAME convd COMPONENT convd EXCLUDE_FROM_ALL)
# Every Debian package carries its own copyright file.
install(FILES ${PROJECT_SOURCE_DIR}/LICENSE DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/libconvd-client-dev
        RENAME copyright COMPONENT dev EXCLUDE_FROM_ALL)

# dpkg keeps a conffile's local edits across upgrades; CPack marks none by itself.
file(WRITE ${CMAKE_BINARY_DIR}/deb/conffiles "/etc/default/convd\n")

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME convd)
set(CPACK_PACKAGE_VENDOR convd)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "${CONVD_PACKAGE_MAINTAINER}")
set(CPACK_RESOURCE_FILE_LICENSE ${PROJECT_SOURCE_DIR}/LICENSE)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_PACKAGE_DIRECTORY ${CMAKE_BINARY_DIR}/packages)
set(CPACK_COMPONENTS_ALL convd dev)

set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT) # NAME_VERSION_ARCH.deb
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "${CONVD_PACKAGE_MAINTAINER}")
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)

set(CPACK_DEBIAN_CONVD_PACKAGE_NAME convd)
set(CPACK_DEBIAN_CONVD_PACKAGE_SECTION net)
set(CPACK_DEBIAN_CONVD_DESCRIPTION
    "2D convolution over gRPC on this machine's GPUs and CPUs
convd owns a machine's compute devices and serves 2D convolution (and its transpose) over
gRPC, so that programs in any language get convolution without owning a GPU stack. This
package holds the daemon, its systemd unit (not enabled on installation), convctl (the
command-line client) and libconvd_client, the C client library.")
set(CPACK_DEBIAN_CONVD_PACKAGE_CONTROL_EXTRA ${CMAKE_BINARY_DIR}/deb/conffiles)
# A shlibs file, so that a package built against libconvd_client depends on convd (CPack
# takes this one for every package; only convd has a shared object).
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS_POLICY ">=")

set(CPACK_DEBIAN_DEV_PACKAGE_NAME libconvd-client-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS "convd (= ${PROJECT_VERSION})")
set(CPACK_DEBIAN_DEV_DESCRIPTION
    "C client library for convd: headers and pkg-config file
Everything needed to build a C client of convd, the convolution daemon: <convd/client.h>
and the headers it includes, the libconvd_client.so link and convd-client.pc
(pkg-config --cflags --libs convd-client).")

include(CPack)
