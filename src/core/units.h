/* units.h — human-readable numbers: bytes (KiB/MiB/GiB, binary) and counts (K/M/B). */
#ifndef TUNA_CORE_UNITS_H
#define TUNA_CORE_UNITS_H

#include <stddef.h>
#include <stdint.h>

/* "1.50 GiB", "512 B"; writes into buf and returns it. */
const char *tuna_fmt_bytes(char *buf, size_t cap, double bytes);
/* "1.24 B", "494.0 M", "12.3 K", "17". */
const char *tuna_fmt_count(char *buf, size_t cap, double n);

#endif
