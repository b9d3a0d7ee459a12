/*
 * A fake libnvidia-ml.so for the end-to-end tests: the NVML functions the
 * observer calls, with GPUs described by a small text file that the test
 * rewrites while the observer runs.
 *
 * nvml-wrapper resolves every NVML symbol when it loads the library but keeps
 * a missing one as an error that it reports only if called (never a panic,
 * except nvmlShutdown and nvmlEventSetFree, which its destructors call
 * unchecked). So the fake exports what the observer uses, and a missing
 * symbol behaves like an old driver that lacks the function.
 *
 * Configuration: $FAKE_NVML_CONFIG, else `fake-nvml.conf` next to this
 * library (each test copies the library into its own directory, so tests
 * need no environment variables). Lines `key=value`, `#` comments. Re-read
 * whenever the file changes (write a new file and rename it over the old
 * one), so a test can make a GPU disappear mid-run.
 *
 *   init=<code>               nvmlInit_v2's result (name or number), default success
 *   driver_version=<s>        default 550.54.15
 *   count=<n>                 number of GPUs, default 0
 *   error.<function>=<code>   that function fails with <code>
 *   sleep.<function>=<ms>     that function sleeps first (a wedged driver)
 *   block.<function>=<path>   that function waits while <path> exists (a call that
 *                             hangs until the test removes the file)
 *   sleep_marker=<path>       created when a sleep or block starts, for the test to wait on
 *   gpu<N>.uuid / .name / .pci_bus_id
 *   gpu<N>.lost=1             every call on the GPU: NVML_ERROR_GPU_IS_LOST
 *   gpu<N>.util / .mem_util   percent
 *   gpu<N>.mem_total / .mem_used / .mem_reserved   bytes
 *   gpu<N>.power_mw / .energy_mj / .temp
 *   gpu<N>.pcie_tx_bytes / .pcie_rx_bytes   cumulative counters (fields 197, 198)
 *   gpu<N>.pcie_tx_kib / .pcie_rx_kib       throughput samples, KiB/s
 *   gpu<N>.replays
 *   gpu<N>.ecc_corrected / .ecc_uncorrected                 volatile counts
 *   gpu<N>.ecc_corrected_aggregate / .ecc_uncorrected_aggregate
 *   gpu<N>.mig=0|1
 *   gpu<N>.procs=<pid>:<bytes>,<pid>:na,...   running compute processes
 *   gpu<N>.xid=<n>            XID events generated so far (absent: no XID events)
 *   gpu<N>.xid_code=<code>    default 79
 *   gpu<N>.mig_devices=<uuid>:<used>:<total>[:<gi>],...   MIG devices (nvmlDeviceGetMigDeviceHandleByIndex),
 *                             whose handles answer nvmlDeviceGetUUID, nvmlDeviceGetMemoryInfo_v2 and
 *                             nvmlDeviceGetGpuInstanceId (<gi>, default the entry's position)
 *   gpu<N>.mig<gi>.gpm.<id>=<value>   GPM metric <id> of GPU instance <gi> (nvmlGpmMigSampleGet
 *                             samples, on a GPU with gpm=1), like gpu<N>.gpm.<id>
 *   gpu<N>.nvlink=<s>,<s>,... NVLink links 0, 1, ...: 1 active, 0 inactive (nvmlDeviceGetNvLinkState);
 *                             other links below 18 answer NVML_ERROR_NOT_SUPPORTED, 18 and up
 *                             NVML_ERROR_INVALID_ARGUMENT; absent: no NVLink (NOT_SUPPORTED)
 *   gpu<N>.nvlink<L>.tx_kib / .rx_kib   link L's data counters in KiB (fields 138, 139, scopeId L)
 *   gpu<N>.nvlink<L>.replay / .recovery / .crc_flit / .crc_data / .ecc_data
 *                             link L's error counters (nvmlDeviceGetNvLinkErrorCounter 0 to 4)
 *   gpu<N>.gpm=0|1            GPM support (nvmlGpmQueryDeviceSupport); absent: 0, a pre-Hopper GPU
 *   gpu<N>.gpm.<id>=<value>   GPM metric <id> (nvmlGpmMetricId_t) as nvmlGpmMetricsGet returns it,
 *                             in NVML's units (percent 0-100, MiB/s); absent: that metric fails
 *                             with NVML_ERROR_NOT_SUPPORTED
 *
 * A GPU value whose key is absent is NVML_ERROR_NOT_SUPPORTED.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef unsigned int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct fake_dev *nvmlDevice_t;
typedef struct fake_set *nvmlEventSet_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef union {
    double dVal;
    int siVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

#define MAX_GPUS 64
#define MAX_SETS 256
#define EVENT_XID 8ULL
#define FI_PCIE_COUNT_TX_BYTES 197
#define FI_PCIE_COUNT_RX_BYTES 198
#define FI_NVLINK_THROUGHPUT_DATA_TX 138
#define FI_NVLINK_THROUGHPUT_DATA_RX 139
#define NVLINK_MAX_LINKS 18
#define VALUE_TYPE_UNSIGNED_LONG_LONG 3
#define NO_ID 0xFFFFFFFFu
#define NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

struct fake_dev { int index; };
#define MAX_MIG 8
/* MIG device handles: migs[gpu][k] is the k-th entry of gpu<N>.mig_devices. */
static struct fake_dev migs[MAX_GPUS][MAX_MIG];
struct fake_set {
    int used;
    int registered[MAX_GPUS];
    unsigned long long delivered[MAX_GPUS];
};

