"""`python -m moe_dist.train --config X key=value ...` (also under torchrun): same as `moe-dist train`."""
import sys

from moe_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
