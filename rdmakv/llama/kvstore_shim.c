/* The C side of libkv_store_rdmakv.so: the kv_store_v1 vtable, handles, and the two calls an
 * engine makes per chunk, done here without entering Python.
 *
 * Why C at all: an engine calls put_chunk and get_chunk once per chunk (192 times each for a
 * 256-token Qwen2.5-0.5B session at W=64). Crossing into the embedded interpreter for each one
 * (the GIL, a lookup, a copy, a malloc) made the library twice as slow as the Python API it wraps.
 * So:
 *   - put_chunk appends the engine's key and a copy of its bytes to the handle's pending arena
 *     (the ABI lets puts wait for the next put_manifest); nothing is hashed here: the store keeps
 *     its own check of the bytes beside each key.
 *   - get_chunk answers from the handle's prefetch table (chunks a prefetch landed in one buffer
 *     that Python keeps alive), with the malloc + copy the ABI asks for.
 * Everything else (open, put_manifest, get_manifest, prefetch_chunks, delete_manifest, a miss of
 * get_chunk, a pending arena that is full) is a call into Python (rdmakv_py_*), made with the
 * handle's lock held and never while this file holds anything Python needs.
 *
 * Handles are structs registered in a global set: a stale or double-closed handle is not in the
 * set and gets KV_STORE_INVALID, never a dereference. Each call holds a reference, so a close
 * while another thread is inside a call tears the handle down when that call returns.
 *
 * Keys are held as the store holds opaque keys (rdmakv/hashing.py): a length byte (0x80 set when
 * the store's check is BLAKE3) and the key, zero-padded to 64 bytes.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RKV_KEY_MAX 64
#define RKV_KEYW (RKV_KEY_MAX + 1)
#define RKV_MAX_HANDLES 4096                  /* open handles per process */
#define RKV_MAX_CHUNK ((size_t)1 << 31)       /* the largest chunk a manifest can name */
#define RKV_MAX_PENDING_CHUNKS ((size_t)1 << 20) /* chunks put before one put_manifest */
#define RKV_SENT UINT64_MAX                   /* a pending chunk whose bytes were sent ahead */

typedef struct {
    uint8_t key[RKV_KEYW];
    uint8_t used;
    uint32_t len;
    uint64_t pos;         /* pending: the entry's index; cache: unused */
    const uint8_t *ptr;   /* cache: the chunk's bytes (in a buffer Python keeps alive) */
    uint32_t gen;         /* cache: which prefetch buffer the bytes are in */
} rkv_slot;

typedef struct {
    rkv_slot *s;
    size_t cap, n; /* cap: a power of two, at most half full */
} rkv_table;

struct kv_store_v1 {
    pthread_mutex_t lock;
    uint32_t refs;
    int closed;
    uint8_t check_flag; /* 0x80 when this handle's keys are checked with BLAKE3 */
    /* pending puts: keys, lengths and offsets into one data arena, in put order */
    uint8_t *keys;
    uint32_t *lens;
    uint64_t *offs;
    size_t n, cap;
    uint8_t *data;
    size_t data_len, data_cap, pending_limit;
    rkv_table pending;
    /* the prefetch table */
    rkv_table cache;
};

/* -- the table: open addressing over 65-byte keys ---------------------------------------- */
static uint64_t rkv_hash(const uint8_t *k) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a over the key's own bytes, then a finaliser */
    size_t n = (size_t)(k[0] & 0x7f) + 1;
    for (size_t i = 0; i < n; i++) h = (h ^ k[i]) * 0x100000001b3ULL;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    return h ^ (h >> 33);
}

static rkv_slot *rkv_find(rkv_table *t, const uint8_t *k) {
    if (!t->cap) return NULL;
    size_t mask = t->cap - 1;
    for (size_t i = rkv_hash(k) & mask;; i = (i + 1) & mask) {
        rkv_slot *s = &t->s[i];
        if (!s->used) return s;
        if (!memcmp(s->key, k, RKV_KEYW)) return s;
    }
}

static int rkv_grow(rkv_table *t, size_t want) {
    if (2 * want <= t->cap) return 0;
    size_t cap = t->cap ? t->cap : 256;
    while (2 * want > cap) cap *= 2;
    rkv_slot *old = t->s;
    size_t old_cap = t->cap;
    t->s = calloc(cap, sizeof(rkv_slot));
    if (!t->s) {
        t->s = old;
        return -1;
    }
    t->cap = cap;
    t->n = 0;
    for (size_t i = 0; i < old_cap; i++)
        if (old[i].used) {
            *rkv_find(t, old[i].key) = old[i];
            t->n++;
        }
    free(old);
    return 0;
}

