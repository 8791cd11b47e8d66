/* An LD_PRELOAD library that logs every malloc-family call of a process to $HEAPTRACE_FILE (bench/heap_replay.py).
 *
 * Why: the resident peak of a CPU training step exceeds its live tensors by 25-80% (glibc's heap), and neither
 * PyTorch's profiler nor the planner's fake tensors see the C++ allocations that interleave with the tensors.
 * This logs them all, in order, so that replay.c can run the same sequence through glibc again (and again
 * with some of it left out) to see what the excess comes from. A diagnostic: lorafit does not use it.
 *
 * Each record: op (0 free, 1 malloc/calloc, 2 realloc, 3 aligned, 9 a mark from heaptrace_mark), thread id,
 * pointer, size, the old pointer (realloc) or the alignment, and the caller's address (to tell libc10, where
 * PyTorch's CPU tensors are allocated, from the rest). The calls go to glibc's own __libc_* entry points, so
 * the traced process uses the same arenas and bins it would without the tracer.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

typedef struct { uint8_t op; uint8_t pad[3]; uint32_t tid; uint64_t ptr, size, old, caller; } record_t;

#define CAPACITY (1 << 16)
static __thread int inside;  /* the tracer's own allocations (none expected) are not logged */
static record_t records[CAPACITY];
static int count;
static int fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void flush_locked(void) {
  if (fd >= 0 && count) write(fd, records, sizeof(record_t) * count);
  count = 0;
}

static void log_call(int op, void *ptr, size_t size, void *old, void *caller) {
  if (inside) return;
  inside = 1;
  pthread_mutex_lock(&lock);
  if (fd == -1) {
    const char *path = getenv("HEAPTRACE_FILE");
    fd = path ? open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644) : -2;
  }
  if (fd >= 0) {
    record_t *r = &records[count++];
    r->op = op; r->tid = (uint32_t)syscall(SYS_gettid);
    r->ptr = (uint64_t)ptr; r->size = size; r->old = (uint64_t)old; r->caller = (uint64_t)caller;
    if (count == CAPACITY) flush_locked();
  }
  pthread_mutex_unlock(&lock);
  inside = 0;
}

void heaptrace_mark(uint64_t mark) {
  log_call(9, 0, mark, 0, 0);
  pthread_mutex_lock(&lock);
  flush_locked();
  pthread_mutex_unlock(&lock);
}

void *malloc(size_t size) { void *p = __libc_malloc(size); log_call(1, p, size, 0, __builtin_return_address(0)); return p; }
void free(void *p) { if (p) log_call(0, p, 0, 0, __builtin_return_address(0)); __libc_free(p); }
void *calloc(size_t n, size_t size) { void *p = __libc_calloc(n, size); log_call(1, p, n * size, 0, __builtin_return_address(0)); return p; }
void *realloc(void *old, size_t size) { void *p = __libc_realloc(old, size); log_call(2, p, size, old, __builtin_return_address(0)); return p; }
void *memalign(size_t align, size_t size) { void *p = __libc_memalign(align, size); log_call(3, p, size, (void *)align, __builtin_return_address(0)); return p; }
void *aligned_alloc(size_t align, size_t size) { void *p = __libc_memalign(align, size); log_call(3, p, size, (void *)align, __builtin_return_address(0)); return p; }
void *valloc(size_t size) { void *p = __libc_memalign(4096, size); log_call(3, p, size, (void *)4096, __builtin_return_address(0)); return p; }
int posix_memalign(void **out, size_t align, size_t size) {
  void *p = __libc_memalign(align, size);
  if (!p) return 12; /* ENOMEM */
  *out = p;
  log_call(3, p, size, (void *)align, __builtin_return_address(0));
  return 0;
}

__attribute__((destructor)) static void finish(void) { pthread_mutex_lock(&lock); flush_locked(); pthread_mutex_unlock(&lock); }
