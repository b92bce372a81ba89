"""`python -m runner.export`: the command-line entry point of runner/tools/export.py."""

from runner.tools.export import main

if __name__ == "__main__":
    main()
