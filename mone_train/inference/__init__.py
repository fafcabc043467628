"""``mone-generate``: text from a trained or exported model (``cli``)."""
