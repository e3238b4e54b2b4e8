"""``python -m pipeline <command>``: argument parsing only; every handler imports its stage when it runs."""
