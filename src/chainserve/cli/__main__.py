"""``python -m chainserve.cli`` runs the ``chainserve`` command line."""

from chainserve.cli import main

if __name__ == "__main__":
    main()
