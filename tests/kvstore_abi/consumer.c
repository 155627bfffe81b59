/* A kv_store_v1 consumer that does what the chunked-save engine does: dlopen the backend
 * through KV_STORE_LIBRARY_PATH (RTLD_LOCAL), put every chunk and then its own manifest, and
 * restore by get_manifest + prefetch_chunks + one get_chunk per chunk, compared byte for byte.
 *
 *   consumer save     URI NAME FILE [SESSION]   cold or warm: the same calls either way
 *   consumer restore  URI NAME FILE [SESSION]
 *   consumer delete   URI NAME                  then get_manifest must say NOT_FOUND
 *   consumer open     URI                       prints "open ok" or "open NULL"
 *   consumer errors   URI FILE                  each bad call, with its code
 *   consumer threads  URI FILE N                N threads with a handle each, N sharing one
 *   consumer bench    URI FILE RUNS             cold save, warm save, restore: median ms
 *
 * FILE (written by bench/kvstore_abi.py): "RKVC", u32 hash_len, u32 sessions, u32 chunks; then
 * per session, per chunk: hash[hash_len] (the engine's byte order), u32 length, bytes.
 * The engine manifest is this program's own format: "ENGM", u32 count, the hashes in order.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kv_store_abi.h"

typedef struct {
    uint8_t *hash;
    uint8_t *data;
    uint32_t len;
} chunk_t;

typedef struct {
    uint32_t hash_len, sessions, chunks;
    chunk_t *c; /* sessions * chunks */
} sessions_t;

static const kv_store_vtable *vt;

