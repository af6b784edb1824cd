// The Python module mmacmix.ops._ext: every compiled CPU kernel.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmacmix's CPU kernels: ACmix local attention, X-volution PSSA";
  m.def("local_attention_forward", &mmacmix::local_attention_forward,
        "(out, lse) for contiguous q (N, D, Ho, Wo) and k, v (N, D, H, W)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kernel_size"),
        py::arg("stride"));
  m.def("local_attention_backward", &mmacmix::local_attention_backward,
        "(grad_q, grad_k, grad_v) from grad_out and the forward's lse",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("lse"), py::arg("kernel_size"), py::arg("stride"));
  m.def(
      "cpu_isa", [] { return mmacmix::cpu_isa_name(mmacmix::active_cpu_isa()); },
      "instruction set the local-attention kernel runs: avx512, avx2 or "
      "baseline");
  m.def("supported_cpu_isas", &mmacmix::supported_cpu_isas,
        "instruction sets this build and CPU can run, narrowest first");
  m.def("set_cpu_isa", &mmacmix::set_cpu_isa,
        "selects the local-attention kernel's instruction set (auto: the "
        "widest supported); returns the one now active",
        py::arg("name"));
  m.def("pixel_shift_forward", &mmacmix::pixel_shift_forward,
        "weight @ shift products of x (added onto base when given)",
        py::arg("x"), py::arg("weight"), py::arg("base"),
        py::arg("distance"), py::arg("stride"), py::arg("tile_positions"),
        py::arg("block_bytes"));
  m.def("pixel_shift_backward", &mmacmix::pixel_shift_backward,
        "(grad_x, grad_weight) of pixel_shift_forward, None where not needed",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("distance"),
        py::arg("stride"), py::arg("need_x"), py::arg("need_weight"),
        py::arg("tile_positions"), py::arg("block_bytes"));
}
