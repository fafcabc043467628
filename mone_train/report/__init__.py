"""``mone-report``: finished runs compared in a table and plots (``cli``)."""
