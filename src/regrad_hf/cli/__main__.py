"""`python -m regrad_hf.cli ...`: the `regrad` command."""

from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
