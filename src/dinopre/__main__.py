"""`python -m dinopre` runs the same command-line program as `dinopre`."""

from dinopre.cli import main

if __name__ == "__main__":
    main()
