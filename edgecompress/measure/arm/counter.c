/*
 * edgecompress instruction counter: a qemu-user TCG plugin (plugin API version 1, qemu 7.2).
 *
 * Counts the guest's executed AArch64 instructions, in total and by class, between
 * markers the measuring worker emits around each inference, and (optionally) the counts
 * at every clock_gettime(CLOCK_REALTIME) inside a marked region, so that onnxruntime's
 * profiling timestamps can be turned into per-node counts.
 *
 * Counts must not depend on how the host scheduled the run, so the plugin
 *   - counts only the thread that opened the region (`owner`), never other threads;
 *   - gives the guest's main thread a virtual clock: every clock_gettime/gettimeofday it
 *     makes returns the clock's value at its first call plus 10 ns per instruction the
 *     thread has executed since. onnxruntime rate-limits some of its own work by wall
 *     time (e.g. evaluation events at most every 50 ms), which would otherwise decide
 *     from run to run whether that work falls inside an inference;
 *   - answers the main thread's getcpu() with CPU 0: onnxruntime picks per-core kernels
 *     by it, and qemu would pass the host CPU through.
 * The clock and CPU are rewritten in guest memory through /proc/self/mem, after checking
 * on the first clock call that guest addresses are host addresses (guest_base 0);
 * otherwise the guest keeps the real clock and a `warning` record says so.
 *
 * Marker: lseek(-1, MARK_MAGIC | op, region). The call fails harmlessly with EBADF.
 *   op 1: begin region, op 2: end region, op 3: begin region and trace clock calls.
 *
 * Output (file given as out=PATH), one record per line:
 *   region ID C0 C1 ... C8          counts by class (CLASSES order in plugin.py) in the region
 *   clock ID T_NS C0 ... C8         counts since the region began at a guest
 *                                   clock_gettime(CLOCK_REALTIME) that returned T_NS
 *   warning TEXT                    the virtual clock could not be installed
 *
 * Debian 12 ships qemu 7.2 without qemu-plugin.h, so the few declarations this file
 * needs are written out below; they match include/qemu/qemu-plugin.h of qemu 7.2.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- qemu 7.2 plugin API, version 1 (only what is used here) ---- */
#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))
typedef uint64_t qemu_plugin_id_t;
typedef struct {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index,
                                              int64_t num, uint64_t a1, uint64_t a2,
                                              uint64_t a3, uint64_t a4, uint64_t a5,
                                              uint64_t a6, uint64_t a7, uint64_t a8);