static void die(const char *what) {
    fprintf(stderr, "consumer: %s\n", what);
    exit(2);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void load_backend(void) {
    const char *dir = getenv("KV_STORE_LIBRARY_PATH");
    void *lib = NULL;
    if (dir && *dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/libkv_store_rdmakv.so", dir);
        lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    }
    if (!lib) lib = dlopen("libkv_store_rdmakv.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "consumer: dlopen: %s\n", dlerror());
        exit(2);
    }
    const kv_store_vtable *(*get)(void) = (const kv_store_vtable *(*)(void))dlsym(lib, "kv_store_get_vtable");
    if (!get) die("no kv_store_get_vtable");
    vt = get();
    if (vt->version < 2 || !vt->prefetch_chunks) die("backend has no prefetch_chunks");
}

static void read_exact(FILE *f, void *p, size_t n) {
    if (n && fread(p, 1, n, f) != n) die("short session file");
}

static sessions_t load_sessions(const char *path) {
    sessions_t s;
    char magic[4];
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the session file");
    read_exact(f, magic, 4);
    if (memcmp(magic, "RKVC", 4)) die("not a session file");
    read_exact(f, &s.hash_len, 4);
    read_exact(f, &s.sessions, 4);
    read_exact(f, &s.chunks, 4);
    s.c = calloc((size_t)s.sessions * s.chunks, sizeof(chunk_t));
    for (size_t i = 0; i < (size_t)s.sessions * s.chunks; i++) {
        s.c[i].hash = malloc(s.hash_len);
        read_exact(f, s.c[i].hash, s.hash_len);
        read_exact(f, &s.c[i].len, 4);
        s.c[i].data = malloc(s.c[i].len);
        read_exact(f, s.c[i].data, s.c[i].len);
    }
    fclose(f);
    return s;
}

static chunk_t *session(sessions_t *s, uint32_t i) { return s->c + (size_t)i * s->chunks; }

static uint8_t *engine_manifest(sessions_t *s, uint32_t i, size_t *len) {
    *len = 8 + (size_t)s->chunks * s->hash_len;
    uint8_t *m = malloc(*len);
    memcpy(m, "ENGM", 4);
    memcpy(m + 4, &s->chunks, 4);
    for (uint32_t j = 0; j < s->chunks; j++) memcpy(m + 8 + (size_t)j * s->hash_len, session(s, i)[j].hash, s->hash_len);
    return m;
}

static int save(kv_store_v1 *h, sessions_t *s, uint32_t i, const char *name) {
    chunk_t *c = session(s, i);
    for (uint32_t j = 0; j < s->chunks; j++) {
        int rc = vt->put_chunk(h, c[j].hash, s->hash_len, c[j].data, c[j].len);
        if (rc < 0) return rc;
    }
    size_t mlen;
    uint8_t *m = engine_manifest(s, i, &mlen);
    int rc = vt->put_manifest(h, name, m, mlen);
    free(m);
    return rc;
}

/* 0 when every chunk came back identical; negative: a call failed; 1: wrong bytes */
static int restore(kv_store_v1 *h, sessions_t *s, uint32_t i, const char *name) {
    uint8_t *m;
    size_t mlen, want_len;
    int rc = vt->get_manifest(h, name, &m, &mlen);
    if (rc < 0) return rc;
    uint8_t *want = engine_manifest(s, i, &want_len);
    int bad = mlen != want_len || memcmp(m, want, mlen);
    free(want);
    if (bad) {
        free(m);
        return 1;
    }
    uint32_t count;
    memcpy(&count, m + 4, 4);
    rc = vt->prefetch_chunks(h, m + 8, count, s->hash_len);
    if (rc < 0) {
        free(m);
        return rc;
    }
    chunk_t *c = session(s, i);
    for (uint32_t j = 0; j < count && !bad; j++) {
        uint8_t *out;
        size_t n;
        rc = vt->get_chunk(h, m + 8 + (size_t)j * s->hash_len, s->hash_len, &out, &n);
        if (rc < 0) {
            free(m);
            return rc;
        }
        bad = n != c[j].len || memcmp(out, c[j].data, n);
        free(out);
    }
    free(m);
    return bad;
}

static kv_store_v1 *must_open(const char *uri) {
    kv_store_v1 *h = vt->open(uri);
    if (!h) die("open returned NULL");
    return h;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void errors(const char *uri, sessions_t *s) {
    kv_store_v1 *h = must_open(uri);
    chunk_t *c = session(s, 0);
    uint8_t *out = NULL;
    size_t n = 0;
    uint8_t zeros[64] = {0};
    printf("short_hash %d\n", vt->put_chunk(h, c[0].hash, s->hash_len - 1, c[0].data, c[0].len));
    printf("wrong_bytes %d\n", vt->put_chunk(h, c[0].hash, s->hash_len, c[1].data, c[1].len));
    printf("null_data %d\n", vt->put_chunk(h, c[0].hash, s->hash_len, NULL, c[0].len));
    printf("unknown_manifest %d\n", vt->get_manifest(h, "no-such-session", &out, &n));
    printf("unknown_chunk %d\n", vt->get_chunk(h, zeros, s->hash_len, &out, &n));
    printf("null_out %d\n", vt->get_manifest(h, "no-such-session", NULL, NULL));
    printf("null_name %d\n", vt->put_manifest(h, NULL, zeros, 4));
    printf("bad_name %d\n", vt->put_manifest(h, "bad\nname", zeros, 4));
    printf("prefetch_hash_len %d\n", vt->prefetch_chunks(h, zeros, 1, s->hash_len + 1));
    printf("delete_unknown %d\n", vt->delete_manifest(h, "no-such-session"));
    printf("after_errors_save %d\n", save(h, s, 0, "after-errors"));
    printf("after_errors_restore %d\n", restore(h, s, 0, "after-errors"));
    vt->close(h);
    printf("closed_handle %d\n", vt->get_manifest(h, "after-errors", &out, &n));
    vt->close(h); /* a second close is ignored */
    vt->close(NULL);
    printf("null_handle %d\n", vt->delete_manifest(NULL, "x"));
}

typedef struct {
    const char *uri;
    sessions_t *s;
    kv_store_v1 *shared;
    pthread_mutex_t *lock;
    int id, rounds, failures;
} worker_t;

static void *worker(void *arg) {
    worker_t *w = arg;
    kv_store_v1 *h = w->shared ? w->shared : vt->open(w->uri);
    if (!h) {
        w->failures = w->rounds;
        return NULL;
    }
    for (int r = 0; r < w->rounds; r++) {
        char name[64];
        snprintf(name, sizeof name, "%s-%d-%d", w->shared ? "shared" : "own", w->id, r);
        uint32_t i = (uint32_t)(w->id + r) % w->s->sessions;
        if (w->lock) pthread_mutex_lock(w->lock); /* a shared handle buffers one save at a time */
        int rc = save(h, w->s, i, name);
        if (rc == 0) rc = restore(h, w->s, i, name);
        if (w->lock) pthread_mutex_unlock(w->lock);
        if (rc != 0) {
            fprintf(stderr, "consumer: thread %d round %d: %d\n", w->id, r, rc);
            w->failures++;
        }
    }
    if (!w->shared) vt->close(h);
    return NULL;
}

static int threads(const char *uri, sessions_t *s, int n) {
    pthread_t t[64];
    worker_t w[64];
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    kv_store_v1 *shared = must_open(uri);
    int failures = 0;
    if (n > 32) n = 32;
    for (int i = 0; i < 2 * n; i++) {
        int is_shared = i >= n;
        w[i] = (worker_t){uri, s, is_shared ? shared : NULL, is_shared ? &lock : NULL, i, 4, 0};
        pthread_create(&t[i], NULL, worker, &w[i]);
    }
    for (int i = 0; i < 2 * n; i++) {
        pthread_join(t[i], NULL);
        failures += w[i].failures;
    }
    vt->close(shared);
    printf("threads %d failures %d\n", 2 * n, failures);
    return failures != 0;
}

static int bench(const char *uri, sessions_t *s, int runs) {
    kv_store_v1 *h = must_open(uri);
    double *cold = calloc(runs, sizeof(double)), *warm = calloc(runs, sizeof(double));
    double *rest = calloc(runs, sizeof(double));
    int bad = 0;
    if (runs > (int)s->sessions) runs = (int)s->sessions;
    bad |= save(h, s, 0, "bench-warmup") != 0 || restore(h, s, 0, "bench-warmup") != 0;
    for (int r = 1; r < runs; r++) {
        char name[64];
        snprintf(name, sizeof name, "bench-%d", r);
        double t0 = now_ms();
        bad |= save(h, s, (uint32_t)r, name) != 0;
        double t1 = now_ms();
        bad |= save(h, s, (uint32_t)r, name) != 0;
        double t2 = now_ms();
        bad |= restore(h, s, (uint32_t)r, name) != 0;
        double t3 = now_ms();
        cold[r - 1] = t1 - t0, warm[r - 1] = t2 - t1, rest[r - 1] = t3 - t2;
    }
    vt->close(h);
    printf("{\"runs\": %d, \"cold_save_ms\": %.4f, \"warm_save_ms\": %.4f, \"restore_ms\": %.4f, \"ok\": %s}\n",
           runs - 1, median(cold, runs - 1), median(warm, runs - 1), median(rest, runs - 1), bad ? "false" : "true");
    return bad;
}

int main(int argc, char **argv) {
    if (argc < 3) die("usage: consumer save|restore|delete|open|errors|threads|bench URI ...");
    const char *cmd = argv[1], *uri = argv[2];
    load_backend();
    if (!strcmp(cmd, "open")) {
        kv_store_v1 *h = vt->open(uri);
        printf("open %s\n", h ? "ok" : "NULL");
        if (h) vt->close(h);
        return 0;
    }
    if (!strcmp(cmd, "delete") && argc >= 4) {
        kv_store_v1 *h = must_open(uri);
        uint8_t *out;
        size_t n;
        int rc = vt->delete_manifest(h, argv[3]);
        printf("delete %d\nget_after_delete %d\n", rc, vt->get_manifest(h, argv[3], &out, &n));
        vt->close(h);
        return rc != 0;
    }
    if (argc < 4) die("missing FILE");
    if (!strcmp(cmd, "errors")) {
        sessions_t s = load_sessions(argv[3]);
        errors(uri, &s);
        return 0;
    }
    if (!strcmp(cmd, "threads") && argc >= 5) {
        sessions_t s = load_sessions(argv[3]);
        return threads(uri, &s, atoi(argv[4]));
    }
    if (!strcmp(cmd, "bench") && argc >= 5) {
        sessions_t s = load_sessions(argv[3]);
        return bench(uri, &s, atoi(argv[4]));
    }
    if (argc < 5) die("missing NAME FILE");
    sessions_t s = load_sessions(argv[4]);
    uint32_t i = argc > 5 ? (uint32_t)atoi(argv[5]) : 0;
    kv_store_v1 *h = must_open(uri);
    double t0 = now_ms();
    int rc;
    if (!strcmp(cmd, "save"))
        rc = save(h, &s, i, argv[3]);
    else if (!strcmp(cmd, "restore"))
        rc = restore(h, &s, i, argv[3]);
    else
        die("unknown command");
    printf("%s %d %.3f ms\n", cmd, rc, now_ms() - t0);
    vt->close(h);
    return rc != 0;
}
