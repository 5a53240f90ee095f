/* The search path's compiled kernels: the top-k merge, a k-way merge of the nodes' rows, and the
 * varint decoder that reads the ids of the nodes' replies.
 *
 * The merge (mishards/core/merge.py calls it; it checks every size it is given itself):
 *
 *     merge_rows(ids, distances, nq, width, descending, out_ids, out_distances) -> None
 *     merge_rows(ids, distances, nq, width, descending) -> (list of ids, list of distances)
 *
 * ids, distances: tuples with one entry per node, nq x k_i values (k_i >= 0), row-major: C-contiguous
 * int64 and float32 buffers, or lists of Python ints and floats (small replies decode to lists).
 * out_ids, out_distances: writable buffers of nq x width int64 and float32; when both are left out
 * (or None), the answer comes back as two flat lists instead, (ids, distances).
 *
 * The rules are the ones merge.py documents: rank by (key, id) where the key orders distances
 * best first (ascending, or descending for inner product; -0.0 ties 0.0; NaN after every number),
 * id -1 is padding and never competes, an id is kept once at its best rank, short rows are padded
 * with id -1 and the worst distance.
 *
 * Why it is fast: nodes send their rows best first, so the merge walks each node's row from the
 * front and never sorts. A row that is not in (key, id) order is copied and fixed first (ties in
 * another id order: run by run; anything else: sorted), so the answer never depends on the nodes'
 * order. The work per output row is O(sum k_i) to check the order plus O(width x nodes) to merge;
 * fixing a row out of order is O(k_i log k_i) at most. Two output rows are merged at once (see
 * run_merge). Allocations are sized by the inputs alone, and the GIL is released while it runs.
 *
 * The varint decoder (mishards/core/wire.py): decode_varints, below.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PADDING_ID (-1)
#define NAN_KEY 0xFFFFFFFEu
#define END_KEY 0xFFFFFFFFu /* padding and the end of a row: above every real key (NaN's is the largest) */
#define FLT_MAX_VALUE 3.40282346638528859812e+38F

/* Unsigned order of the key = rank order of the distance: the float's bits, the sign flipped for
 * descending order (sign_flip 0x80000000), -0.0 made 0.0, negative floats' bits inverted, NaN
 * after every number. Integer operations only and no branch, so the loops over a row vectorise. */
static inline uint32_t rank_key(float distance, uint32_t sign_flip) {
    uint32_t bits;
    memcpy(&bits, &distance, sizeof bits);
    bits ^= sign_flip;
    uint32_t magnitude = bits & 0x7FFFFFFFu;
    uint32_t key = bits ^ ((uint32_t)((int32_t)bits >> 31) | 0x80000000u);
    key = magnitude == 0 ? 0x80000000u : key;
    return magnitude > 0x7F800000u ? NAN_KEY : key;
}

typedef struct {
    uint32_t key;
    float distance;
    int64_t id;
} Candidate;

static int compare_candidates(const void *left, const void *right) {
    const Candidate *a = left, *b = right;
    if (a->key != b->key) {
        return a->key < b->key ? -1 : 1;
    }
    return (a->id > b->id) - (a->id < b->id);
}

/* One node's row as the merge reads it: keys (END_KEY after the last real entry), ids, distances. */
typedef struct {
    const uint32_t *keys;
    const int64_t *ids;
    const float *distances;
    Py_ssize_t position;
} Cursor;

typedef enum { IN_ORDER, TIES_OUT_OF_ORDER, OUT_OF_ORDER } RowOrder;

/* Fills keys[0..count] (keys[count] = END_KEY) for the row and tells whether the merge may walk it
 * as it is: real entries in (key, id) order, any padding only at the end. TIES_OUT_OF_ORDER: in
 * key order, but some run of equal keys is not in ascending id order. */
