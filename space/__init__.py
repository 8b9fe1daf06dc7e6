"""The Gradio demo: `ui` (the Blocks page), `render` (overlays, peak regions, files), `serving`
(model loading, device, limits). `app.py` builds and launches it; nothing runs at import."""
