/* Test-only canaries for `make test-asan` (sanitize/check_active.py): built
 * with the same sanitizer flags as the extension, each does one thing the
 * sanitizers must report. If a run of them is not reported, the target is
 * not sanitizing and fails instead of passing unsanitized. Never linked into
 * gridgate. */
#include <limits.h>
#include <stdlib.h>

/* Reads p[index] of an 8-byte heap block: index 8 is one byte past its end. */
int gridgate_canary_heap_read(int index) {
    char *p = malloc(8);
    int i;
    for (i = 0; i < 8; i++) p[i] = (char)i;
    volatile char c = p[index];
    free(p);
    return c;
}

/* Adds one to x: INT_MAX overflows, undefined behaviour UBSan reports. */
int gridgate_canary_add_one(int x) {
    return x + 1;
}
