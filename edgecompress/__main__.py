"""`python -m edgecompress`."""

from edgecompress.cli import main

if __name__ == "__main__":
    main()
