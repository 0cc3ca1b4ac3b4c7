// lowbit_native::linear: lowbit's C GEMV kernels (lowbit_cpu.c, loaded by lowbit.kernels.native) as a
// PyTorch operator implemented in C++, so a compiled graph calls them with no Python frame in between.
// Built by lowbit.kernels.torch_ops with torch.utils.cpp_extension; the kernels' addresses are handed
// over once by set_kernels (the C library stays the one lowbit.kernels.native checked and loaded).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using wo_fn = int (*)(const float *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, int, int, int64_t,
                      const void *, int, const void *, int, const float *, int64_t, const float *, float *, int);
using a8_fn = int (*)(const float *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, int, int, int64_t,
                      const void *, int, const void *, int, const float *, float *, int);

wo_fn g_wo = nullptr;
a8_fn g_a8 = nullptr;

void set_kernels(int64_t wo, int64_t a8) {
    g_wo = reinterpret_cast<wo_fn>(wo);
    g_a8 = reinterpret_cast<a8_fn>(a8);
}

template <typename T>
const T *ptr_or_null(const std::optional<at::Tensor> &t) {
    return t.has_value() ? static_cast<const T *>(t->data_ptr()) : nullptr;
}

// y (..., N) float32 = x (..., K) float32 contiguous @ W.T + bias, W the stored codes (N, row_bytes).
at::Tensor linear(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scale,
                  const std::optional<at::Tensor> &zero_point, const std::optional<at::Tensor> &lut,
                  const std::optional<at::Tensor> &bias, int64_t code, int64_t offset, int64_t group,
                  int64_t scale_kind, int64_t zp_kind, int64_t lut_stride, bool a8) {
    TORCH_CHECK(g_wo != nullptr && g_a8 != nullptr, "lowbit_native: kernels not set");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "lowbit_native.linear: x must be float32, contiguous");
    const int64_t K = x.size(-1), N = qweight.size(0), M = K ? x.numel() / K : 0;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    const float *b = ptr_or_null<float>(bias);
    const void *zp = zero_point.has_value() ? zero_point->data_ptr() : nullptr;
    const int threads = at::get_num_threads();
    int rc;
    if (a8) {
        rc = g_a8(x.data_ptr<float>(), M, K, qweight.data_ptr<uint8_t>(), N, qweight.size(1), (int)code,
                  (int)offset, group, scale.data_ptr(), (int)scale_kind, zp, (int)zp_kind, b,
                  y.data_ptr<float>(), threads);
    } else {
        rc = g_wo(x.data_ptr<float>(), M, K, qweight.data_ptr<uint8_t>(), N, qweight.size(1), (int)code,
                  (int)offset, group, scale.data_ptr(), (int)scale_kind, zp, (int)zp_kind, ptr_or_null<float>(lut),
                  lut_stride, b, y.data_ptr<float>(), threads);
    }
    TORCH_CHECK(rc != -1, "lowbit native kernel could not allocate its activation buffer");
    TORCH_CHECK(rc == 0, "lowbit native kernel refused its arguments (code ", rc, ")");
    return y;
}

}  // namespace

TORCH_LIBRARY(lowbit_native, m) {
    m.def("set_kernels(int wo, int a8) -> ()", &set_kernels);
    m.def("linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, Tensor? lut, Tensor? bias, "
          "int code, int offset, int group, int scale_kind, int zp_kind, int lut_stride, bool a8) -> Tensor");
    m.impl("linear", c10::DispatchKey::CPU, &linear);
}