static void rkv_clear(rkv_table *t) {
    if (t->n) memset(t->s, 0, t->cap * sizeof(rkv_slot));
    t->n = 0;
}

/* Remove every slot for which keep() is false (a rebuild: deletion in open addressing). */
static int rkv_filter(rkv_table *t, uint32_t drop_gen) {
    rkv_table fresh = {0};
    if (rkv_grow(&fresh, t->n ? t->n : 1) < 0) return -1;
    for (size_t i = 0; i < t->cap; i++)
        if (t->s[i].used && t->s[i].gen != drop_gen) {
            *rkv_find(&fresh, t->s[i].key) = t->s[i];
            fresh.n++;
        }
    free(t->s);
    *t = fresh;
    return 0;
}

/* -- the registry of live handles --------------------------------------------------------- */
static pthread_mutex_t rkv_registry_lock = PTHREAD_MUTEX_INITIALIZER;
static kv_store_v1 *rkv_registry[RKV_MAX_HANDLES];

static kv_store_v1 *rkv_acquire(kv_store_v1 *h) {
    kv_store_v1 *out = NULL;
    if (!h) return NULL;
    pthread_mutex_lock(&rkv_registry_lock);
    for (size_t i = 0; i < RKV_MAX_HANDLES; i++)
        if (rkv_registry[i] == h) {
            if (!h->closed) {
                h->refs++;
                out = h;
            }
            break;
        }
    pthread_mutex_unlock(&rkv_registry_lock);
    return out;
}

static void rkv_free(kv_store_v1 *h) {
    free(h->keys);
    free(h->lens);
    free(h->offs);
    free(h->data);
    free(h->pending.s);
    free(h->cache.s);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static void rkv_release(kv_store_v1 *h) {
    int last = 0;
    pthread_mutex_lock(&rkv_registry_lock);
    if (--h->refs == 0 && h->closed) {
        for (size_t i = 0; i < RKV_MAX_HANDLES; i++)
            if (rkv_registry[i] == h) rkv_registry[i] = NULL;
        last = 1;
    }
    pthread_mutex_unlock(&rkv_registry_lock);
    if (last) {
        rdmakv_py_close(h); /* the Python side lets go of its connection and buffers */
        rkv_free(h);
    }
}

static int rkv_register(kv_store_v1 *h) {
    int ok = 0;
    pthread_mutex_lock(&rkv_registry_lock);
    for (size_t i = 0; i < RKV_MAX_HANDLES && !ok; i++)
        if (!rkv_registry[i]) {
            rkv_registry[i] = h;
            ok = 1;
        }
    pthread_mutex_unlock(&rkv_registry_lock);
    return ok;
}

static int rkv_make_key(kv_store_v1 *h, uint8_t *out, const uint8_t *hash, size_t hash_len) {
    if (!hash || hash_len == 0 || hash_len > RKV_KEY_MAX) return -1;
    memset(out, 0, RKV_KEYW);
    out[0] = (uint8_t)hash_len | h->check_flag;
    memcpy(out + 1, hash, hash_len);
    return 0;
}

/* -- the vtable ----------------------------------------------------------------------------- */
static kv_store_v1 *rkv_open(const char *uri) {
    kv_store_v1 *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    pthread_mutex_init(&h->lock, NULL);
    h->refs = 1;
    if (!rkv_register(h)) {
        rdmakv_py_say("open: too many open handles in this process");
        pthread_mutex_destroy(&h->lock);
        free(h);
        return NULL;
    }
    int64_t opts = rdmakv_py_open(h, uri); /* < 0: refused (Python said why); else options */
    if (opts < 0) {
        pthread_mutex_lock(&rkv_registry_lock);
        for (size_t i = 0; i < RKV_MAX_HANDLES; i++)
            if (rkv_registry[i] == h) rkv_registry[i] = NULL;
        pthread_mutex_unlock(&rkv_registry_lock);
        rkv_free(h);
        return NULL;
    }
    h->check_flag = (opts & 1) ? 0x80 : 0;
    h->pending_limit = (size_t)(opts >> 1);
    rkv_release(h);
    return h;
}

static void rkv_close(kv_store_v1 *h) {
    kv_store_v1 *g = rkv_acquire(h);
    if (!g) return; /* NULL, unknown or already closed: nothing to do */
    pthread_mutex_lock(&rkv_registry_lock);
    if (!g->closed) {
        g->closed = 1;
        g->refs--; /* the reference open gave */
    }
    pthread_mutex_unlock(&rkv_registry_lock);
    rkv_release(g);
}

static int rkv_reserve(kv_store_v1 *h, size_t data_more) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 256;
        uint8_t *k = realloc(h->keys, cap * RKV_KEYW);
        if (!k) return -1;
        h->keys = k;
        uint32_t *l = realloc(h->lens, cap * sizeof(uint32_t));
        if (!l) return -1;
        h->lens = l;
        uint64_t *o = realloc(h->offs, cap * sizeof(uint64_t));
        if (!o) return -1;
        h->offs = o;
        h->cap = cap;
    }
    if (h->data_len + data_more > h->data_cap) {
        size_t cap = h->data_cap ? h->data_cap : (1 << 20);
        while (cap < h->data_len + data_more) cap *= 2;
        uint8_t *d = realloc(h->data, cap);
        if (!d) return -1;
        h->data = d;
        h->data_cap = cap;
    }
    return rkv_grow(&h->pending, h->n + 1);
}

