// Frame -> engine input in one pass: 16-to-8-bit mapping (a lookup table), letterbox (bilinear
// resize with half-pixel centres, edge clamping, grey padding), BGR->RGB or grey->RGB, /255, CHW.
// The semantics of cellseg.edge.preprocess.Preprocessor (the numpy/OpenCV reference): the value
// resampled from the 8-bit image is rounded to a whole 8-bit level, as OpenCV's 8-bit resize does.
//
// One thread per input pixel (x, y) writes its three channels. Compiled at run time by pycuda
// (which wraps the file in extern "C"); the CPU tests compile the same file with g++.

__device__ float fetch8(const unsigned char* img8, const unsigned short* img16, const unsigned char* lut,
                        int index)
{
    // 16-bit frames go through the mapping's table; 8-bit ones are taken as they are.
    return img16 != 0 ? (float)lut[img16[index]] : (float)img8[index];
}

__global__ void letterbox(const unsigned char* img8, const unsigned short* img16, const unsigned char* lut,
                          int frame_w, int frame_h, int channels, int resized_w, int resized_h,
                          int pad_x, int pad_y, int input_w, int input_h, float* out)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= input_w || y >= input_h) return;
    int plane = input_w * input_h;
    int o = y * input_w + x;
    int rx = x - pad_x, ry = y - pad_y;
    const float s = 1.0f / 255.0f;  // multiplied, not divided: the reference's rounding exactly
    if (rx < 0 || ry < 0 || rx >= resized_w || ry >= resized_h) {
        float pad = 114.0f * s;
        out[o] = pad;
        out[plane + o] = pad;
        out[2 * plane + o] = pad;
        return;
    }
    float vals[3];
    if (resized_w == frame_w && resized_h == frame_h) {
        for (int c = 0; c < channels; ++c) vals[c] = fetch8(img8, img16, lut, (ry * frame_w + rx) * channels + c);
    } else {
        // Source coordinates of the pixel centre, clamped to the frame (OpenCV INTER_LINEAR).
        float sx = ((float)rx + 0.5f) * ((float)frame_w / (float)resized_w) - 0.5f;
        float sy = ((float)ry + 0.5f) * ((float)frame_h / (float)resized_h) - 0.5f;
        sx = fminf(fmaxf(sx, 0.0f), (float)(frame_w - 1));
        sy = fminf(fmaxf(sy, 0.0f), (float)(frame_h - 1));
        int x0 = (int)sx, y0 = (int)sy;
        int x1 = min(x0 + 1, frame_w - 1), y1 = min(y0 + 1, frame_h - 1);
        float fx = sx - (float)x0, fy = sy - (float)y0;
        for (int c = 0; c < channels; ++c) {
            float v00 = fetch8(img8, img16, lut, (y0 * frame_w + x0) * channels + c);
            float v01 = fetch8(img8, img16, lut, (y0 * frame_w + x1) * channels + c);
            float v10 = fetch8(img8, img16, lut, (y1 * frame_w + x0) * channels + c);
            float v11 = fetch8(img8, img16, lut, (y1 * frame_w + x1) * channels + c);
            float top = v00 + (v01 - v00) * fx;
            float bottom = v10 + (v11 - v10) * fx;
            vals[c] = rintf(top + (bottom - top) * fy);
        }
    }
    if (channels == 1) {
        float v = vals[0] * s;
        out[o] = v;
        out[plane + o] = v;
        out[2 * plane + o] = v;
    } else {  // BGR -> RGB
        out[o] = vals[2] * s;
        out[plane + o] = vals[1] * s;
        out[2 * plane + o] = vals[0] * s;
    }
}
