"""The one error type the export CLI turns into a single line and a non-zero exit."""


class ExportError(Exception):
    """Bad input or a failed check; the message says what is wrong and what to change."""
