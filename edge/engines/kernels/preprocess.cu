// Frame -> engine input in one pass: 16-to-8-bit mapping (a lookup table), letterbox (bilinear
// resize with half-pixel centres, edge clamping, grey padding), BGR->RGB or grey->RGB, /255, CHW,
// written as float32 or as IEEE half (for engines with an FP16 input). The semantics of cellseg.edge.preprocess.Preprocessor (the numpy/OpenCV reference): the
// value resampled from the 8-bit image is rounded to a whole 8-bit level, as OpenCV's 8-bit
// resize does.
//
// One thread per input pixel (x, y) writes its three channels. Compiled at run time by pycuda
// (which wraps the file in extern "C", so no C++ headers such as cuda_fp16.h); the CPU tests
// compile the same file with g++.

__device__ float fetch8(const unsigned char* img8, const unsigned short* img16, const unsigned char* lut,
                        int index)
{
    // 16-bit frames go through the mapping's table; 8-bit ones are taken as they are.
    return img16 != 0 ? (float)lut[img16[index]] : (float)img8[index];
}

// The input's R, G and B at input pixel (x, y), scaled to [0, 1].
__device__ void input_pixel(const unsigned char* img8, const unsigned short* img16, const unsigned char* lut,
                            int frame_w, int frame_h, int channels, int resized_w, int resized_h,
                            int pad_x, int pad_y, int x, int y, float* rgb)
{
    int rx = x - pad_x, ry = y - pad_y;
    const float s = 1.0f / 255.0f;  // multiplied, not divided: the reference's rounding exactly
    if (rx < 0 || ry < 0 || rx >= resized_w || ry >= resized_h) {
        rgb[0] = rgb[1] = rgb[2] = 114.0f * s;
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
        rgb[0] = rgb[1] = rgb[2] = vals[0] * s;
    } else {  // BGR -> RGB
        rgb[0] = vals[2] * s;
        rgb[1] = vals[1] * s;
        rgb[2] = vals[0] * s;
    }
}

// float32 -> IEEE 754 half (binary16) bits, rounded to nearest, ties to even: what
// cvt.rn.f16.f32 and numpy's astype(float16) do, including subnormals, overflow to infinity
// and NaN. Integer arithmetic only, so pycuda's extern "C" source needs no cuda_fp16.h.
__device__ unsigned short half_bits(float value)
{
    unsigned int f = __float_as_uint(value);
    unsigned int sign = (f >> 16) & 0x8000u;
    unsigned int mag = f & 0x7fffffffu;
    if (mag > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
    if (mag >= 0x47800000u) return (unsigned short)(sign | 0x7c00u);  // >= 65536 (or inf): infinity
    unsigned int h, rest, halfway;
    if (mag < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
        unsigned int e = mag >> 23;
        if (e < 102u) return (unsigned short)sign;  // below 2^-25: rounds to zero
        unsigned int m = (mag & 0x7fffffu) | 0x800000u;
        unsigned int shift = 126u - e;  // 14..24
        h = m >> shift;
        rest = m & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1u);
    } else {  // a normal half: exponent rebiased from 127 to 15, 13 mantissa bits dropped
        h = (mag >> 13) - (112u << 10);
        rest = mag & 0x1fffu;
        halfway = 0x1000u;
    }
    // A carry out of the mantissa steps the exponent, up to infinity: still the right rounding.
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}

// Writes float32 to `out`, or IEEE half bits to `out_half` for an engine with an FP16 input:
// exactly one of the two is non-null.
__global__ void letterbox(const unsigned char* img8, const unsigned short* img16, const unsigned char* lut,
                          int frame_w, int frame_h, int channels, int resized_w, int resized_h,
                          int pad_x, int pad_y, int input_w, int input_h, float* out, unsigned short* out_half)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= input_w || y >= input_h) return;
    float rgb[3];
    input_pixel(img8, img16, lut, frame_w, frame_h, channels, resized_w, resized_h, pad_x, pad_y, x, y, rgb);
    int plane = input_w * input_h, o = y * input_w + x;
    for (int c = 0; c < 3; ++c) {
        if (out != 0) out[c * plane + o] = rgb[c];
        else out_half[c * plane + o] = half_bits(rgb[c]);
    }
}
