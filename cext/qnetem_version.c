/*
 * qnetem_version.c - the package version this module was built from.
 *
 * cext/build_cext.py reads __version__ from emulator/__init__.py and passes it as
 * -DQNETEM_VERSION="x.y.z"; emulator/kernels/_c.py refuses a module whose version differs
 * from the installed package (a stale build after a version bump).
 */
#include "qnetem.h"

#ifndef QNETEM_VERSION
#error "QNETEM_VERSION must be defined by the build (cext/build_cext.py)"
#endif

const char *qnetem_version(void) { return QNETEM_VERSION; }
