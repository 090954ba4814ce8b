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

#ifndef QNETEM_SOURCE_DIGEST
#error "QNETEM_SOURCE_DIGEST must be defined by the build (cext/build_cext.py)"
#endif

const char *qnetem_version(void) { return QNETEM_VERSION; }

/* Digest of cext/*.c and cext/*.h this module was compiled from (emulator/kernels/_digest.py). */
const char *qnetem_source_digest(void) { return QNETEM_SOURCE_DIGEST; }
