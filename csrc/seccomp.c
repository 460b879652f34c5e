/*
 * seccomp.c: the system call allow-list of the data-path worker threads.
 *
 * The queue workers (blk_worker.c) parse descriptors and requests a guest controls; a bug
 * there must not hand the guest the daemon's privileges (its sockets, the control plane,
 * every other volume file by opening it, exec). So each worker confines itself, at its
 * start and before it touches guest memory, to the system calls the data path makes. The
 * filter is installed without SECCOMP_FILTER_FLAG_TSYNC: it applies to the calling thread
 * only, and the Python event loop (which opens sockets, files, spawns nothing but needs
 * everything else) stays unfiltered. It holds wherever the daemon runs, with or without
 * systemd's SystemCallFilter.
 *
 * libseccomp builds the BPF program once per mode (vpv_seccomp_set_mode, on the control
 * plane's thread; it takes care of the architecture check and of syscall numbering), and
 * each worker loads the ready program with one prctl(PR_SET_SECCOMP) call: no allocation
 * and no libseccomp state in the worker, and any number of workers may start at once.
 *
 * io_uring_enter is allowed, and an io_uring can do far more than read and write (open,
 * connect, send, ...) without a system call the filter sees: blk_io.c therefore restricts
 * every queue's ring to READV and WRITEV (IORING_REGISTER_RESTRICTIONS) before enabling it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <seccomp.h>   /* libseccomp (the internal header is vpv_seccomp.h) */

#include "vpv_seccomp.h"
#include "vhost_pv.h"

/* Allowed without looking at the arguments, each for the reason beside it (measured with
 * strace -f on the daemon tests and loadgen, completed from the code paths no test reaches:
 * glibc's fatal message, re-raising a foreign SIGBUS). Names a given architecture lacks
 * (poll on arm64) are skipped. */
static const char *const allowed[] = {
    /* the guest's data and the frontend's eventfds */
    "read",            /* kick eventfd (without RWF_NOWAIT), io_uring completion eventfd */
    "preadv2",         /* kick eventfd with RWF_NOWAIT */
    "write",           /* call eventfd (interrupts), broken / event eventfds; crash reports */
    "writev",          /* glibc's fatal error message (malloc corruption, then abort) */
    "preadv",          /* synchronous reads (no io_uring, O_DIRECT fallback, short transfers) */
    "pwritev",         /* synchronous writes (buffered writes go inline, not to the io_uring) */
    "pread64",         /* quarantine ring: superblock and records */
    "pwrite64",        /* quarantine ring: records, filler, superblock; zeroing fallback */
    "fdatasync",       /* FLUSH */
    "fallocate",       /* DISCARD and WRITE_ZEROES (punch hole, zero range) */
    "io_uring_enter",  /* submit and reap the queue's ring (restricted to READV/WRITEV) */
    /* waiting */
    "poll",            /* the worker's sleep on kick, stop and completion eventfds */
    "ppoll",           /* the same where there is no poll(2) */
    "clock_nanosleep", /* kick coalescing (nanosleep) */
    "nanosleep",
    "clock_gettime",   /* vDSO fallback */
    "futex",           /* the volume's flip lock, ring and event mutexes */
    "restart_syscall", /* the kernel resumes a sleep that io_uring task work interrupted */
    /* memory: malloc and free (bounce buffers, arenas), the thread stack's release at exit */
    "munmap", "mremap", "madvise", "brk",
    /* signals */
    "rt_sigreturn",    /* return from the stop's SIGURG handler */
    "rt_sigprocmask",  /* glibc blocks signals at thread exit and in raise() */
    "getpid", "gettid",/* raise(): re-sending a SIGBUS that was not a guest fault, abort() */
    /* ending */
    "exit",            /* the worker returns */
    "exit_group",      /* a fatal report (sanitizers, glibc); the kill action ends it too */
    "close",           /* a worker a stop gave up on frees its io_uring, stop fd and device */
#if defined(__SANITIZE_ADDRESS__)
    /* The ASan + UBSan build (build.py --sanitize, `make asan`) only. A report from a worker
     * opens its log file (and makes log_path's directories), reads /proc/self/maps and the
     * libraries' ELF files to symbolize the stack, checks memory readability through a
     * pipe and locks with sched_yield, then exits: measured with strace on reports from a
     * filtered thread. Without these the report would be lost to SIGSYS. And every
     * sanitized thread takes down, at its exit, the alternate signal stack ASan gave it. */
    "open", "openat", "readlink", "newfstatat", "fstat", "fcntl", "mkdir", "pipe2", "sched_yield",
    "sigaltstack",
#endif
};

/* A rule that looks at one argument: syscall(arg `arg` & mask == value). */
struct arg_rule {
    const char *name;
    unsigned arg;
    uint64_t mask;
    uint64_t value;
};

static const struct arg_rule arg_rules[] = {
    /* malloc's mappings, never executable: no code can be mapped or made runnable */
    {"mmap", 2, PROT_EXEC, 0},
    {"mprotect", 2, PROT_EXEC, 0},
    /* the SIGBUS guard's handler, on a fault that was not the guest's, puts the previous
     * disposition back (vring.c); abort() resets SIGABRT */
    {"rt_sigaction", 0, ~0ull, SIGBUS},
    {"rt_sigaction", 0, ~0ull, SIGABRT},
    /* raise() of those two signals only */
    {"tgkill", 2, ~0ull, SIGBUS},
    {"tgkill", 2, ~0ull, SIGABRT},
#if defined(__SANITIZE_ADDRESS__)
    {"ioctl", 1, ~0ull, TCGETS},   /* the sanitizers ask whether the report goes to a tty */
#endif
};

