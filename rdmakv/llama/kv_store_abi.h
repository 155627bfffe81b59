/* kv_store_v1: the storage backend ABI of a chunked-save llama.cpp (rdmakv's own header,
 * written from the published facts of the reference design's tools/server/kv_store_abi.h).
 *
 * An engine dlopen()s libkv_store_<scheme>.so (KV_STORE_LIBRARY_PATH first, then the system
 * loader) and calls kv_store_get_vtable(). Negative returns are errors; *out buffers are
 * malloc()ed by the backend and free()d by the caller. Puts may be buffered until the next
 * put_manifest; a visible manifest implies its chunks are visible; there is no chunk-level
 * exists or delete. rdmakv: a chunk's key is whatever the engine passes (1..64 bytes, compared as
 * bytes; hash_len is its length); a chunk no manifest names any more stays readable by key as
 * evictable cache; delete_manifest frees what only that manifest named.
 */
#ifndef KV_STORE_ABI_H
#define KV_STORE_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_store_v1 kv_store_v1; /* an opaque handle */

typedef struct kv_store_vtable {
    uint32_t version; /* 1; 2 when prefetch_chunks is set */
    kv_store_v1 *(*open)(const char *uri);
    void (*close)(kv_store_v1 *h);
    int (*put_chunk)(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, const uint8_t *data, size_t len);
    int (*get_chunk)(kv_store_v1 *h, const uint8_t *hash, size_t hash_len, uint8_t **out, size_t *out_len);
    int (*put_manifest)(kv_store_v1 *h, const char *name, const uint8_t *data, size_t len);
    int (*get_manifest)(kv_store_v1 *h, const char *name, uint8_t **out, size_t *out_len);
    int (*delete_manifest)(kv_store_v1 *h, const char *name);
    int (*prefetch_chunks)(kv_store_v1 *h, const uint8_t *hashes, size_t count, size_t hash_len);
} kv_store_vtable;

/* rdmakv's error codes (any negative value is an error to a consumer that knows no more) */
#define KV_STORE_OK 0
#define KV_STORE_ERROR (-1)       /* anything else; the reason went to stderr */
#define KV_STORE_NOT_FOUND (-2)   /* no such manifest, or the chunk is not stored */
#define KV_STORE_INVALID (-3)     /* bad argument: hash length, name, NULL pointer, closed handle */
#define KV_STORE_UNREACHABLE (-4) /* the server cannot be reached or the connection was lost */
#define KV_STORE_AUTH (-5)        /* the key was refused */
#define KV_STORE_FULL (-6)        /* the store or its disk is full */
#define KV_STORE_NO_MEMORY (-7)   /* malloc failed or a bounded buffer is full */

const kv_store_vtable *kv_store_get_vtable(void);

#ifdef __cplusplus
}
#endif
#endif
