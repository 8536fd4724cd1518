"""The one exception type for problems a user can fix."""


class VAEFTError(Exception):
    """A user-facing problem: bad input, missing file, wrong setting.

    The message names the input and says what to do. Nodes show it in ComfyUI's
    error dialog, the CLI prints it without a traceback.
    """