static int rkv_put_chunk(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, const uint8_t *data, size_t len) {
    uint8_t key[RKV_KEYW];
    kv_store_v1 *g = rkv_acquire(h);
    if (!g) {
        rdmakv_py_say("put_chunk: not an open handle");
        return KV_STORE_INVALID;
    }
    int rc = KV_STORE_OK;
    if (rkv_make_key(g, key, hash, hash_len) < 0) {
        rdmakv_py_bad_key("put_chunk", hash_len, hash != NULL);
        rc = KV_STORE_INVALID;
    } else if (len == 0 || len > RKV_MAX_CHUNK || !data) {
        rdmakv_py_bad_chunk("put_chunk", len, data != NULL);
        rc = KV_STORE_INVALID;
    }
    if (rc != KV_STORE_OK) {
        rkv_release(g);
        return rc;
    }
    pthread_mutex_lock(&g->lock);
    rkv_slot *s = rkv_find(&g->pending, key);
    if (s && s->used) { /* putting a chunk twice is a no-op */
        pthread_mutex_unlock(&g->lock);
        rkv_release(g);
        return KV_STORE_OK;
    }
    if (g->n >= RKV_MAX_PENDING_CHUNKS) {
        rc = KV_STORE_NO_MEMORY;
    } else if (g->data_len + len > g->pending_limit && g->data_len) {
        rc = rdmakv_py_send_ahead(g); /* the arena is full: send what the store lacks now */
        if (rc == KV_STORE_OK) g->data_len = 0;
    }
    if (rc == KV_STORE_OK && rkv_reserve(g, len) < 0) rc = KV_STORE_NO_MEMORY;
    if (rc == KV_STORE_OK) {
        memcpy(g->keys + g->n * RKV_KEYW, key, RKV_KEYW);
        memcpy(g->data + g->data_len, data, len);
        g->lens[g->n] = (uint32_t)len;
        g->offs[g->n] = g->data_len;
        s = rkv_find(&g->pending, key);
        memcpy(s->key, key, RKV_KEYW);
        s->used = 1;
        s->pos = g->n;
        g->pending.n++;
        g->data_len += len;
        g->n++;
    } else if (rc == KV_STORE_NO_MEMORY) {
        rdmakv_py_say("put_chunk: out of memory, or more than 2^20 chunks put before one put_manifest");
    }
    pthread_mutex_unlock(&g->lock);
    rkv_release(g);
    return rc;
}

#define RKV_PY_CALL(fn, what, ...)                          \
    do {                                                    \
        kv_store_v1 *g = rkv_acquire(h);                    \
        if (!g) {                                           \
            rdmakv_py_say(what ": not an open handle");     \
            return KV_STORE_INVALID;                        \
        }                                                   \
        pthread_mutex_lock(&g->lock);                       \
        int rc = fn(g, __VA_ARGS__);                        \
        pthread_mutex_unlock(&g->lock);                     \
        rkv_release(g);                                     \
        return rc;                                          \
    } while (0)

static void rkv_clear_pending(kv_store_v1 *h) {
    h->n = 0;
    h->data_len = 0;
    rkv_clear(&h->pending);
}

static int rkv_put_manifest(kv_store_v1 *h, const char *name, const uint8_t *data, size_t len) {
    /* Python clears the pending chunks (rdmakv_c_pending_clear) once the arguments check out and the
     * save is under way, so that a failed save does not leak its chunks into the next one, while a
     * call refused for a bad argument leaves them for the engine's retry. */
    RKV_PY_CALL(rdmakv_py_put_manifest, "put_manifest", name, data, len);
}

