// rope kernels: to be written
