"""End-to-end decode benchmark: a thin entry point for `offload bench decode`
(offload/benchmarks/decode.py, which ships with the package). Same arguments."""

from offload.benchmarks.decode import main

if __name__ == "__main__":
    main()
