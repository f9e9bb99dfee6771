"""``python -m chainserve`` runs the ``chainserve`` command line (block servers are started this way)."""

from chainserve.cli import main

if __name__ == "__main__":
    main()
