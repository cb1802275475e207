"""Same as ``philora bench``: philora vs TRL + PEFT on the same shape, data and settings.

    python bench/run.py --help
"""

import sys

from philora.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
