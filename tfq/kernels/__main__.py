"""``python -m tfq.kernels``: build the fused kernels and check that they load."""
import sys

from tfq import kernels


def main():
    kernels.build()
    if not kernels.available():
        sys.exit("tfq: the fused kernels were built but do not load (see the warning above)")
    print("tfq: fused kernels ready:", kernels.LIBRARY)


if __name__ == "__main__":
    main()
