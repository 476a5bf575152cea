"""One exception type for problems in what the user gave us.

A bad file, flag or model name should end a command with one clear line, not a traceback.
Library code raises `InputError("what is wrong, and where")`; the command-line entry points
(train.py, evaluate.py) catch it, print the message and exit with status 2.
"""


class InputError(Exception):
    """A problem with user input (a file, a flag, a model name) that one line can explain."""
