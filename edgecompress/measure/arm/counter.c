/*
 * edgecompress instruction counter: a qemu-user TCG plugin (plugin API version 1, qemu 7.2).
 *
 * Counts the guest's executed AArch64 instructions, in total and by class, between
 * markers the measuring worker emits around each inference, and (optionally) the
 * counts at every clock_gettime call inside a marked region, so that onnxruntime's
 * profiling timestamps can be turned into per-node counts.
 *
 * Marker: lseek(-1, MARK_MAGIC | op, region). The call fails harmlessly with EBADF.
 *   op 1: begin region, op 2: end region, op 3: begin region and trace clock calls.
 *
 * Output (file given as out=PATH), one record per line:
 *   region ID C0 C1 ... C8          counts by class (CLASS_NAMES order) in the region
 *   clock ID T_NS C0 ... C8         counts since the region began at a guest
 *                                   clock_gettime(CLOCK_REALTIME); T_NS the host's
 *                                   CLOCK_REALTIME just before the guest's call ran
 *
 * Debian 12 ships qemu 7.2 without qemu-plugin.h, so the few declarations this file
 * needs are written out below; they match include/qemu/qemu-plugin.h of qemu 7.2.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index,
                                              int64_t num, uint64_t a1, uint64_t a2,
                                              uint64_t a3, uint64_t a4, uint64_t a5,
                                              uint64_t a6, uint64_t a7, uint64_t a8);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
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

static uint64_t counts[N_CLASSES];
static uint64_t region_start[N_CLASSES];
static int64_t region_id = -1;
static bool tracing;
static FILE *out;

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

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t per_class[N_CLASSES] = {0};
    size_t n = qemu_plugin_tb_n_insns(tb);

    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t word = 0;
        size_t size = qemu_plugin_insn_size(insn);
        memcpy(&word, qemu_plugin_insn_data(insn), size < 4 ? size : 4);
        per_class[classify(word)]++;
    }
    /* One inline add per class present, at block entry: exact for blocks that run to
     * their end, and a syscall always ends a block, so counts at a marker are exact. */
    for (int c = 0; c < N_CLASSES; c++) {
        if (per_class[c]) {
            qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counts[c],
                                                     per_class[c]);
        }
    }
}

static void write_counts_since_start(void)
{
    for (int c = 0; c < N_CLASSES; c++) {
        fprintf(out, " %" PRIu64, counts[c] - region_start[c]);
    }
    fputc('\n', out);
}

static void vcpu_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                         uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                         uint64_t a7, uint64_t a8)
{
    if (num == AARCH64_NR_CLOCK_GETTIME && a1 == 0 /* CLOCK_REALTIME */ && tracing &&
        region_id >= 0) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        fprintf(out, "clock %" PRId64 " %" PRIu64, region_id,
                (uint64_t)(now.tv_sec * 1000000000LL + now.tv_nsec));
        write_counts_since_start();
        return;
    }
    if (num != AARCH64_NR_LSEEK || (uint32_t)a1 != 0xFFFFFFFFu ||
        (a2 & ~0xFFFFULL) != MARK_MAGIC) {
        return;
    }
    switch (a2 & 0xFFFF) {
    case 1:
    case 3:
        memcpy(region_start, counts, sizeof(counts));
        region_id = (int64_t)(uint32_t)a3;
        tracing = (a2 & 0xFFFF) == 3;
        break;
    case 2:
        if (region_id >= 0) {
            fprintf(out, "region %" PRId64, region_id);
            write_counts_since_start();
            fflush(out);
        }
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
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, vcpu_syscall);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
