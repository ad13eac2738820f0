"""`python -m data.prepare` from a checkout: the offline preparation CLI of `powerattn.data.prepare`."""

import sys

from powerattn.data.prepare import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m data.prepare"))
