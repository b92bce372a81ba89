"""Project exceptions: each message names what is wrong, where, and how to fix it.

The CLI prints a RunnerError as one line (or one line per problem) and exits non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""


class RunnerError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(RunnerError):
    """A configuration value or combination that cannot work."""


class InputError(RunnerError):
    """Conversation files that cannot be read or validated; lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{len(problems)} problem(s) in the input, nothing was generated:\n{shown}")


class ModelLoadError(RunnerError):
    """A model or tokenizer that cannot be found, converted or loaded."""


class RunInterrupted(RunnerError):
    """The run stopped on a signal with its complete records kept: resume it to go on."""


class Interrupted(BaseException):
    """SIGTERM arrived (SIGINT arrives as KeyboardInterrupt): the run ends as interrupted. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on its way (in a library
    loading the model) swallows it and lets the run go on."""
