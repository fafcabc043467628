"""``mone-plan``: memory, traffic and FLOPs of a run before it starts (``plan``), the layout
search's cost model (``layout_search``), the GPU facts both use (``hardware``), and the CLI."""
