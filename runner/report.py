"""`python -m runner.report`: the command-line entry point of runner/tools/report.py."""

from runner.tools.report import main

if __name__ == "__main__":
    main()
