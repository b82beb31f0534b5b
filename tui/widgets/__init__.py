"""The panes of the main screen (one per module) and small helper widgets."""
