"""`python -m runner.merge`: the command-line entry point of runner/tools/merge.py."""

from runner.tools.merge import main

if __name__ == "__main__":
    main()
