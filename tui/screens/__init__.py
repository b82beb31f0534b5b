"""Screens: the main screen, help, confirm-quit, path dialogs and the error modal."""
