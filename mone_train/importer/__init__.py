"""Import of released Hugging Face models, and upcycling of dense ones (``mone-import``)."""
