"""``python -m bench.validator``."""

from bench.validator import main

if __name__ == "__main__":
    main()