typedef void (*qemu_plugin_vcpu_syscall_ret_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_idx,
                                                  int64_t num, int64_t ret);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_vcpu_syscall_ret_cb(qemu_plugin_id_t id,
                                              qemu_plugin_vcpu_syscall_ret_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb,
                                    void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
/* ---- end of the plugin API ---- */

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

#define MARK_MAGIC 0x45434F4D50520000ULL /* "ECOMPR" */
#define AARCH64_NR_LSEEK 62
#define AARCH64_NR_CLOCK_GETTIME 113
#define AARCH64_NR_GETCPU 168
#define AARCH64_NR_GETTIMEOFDAY 169
#define GUEST_CLOCK_REALTIME 0
#define N_CLOCKS 16           /* clock ids 0..15 get a virtual clock each */
#define NS_PER_INSTRUCTION 10 /* the virtual clock's pace: 100 M instructions per second */
#define MAIN_VCPU 0           /* the guest's first thread */

/* Keep in step with CLASSES in plugin.py. */
enum insn_class {
    C_FP_MLA,  /* floating-point (fused) multiply-add, vector or scalar */
    C_INT_MAC, /* SIMD integer multiply, multiply-accumulate, widening pairwise accumulate */
    C_DOT,     /* SIMD integer dot product and matrix multiply-accumulate */
    C_SIMD,    /* other Advanced SIMD and floating-point data processing */
    C_LOAD,
    C_STORE,
    C_BRANCH,
    C_SVE,     /* SVE and SME */
    C_OTHER,   /* integer data processing, system */
    N_CLASSES
};

/* Classify one A64 instruction word by its top-level encoding group (Arm ARM, C4.1). */
static int classify(uint32_t w)
{
    uint32_t op0 = (w >> 25) & 0xF;

    if (op0 == 0x2) {
        return C_SVE;
    }
    if (op0 == 0x0 && (w >> 31)) {
        return C_SVE; /* SME */
    }
    if ((op0 & 0xE) == 0xA) { /* branches, exception generation, system */
        if ((w & 0x7C000000) == 0x14000000 ||  /* B, BL */
            (w & 0x7E000000) == 0x34000000 ||  /* CBZ, CBNZ */
            (w & 0x7E000000) == 0x36000000 ||  /* TBZ, TBNZ */
            (w & 0xFF000000) == 0x54000000 ||  /* B.cond, BC.cond */
            (w & 0xFE000000) == 0xD6000000) {  /* BR, BLR, RET */
            return C_BRANCH;
        }
        return C_OTHER;
    }
    if ((op0 & 0x5) == 0x4) { /* loads and stores */
        uint32_t group = (w >> 27) & 0x7;
        if (group == 0x3 && !((w >> 24) & 1)) {
            return C_LOAD; /* literal loads, PRFM literal */
        }
        if (group == 0x7) { /* register: immediate, register offset, unsigned offset */
            uint32_t opc = (w >> 22) & 3, vec = (w >> 26) & 1, size = w >> 30;
            if (!((w >> 24) & 1) && ((w >> 21) & 1) && ((w >> 10) & 3) == 0) {
                return C_STORE; /* atomic read-modify-write */
            }
            if (opc == 0 || (vec && size == 0 && opc == 2)) {
                return C_STORE; /* STR, STR Q */
            }
            return C_LOAD;
        }
        return ((w >> 22) & 1) ? C_LOAD : C_STORE; /* exclusive, pair, SIMD structures */
    }
    if ((op0 & 0x7) == 0x7) { /* Advanced SIMD and floating point */
        uint32_t u = (w >> 29) & 1;
        if ((w & 0xFF000000) == 0x1F000000) {
            return C_FP_MLA; /* FMADD, FMSUB, FNMADD, FNMSUB */
        }
        if ((w & 0x9F200400) == 0x0E200400) { /* three same */
            uint32_t opcode = (w >> 11) & 0x1F;
            if (!u && opcode == 0x19) {
                return C_FP_MLA; /* FMLA, FMLS (vector) */
            }
            if (opcode == 0x12 || (!u && opcode == 0x13)) {
                return C_INT_MAC; /* MLA, MLS, MUL */
            }
            return C_SIMD;
        }
        if ((w & 0x9F60C400) == 0x0E400400) { /* three same, half precision */
            return (!u && ((w >> 11) & 7) == 1) ? C_FP_MLA : C_SIMD;
        }
        if ((w & 0x9F208400) == 0x0E008400) { /* three same extra */
            uint32_t opcode = (w >> 11) & 0xF;
            if (opcode >= 0x2 && opcode <= 0x5) {
                return C_DOT; /* SDOT, UDOT, USDOT, SMMLA, UMMLA, USMMLA */
            }
            if (opcode <= 0x1) {
                return C_INT_MAC; /* SQRDMLAH, SQRDMLSH */
            }
            return C_SIMD;
        }
        if ((w & 0x9F200C00) == 0x0E200000) { /* three different */
            uint32_t opcode = (w >> 12) & 0xF;
            if (opcode >= 0x8 && opcode <= 0xD) {
                return C_INT_MAC; /* [SU]MLAL, [SU]MLSL, [SU]MULL, SQDML[AS]L, SQDMULL */
            }
            return C_SIMD;
        }
        if ((w & 0x9F3E0C00) == 0x0E200800) { /* two-register miscellaneous */
            return (((w >> 12) & 0x1F) == 0x6) ? C_INT_MAC : C_SIMD; /* SADALP, UADALP */
        }
        if ((w & 0x9F000400) == 0x0F000000 || (w & 0xDF000400) == 0x5F000000) {
            /* vector or scalar x indexed element */
            uint32_t opcode = (w >> 12) & 0xF, size = (w >> 22) & 3;
            if (opcode == 0xE) {
                return C_DOT; /* SDOT, UDOT (by element) */
            }
            if (opcode == 0xF && !u && (size == 0 || size == 2)) {
                return C_DOT; /* SUDOT, USDOT (by element) */
            }
            if (!u && (opcode == 0x1 || opcode == 0x5)) {
                return C_FP_MLA; /* FMLA, FMLS (by element) */
            }
            if (!u && (opcode == 0x0 || opcode == 0x4) && size == 2) {
                return C_FP_MLA; /* FMLAL, FMLSL (by element) */
            }
            if ((u && (opcode == 0x0 || opcode == 0x4)) || (!u && opcode == 0x8) ||
                opcode == 0x2 || opcode == 0x6 || opcode == 0xA ||
                (!u && (opcode == 0x3 || opcode == 0x7 || opcode == 0xB))) {
                return C_INT_MAC; /* MLA, MLS, MUL, [SU]MLAL, [SU]MLSL, [SU]MULL, SQDM* */
            }
            return C_SIMD;
        }
        return C_SIMD;
    }
    return C_OTHER; /* data processing: immediate and register */
}

#ifdef EDGECOMPRESS_TEST
/* Lets the unit tests call the classifier directly (ctypes on a test build). */
QEMU_PLUGIN_EXPORT int edgecompress_classify(uint32_t word)
{
    return classify(word);
}
#endif

/* Counts of the thread that opened the current region (the owner), since it opened. */
static uint64_t counts[N_CLASSES];
static volatile int64_t owner = -1; /* vcpu (guest thread) index, -1 outside a region */
static int64_t region_id = -1;
static bool tracing;
static FILE *out;

/* The main thread's virtual clock and the syscall it is in. */
static uint64_t main_instructions; /* executed by the main thread since the start */
static int64_t clock_base[N_CLOCKS];
static bool clock_based[N_CLOCKS];
static int64_t clock_last[N_CLOCKS];
static int virtual_ok = -1; /* -1 not checked yet, 0 off, 1 on */
static int memfd = -1;
static int64_t pending_num = -1;
static uint64_t pending_a1, pending_a2;

struct tb_classes {
    uint64_t n[N_CLASSES];
    uint64_t total;
};

/* Runs at the entry of every executed block: exact for blocks that run to their end, and
 * a syscall always ends a block, so the counts seen at a marker or a clock call are exact. */
static void tb_exec(unsigned int vcpu_index, void *userdata)
{
    const struct tb_classes *block = userdata;

    if (vcpu_index == MAIN_VCPU) {
        main_instructions += block->total;
    }
    if ((int64_t)vcpu_index != owner) {
        return;
    }
    for (int c = 0; c < N_CLASSES; c++) {
        counts[c] += block->n[c];
    }
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    struct tb_classes *block = calloc(1, sizeof(*block)); /* lives as long as the block */
    size_t n = qemu_plugin_tb_n_insns(tb);

    if (!block) {
        return;
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t word = 0;
        size_t size = qemu_plugin_insn_size(insn);
        memcpy(&word, qemu_plugin_insn_data(insn), size < 4 ? size : 4);
        block->n[classify(word)]++;
    }
    block->total = n;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS, block);
}

