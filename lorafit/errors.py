"""The one exception type the CLI shows to users without a traceback."""


class LorafitError(Exception):
    """A user-facing problem: bad recipe, missing file, adapter that does not fit the base.

    The message must say what was wrong, where (file, key path, module) and how to fix it.
    Anything else that escapes is a bug in lorafit and keeps its traceback.
    """
