"""Theme files (TOML) shipped with unlearn-tui; ``tui.themes`` turns them into Textual themes."""
