"""The Textual front end of unlearn-tui.

Importing this package imports nothing heavy: ``tui.cli`` must start without
Textual or torch, and the app imports torch only inside the work that needs it.
"""