static void write_counts(void)
{
    for (int c = 0; c < N_CLASSES; c++) {
        fprintf(out, " %" PRIu64, counts[c]);
    }
    fputc('\n', out);
}

static bool guest_read(uint64_t addr, void *buf, size_t len)
{
    return memfd >= 0 && pread(memfd, buf, len, (off_t)addr) == (ssize_t)len;
}

static bool guest_write(uint64_t addr, const void *buf, size_t len)
{
    return memfd >= 0 && pwrite(memfd, buf, len, (off_t)addr) == (ssize_t)len;
}

/* The main thread's clock `clk` as the guest must see it, given the real value now. */
static int64_t virtual_ns(int clk, int64_t real_ns)
{
    int64_t pace = (int64_t)(main_instructions * NS_PER_INSTRUCTION);
    int64_t value;

    if (!clock_based[clk]) {
        clock_base[clk] = real_ns - pace;
        clock_based[clk] = true;
    }
    value = clock_base[clk] + pace;
    if (value <= clock_last[clk]) {
        value = clock_last[clk] + 1; /* strictly increasing, like a real clock */
    }
    clock_last[clk] = value;
    return value;
}

/* First clock call: are guest addresses host addresses? Compare what the kernel wrote. */
static void check_virtual(uint64_t addr, int clk)
{
    struct timespec guest, host;

    if (guest_read(addr, &guest, sizeof(guest)) && clock_gettime(clk, &host) == 0 &&
        llabs((long long)(host.tv_sec - guest.tv_sec)) <= 5) {
        virtual_ok = 1;
        return;
    }
    virtual_ok = 0;
    fprintf(out, "warning virtual clock off: guest memory is not at host addresses\n");
}