static struct fake_dev devs[MAX_GPUS];
static struct fake_set sets[MAX_SETS];
static int initialized;

/* ---- configuration ---------------------------------------------------- */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char cfg_path[4096];
static char *cfg_text;
/* The configuration's key=value lines, sorted by key (then by line, so the
 * last occurrence of a key is the last of its run): a lookup is a binary
 * search, not a scan, so an 8-GPU configuration with 18 NVLink links each
 * (a thousand lines, a thousand calls a cycle) measures the observer, not
 * this file's parsing. Keys and values point into cfg_text. */
struct cfg_entry {
    const char *key, *value;
    size_t klen, vlen, line;
};
static struct cfg_entry *cfg_index;
static size_t cfg_count;
static struct stat cfg_stat;
static int cfg_have_stat;

static void cfg_find_path(void) {
    if (cfg_path[0]) return;
    const char *env = getenv("FAKE_NVML_CONFIG");
    if (env && *env) {
        snprintf(cfg_path, sizeof cfg_path, "%s", env);
        return;
    }
    Dl_info info;
    if (dladdr((void *)cfg_find_path, &info) && info.dli_fname) {
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", info.dli_fname);
        snprintf(cfg_path, sizeof cfg_path, "%s/fake-nvml.conf", dirname(copy));
    }
}

static int cfg_entry_cmp(const void *a, const void *b) {
    const struct cfg_entry *x = a, *y = b;
    size_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = memcmp(x->key, y->key, n);
    if (c) return c;
    if (x->klen != y->klen) return x->klen < y->klen ? -1 : 1;
    return x->line < y->line ? -1 : x->line > y->line;
}

