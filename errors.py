"""
The one kind of error that is the user's to fix.

Design choices:
- A mistake found after the flags are parsed (a missing file, a run folder in use, CUDA asked for but absent, a
  baseline that cannot be compared) raises UsageError, or a subclass named for where it was found. main.py turns
  every one of them into one line on stderr and exit code 2, in one place; nothing else needs the parser.
"""


class UsageError(Exception):
    """A mistake of the user's: the message is one line saying what is wrong and what to do; exit code 2."""
