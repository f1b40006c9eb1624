// YOLO-seg postprocess on the GPU: the semantics of cellseg.edge.postprocess (the numpy reference).
//
//   filter_candidates   one thread per anchor: best class, keep it when its score > conf
//   (NMS runs on the CPU over the few hundred survivors, which costs less than a GPU round trip)
//   proto_logits        per kept detection, coefficients . prototypes over its box's prototype window
//   assemble_masks      per kept detection and frame pixel in its box: bilinear resample of the
//                       logits (separable weights prepared on the host), threshold, the cropped
//                       mask, its area, and the union map for confluence
//   count_union         covered pixels of the union map
//
// Only scalars, boxes, areas and (on request) the cropped masks come back to the host.

__global__ void filter_candidates(const float* preds, int anchors, int classes, float conf,
                                  int max_out, int* count, int* index, float* score, int* klass)
{
    int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= anchors) return;
    float best = preds[4 * anchors + a];
    int best_c = 0;
    for (int c = 1; c < classes; ++c) {
        float s = preds[(4 + c) * anchors + a];
        if (s > best) { best = s; best_c = c; }
    }
    if (best > conf) {
        int slot = atomicAdd(count, 1);
        if (slot < max_out) {
            index[slot] = a;
            score[slot] = best;
            klass[slot] = best_c;
        }
    }
}

// window: per detection px0, px1, py0, py1 (prototype cells); offset: where its logits start.
__global__ void proto_logits(const float* protos, int nm, int ph, int pw, const float* coefs,
                             const int* window, const int* offset, float* logits)
{
    int k = blockIdx.y;
    int px0 = window[4 * k], px1 = window[4 * k + 1], py0 = window[4 * k + 2], py1 = window[4 * k + 3];
    int ww = px1 - px0, cells = ww * (py1 - py0);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cells; i += gridDim.x * blockDim.x) {
        int px = px0 + i % ww, py = py0 + i / ww;
        float acc = 0.0f;
        for (int m = 0; m < nm; ++m) acc += coefs[k * nm + m] * protos[(m * ph + py) * pw + px];
        logits[offset[k] + i] = acc;
    }
}

// box: per detection c0, c1, r0, r1 (frame pixels [c0, c1) x [r0, r1)); mask_offset: where its
// cropped mask starts. xfirst/xw: for each frame column, the first prototype column and taps
// weights (taps per pixel); yfirst/yw the same for rows. union_map: frame-sized, zeroed by the host.
__global__ void assemble_masks(const float* logits, const int* window, const int* offset, const int* box,
                               const int* mask_offset, const int* xfirst, const float* xw,
                               const int* yfirst, const float* yw, int taps, float threshold,
                               int frame_w, unsigned char* masks, unsigned char* union_map, int* areas)
{
    int k = blockIdx.y;
    int px0 = window[4 * k], px1 = window[4 * k + 1], py0 = window[4 * k + 2], py1 = window[4 * k + 3];
    int c0 = box[4 * k], c1 = box[4 * k + 1], r0 = box[4 * k + 2], r1 = box[4 * k + 3];
    int bw = c1 - c0, pixels = bw * (r1 - r0), ww = px1 - px0;
    const float* L = logits + offset[k];
    int found = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < pixels; i += gridDim.x * blockDim.x) {
        int c = c0 + i % bw, r = r0 + i / bw;
        float v = 0.0f;
        for (int a = 0; a < taps; ++a) {
            float wy = yw[r * taps + a];
            int py = yfirst[r] + a;
            if (wy == 0.0f || py >= py1) continue;
            float row = 0.0f;
            for (int b = 0; b < taps; ++b) {
                float wx = xw[c * taps + b];
                int px = xfirst[c] + b;
                if (wx == 0.0f || px >= px1) continue;
                row += wx * L[(py - py0) * ww + (px - px0)];
            }
            v += wy * row;
        }
        unsigned char inside = v > threshold ? 1 : 0;
        masks[mask_offset[k] + i] = inside;
        if (inside) {
            union_map[r * frame_w + c] = 1;  // every writer stores the same 1: no atomic needed
            ++found;
        }
    }
    if (found) atomicAdd(&areas[k], found);
}

__global__ void count_union(const unsigned char* union_map, int n, unsigned int* total)
{
    unsigned int local = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) local += union_map[i];
    if (local) atomicAdd(total, local);
}

// out (n x rows, row-major) = preds[row0 .. row0 + rows, idx[k]]: boxes of the candidates, or
// mask coefficients of the kept detections, without copying the whole prediction tensor back.
__global__ void gather_columns(const float* preds, int anchors, int row0, int rows, const int* idx, int n,
                               float* out)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * rows) return;
    int k = i / rows, r = i % rows;
    out[i] = preds[(row0 + r) * anchors + idx[k]];
}