static void clock_record(int64_t value_ns)
{
    if (tracing && owner >= 0) {
        fprintf(out, "clock %" PRId64 " %" PRId64, region_id, value_ns);
        write_counts();
    }
}

static void vcpu_syscall_ret(qemu_plugin_id_t id, unsigned int vcpu_idx, int64_t num, int64_t ret)
{
    int64_t called = pending_num;

    if (vcpu_idx != MAIN_VCPU || called != num) {
        return;
    }
    pending_num = -1;
    if (ret != 0) {
        return;
    }
    if (num == AARCH64_NR_CLOCK_GETTIME && pending_a1 < N_CLOCKS && pending_a2) {
        int clk = (int)pending_a1;
        struct timespec ts;
        if (virtual_ok < 0) {
            check_virtual(pending_a2, clk);
        }
        if (virtual_ok == 1 && guest_read(pending_a2, &ts, sizeof(ts))) {
            int64_t v = virtual_ns(clk, ts.tv_sec * 1000000000LL + ts.tv_nsec);
            ts.tv_sec = v / 1000000000LL;
            ts.tv_nsec = v % 1000000000LL;
            guest_write(pending_a2, &ts, sizeof(ts));
            if (clk == GUEST_CLOCK_REALTIME && (int64_t)vcpu_idx == owner) {
                clock_record(v);
            }
        }
    } else if (num == AARCH64_NR_GETTIMEOFDAY && pending_a1 && virtual_ok == 1) {
        struct {
            int64_t sec, usec;
        } tv;
        if (guest_read(pending_a1, &tv, sizeof(tv))) {
            int64_t v = virtual_ns(GUEST_CLOCK_REALTIME, tv.sec * 1000000000LL + tv.usec * 1000);
            tv.sec = v / 1000000000LL;
            tv.usec = (v % 1000000000LL) / 1000;
            guest_write(pending_a1, &tv, sizeof(tv));
        }
    } else if (num == AARCH64_NR_GETCPU && virtual_ok == 1) {
        uint32_t zero = 0;
        if (pending_a1) {
            guest_write(pending_a1, &zero, sizeof(zero));
        }
        if (pending_a2) {
            guest_write(pending_a2, &zero, sizeof(zero));
        }
    }
}

static void vcpu_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                         uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                         uint64_t a7, uint64_t a8)
{
    if (vcpu_index == MAIN_VCPU) {
        pending_num = num;
        pending_a1 = a1;
        pending_a2 = a2;
    }
    if (num == AARCH64_NR_CLOCK_GETTIME && a1 == GUEST_CLOCK_REALTIME &&
        (int64_t)vcpu_index == owner && (vcpu_index != MAIN_VCPU || virtual_ok == 0)) {
        /* No virtual clock for this thread: record the host's time just before the call. */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        clock_record(now.tv_sec * 1000000000LL + now.tv_nsec);
        return;
    }
    if (num != AARCH64_NR_LSEEK || (uint32_t)a1 != 0xFFFFFFFFu ||
        (a2 & ~0xFFFFULL) != MARK_MAGIC) {
        return;
    }
    switch (a2 & 0xFFFF) {
    case 1:
    case 3:
        memset(counts, 0, sizeof(counts));
        region_id = (int64_t)(uint32_t)a3;
        tracing = (a2 & 0xFFFF) == 3;
        owner = vcpu_index;
        break;
    case 2:
        if (region_id >= 0 && (int64_t)vcpu_index == owner) {
            fprintf(out, "region %" PRId64, region_id);
            write_counts();
            fflush(out);
        }
        owner = -1;
        region_id = -1;
        tracing = false;
        break;
    }
}

static void plugin_exit(qemu_plugin_id_t id, void *userdata)
{
    if (out) {
        fflush(out);
        if (out != stderr) {
            fclose(out);
        }
        out = NULL;
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    const char *path = NULL;

    if (info->system_emulation || strcmp(info->target_name, "aarch64") != 0) {
        fprintf(stderr, "edgecompress counter: needs qemu-aarch64 user mode\n");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            path = argv[i] + 4;
        }
    }
    out = path ? fopen(path, "w") : stderr;
    if (!out) {
        fprintf(stderr, "edgecompress counter: cannot write %s\n", path);
        return -1;
    }
    memfd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, vcpu_syscall);
    qemu_plugin_register_vcpu_syscall_ret_cb(id, vcpu_syscall_ret);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
