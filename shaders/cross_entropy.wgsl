// cross_entropy kernels: to be written
