/* Replay a tracer.c log through this process's glibc and print, per training step, how far the heap grew.
 *
 *   replay LOG C10_START C10_END [tensors-only]
 *
 * Marks 2k-1 and 2k bracket step k (bench/heap_replay.py sets them). For each step: the peak growth of the heap
 * (the main arena's brk extent plus mmapped chunks) above the extent at the step's start, the peak growth of the
 * live bytes allocated from libc10 (PyTorch's CPU tensors: callers in [C10_START, C10_END)), and the extent at
 * the start. malloc_trim runs at mark 1, as the training loop trims once set up. With `tensors-only`, the
 * allocations made inside steps by anything but libc10 are left out: the heap as it would be with the
 * tensors alone. Prints one JSON list.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct { uint8_t op; uint8_t pad[3]; uint32_t tid; uint64_t ptr, size, old, caller; } record_t;

#define SLOTS (1u << 25)
#define TENSOR_BIT (1ULL << 63)
#define EMPTY 0
#define GONE 1
static uint64_t *keys, *sizes;
static void **values;
static char *heap_start;
static uint64_t mmapped, tensors;

static uint64_t slot(uint64_t key) { key ^= key >> 33; key *= 0xff51afd7ed558ccdULL; key ^= key >> 33; return key & (SLOTS - 1); }
static void remember(uint64_t key, void *value, uint64_t size) {
  uint64_t i = slot(key);
  while (keys[i] != EMPTY && keys[i] != key && keys[i] != GONE) i = (i + 1) & (SLOTS - 1);
  keys[i] = key; values[i] = value; sizes[i] = size;
}
static void *forget(uint64_t key, uint64_t *size) {
  for (uint64_t i = slot(key); keys[i] != EMPTY; i = (i + 1) & (SLOTS - 1))
    if (keys[i] == key) { keys[i] = GONE; *size = sizes[i]; return values[i]; }
  return NULL;
}
static int is_mmapped(void *p) { return (((uint64_t *)p)[-1] & 2) != 0; }  /* glibc's IS_MMAPPED chunk bit */
static void released(void *p, uint64_t size) {
  if (is_mmapped(p)) mmapped -= malloc_usable_size(p) + 16;
  if (size & TENSOR_BIT) tensors -= size & ~TENSOR_BIT;
}
static uint64_t extent(void) { return (uint64_t)((char *)sbrk(0) - heap_start) + mmapped; }

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: replay LOG C10_START C10_END [tensors-only]\n"); return 2; }
  FILE *log = fopen(argv[1], "rb");
  if (!log) { perror(argv[1]); return 1; }
  uint64_t c10_start = strtoull(argv[2], 0, 16), c10_end = strtoull(argv[3], 0, 16);
  int tensors_only = argc > 4;
  keys = calloc(SLOTS, 8); sizes = calloc(SLOTS, 8); values = calloc(SLOTS, sizeof(void *));
  heap_start = sbrk(0);
  record_t r;
  int in_step = 0, first = 1;
  uint64_t start = 0, peak = 0, tensors_start = 0, tensors_peak = 0;
  printf("[");
  while (fread(&r, sizeof r, 1, log) == 1) {
    if (r.op == 9) {
      int mark = (int)r.size;
      if (mark == 1) malloc_trim(0);
      if (mark % 2 == 1) { in_step = 1; start = peak = extent(); tensors_start = tensors_peak = tensors; }
      else {
        in_step = 0;
        printf("%s{\"heap_MiB\": %.2f, \"tensors_MiB\": %.2f, \"heap_at_start_MiB\": %.2f}", first ? "" : ", ",
               (peak - start) / 1048576.0, (tensors_peak - tensors_start) / 1048576.0, start / 1048576.0);
        first = 0;
      }
      continue;
    }
    uint64_t size;
    if (r.op == 0) {
      void *p = forget(r.ptr, &size);
      if (p) { released(p, size); free(p); }
      continue;
    }
    int tensor = r.caller >= c10_start && r.caller < c10_end;
    if (tensors_only && in_step && !tensor && r.op != 2) continue;
    void *p;
    if (r.op == 2) {
      void *old = r.old ? forget(r.old, &size) : NULL;
      if (r.old && !old) continue;  /* its allocation was left out */
      if (old) released(old, size);
      p = realloc(old, r.size);
    } else if (r.op == 3) {
      if (posix_memalign(&p, r.old, r.size)) p = NULL;
    } else {
      p = malloc(r.size);
    }
    if (!p) continue;
    if (r.size && is_mmapped(p)) mmapped += malloc_usable_size(p) + 16;
    if (tensor) tensors += r.size;
    remember(r.ptr, p, r.size | (tensor ? TENSOR_BIT : 0));
    if (in_step) {
      uint64_t now = extent();
      if (now > peak) peak = now;
      if (tensors > tensors_peak) tensors_peak = tensors;
    }
  }
  printf("]\n");
  return 0;
}
