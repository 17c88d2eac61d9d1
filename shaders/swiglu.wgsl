// swiglu kernels: to be written