/* Indexes cfg_text's `key=value` lines. Caller holds mu. */
static void cfg_build_index(void) {
    free(cfg_index);
    cfg_index = NULL;
    cfg_count = 0;
    size_t cap = 0, n = 0;
    for (const char *line = cfg_text; line && *line; n++) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        while (len && (line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
        const char *eq = memchr(line, '=', len);
        if (eq && eq > line && line[0] != '#') {
            if (cfg_count == cap) {
                cap = cap ? cap * 2 : 256;
                struct cfg_entry *grown = realloc(cfg_index, cap * sizeof *grown);
                if (!grown) break;
                cfg_index = grown;
            }
            cfg_index[cfg_count++] = (struct cfg_entry){line, eq + 1, (size_t)(eq - line), len - (size_t)(eq - line) - 1, n};
        }
        line = end ? end + 1 : line + len;
    }
    qsort(cfg_index, cfg_count, sizeof *cfg_index, cfg_entry_cmp);
}

/* Re-reads the file when it changed (new inode, size or mtime). Caller holds mu. */
static void cfg_refresh(void) {
    cfg_find_path();
    struct stat st;
    if (stat(cfg_path, &st) != 0) {
        free(cfg_text);
        cfg_text = NULL;
        cfg_have_stat = 0;
        cfg_build_index();
        return;
    }
    if (cfg_have_stat && st.st_ino == cfg_stat.st_ino && st.st_size == cfg_stat.st_size &&
        st.st_mtim.tv_sec == cfg_stat.st_mtim.tv_sec && st.st_mtim.tv_nsec == cfg_stat.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(cfg_path, "r");
    if (!f) return;
    char *text = calloc(1, (size_t)st.st_size + 2);
    size_t n = text ? fread(text, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    if (!text) return;
    text[n] = '\0';
    free(cfg_text);
    cfg_text = text;
    cfg_stat = st;
    cfg_have_stat = 1;
    cfg_build_index();
}

/* Copies the value of `key` into out; 1 if present (the last occurrence wins). */
static int cfg_get(const char *key, char *out, size_t outlen) {
    int found = 0;
    size_t klen = strlen(key);
    pthread_mutex_lock(&mu);
    cfg_refresh();
    /* The first entry whose key is not below `key`, then the last of its run. */
    size_t lo = 0, hi = cfg_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct cfg_entry *e = &cfg_index[mid];
        size_t n = e->klen < klen ? e->klen : klen;
        int c = memcmp(e->key, key, n);
        if (c < 0 || (c == 0 && e->klen < klen))
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t last = lo;
    while (last < cfg_count && cfg_index[last].klen == klen && memcmp(cfg_index[last].key, key, klen) == 0) last++;
    if (last > lo) {
        const struct cfg_entry *e = &cfg_index[last - 1];
        size_t vlen = e->vlen >= outlen ? outlen - 1 : e->vlen;
        memcpy(out, e->value, vlen);
        out[vlen] = '\0';
        found = 1;
    }
    pthread_mutex_unlock(&mu);
    return found;
}

static int cfg_ull(const char *key, unsigned long long *v) {
    char buf[64];
    if (!cfg_get(key, buf, sizeof buf)) return 0;
    *v = strtoull(buf, NULL, 0);
    return 1;
}

static int gpu_get(int idx, const char *field, char *out, size_t outlen) {
    char key[128];
    snprintf(key, sizeof key, "gpu%d.%s", idx, field);
    return cfg_get(key, out, outlen);
}

static int gpu_ull(int idx, const char *field, unsigned long long *v) {
    char key[128];
    snprintf(key, sizeof key, "gpu%d.%s", idx, field);
    return cfg_ull(key, v);
}

static nvmlReturn_t parse_code(const char *s) {
    static const struct { const char *name; nvmlReturn_t code; } names[] = {
        {"success", NVML_SUCCESS},
        {"uninitialized", NVML_ERROR_UNINITIALIZED},
        {"invalid_argument", NVML_ERROR_INVALID_ARGUMENT},
        {"not_supported", NVML_ERROR_NOT_SUPPORTED},
        {"no_permission", NVML_ERROR_NO_PERMISSION},
        {"not_found", NVML_ERROR_NOT_FOUND},
        {"driver_not_loaded", NVML_ERROR_DRIVER_NOT_LOADED},
        {"timeout", NVML_ERROR_TIMEOUT},
        {"gpu_is_lost", NVML_ERROR_GPU_IS_LOST},
        {"reset_required", NVML_ERROR_RESET_REQUIRED},
        {"lib_rm_version_mismatch", NVML_ERROR_LIB_RM_VERSION_MISMATCH},
        {"unknown", NVML_ERROR_UNKNOWN},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) return names[i].code;
    return (nvmlReturn_t)strtoul(s, NULL, 0);
}

static void touch_sleep_marker(void) {
    char buf[4096];
    if (cfg_get("sleep_marker", buf, sizeof buf)) {
        int fd = open(buf, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        if (fd >= 0) close(fd);
    }
}

static void sleep_ms(unsigned long long ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Sleeps or blocks if the test asked this function to, then returns the error
 * the test injected for it (NVML_SUCCESS if none). */
static nvmlReturn_t begin(const char *fn) {
    char key[160], buf[4096];
    snprintf(key, sizeof key, "sleep.%s", fn);
    unsigned long long ms;
    if (cfg_ull(key, &ms) && ms > 0) {
        touch_sleep_marker();
        sleep_ms(ms);
    }
    snprintf(key, sizeof key, "block.%s", fn);
    struct stat st;
    if (cfg_get(key, buf, sizeof buf) && stat(buf, &st) == 0) {
        touch_sleep_marker();
        while (stat(buf, &st) == 0) sleep_ms(10);
    }
    snprintf(key, sizeof key, "error.%s", fn);
    if (cfg_get(key, buf, sizeof buf)) return parse_code(buf);
    return NVML_SUCCESS;
}

static unsigned long long gpu_count(void) {
    unsigned long long n = 0;
    cfg_ull("count", &n);
    return n > MAX_GPUS ? MAX_GPUS : n;
}

static int dev_index(nvmlDevice_t d) {
    if (d < devs || d >= devs + MAX_GPUS) return -1;
    return (int)(d - devs);
}

/* Common start of every per-GPU function. */
static nvmlReturn_t dev_begin(const char *fn, nvmlDevice_t d, int *idx) {
    nvmlReturn_t r = begin(fn);
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    *idx = dev_index(d);
    if (*idx < 0 || (unsigned long long)*idx >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long lost = 0;
    if (gpu_ull(*idx, "lost", &lost) && lost) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

#define DEV(fn, device)                               \
    int idx;                                          \
    do {                                              \
        nvmlReturn_t r_ = dev_begin(fn, device, &idx); \
        if (r_ != NVML_SUCCESS) return r_;            \
    } while (0)

static nvmlReturn_t copy_str(const char *s, char *out, unsigned int len) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, s);
    return NVML_SUCCESS;
}

/* ---- library ------------------------------------------------------------ */

EXPORT nvmlReturn_t nvmlInit_v2(void) {
    nvmlReturn_t r = begin("nvmlInit_v2");
    if (r != NVML_SUCCESS) return r;
    char buf[64];
    if (cfg_get("init", buf, sizeof buf)) {
        r = parse_code(buf);
        if (r != NVML_SUCCESS) return r;
    }
    for (int i = 0; i < MAX_GPUS; i++) devs[i].index = i;
    initialized++;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Fake NVML error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t r = begin("nvmlSystemGetDriverVersion");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    char buf[80] = "550.54.15";
    cfg_get("driver_version", buf, sizeof buf);
    return copy_str(buf, version, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    nvmlReturn_t r = begin("nvmlDeviceGetCount_v2");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned int)gpu_count();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t r = begin("nvmlDeviceGetHandleByIndex_v2");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (index >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long lost = 0;
    if (gpu_ull((int)index, "lost", &lost) && lost) return NVML_ERROR_GPU_IS_LOST;
    *device = &devs[index];
    return NVML_SUCCESS;
}

/* ---- identity ------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    DEV("nvmlDeviceGetIndex", device);
    *index = (unsigned int)idx;
    return NVML_SUCCESS;
}

/* The k-th MIG device of gpu<idx> (uuid, used, total, GPU instance ID); 1 if configured. */
static int mig_entry_gi(int idx, int k, char *uuid, size_t uuidlen, unsigned long long *used,
                        unsigned long long *total, unsigned int *gi) {
    char buf[4096];
    if (!gpu_get(idx, "mig_devices", buf, sizeof buf)) return 0;
    int i = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save), i++) {
        if (i != k) continue;
        char *c1 = strchr(tok, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) return 0;
        char *c3 = strchr(c2 + 1, ':');
        *c1 = '\0';
        snprintf(uuid, uuidlen, "%s", tok);
        *used = strtoull(c1 + 1, NULL, 10);
        *total = strtoull(c2 + 1, NULL, 10);
        *gi = c3 ? (unsigned int)strtoul(c3 + 1, NULL, 10) : (unsigned int)k;
        return 1;
    }
    return 0;
}

static int mig_entry(int idx, int k, char *uuid, size_t uuidlen, unsigned long long *used,
                     unsigned long long *total) {
    unsigned int gi;
    return mig_entry_gi(idx, k, uuid, uuidlen, used, total, &gi);
}

/* Whether `d` is a MIG device handle; sets its GPU and position. */
static int mig_handle(nvmlDevice_t d, int *idx, int *k) {
    if (d < &migs[0][0] || d >= &migs[0][0] + MAX_GPUS * MAX_MIG) return 0;
    int n = (int)(d - &migs[0][0]);
    *idx = n / MAX_MIG;
    *k = n % MAX_MIG;
    return 1;
}

EXPORT nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    DEV("nvmlDeviceGetMaxMigDeviceCount", device);
    unsigned long long mig = 0;
    if (!gpu_ull(idx, "mig", &mig)) return NVML_ERROR_NOT_SUPPORTED;
    *count = MAX_MIG;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    DEV("nvmlDeviceGetMigDeviceHandleByIndex", device);
    char uuid[96];
    unsigned long long used, total;
    if (index >= MAX_MIG) return NVML_ERROR_INVALID_ARGUMENT;
    /* Like the real library: a free slot is NOT_FOUND. */
    if (!mig_entry(idx, (int)index, uuid, sizeof uuid, &used, &total)) return NVML_ERROR_NOT_FOUND;
    *mig = &migs[idx][index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    nvmlReturn_t r = begin("nvmlDeviceGetGpuInstanceId");
    if (r != NVML_SUCCESS) return r;
    int mig_gpu, mig_k;
    char uuid[96];
    unsigned long long used, total;
    if (!mig_handle(device, &mig_gpu, &mig_k)) return NVML_ERROR_INVALID_ARGUMENT;
    if (!mig_entry_gi(mig_gpu, mig_k, uuid, sizeof uuid, &used, &total, id)) return NVML_ERROR_NOT_FOUND;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    int mig_gpu, mig_k;
    if (mig_handle(device, &mig_gpu, &mig_k)) {
        char buf[96];
        unsigned long long used, total;
        if (!mig_entry(mig_gpu, mig_k, buf, sizeof buf, &used, &total)) return NVML_ERROR_NOT_FOUND;
        return copy_str(buf, uuid, length);
    }
    DEV("nvmlDeviceGetUUID", device);
    char buf[96];
    if (!gpu_get(idx, "uuid", buf, sizeof buf))
        snprintf(buf, sizeof buf, "GPU-fake0000-0000-0000-0000-%012d", idx);
    return copy_str(buf, uuid, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    DEV("nvmlDeviceGetName", device);
    char buf[96] = "Fake GPU";
    gpu_get(idx, "name", buf, sizeof buf);
    return copy_str(buf, name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    DEV("nvmlDeviceGetPciInfo_v3", device);
    memset(pci, 0, sizeof *pci);
    if (!gpu_get(idx, "pci_bus_id", pci->busId, sizeof pci->busId))
        snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", idx + 1);
    pci->bus = (unsigned int)idx + 1;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", idx + 1);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    DEV("nvmlDeviceGetMigMode", device);
    unsigned long long mig;
    if (!gpu_ull(idx, "mig", &mig)) return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = (unsigned int)mig;
    return NVML_SUCCESS;
}

/* ---- values --------------------------------------------------------------- */

/* A plain unsigned int or unsigned long long value under gpu<N>.<field>. */
#define UINT_GETTER(fn, field, type)                              \
    EXPORT nvmlReturn_t fn(nvmlDevice_t device, type *out) {      \
        DEV(#fn, device);                                         \
        unsigned long long v;                                     \
        if (!gpu_ull(idx, field, &v)) return NVML_ERROR_NOT_SUPPORTED; \
        *out = (type)v;                                           \
        return NVML_SUCCESS;                                      \
    }

UINT_GETTER(nvmlDeviceGetPowerUsage, "power_mw", unsigned int)
UINT_GETTER(nvmlDeviceGetTotalEnergyConsumption, "energy_mj", unsigned long long)
UINT_GETTER(nvmlDeviceGetPcieReplayCounter, "replays", unsigned int)

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *u) {
    DEV("nvmlDeviceGetUtilizationRates", device);
    unsigned long long gpu, mem = 0;
    if (!gpu_ull(idx, "util", &gpu)) return NVML_ERROR_NOT_SUPPORTED;
    gpu_ull(idx, "mem_util", &mem);
    u->gpu = (unsigned int)gpu;
    u->memory = (unsigned int)mem;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *m) {
    /* NVML_STRUCT_VERSION(Memory, 2), as the real library checks it. */
    if (m->version != ((unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)))
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    int mig_gpu, mig_k;
    if (mig_handle(device, &mig_gpu, &mig_k)) {
        char uuid[96];
        unsigned long long mused, mtotal;
        if (!mig_entry(mig_gpu, mig_k, uuid, sizeof uuid, &mused, &mtotal)) return NVML_ERROR_NOT_FOUND;
        m->total = mtotal;
        m->used = mused;
        m->reserved = 0;
        m->free = mtotal - mused;
        return NVML_SUCCESS;
    }
    DEV("nvmlDeviceGetMemoryInfo_v2", device);
    unsigned long long total, used, reserved = 0;
    if (!gpu_ull(idx, "mem_total", &total) || !gpu_ull(idx, "mem_used", &used)) return NVML_ERROR_NOT_SUPPORTED;
    gpu_ull(idx, "mem_reserved", &reserved);
    m->total = total;
    m->used = used;
    m->reserved = reserved;
    m->free = total - used - reserved;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor, unsigned int *temp) {
    DEV("nvmlDeviceGetTemperature", device);
    unsigned long long v;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu_ull(idx, "temp", &v)) return NVML_ERROR_NOT_SUPPORTED;
    *temp = (unsigned int)v;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, unsigned int counter, unsigned int *value) {
    DEV("nvmlDeviceGetPcieThroughput", device);
    unsigned long long v;
    const char *field = counter == 0 ? "pcie_tx_kib" : counter == 1 ? "pcie_rx_kib" : NULL;
    if (!field) return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu_ull(idx, field, &v)) return NVML_ERROR_NOT_SUPPORTED;
    *value = (unsigned int)v;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType, unsigned int counterType,
                                               unsigned long long *count) {
    DEV("nvmlDeviceGetTotalEccErrors", device);
    if (errorType > 1 || counterType > 1) return NVML_ERROR_INVALID_ARGUMENT;
    static const char *fields[2][2] = {
        {"ecc_corrected", "ecc_corrected_aggregate"},
        {"ecc_uncorrected", "ecc_uncorrected_aggregate"},
    };
    if (!gpu_ull(idx, fields[errorType][counterType], count)) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount, nvmlFieldValue_t *values) {
    DEV("nvmlDeviceGetFieldValues", device);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        char nvlink[64];
        const char *field = v->fieldId == FI_PCIE_COUNT_TX_BYTES ? "pcie_tx_bytes"
                          : v->fieldId == FI_PCIE_COUNT_RX_BYTES ? "pcie_rx_bytes"
                                                                 : NULL;
        if (v->fieldId == FI_NVLINK_THROUGHPUT_DATA_TX || v->fieldId == FI_NVLINK_THROUGHPUT_DATA_RX) {
            snprintf(nvlink, sizeof nvlink, "nvlink%u.%s", v->scopeId,
                     v->fieldId == FI_NVLINK_THROUGHPUT_DATA_TX ? "tx_kib" : "rx_kib");
            field = nvlink;
        }
        v->timestamp = (long long)tv.tv_sec * 1000000 + tv.tv_usec;
        v->latencyUsec = 0;
        unsigned long long x;
        if (field && gpu_ull(idx, field, &x)) {
            v->valueType = VALUE_TYPE_UNSIGNED_LONG_LONG;
            v->value.ullVal = x;
            v->nvmlReturn = NVML_SUCCESS;
        } else {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                           nvmlProcessInfo_t *infos) {
    DEV("nvmlDeviceGetComputeRunningProcesses_v3", device);
    nvmlProcessInfo_t found[256];
    unsigned int n = 0;
    char buf[8192];
    if (gpu_get(idx, "procs", buf, sizeof buf)) {
        for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && n < 256; tok = strtok_r(NULL, ",", &save)) {
            char *colon = strchr(tok, ':');
            if (!colon) continue;
            *colon = '\0';
            found[n].pid = (unsigned int)strtoul(tok, NULL, 10);
            found[n].usedGpuMemory = strcmp(colon + 1, "na") == 0 ? NOT_AVAILABLE : strtoull(colon + 1, NULL, 10);
            found[n].gpuInstanceId = NO_ID;
            found[n].computeInstanceId = NO_ID;
            n++;
        }
    }
    if (*infoCount < n || (!infos && n)) {
        *infoCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n) memcpy(infos, found, n * sizeof found[0]);
    *infoCount = n;
    return NVML_SUCCESS;
}

/* ---- NVLink ---------------------------------------------------------------- */

/* Link `link` of gpu<idx>: NVML_SUCCESS with its state, or why not. */
static nvmlReturn_t nvlink_state(int idx, unsigned int link, unsigned int *active) {
    char buf[256];
    if (link >= NVLINK_MAX_LINKS) return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpu_get(idx, "nvlink", buf, sizeof buf)) return NVML_ERROR_NOT_SUPPORTED;
    unsigned int i = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save), i++) {
        if (i == link) {
            *active = (unsigned int)strtoul(tok, NULL, 10);
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_SUPPORTED;
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, unsigned int *isActive) {
    DEV("nvmlDeviceGetNvLinkState", device);
    return nvlink_state(idx, link, isActive);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link, unsigned int counter,
                                                   unsigned long long *value) {
    DEV("nvmlDeviceGetNvLinkErrorCounter", device);
    static const char *names[] = {"replay", "recovery", "crc_flit", "crc_data", "ecc_data"};
    unsigned int active;
    nvmlReturn_t r = nvlink_state(idx, link, &active);
    if (r != NVML_SUCCESS) return r;
    if (counter >= sizeof names / sizeof names[0]) return NVML_ERROR_INVALID_ARGUMENT;
    char field[64];
    snprintf(field, sizeof field, "nvlink%u.%s", link, names[counter]);
    if (!gpu_ull(idx, field, value)) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

/* ---- GPM (nvml.h's nvmlGpm* structures, version 1) ----------------------- */

#define GPM_METRIC_MAX 98
typedef struct fake_gpm_sample {
    int idx;    /* GPU of the sample, -1 until nvmlGpmSampleGet fills it */
    long gi;    /* GPU instance of a MIG sample (nvmlGpmMigSampleGet), else -1 */
} *nvmlGpmSample_t;
typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        char *shortName;
        char *longName;
        char *unit;
    } metricInfo;
} nvmlGpmMetric_t;
typedef struct {
    unsigned int version;
    unsigned int numMetrics;
    nvmlGpmSample_t sample1;
    nvmlGpmSample_t sample2;
    nvmlGpmMetric_t metrics[GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;
typedef struct {
    unsigned int version;
    unsigned int isSupportedDevice;
} nvmlGpmSupport_t;

static int gpm_supported(int idx) {
    unsigned long long on = 0;
    return gpu_ull(idx, "gpm", &on) && on;
}

EXPORT nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *support) {
    DEV("nvmlGpmQueryDeviceSupport", device);
    if (!support || support->version != 1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    support->isSupportedDevice = (unsigned int)gpm_supported(idx);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    nvmlReturn_t r = begin("nvmlGpmSampleAlloc");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof **sample);
    if (!*sample) return NVML_ERROR_UNKNOWN;
    (*sample)->idx = -1;
    (*sample)->gi = -1;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    free(sample);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t sample) {
    DEV("nvmlGpmSampleGet", device);
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpm_supported(idx)) return NVML_ERROR_NOT_SUPPORTED;
    sample->idx = idx;
    sample->gi = -1;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t device, unsigned int gpuInstanceId, nvmlGpmSample_t sample) {
    DEV("nvmlGpmMigSampleGet", device);
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    if (!gpm_supported(idx)) return NVML_ERROR_NOT_SUPPORTED;
    char uuid[96];
    unsigned long long used, total;
    unsigned int gi;
    for (int k = 0; k < MAX_MIG; k++) {
        if (mig_entry_gi(idx, k, uuid, sizeof uuid, &used, &total, &gi) && gi == gpuInstanceId) {
            sample->idx = idx;
            sample->gi = (long)gi;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INVALID_ARGUMENT;
}

EXPORT nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *get) {
    nvmlReturn_t r = begin("nvmlGpmMetricsGet");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!get || get->version != 1) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (!get->sample1 || !get->sample2 || get->numMetrics > GPM_METRIC_MAX) return NVML_ERROR_INVALID_ARGUMENT;
    /* Two filled samples of the same GPU, as the real library requires. */
    int idx = get->sample1->idx;
    long gi = get->sample1->gi;
    if (idx < 0 || get->sample2->idx != idx || get->sample2->gi != gi) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < get->numMetrics; i++) {
        nvmlGpmMetric_t *m = &get->metrics[i];
        char field[48], buf[64];
        if (gi >= 0)
            snprintf(field, sizeof field, "mig%ld.gpm.%u", gi, m->metricId);
        else
            snprintf(field, sizeof field, "gpm.%u", m->metricId);
        memset(&m->metricInfo, 0, sizeof m->metricInfo);
        if (gpu_get(idx, field, buf, sizeof buf)) {
            m->value = strtod(buf, NULL);
            m->nvmlReturn = NVML_SUCCESS;
        } else {
            m->value = 0;
            m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return NVML_SUCCESS;
}

/* ---- XID events ----------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    DEV("nvmlDeviceGetSupportedEventTypes", device);
    unsigned long long xid;
    *types = gpu_ull(idx, "xid", &xid) ? EVENT_XID : 0;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    nvmlReturn_t r = begin("nvmlEventSetCreate");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < MAX_SETS; i++) {
        if (!sets[i].used) {
            memset(&sets[i], 0, sizeof sets[i]);
            sets[i].used = 1;
            *set = &sets[i];
            pthread_mutex_unlock(&mu);
            return NVML_SUCCESS;
        }
    }
    pthread_mutex_unlock(&mu);
    return NVML_ERROR_UNKNOWN;
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    DEV("nvmlDeviceRegisterEvents", device);
    unsigned long long xid;
    if (!set || set < sets || set >= sets + MAX_SETS || !set->used) return NVML_ERROR_INVALID_ARGUMENT;
    if (!(types & EVENT_XID) || !gpu_ull(idx, "xid", &xid)) return NVML_ERROR_NOT_SUPPORTED;
    /* Events raised before registration are not delivered. */
    set->registered[idx] = 1;
    set->delivered[idx] = xid;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    nvmlReturn_t r = begin("nvmlEventSetWait_v2");
    if (r != NVML_SUCCESS) return r;
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!set || set < sets || set >= sets + MAX_SETS || !set->used) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long n = gpu_count();
    for (unsigned long long i = 0; i < n; i++) {
        unsigned long long xid, code = 79;
        if (!set->registered[i] || !gpu_ull((int)i, "xid", &xid) || xid <= set->delivered[i]) continue;
        gpu_ull((int)i, "xid_code", &code);
        set->delivered[i]++;
        data->device = &devs[i];
        data->eventType = EVENT_XID;
        data->eventData = code;
        data->gpuInstanceId = NO_ID;
        data->computeInstanceId = NO_ID;
        return NVML_SUCCESS;
    }
    if (timeoutms) usleep((timeoutms > 1000 ? 1000 : timeoutms) * 1000);
    return NVML_ERROR_TIMEOUT;
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (!set || set < sets || set >= sets + MAX_SETS || !set->used) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&mu);
    set->used = 0;
    pthread_mutex_unlock(&mu);
    return NVML_SUCCESS;
}
