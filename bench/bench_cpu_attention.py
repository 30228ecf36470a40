"""CPU paged-attention kernels against the read bandwidth: a thin entry point for `offload bench kernels`
(offload/benchmarks/kernels.py, which ships with the package). Same arguments."""

from offload.benchmarks.kernels import main

if __name__ == "__main__":
    main()