static int rkv_get_chunk(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, uint8_t **out, size_t *out_len) {
    uint8_t key[RKV_KEYW];
    kv_store_v1 *g = rkv_acquire(h);
    if (!g) {
        rdmakv_py_say("get_chunk: not an open handle");
        return KV_STORE_INVALID;
    }
    if (rkv_make_key(g, key, hash, hash_len) < 0 || !out || !out_len) {
        if (!out || !out_len)
            rdmakv_py_say("get_chunk: NULL out pointer");
        else
            rdmakv_py_bad_key("get_chunk", hash_len, hash != NULL);
        rkv_release(g);
        return KV_STORE_INVALID;
    }
    pthread_mutex_lock(&g->lock);
    int rc;
    rkv_slot *s = rkv_find(&g->cache, key);
    if (s && s->used) {
        uint8_t *p = malloc(s->len ? s->len : 1);
        if (p) {
            memcpy(p, s->ptr, s->len);
            *out = p;
            *out_len = s->len;
            rc = KV_STORE_OK;
        } else {
            rc = KV_STORE_NO_MEMORY;
        }
    } else {
        rc = rdmakv_py_get_chunk(g, key, out, out_len); /* not prefetched: by key from the store */
    }
    pthread_mutex_unlock(&g->lock);
    rkv_release(g);
    return rc;
}

static int rkv_get_manifest(kv_store_v1 *h, const char *name, uint8_t **out, size_t *out_len) {
    RKV_PY_CALL(rdmakv_py_get_manifest, "get_manifest", name, out, out_len);
}

static int rkv_delete_manifest(kv_store_v1 *h, const char *name) {
    RKV_PY_CALL(rdmakv_py_delete_manifest, "delete_manifest", name);
}

static int rkv_prefetch_chunks(kv_store_v1 *h, const uint8_t *hashes, size_t count, size_t hash_len) {
    RKV_PY_CALL(rdmakv_py_prefetch_chunks, "prefetch_chunks", hashes, count, hash_len);
}

/* -- helpers Python calls, inside a call into Python (the handle's lock is held) ------------ */
size_t rdmakv_c_pending(kv_store_v1 *h, uint8_t **keys, uint32_t **lens, uint64_t **offs, uint8_t **data) {
    *keys = h->keys;
    *lens = h->lens;
    *offs = h->offs;
    *data = h->data;
    return h->n;
}

void rdmakv_c_pending_clear(kv_store_v1 *h) { rkv_clear_pending(h); }

void rdmakv_c_pending_sent(kv_store_v1 *h) {
    for (size_t i = 0; i < h->n; i++) h->offs[i] = RKV_SENT;
}

/* Make n chunks of one prefetch buffer answer get_chunk: keys (n x 65 bytes), each at base +
 * offs[i], lens[i] bytes. A key already cached is pointed at the new copy. */
int rdmakv_c_cache_add(kv_store_v1 *h, uint32_t gen, const uint8_t *keys, const uint8_t *base, const uint64_t *offs,
                       const uint32_t *lens, size_t n) {
    if (rkv_grow(&h->cache, h->cache.n + n) < 0) return -1;
    for (size_t i = 0; i < n; i++) {
        rkv_slot *s = rkv_find(&h->cache, keys + i * RKV_KEYW);
        if (!s->used) {
            memcpy(s->key, keys + i * RKV_KEYW, RKV_KEYW);
            s->used = 1;
            h->cache.n++;
        }
        s->ptr = base + offs[i];
        s->len = lens[i];
        s->gen = gen;
    }
    return 0;
}

/* A prefetch buffer is being let go: its chunks stop answering get_chunk. */
int rdmakv_c_cache_drop(kv_store_v1 *h, uint32_t gen) { return rkv_filter(&h->cache, gen); }

void rdmakv_c_cache_clear(kv_store_v1 *h) { rkv_clear(&h->cache); }

size_t rdmakv_c_cache_size(kv_store_v1 *h) { return h->cache.n; }

static const kv_store_vtable rdmakv_vtable = {
    2,
    rkv_open,
    rkv_close,
    rkv_put_chunk,
    rkv_get_chunk,
    rkv_put_manifest,
    rkv_get_manifest,
    rkv_delete_manifest,
    rkv_prefetch_chunks,
};

CFFI_DLLEXPORT const kv_store_vtable *kv_store_get_vtable(void) { return &rdmakv_vtable; }