/* The program for the current mode; replaced (never while a worker loads it) by set_mode. */
static pthread_mutex_t filter_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t filter_mode = VPV_SECCOMP_KILL;   /* on unless the control plane says otherwise */
static struct sock_fprog filter_prog;             /* .filter NULL: not built yet */

static int add_rules(scmp_filter_ctx ctx)
{
    for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++) {
        int nr = seccomp_syscall_resolve_name(allowed[i]);
        if (nr == __NR_SCMP_ERROR || nr < 0)
            continue;   /* not a system call of this architecture */
        int rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
        if (rc < 0)
            return rc;
    }
    for (size_t i = 0; i < sizeof(arg_rules) / sizeof(arg_rules[0]); i++) {
        const struct arg_rule *r = &arg_rules[i];
        int nr = seccomp_syscall_resolve_name(r->name);
        if (nr == __NR_SCMP_ERROR || nr < 0)
            continue;
        struct scmp_arg_cmp cmp = {.arg = r->arg, .op = SCMP_CMP_MASKED_EQ, .datum_a = r->mask,
                                   .datum_b = r->value};
        int rc = seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, &cmp);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* libseccomp's program for `mode`, as the kernel takes it. 0 or a negative errno. */
static int build(uint32_t mode, struct sock_fprog *out)
{
    /* Tell libseccomp what the kernel has rather than let it probe with seccomp(2): API
     * level 3 is the seccomp syscall with the LOG and KILL_PROCESS actions (Linux 4.14).
     * The daemon itself then never calls seccomp(2), which systemd's @system-service set
     * (the unit's SystemCallFilter) does not contain; a kernel without them refuses the
     * program when a worker loads it, and that worker fails closed. */
    seccomp_api_set(3);
    scmp_filter_ctx ctx = seccomp_init(mode == VPV_SECCOMP_LOG ? SCMP_ACT_LOG : SCMP_ACT_KILL_PROCESS);
    if (!ctx)
        return -ENOMEM;
    int fd = -1;
    int rc = add_rules(ctx);
    /* libseccomp 2.5 exports to an fd only (seccomp_export_bpf_mem is 2.6): a memfd. */
    if (rc == 0 && (fd = memfd_create("vhost-pv-seccomp", MFD_CLOEXEC)) < 0)
        rc = -errno;
    if (rc == 0)
        rc = seccomp_export_bpf(ctx, fd);
    off_t size = rc == 0 ? lseek(fd, 0, SEEK_END) : 0;
    if (rc == 0 && (size <= 0 || size % sizeof(struct sock_filter) || size / sizeof(struct sock_filter) > 0xffff))
        rc = -EINVAL;
    struct sock_filter *insns = rc == 0 ? malloc((size_t)size) : NULL;
    if (rc == 0 && !insns)
        rc = -ENOMEM;
    if (rc == 0 && pread(fd, insns, (size_t)size, 0) != size)
        rc = -EIO;
    if (fd >= 0)
        close(fd);
    seccomp_release(ctx);
    if (rc < 0) {
        free(insns);
        return rc;
    }
    out->len = (unsigned short)(size / sizeof(struct sock_filter));
    out->filter = insns;
    return 0;
}

int vpv_seccomp_set_mode(uint32_t mode)
{
    if (mode != VPV_SECCOMP_OFF && mode != VPV_SECCOMP_KILL && mode != VPV_SECCOMP_LOG)
        return -EINVAL;
    struct sock_fprog prog = {0, NULL};
    if (mode != VPV_SECCOMP_OFF) {
        int rc = build(mode, &prog);
        if (rc < 0)
            return rc;
    }
    pthread_mutex_lock(&filter_lock);
    free(filter_prog.filter);
    filter_prog = prog;
    filter_mode = mode;
    pthread_mutex_unlock(&filter_lock);
    return 0;
}

uint32_t vpv_seccomp_mode(void)
{
    pthread_mutex_lock(&filter_lock);
    uint32_t mode = filter_mode;
    pthread_mutex_unlock(&filter_lock);
    return mode;
}

int vpv_seccomp_enter(void)
{
    pthread_mutex_lock(&filter_lock);
    int rc = 0;
    if (filter_mode != VPV_SECCOMP_OFF && !filter_prog.filter)
        rc = build(filter_mode, &filter_prog);   /* never configured: the default, kill */
    if (rc == 0 && filter_mode != VPV_SECCOMP_OFF) {
        /* Without CAP_SYS_ADMIN the kernel takes a filter only under no_new_privs, which is
         * per thread too: this thread never executes anything. prctl rather than seccomp(2):
         * the same filter (no flags, so no TSYNC), and prctl is in systemd's @system-service. */
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &filter_prog, 0, 0) != 0)
            rc = -errno;
        else
            rc = 1;
    }
    pthread_mutex_unlock(&filter_lock);
    return rc;
}

/* -- the self-test: what a compromised worker would meet ------------------------------------ */

static void *selftest_thread(void *arg)
{
    long *result = arg;
    int rc = vpv_seccomp_enter();
    if (rc < 0) {
        *result = rc;
        return NULL;
    }
    /* socket(2) is what an attacker wants first and the data path never needs. Under the
     * kill action the process ends here, of SIGSYS. */
    long fd = syscall(SYS_socket, AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0) {
        close((int)fd);
        *result = 1;
    } else {
        *result = -errno;
    }
    return NULL;
}

int vpv_seccomp_selftest(void)
{
    long result = 0;
    pthread_t thread;
    int err = pthread_create(&thread, NULL, selftest_thread, &result);
    if (err)
        return -err;
    pthread_join(thread, NULL);
    return (int)result;
}
