"""diffeditor-ray: ``diffeditor edit ... --ray``, batches of edits on Ray worker actors."""

__version__ = "0.1.0"