static RowOrder keys_in_rank_order(const int64_t *restrict ids, const float *restrict distances, Py_ssize_t count,
                                   uint32_t sign_flip, uint32_t *restrict keys) {
    uint64_t sign_bits = 0; /* any negative id, padding (-1) or not: then the slower loop below */
    for (Py_ssize_t j = 0; j < count; j++) {
        sign_bits |= (uint64_t)ids[j];
    }
    for (Py_ssize_t j = 0; j < count; j++) {
        keys[j] = rank_key(distances[j], sign_flip);
    }
    if (sign_bits >> 63) {
        for (Py_ssize_t j = 0; j < count; j++) {
            keys[j] = ids[j] == PADDING_ID ? END_KEY : keys[j];
        }
    }
    keys[count] = END_KEY;
    uint32_t descents = 0, ties = 0;
    for (Py_ssize_t j = 1; j < count; j++) {
        descents |= keys[j] < keys[j - 1];
        ties |= keys[j] == keys[j - 1];
    }
    if (descents) {
        return OUT_OF_ORDER;
    }
    for (Py_ssize_t j = 1; ties && j < count; j++) { /* equal keys (rare for float distances): ids ascending? */
        if (keys[j] == keys[j - 1] && keys[j] != END_KEY && ids[j] < ids[j - 1]) {
            return TIES_OUT_OF_ORDER;
        }
    }
    return IN_ORDER;
}

/* Open addressing set of the ids kept in the current row; a slot is live when its stamp is the
 * row's, so nothing is cleared between rows. Capacity: a power of two, at least 4 x width. */
typedef struct {
    int64_t *ids;
    uint32_t *stamps;
    uint64_t mask;
    int shift;
} SeenIds;

/* 1 if the id was new (and is now in the set), 0 if the row already kept it. */
static inline int keep_once(SeenIds *seen, int64_t id, uint32_t stamp) {
    uint64_t slot = ((uint64_t)id * 0x9E3779B97F4A7C15ull) >> seen->shift;
    while (seen->stamps[slot] == stamp) {
        if (seen->ids[slot] == id) {
            return 0;
        }
        slot = (slot + 1) & seen->mask;
    }
    seen->stamps[slot] = stamp;
    seen->ids[slot] = id;
    return 1;
}

typedef struct {
    Py_ssize_t nodes, nq, width;
    int descending;
    const int64_t **ids;
    const float **distances;
    const Py_ssize_t *node_widths;
    int64_t *out_ids;
    float *out_distances;
} MergeJob;

static int compare_by_id(const void *left, const void *right) {
    const Candidate *a = left, *b = right;
    return (a->id > b->id) - (a->id < b->id);
}

/* A row in key order whose ties are not in id order: copied, each run of equal keys put in id
 * order (insertion sort for short runs, qsort for long ones); keys stay as they are. */
static void order_ties(const int64_t *ids, const float *distances, Py_ssize_t count, const uint32_t *keys,
                       Candidate *run, int64_t *sorted_ids, float *sorted_distances) {
    memcpy(sorted_ids, ids, (size_t)count * sizeof *ids);
    memcpy(sorted_distances, distances, (size_t)count * sizeof *distances);
    for (Py_ssize_t start = 0, end; start < count && keys[start] != END_KEY; start = end) {
        for (end = start + 1; end < count && keys[end] == keys[start]; end++) {
        }
        Py_ssize_t length = end - start;
        if (length < 2) {
            continue;
        }
        for (Py_ssize_t j = 0; j < length; j++) {
            run[j].id = sorted_ids[start + j];
            run[j].distance = sorted_distances[start + j];
        }
        if (length <= 16) {
            for (Py_ssize_t j = 1; j < length; j++) {
                Candidate moving = run[j];
                Py_ssize_t slot = j;
                for (; slot > 0 && moving.id < run[slot - 1].id; slot--) {
                    run[slot] = run[slot - 1];
                }
                run[slot] = moving;
            }
        } else {
            qsort(run, (size_t)length, sizeof *run, compare_by_id);
        }
        for (Py_ssize_t j = 0; j < length; j++) {
            sorted_ids[start + j] = run[j].id;
            sorted_distances[start + j] = run[j].distance;
        }
    }
}

static inline int candidate_before(const Candidate *a, const Candidate *b) {
    return a->key < b->key || (a->key == b->key && a->id < b->id);
}

/* A row out of key order: its real entries sorted by (key, id) into the node's scratch. Insertion
 * sort first: a row nearly in order needs only a few short moves. Past a budget of moves (a row
 * in no order at all) qsort finishes the job, so a row costs O(count log count) at worst. */
