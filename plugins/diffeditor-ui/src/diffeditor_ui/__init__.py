"""``diffeditor ui``: a local Gradio page with one tab per installed task, generated from each
task's spec model (see :mod:`diffeditor_ui.form`)."""

__version__ = "0.1.0"
