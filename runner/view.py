"""`python -m runner.view`: the command-line entry point of runner/tools/view.py."""

from runner.tools.view import main

if __name__ == "__main__":
    main()