static void sort_row(const int64_t *ids, const float *distances, Py_ssize_t count, uint32_t sign_flip,
                     Candidate *candidates, uint32_t *keys, int64_t *sorted_ids, float *sorted_distances) {
    Py_ssize_t real = 0;
    for (Py_ssize_t j = 0; j < count; j++) {
        if (ids[j] != PADDING_ID) {
            candidates[real].key = rank_key(distances[j], sign_flip);
            candidates[real].distance = distances[j];
            candidates[real].id = ids[j];
            real++;
        }
    }
    Py_ssize_t budget = 8 * real + 64;
    for (Py_ssize_t j = 1; j < real && budget >= 0; j++) {
        Candidate moving = candidates[j];
        Py_ssize_t slot = j;
        while (slot > 0 && candidate_before(&moving, &candidates[slot - 1]) && budget-- >= 0) {
            candidates[slot] = candidates[slot - 1];
            slot--;
        }
        candidates[slot] = moving; /* (still a permutation when the budget ran out mid-way) */
    }
    if (budget < 0) {
        qsort(candidates, (size_t)real, sizeof *candidates, compare_candidates);
    }
    for (Py_ssize_t j = 0; j < real; j++) {
        keys[j] = candidates[j].key;
        sorted_ids[j] = candidates[j].id;
        sorted_distances[j] = candidates[j].distance;
    }
    keys[real] = END_KEY;
}

/* One output row being merged, with its own scratch: run_merge keeps two of them in flight. */
typedef struct {
    Cursor *cursors;
    uint32_t *heads; /* each cursor's current key */
    uint32_t *keys;
    int64_t *sorted_ids;
    float *sorted_distances;
    SeenIds seen;
    int64_t *out_ids;
    float *out_distances;
    Py_ssize_t kept;
    uint32_t stamp;
} Lane;

/* Points the lane's cursors at `row` of every node (rows out of order fixed in its scratch). */
static void start_row(const MergeJob *job, Lane *lane, Py_ssize_t row, Py_ssize_t stride, Candidate *candidates,
                      uint32_t sign_flip) {
    for (Py_ssize_t node = 0; node < job->nodes; node++) {
        Py_ssize_t count = job->node_widths[node];
        const int64_t *ids = job->ids[node] + row * count;
        const float *distances = job->distances[node] + row * count;
        Cursor *cursor = &lane->cursors[node];
        uint32_t *node_keys = lane->keys + node * stride;
        cursor->keys = node_keys;
        cursor->position = 0;
        RowOrder order = keys_in_rank_order(ids, distances, count, sign_flip, node_keys);
        if (order == IN_ORDER) {
            cursor->ids = ids;
            cursor->distances = distances;
        } else {
            int64_t *node_ids = lane->sorted_ids + node * stride;
            float *node_distances = lane->sorted_distances + node * stride;
            if (order == TIES_OUT_OF_ORDER) {
                order_ties(ids, distances, count, node_keys, candidates, node_ids, node_distances);
            } else {
                sort_row(ids, distances, count, sign_flip, candidates, node_keys, node_ids, node_distances);
            }
            cursor->ids = node_ids;
            cursor->distances = node_distances;
        }
        lane->heads[node] = node_keys[0];
    }
    lane->out_ids = job->out_ids + row * job->width;
    lane->out_distances = job->out_distances + row * job->width;
    lane->kept = 0;
    if (++lane->stamp == 0) { /* 0 is never a live stamp: after 2**32 - 1 rows they start over */
        memset(lane->seen.stamps, 0, (lane->seen.mask + 1) * sizeof(uint32_t));
        lane->stamp = 1;
    }
}

/* One step of the lane's k-way merge: takes the best head. Returns 0 when the row is complete. */
static inline int merge_step(Lane *lane, Py_ssize_t nodes, Py_ssize_t width) {
    /* The node whose head ranks first: branch-free on keys (which node wins is random, a branch
     * would be mispredicted about every other time); equal keys rank by id. */
    const uint32_t *heads = lane->heads;
    Py_ssize_t best = 0;
    uint32_t best_key = heads[0], tied = 0;
    for (Py_ssize_t node = 1; node < nodes; node++) {
        uint32_t key = heads[node];
        tied |= (key == best_key) & (key != END_KEY);
        int better = key < best_key;
        best = better ? node : best;
        best_key = better ? key : best_key;
    }
    if (best_key == END_KEY) {
        return 0;
    }
    Cursor *cursors = lane->cursors;
    if (tied) {
        for (Py_ssize_t node = 0; node < nodes; node++) {
            const Cursor *other = &cursors[node], *leader = &cursors[best];
            if (heads[node] == best_key && other->ids[other->position] < leader->ids[leader->position]) {
                best = node;
            }
        }
    }
    Cursor *cursor = &cursors[best];
    int64_t id = cursor->ids[cursor->position];
    float distance = cursor->distances[cursor->position];
    cursor->position++;
    lane->heads[best] = cursor->keys[cursor->position];
    if (keep_once(&lane->seen, id, lane->stamp)) {
        lane->out_ids[lane->kept] = id;
        lane->out_distances[lane->kept] = distance;
        lane->kept++;
    }
    return lane->kept < width;
}

