// nf4 kernels: to be written
