/*
 * insnclass: deterministic executed-instruction counter for qemu-aarch64 (user mode),
 * with a few AArch64 instruction classes that identify the int8 / fp32 kernel family.
 *
 *   qemu-aarch64 -plugin ./libinsnclass.so,out=/path/counts.json ...
 *
 * Built by edgepack/emulators/qemu_counting.py against the qemu-plugin.h of the qemu it builds.
 *
 * total   : every executed guest instruction (inline add of n_insns per executed TB)
 * classes : inline add of 1 per executed instruction whose encoding matches (see table).
 * All counters are per vCPU (one per guest thread) and summed at exit; "window" holds the
 * marking thread's counts between the guest's two marks (see MARK_SYSCALL).
 */
#include <glib.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

typedef struct { const char *name; uint32_t mask, value; } Class;

static const Class classes[] = {
    /* Advanced SIMD dot product (FEAT_DotProd, "asimddp") */
    {"sdot_udot_vec",  0x9FE0FC00u, 0x0E809400u},
    {"sdot_udot_elem", 0x9FC0F400u, 0x0F80E000u},
    /* FEAT_I8MM ("i8mm"): USDOT vector/element, SMMLA/UMMLA/USMMLA */
    {"usdot_vec",      0xBFE0FC00u, 0x0E809C00u},
    {"usdot_sudot_elem", 0xBF40F400u, 0x0F00F000u},
    {"smmla_ummla",    0xDFE0F400u, 0x4E80A400u},
    /* plain NEON int8 widening multiplies (kernels without dot product) */
    {"smull_smlal_8b", 0xBFE0BC00u, 0x0E208000u},  /* SMLAL(1000)/SMULL(1100), size=00 */
    {"sadalp_16b",     0xBFFFFC00u, 0x0E606800u},
    {"smlal_smull_elem_16b", 0xBFC07400u, 0x0F402000u},  /* SMLAL/SMULL by element, 16-bit lanes */
    /* fp32/fp16 NEON fused multiply-add */
    {"fmla_vec",       0xBFA0FC00u, 0x0E20CC00u},
    {"fmla_elem",      0xBF80F400u, 0x0F801000u},
    /* SVE: all SVE encodings, and the SVE int8 dot/matmul subsets */
    {"sve_any",        0x1E000000u, 0x04000000u},
    {"sve_sdot_udot",  0xFFA0F800u, 0x44800000u},
    {"sve_mmla_int8",  0xFF20FC00u, 0x45009800u},
    /* SME: all SME encodings (FMOPA, SMOPA, ZA loads...), and SMSTART/SMSTOP */
    {"sme_any",        0x9E000000u, 0x80000000u},
    {"smstart_smstop", 0xFFFFF1FFu, 0xD503417Fu},
};
#define NCLASS (sizeof(classes) / sizeof(classes[0]))

typedef struct { uint64_t total; uint64_t cls[NCLASS]; } Counts;

static struct qemu_plugin_scoreboard *board;
static qemu_plugin_u64 total_entry;
static qemu_plugin_u64 class_entry[NCLASS];
static char *out_path;

/*
 * A counting window the guest opens and closes with a syscall nobody else makes (number
 * MARK_SYSCALL, first argument MARK_MAGIC, second 1 = open, 2 = close; the kernel and qemu answer
 * ENOSYS): only the marking thread's instructions between the two marks count. A runtime's
 * helper threads (onnxruntime starts one at import) and whatever runs before the first mark (imports,
 * loading) then cannot move the figure: it repeats to the instruction.
 */
#define MARK_SYSCALL 4095
#define MARK_MAGIC 0x45444745u /* "EDGE" */
static int window_vcpu = -1;
static gboolean window_closed;
static Counts window_start, window;

static void snapshot(unsigned int vcpu, Counts *out)
{
    out->total = qemu_plugin_u64_get(total_entry, vcpu);
    for (size_t c = 0; c < NCLASS; c++) {
        out->cls[c] = qemu_plugin_u64_get(class_entry[c], vcpu);
    }
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != MARK_SYSCALL || a1 != MARK_MAGIC) {
        return;
    }
    if (a2 == 1 && window_vcpu < 0) {
        window_vcpu = (int)vcpu;
        snapshot(vcpu, &window_start);
    } else if (a2 == 2 && window_vcpu == (int)vcpu && !window_closed) {
        Counts end;
        snapshot(vcpu, &end);
        window.total = end.total - window_start.total;
        for (size_t c = 0; c < NCLASS; c++) {
            window.cls[c] = end.cls[c] - window_start.cls[c];
        }
        window_closed = TRUE;
    }
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, total_entry, n);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t op = 0;
        if (qemu_plugin_insn_data(insn, &op, sizeof(op)) != sizeof(op)) {
            continue;
        }
        for (size_t c = 0; c < NCLASS; c++) {
            if ((op & classes[c].mask) == classes[c].value) {
                qemu_plugin_register_vcpu_insn_exec_inline_per_vcpu(
                    insn, QEMU_PLUGIN_INLINE_ADD_U64, class_entry[c], 1);
            }
        }
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    GString *s = g_string_new("{");
    g_string_append_printf(s, "\"total\": %" PRIu64 ", \"vcpus\": %d",
                           qemu_plugin_u64_sum(total_entry), qemu_plugin_num_vcpus());
    for (size_t c = 0; c < NCLASS; c++) {
        g_string_append_printf(s, ", \"%s\": %" PRIu64, classes[c].name,
                               qemu_plugin_u64_sum(class_entry[c]));
    }
    /* per guest thread (vCPU 0 is the main thread): a runtime's helper threads can be told apart */
    g_string_append(s, ", \"per_vcpu\": [");
    for (int v = 0; v < qemu_plugin_num_vcpus(); v++) {
        g_string_append_printf(s, "%s%" PRIu64, v ? ", " : "", qemu_plugin_u64_get(total_entry, v));
    }
    g_string_append(s, "]");
    if (window_closed) {
        g_string_append_printf(s, ", \"window\": {\"vcpu\": %d, \"total\": %" PRIu64, window_vcpu, window.total);
        for (size_t c = 0; c < NCLASS; c++) {
            g_string_append_printf(s, ", \"%s\": %" PRIu64, classes[c].name, window.cls[c]);
        }
        g_string_append(s, "}");
    }
    g_string_append(s, "}\n");
    if (out_path) {
        FILE *f = fopen(out_path, "w");
        if (f) {
            fputs(s->str, f);
            fclose(f);
        }
    } else {
        qemu_plugin_outs(s->str);
    }
    g_string_free(s, TRUE);
    qemu_plugin_scoreboard_free(board);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (g_str_has_prefix(argv[i], "out=")) {
            out_path = g_strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "insnclass: unknown option %s\n", argv[i]);
            return -1;
        }
    }
    board = qemu_plugin_scoreboard_new(sizeof(Counts));
    total_entry = qemu_plugin_scoreboard_u64_in_struct(board, Counts, total);
    for (size_t c = 0; c < NCLASS; c++) {
        class_entry[c] = (qemu_plugin_u64){ .score = board,
                                            .offset = offsetof(Counts, cls) + c * sizeof(uint64_t) };
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