#define LANES 2 /* the merge loop in run_merge is written out for two */

/* 0 on success, -1 when memory ran out (nothing written is then used).
 *
 * Rows are merged two at a time, step by step in turn: each step waits on the one before it in its
 * row (the head it takes decides which key to load next), so one row alone leaves the core idle
 * most of the time; two independent rows fill those gaps (measured ~1.4x). */
static int run_merge(const MergeJob *job) {
    Py_ssize_t stride = 1; /* per node: its longest row and the END_KEY after it (a node may have none) */
    Py_ssize_t candidates_per_row = 0;
    for (Py_ssize_t node = 0; node < job->nodes; node++) {
        if (job->node_widths[node] + 1 > stride) {
            stride = job->node_widths[node] + 1;
        }
        candidates_per_row += job->node_widths[node];
    }
    /* a row keeps at most width ids, and no more than it has candidates */
    uint64_t most_kept = (uint64_t)(job->width < candidates_per_row ? job->width : candidates_per_row);
    uint64_t capacity = 2;
    int shift = 63;
    while (capacity < most_kept * 4) { /* at most a quarter full: few probes */
        capacity <<= 1;
        shift--;
    }
    size_t slots = (size_t)job->nodes * (size_t)stride;
    Lane lanes[LANES];
    memset(lanes, 0, sizeof lanes);
    Candidate *candidates = malloc((size_t)stride * sizeof *candidates);
    int status = candidates == NULL ? -1 : 0;
    for (int index = 0; index < LANES; index++) {
        Lane *lane = &lanes[index];
        lane->cursors = calloc((size_t)job->nodes, sizeof *lane->cursors);
        lane->heads = calloc((size_t)job->nodes, sizeof *lane->heads);
        lane->keys = malloc(slots * sizeof *lane->keys);
        lane->sorted_ids = malloc(slots * sizeof *lane->sorted_ids);
        lane->sorted_distances = malloc(slots * sizeof *lane->sorted_distances);
        lane->seen = (SeenIds){calloc(capacity, sizeof(int64_t)), calloc(capacity, sizeof(uint32_t)), capacity - 1,
                               shift};
        if (!lane->cursors || !lane->heads || !lane->keys || !lane->sorted_ids || !lane->sorted_distances ||
            !lane->seen.ids || !lane->seen.stamps) {
            status = -1;
        }
    }
    if (status == 0) {
        const float padding_distance = job->descending ? -FLT_MAX_VALUE : FLT_MAX_VALUE;
        const uint32_t sign_flip = job->descending ? 0x80000000u : 0;
        for (Py_ssize_t first = 0; first < job->nq; first += LANES) {
            Py_ssize_t rows = job->nq - first < LANES ? job->nq - first : LANES;
            int busy[LANES] = {0}; /* (width >= 1: a started row has a step to take) */
            for (int index = 0; index < rows; index++) {
                start_row(job, &lanes[index], first + index, stride, candidates, sign_flip);
                busy[index] = 1;
            }
            while (busy[0] | busy[1]) { /* written out for the two lanes: a loop over them measured ~25% slower */
                if (busy[0]) {
                    busy[0] = merge_step(&lanes[0], job->nodes, job->width);
                }
                if (busy[1]) {
                    busy[1] = merge_step(&lanes[1], job->nodes, job->width);
                }
            }
            for (int index = 0; index < rows; index++) {
                Lane *lane = &lanes[index];
                for (Py_ssize_t kept = lane->kept; kept < job->width; kept++) {
                    lane->out_ids[kept] = PADDING_ID;
                    lane->out_distances[kept] = padding_distance;
                }
            }
        }
    }
    free(candidates);
    for (int index = 0; index < LANES; index++) {
        Lane *lane = &lanes[index];
        free(lane->cursors);
        free(lane->heads);
        free(lane->keys);
        free(lane->sorted_ids);
        free(lane->sorted_distances);
        free(lane->seen.ids);
        free(lane->seen.stamps);
    }
    return status;
}

static int get_buffer(PyObject *source, Py_buffer *view, int writable, Py_ssize_t item_size, const char *what) {
    if (PyObject_GetBuffer(source, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (view->len % item_size != 0 || ((uintptr_t)view->buf) % (uintptr_t)item_size != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes are not aligned %zd-byte items", what, view->len, item_size);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* One node's ids (int64) or distances (float32): a list of Python numbers (what the reply decoder
 * gives for small replies), copied into `*owned`; or any C-contiguous buffer, held in `view`. */
static int read_values(PyObject *source, Py_ssize_t item_size, const char *what, Py_buffer *view, void **owned,
                       const void **data, Py_ssize_t *values) {
    if (!PyList_CheckExact(source)) {
        if (get_buffer(source, view, 0, item_size, what) < 0) {
            return -1;
        }
        *data = view->buf;
        *values = view->len / item_size;
        return 0;
    }
    Py_ssize_t count = PyList_GET_SIZE(source);
    *owned = PyMem_Malloc((size_t)(count ? count : 1) * (size_t)item_size);
    if (*owned == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *item = PyList_GET_ITEM(source, j);
        if (item_size == 8) {
            long long id = PyLong_AsLongLong(item);
            if (id == -1 && PyErr_Occurred()) {
                return -1;
            }
            ((int64_t *)*owned)[j] = id;
        } else {
            double distance = PyFloat_AsDouble(item);
            if (distance == -1.0 && PyErr_Occurred()) {
                return -1;
            }
            ((float *)*owned)[j] = (float)distance;
        }
    }
    *data = *owned;
    *values = count;
    return 0;
}

/* (ids list, distances list) of `count` merged values. */
static PyObject *as_lists(const int64_t *ids, const float *distances, Py_ssize_t count) {
    PyObject *id_list = PyList_New(count), *distance_list = PyList_New(count);
    if (id_list == NULL || distance_list == NULL) {
        goto failed;
    }
    for (Py_ssize_t j = 0; j < count; j++) {
        PyObject *id = PyLong_FromLongLong(ids[j]), *distance = PyFloat_FromDouble(distances[j]);
        if (id == NULL || distance == NULL) {
            Py_XDECREF(id);
            Py_XDECREF(distance);
            goto failed;
        }
        PyList_SET_ITEM(id_list, j, id);
        PyList_SET_ITEM(distance_list, j, distance);
    }
    return Py_BuildValue("(NN)", id_list, distance_list);
failed:
    Py_XDECREF(id_list);
    Py_XDECREF(distance_list);
    return NULL;
}

static PyObject *merge_rows(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *ids_tuple, *distances_tuple;
    Py_ssize_t nq, width;
    int descending;
    PyObject *out_ids_object = Py_None, *out_distances_object = Py_None;
    if (!PyArg_ParseTuple(args, "O!O!nnp|OO:merge_rows", &PyTuple_Type, &ids_tuple, &PyTuple_Type, &distances_tuple,
                          &nq, &width, &descending, &out_ids_object, &out_distances_object)) {
        return NULL;
    }
    int to_lists = out_ids_object == Py_None && out_distances_object == Py_None;
    Py_ssize_t nodes = PyTuple_GET_SIZE(ids_tuple);
    if (nodes < 1 || PyTuple_GET_SIZE(distances_tuple) != nodes || nq < 1 || width < 1 || width > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "merge_rows: needs 1+ nodes (ids and distances alike), nq >= 1, "
                                          "1 <= width <= 2**24");
        return NULL;
    }
    /* views and owned copies: 2 per node (ids, distances), then the two outputs; all released at the
     * end (a zeroed view releases nothing) */
    Py_buffer *views = PyMem_Calloc((size_t)nodes * 2 + 2, sizeof(Py_buffer));
    void **owned = PyMem_Calloc((size_t)nodes * 2, sizeof(void *));
    const int64_t **ids = PyMem_Calloc((size_t)nodes, sizeof *ids);
    const float **distances = PyMem_Calloc((size_t)nodes, sizeof *distances);
    Py_ssize_t *node_widths = PyMem_Calloc((size_t)nodes, sizeof *node_widths);
    PyObject *result = NULL;
    int64_t *merged_ids = NULL;
    float *merged_distances = NULL;
    if (views == NULL || owned == NULL || ids == NULL || distances == NULL || node_widths == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t node = 0; node < nodes; node++) {
        Py_ssize_t id_count, distance_count;
        if (read_values(PyTuple_GET_ITEM(ids_tuple, node), 8, "ids", &views[2 * node], &owned[2 * node],
                        (const void **)&ids[node], &id_count) < 0 ||
            read_values(PyTuple_GET_ITEM(distances_tuple, node), 4, "distances", &views[2 * node + 1],
                        &owned[2 * node + 1], (const void **)&distances[node], &distance_count) < 0) {
            goto done;
        }
        if (id_count % nq != 0 || distance_count != id_count) { /* (a node without hits has 0 of each) */
            PyErr_Format(PyExc_ValueError, "merge_rows: node %zd has %zd ids and %zd distances, not %zd equal rows",
                         node, id_count, distance_count, nq);
            goto done;
        }
        node_widths[node] = id_count / nq;
    }
    Py_buffer *out_ids = &views[2 * nodes], *out_distances = &views[2 * nodes + 1];
    if (to_lists) { /* the answer as two new lists: merged into scratch first */
        merged_ids = PyMem_Malloc((size_t)(nq * width) * sizeof *merged_ids);
        merged_distances = PyMem_Malloc((size_t)(nq * width) * sizeof *merged_distances);
        if (merged_ids == NULL || merged_distances == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    } else {
        if (get_buffer(out_ids_object, out_ids, 1, 8, "out_ids") < 0 ||
            get_buffer(out_distances_object, out_distances, 1, 4, "out_distances") < 0) {
            goto done;
        }
        if (out_ids->len / 8 != nq * width || out_distances->len / 4 != nq * width) {
            PyErr_SetString(PyExc_ValueError, "merge_rows: the outputs must hold nq x width values each");
            goto done;
        }
    }
    MergeJob job = {nodes,          nq, width, descending, ids, distances, node_widths,
                    to_lists ? merged_ids : out_ids->buf, to_lists ? merged_distances : out_distances->buf};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_merge(&job);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = to_lists ? as_lists(merged_ids, merged_distances, nq * width) : Py_NewRef(Py_None);
done:
    PyMem_Free(merged_ids);
    PyMem_Free(merged_distances);
    if (views != NULL) {
        for (Py_ssize_t index = 0; index < nodes * 2 + 2; index++) {
            PyBuffer_Release(&views[index]);
        }
    }
    if (owned != NULL) {
        for (Py_ssize_t index = 0; index < nodes * 2; index++) {
            PyMem_Free(owned[index]);
        }
    }
    PyMem_Free(views);
    PyMem_Free(owned);
    PyMem_Free(ids);
    PyMem_Free(distances);
    PyMem_Free(node_widths);
    return result;
}

/* decode_varints(data, start, stop, out) -> count: the packed varints of data[start:stop] (a
 * repeated int64 field's payload) into `out`, a writable int64 buffer of at least stop - start
 * values (a varint takes one byte or more). A varint cut off by `stop` or longer than 10 bytes
 * raises ValueError. Bits past the 64th are dropped, as protobuf's parsers do. */
static PyObject *decode_varints(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data, out;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "y*nnw*:decode_varints", &data, &start, &stop, &out)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (start < 0 || stop < start || stop > data.len) {
        PyErr_Format(PyExc_ValueError, "decode_varints: [%zd, %zd) is not inside %zd bytes", start, stop, data.len);
        goto done;
    }
    if (out.len / 8 < stop - start || ((uintptr_t)out.buf) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "decode_varints: out must be an aligned int64 buffer of stop - start values");
        goto done;
    }
    const uint8_t *byte = (const uint8_t *)data.buf + start, *end = (const uint8_t *)data.buf + stop;
    int64_t *values = out.buf;
    Py_ssize_t count = 0;
    while (byte < end) {
        uint64_t value = 0;
        for (int shift = 0;; shift += 7) {
            if (byte == end || shift > 63) {
                PyErr_SetString(PyExc_ValueError, "decode_varints: a varint is cut off or longer than 10 bytes");
                goto done;
            }
            value |= (uint64_t)(*byte & 0x7F) << shift;
            if (!(*byte++ & 0x80)) {
                break;
            }
        }
        values[count++] = (int64_t)value;
    }
    result = PyLong_FromSsize_t(count);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"merge_rows", merge_rows, METH_VARARGS,
     "merge_rows(ids, distances, nq, width, descending[, out_ids, out_distances]): k-way merge of the nodes' "
     "rows into out_ids/out_distances, or into two new lists when they are left out (see mishards/core/merge.py)."},
    {"decode_varints", decode_varints, METH_VARARGS,
     "decode_varints(data, start, stop, out) -> count: the packed varints of data[start:stop] into the int64 "
     "buffer out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_topk",
    .m_doc = "The search path's compiled kernels: top-k merge, varint decoding.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__topk(void) { return PyModule_Create(&module); }
